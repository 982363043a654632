"""The model: where a VAE comes from (`source`), the exact single-frame 2-D rewrite (`single_frame`), the two
graphs vaebuild exports and builds (`graphs`), sample inputs (`inputs`) and precisions (`precision`).

This module imports nothing heavy: it names the graphs and their ONNX files for every other module.
"""

GRAPHS = ("encoder", "decoder")
# The split graphs of exact tiles (`vaebuild.model.tiling`), built into a folder by `--tile`.
TILE_GRAPHS = ("decoder_head", "decoder_tail", "encoder_down", "encoder_rest")
ONNX_FILES = {graph: f"vae_{graph}.onnx" for graph in GRAPHS}
