"""Packages' time with cuDNN picking convolution engines by timing instead of by heuristics (issue 10; step 15 of docs/design/speed_notes.md).

    python benchmarks/kernels/cudnn_search.py DIR

DIR: a `vaebuild static --backend inductor` folder with a 1_1 (1328x1328) pair. In one process, twice over:
the decoder and the encoder plain, then under `torch.backends.cudnn.flags(benchmark=True)` with PyTorch's
default search limit (10 engines per shape) and with the limit lifted (0: every engine cuDNN offers), each a
CUDA-event median of 30 calls after 5 warm-ups, with the max abs difference from the plain output. Prints one
line per graph. `benchmarks/kernels/conv_rates.py` shows the one shape where the full search finds a faster engine
(192 -> 384 channels at 332x332: 0.247 against 0.410 ms alone).
"""

import sys
from types import SimpleNamespace

import torch

from conv_rates import median_ms  # benchmarks/kernels/ sibling: the script's folder is on sys.path
from vaebuild.model.inputs import sample_input
from vaebuild.runtime import VaeRuntime

SHAPES = {"decoder": (1, 16, 1, 166, 166), "encoder": (1, 3, 1, 1328, 1328)}


def main():
    runtime = VaeRuntime(sys.argv[1], resident="all", allow_fallback=False)
    config = SimpleNamespace(**runtime.manifest["vae_config"])
    for graph, shape in SHAPES.items():
        x = sample_input(graph, shape, config).to("cuda", torch.bfloat16)
        run = runtime.decode if graph == "decoder" else runtime.encode
        plain = run(x).float()
        rows = []
        for _ in range(2):
            rows.append(("plain", round(median_ms(lambda: run(x), runs=30, warmup=5), 3)))
            with torch.backends.cudnn.flags(enabled=True, benchmark=True, deterministic=False, allow_tf32=False):
                for limit in (10, 0):
                    torch.backends.cudnn.benchmark_limit = limit
                    max_abs = (run(x).float() - plain).abs().max().item()
                    rows.append((f"benchmark limit {limit}", round(median_ms(lambda: run(x), runs=30, warmup=5), 3), max_abs))
            torch.backends.cudnn.benchmark_limit = 10
        print(graph, rows, flush=True)


if __name__ == "__main__":
    main()
