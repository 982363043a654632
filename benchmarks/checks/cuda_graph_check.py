"""CUDA-graph replay of a folder's AOTInductor packages against their plain calls, on a CUDA GPU.

    python benchmarks/checks/cuda_graph_check.py FOLDER [--atol 0]

For each package of FOLDER (a `vaebuild static` or `multiprofile --backend inductor` build) and each of its
profiles' opt shapes: two different inputs through `VaeRuntime(cuda_graphs=True)` (the first call captures,
the second replays the captured graph on the new input) and through a plain `VaeRuntime`. Prints per row the
max abs difference of each call, the first (capturing) call's time and the memory the graph's pool keeps
(reserved by torch's allocator after `empty_cache`); exits 1
when a difference exceeds --atol (default 0: a replay runs the same kernels on the same data).
"""

import argparse
import sys
import time
from types import SimpleNamespace

import torch

from vaebuild.model.inputs import sample_input
from vaebuild.runtime import VaeRuntime, read_engine_dir


def check(folder, atol):
    """Rows of (engine, shape, max abs of call 1, of call 2, capture ms, graph MiB); True when all are within atol."""
    manifest, entries = read_engine_dir(folder)
    config = SimpleNamespace(**manifest["vae_config"])
    plain = VaeRuntime(folder, resident="lazy", allow_fallback=False)
    graphed = VaeRuntime(folder, resident="lazy", allow_fallback=False, cuda_graphs=True)
    rows, ok = [], True
    for graph, graph_entries in entries.items():
        call = {"encoder": "encode", "decoder": "decode"}[graph]
        for entry in graph_entries:
            for profile in entry.profiles:
                x1, x2 = (sample_input(graph, profile.opt, config, seed).to("cuda", torch.bfloat16) for seed in (1, 2))
                graphed.prepare(graph, profile.opt)  # load first: only the capture is timed below
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                reserved = torch.cuda.memory_reserved()
                start = time.perf_counter()
                first = getattr(graphed, call)(x1)
                torch.cuda.synchronize()
                capture_ms = (time.perf_counter() - start) * 1e3
                torch.cuda.empty_cache()  # what stays reserved is the graph's pool (and the returned copy)
                held_mib = (torch.cuda.memory_reserved() - reserved) / 2**20
                second = getattr(graphed, call)(x2)
                diffs = [(out.float() - getattr(plain, call)(x).float()).abs().max().item()
                         for out, x in ((first, x1), (second, x2))]
                assert graphed.last_route[graph].kind == "engine"
                ok &= max(diffs) <= atol
                rows.append((entry.rel_path, list(profile.opt), *diffs, capture_ms, held_mib))
            plain.release()
            graphed.release()
    return rows, ok


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--atol", type=float, default=0.0)
    args = parser.parse_args()
    rows, ok = check(args.folder, args.atol)
    print(f"CUDA-graph replay vs plain calls: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| engine | input shape | max abs, call 1 (capture) | max abs, call 2 (replay) | first call ms | graph MiB |")
    print("|---|---|---|---|---|---|")
    for engine, shape, d1, d2, ms, mib in rows:
        print(f"| {engine} | {shape} | {d1:.3g} | {d2:.3g} | {ms:.0f} | {mib:.0f} |")
    print("all equal within atol" if ok else f"DIFFERENT beyond atol {args.atol}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
