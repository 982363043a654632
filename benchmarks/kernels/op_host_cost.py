"""Host-side cost per call of vaebuild's custom ops on a CUDA GPU (what a package pays per call outside the GPU).

    python3 benchmarks/kernels/op_host_cost.py

Each op on a tiny input (its GPU work negligible), 5 x 200 calls without synchronizing: CPU wall time per call,
median of the 5, next to `F.conv2d` on the same input. Prints one line per op.
"""

import statistics
import time

import torch
import torch.nn.functional as F

import vaebuild.kernels.attention  # noqa: F401 - registers vaebuild::attention_d384
import vaebuild.kernels.conv_norm  # noqa: F401 - registers vaebuild::conv3x3_rms_silu and conv3x3_add


def main():
    cl = torch.channels_last
    x = torch.randn(1, 96, 32, 32, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=cl)
    w = (0.03 * torch.randn(96, 96, 3, 3, device="cuda", dtype=torch.bfloat16)).contiguous(memory_format=cl)
    b = torch.zeros(96, device="cuda", dtype=torch.bfloat16)
    g = torch.ones(96, device="cuda", dtype=torch.bfloat16)
    qkv = torch.randn(1, 1, 256, 1152, device="cuda", dtype=torch.bfloat16).chunk(3, -1)
    ops = {
        "conv3x3_rms_silu": lambda: torch.ops.vaebuild.conv3x3_rms_silu(x, w, b, g),
        "conv3x3_add": lambda: torch.ops.vaebuild.conv3x3_add(x, w, b, x, 1),
        "attention_d384": lambda: torch.ops.vaebuild.attention_d384(*qkv),
        "F.conv2d (reference)": lambda: F.conv2d(x, w, b, padding=1),
    }
    for name, fn in ops.items():
        fn()
        torch.cuda.synchronize()
        per_call = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(200):
                fn()
            per_call.append((time.perf_counter() - start) / 200 * 1e6)
            torch.cuda.synchronize()
        print(f"{name}: {statistics.median(per_call):.1f} us host time per call (median of 5 x 200 calls)", flush=True)


if __name__ == "__main__":
    main()
