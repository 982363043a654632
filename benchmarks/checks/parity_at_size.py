"""ONNX Runtime vs PyTorch for a whole export at one (large) size: the numbers quoted in issue notes.

    python benchmarks/checks/parity_at_size.py --random-init --precision fp16 --size 1328x1328 --onnx build/onnx-fp16

Exports into --onnx unless an identical export is there, then runs each graph once in ONNX Runtime
(CPU; a bf16 graph as its float32 twin) against diffusers' unfolded 3-D graphs in float32.
"""

import argparse

from vaebuild.export.onnx import ExportOptions, export_unless_current
from vaebuild.model.graphs import build_graphs, describe_graphs
from vaebuild.model.inputs import sample_input
from vaebuild.model.source import ModelSource, load_vae
from vaebuild.export.check import compare_with_torch


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model")
    parser.add_argument("--random-init", action="store_true")
    parser.add_argument("--precision", default="fp16")
    parser.add_argument("--size", default="1328x1328", help="WxH image size")
    parser.add_argument("--onnx", required=True)
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))
    source = ModelSource(model=args.model, random_init=args.random_init)
    vae = load_vae(source)
    export_unless_current(vae, source.describe(), args.onnx, ExportOptions(precision=args.precision))
    for description, reference in zip(describe_graphs(vae), build_graphs(vae, fold=False)):
        hw = (height, width) if description.name == "encoder" else (height // 8, width // 8)
        feed = sample_input(description.name, description.input_shape(1, *hw), vae.config, seed=0)
        result = compare_with_torch(
            description.name, f"{args.onnx}/{description.file_name}", reference, feed, tolerance=float("inf")
        )
        print(
            f"{args.precision} {description.name} {list(feed.shape)} ({result.executed_as}): "
            f"max abs {result.max_abs:.4g}, max rel {result.max_rel:.4g}, {result.seconds:.0f} s"
        )


if __name__ == "__main__":
    main()
