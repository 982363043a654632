"""Load costs as a fresh process pays them: `python -m vaebuild.bench.load_probe FOLDER OUT.json --device D [--engines a,b]`.

Writes one JSON object to OUT.json. Per engine, in load order: `load_ms` (the runtime's load, `import torch` and
CUDA initialisation excluded; the first weight-free package of a folder also reads its shared
weights) and `gpu_mb_held` (the drop in free CUDA memory across that load). `resident_mb`: the free
memory all of those loads took together. `vaebuild bench` runs it in a subprocess per engine pair.
"""

import argparse
import json


def probe(folder, device, engines=None):
    """Load `engines` (default: all) of `folder` on `device` in order; return their costs."""
    import torch

    from vaebuild.runtime import VaeRuntime

    device = torch.device(device)
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.zeros(1, device=device)  # create the CUDA context before anything is measured
        torch.cuda.synchronize(device)
        free_before = torch.cuda.mem_get_info(device)[0]
    runtime = VaeRuntime(folder, device=device, resident="lazy", allow_fallback=False)
    result = {"engines": {}}
    for rel_path in engines or runtime.engine_paths:
        runtime.load(rel_path)
        result["engines"][rel_path] = {
            "load_ms": round(runtime.load_seconds[rel_path] * 1e3, 2),
            "gpu_mb_held": round(runtime.engine_bytes[rel_path] / 2**20, 1) if on_cuda else None,
        }
    result["resident_mb"] = round((free_before - torch.cuda.mem_get_info(device)[0]) / 2**20, 1) if on_cuda else None
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("result", help="JSON file to write")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--engines", default=None, help="comma-separated relative paths (default: every engine)")
    args = parser.parse_args(argv)
    engines = [e for e in args.engines.split(",") if e] if args.engines else None
    with open(args.result, "w") as f:
        json.dump(probe(args.folder, args.device, engines), f)


if __name__ == "__main__":
    main()
