"""The Qwen-Image VAE mid-block attention alone: one head of dim 384 over h*w tokens.

Which exact attention kernel reaches the compute floor? Run on a CUDA GPU:
    python3 benchmarks/kernels/attention_probe.py --tokens 27556 --json attention.json
(27,556 tokens = the 166x166 latent of a 1328x1328 image.) The H100 run is in git at tag results-archive:
`git show results-archive:benchmarks/results/attention_h100.md`.
"""

import argparse
import json

import torch
import torch.nn.functional as F

from vaebuild.bench import summarize, time_calls

H100_BF16_TFLOPS = 790.0  # measured dense bf16 matmul rate on an H100


def attention_variants(q, k, v):
    """Every exact formulation tried: SDPA's backends and FlexAttention with smaller tiles."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    variants = {"default": lambda: F.scaled_dot_product_attention(q, k, v)}
    for backend in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
        def run(backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v)

        variants[backend.name.lower()] = run
    flex = torch.compile(flex_attention, dynamic=False)
    variants["flex_attention"] = lambda: flex(q, k, v)
    for block_m, block_n, stages in ((64, 32, 1), (64, 64, 1), (128, 32, 1), (64, 32, 2)):
        options = {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_stages": stages, "num_warps": 4}
        variants[f"flex_{block_m}x{block_n}s{stages}"] = lambda options=options: flex(q, k, v, kernel_options=options)
    return variants


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=166 * 166)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--json", default="attention.json")
    args = parser.parse_args()
    floor_ms = 4 * args.tokens**2 * args.dim / (H100_BF16_TFLOPS * 1e12) * 1e3
    q, k, v = (torch.randn(1, 1, args.tokens, args.dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    rows = []
    for name, fn in attention_variants(q, k, v).items():
        try:
            out = fn()
            rel = ((out.float() - reference).norm() / reference.norm()).item()
            timing = summarize(time_calls(fn, q.device, warmup=3, runs=20))
            row = {"variant": name, "ms": timing["median_ms"], "p90": timing["p90_ms"], "rel_err": rel, "floor_ms": floor_ms}
        except Exception as exc:  # noqa: BLE001 - an unsupported kernel is a result, not a crash
            row = {"variant": name, "error": " ".join(str(exc).split())[:200]}
        print(row, flush=True)
        rows.append(row)
    with open(args.json, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
