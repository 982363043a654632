"""Weight-free packages serve another checkpoint of the same architecture: a check on a GPU host.

    python benchmarks/checks/weights_swap_check.py FOLDER [--size 512x512]

Writes the 2-D graphs of `--random-init --seed 1` (not the folder's seed-0 weights) at the folder's
precision with `weights_file.write_weights_file`, runs the folder's decoder package for that size with
`VaeRuntime(folder, weights=...)`, and prints max |package - eager 2-D decoder| for the new weights and,
for contrast, for the folder's own weights.
"""

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from vaebuild.model.graphs import build_graphs  # noqa: E402
from vaebuild.model.inputs import sample_latents  # noqa: E402
from vaebuild.model.source import ModelSource, load_vae  # noqa: E402
from vaebuild.model.precision import get_precision  # noqa: E402
from vaebuild.runtime import VaeRuntime  # noqa: E402
from vaebuild.weights_file import write_weights_file  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--size", default="512x512", help="WIDTHxHEIGHT of a static package in the folder")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    runtime = VaeRuntime(args.folder, resident="lazy", allow_fallback=False)
    dtype = get_precision(runtime.manifest["precision"]).dtype
    vae = load_vae(ModelSource(random_init=True, seed=1))
    graphs = [g.to(device="cuda", dtype=dtype) for g in build_graphs(vae, fast_attention=True, fused_norms=True)]
    z = sample_latents((1, vae.config.z_dim, 1, height // 8, width // 8), vae.config, seed=3).to("cuda", dtype)
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        path = Path(tmp) / "seed1.safetensors"
        write_weights_file(path, graphs)
        swapped = VaeRuntime(args.folder, weights=path, resident="lazy", allow_fallback=False).decode(z)
        own = runtime.decode(z)
        reference = graphs[1](z)
    print(f"{args.size}: max |package with seed-1 weights - eager seed-1| = "
          f"{(swapped.float() - reference.float()).abs().max().item():.4g}; "
          f"max |package with its own weights - eager seed-1| = {(own.float() - reference.float()).abs().max().item():.4g}")


if __name__ == "__main__":
    main()
