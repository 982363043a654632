"""The model: where a VAE comes from (`source`), the exact single-frame 2-D rewrite (`single_frame`), the two
graphs vaebuild exports and builds (`graphs`), sample inputs (`inputs`) and precisions (`precision`).

This module imports nothing heavy: it names the graphs and their ONNX files for every other module.
"""

GRAPHS = ("encoder", "decoder")
ONNX_FILES = {graph: f"vae_{graph}.onnx" for graph in GRAPHS}
