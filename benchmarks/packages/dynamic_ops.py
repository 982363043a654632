"""Probe: vaebuild's ops inside dynamic-shape packages (issue 26's first candidate mechanism).

    python benchmarks/packages/dynamic_ops.py --engines I2I_DIR --out OUT [--fused-norms]

I2I_DIR is an inductor multi-profile folder (`vaebuild multiprofile --backend inductor ...`). Its packages keep
inductor's own convolution kernels (`uses_fused_norms` is static-only). This compiles the same two graphs, over the
same profiles and from the folder's weights file, with `vaebuild::attention_d384` (and, with --fused-norms, the
fused convolution + norm ops), in two worker processes, and writes OUT/i2i_ops: a copy of the folder's manifest
pointing at the new packages (the weights file linked). Time both folders in one run with
`vaebuild bench --engines I2I_DIR --engines OUT/i2i_ops --sizes ...`; `vaebuild verify OUT/i2i_ops` checks it.
"""

import argparse
import json
import multiprocessing
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from vaebuild.backends.inductor.compile import compile_package  # noqa: E402
from vaebuild.fileio import write_json  # noqa: E402
from vaebuild.manifest import MANIFEST_NAME  # noqa: E402
from vaebuild.weights_file import WEIGHTS_NAME  # noqa: E402


def compile_request_for(manifest, folder, entry, engine_path, device, **kernel_choices):
    """The `compile_package` request that rebuilds one `entry` of `folder`'s manifest at `engine_path`."""
    return {
        "graph": entry["graph"],
        "vae_config": manifest["vae_config"],
        "weights_path": str(folder / WEIGHTS_NAME),
        "precision": manifest["precision"],
        "device": device,
        "engine_path": str(engine_path),
        "profiles": [{entry["input"]: [p["input"][level] for level in ("min", "opt", "max")]}
                     for p in entry["profiles"]],
        "input_name": entry["input"],
        "output_name": entry["output"],
        "spatial_multiple": 8 if entry["graph"] == "encoder" else 1,
        "embed_weights": False,
        **kernel_choices,
    }


def requests_for(folder, out, fused_norms, device):
    """One `compile_package` request per engine of the multi-profile `folder`, with vaebuild's ops on."""
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    if manifest["kind"] != "multiprofile":
        sys.exit(f"{folder} holds a {manifest['kind']} build; pass a multi-profile inductor folder")
    requests = [compile_request_for(manifest, folder, entry, out / entry["path"], device, fast_kernels=True,
                                    fused_norms=fused_norms) for entry in manifest["engines"]]
    return manifest, requests


def _compile(request):
    info = compile_package(request)
    return request["engine_path"], info.sha256, info.size_bytes, info.build_seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", required=True, type=Path, help="an inductor multi-profile folder")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--fused-norms", action="store_true", help="also the fused convolution + norm ops")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test")
    args = parser.parse_args()
    out = args.out / "i2i_ops"
    out.mkdir(parents=True, exist_ok=True)
    manifest, requests = requests_for(args.engines.resolve(), out, args.fused_norms, args.device)
    with multiprocessing.get_context("spawn").Pool(len(requests)) as pool:
        built = {path: rest for path, *rest in pool.map(_compile, requests)}
    for entry in manifest["engines"]:
        sha256, size_bytes, seconds = built[str(out / entry["path"])]
        entry.update(sha256=sha256, size_bytes=size_bytes, build_seconds=round(seconds, 2),
                     fast_kernels=True, fused_norms=args.fused_norms)
        print(f"{entry['path']}: compiled with vaebuild's ops in {seconds:.0f} s, {size_bytes / 1e6:.1f} MB")
    weights = out / WEIGHTS_NAME
    if not weights.exists():
        weights.symlink_to((args.engines / WEIGHTS_NAME).resolve())
    write_json(out / MANIFEST_NAME, manifest)


if __name__ == "__main__":
    main()
