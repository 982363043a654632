"""The warp-specialized Gluon attention kernel (vaebuild/kernels/attention_fwd_gluon.py) on a Hopper GPU.

    python3 benchmarks/kernels/attention_ws_kernel.py --out results_dir

Every `GluonConfig` of VARIANTS, and the Triton kernel's default (vaebuild/kernels/attention_fwd_triton.py) before and
after them, each in its own process (a kernel that deadlocks is reported, not waited for): max abs and
relative error against fp32 math attention at 1, 63, 64, 127, 129, 1000 and 27,556 tokens in bf16 and at 63
and 27,556 in fp16 (q, k, v views of one [1, 1, N, 1152] tensor, as diffusers makes them; the output memory
poisoned with NaN first), then the `triton.testing.do_bench` median at 27,556 tokens (1328x1328) next to
SDPA's default kernel in the same process. Writes attention_ws_kernel_h100.md and .json under --out.
"""

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

TOKENS = 166 * 166
FLOOR_MS = 4 * TOKENS**2 * 384 / 790e12 * 1e3
VARIANTS = {
    "default": {},
    "no lazy rescale": {"lazy_rescale": False},
    "no ping-pong": {"pingpong": False},
    "splits 1": {"splits": 1},
    "splits 2": {"splits": 2},
    "splits 4": {"splits": 4},
    "BLOCK_N 16": {"block_n": 16},
}
CHECKS = [("bfloat16", n) for n in (1, 63, 64, 127, 129, 1000, TOKENS)] + [("float16", n) for n in (63, TOKENS)]


def measure(name):
    """Child process: errors and time of one variant ("triton" = the Triton kernel); prints one JSON row."""
    import torch
    import torch.nn.functional as F
    import triton
    from attention_kernel import errors, poisoned, qkv_views, reference  # benchmarks/kernels/ sibling: on sys.path

    from vaebuild.kernels import attention_fwd_gluon as attention_gluon, attention_fwd_triton as attention_triton

    if name == "triton":
        forward = attention_triton.attention_forward
        row = {"variant": "Triton kernel (attention_triton default)", **asdict(attention_triton.DEFAULT_CONFIG)}
    else:
        config = replace(attention_gluon.DEFAULT_GLUON_CONFIG, **VARIANTS[name])
        forward = lambda q, k, v: attention_gluon.attention_forward(q, k, v, config)  # noqa: E731
        row = {"variant": name, **asdict(config)}

    for dtype_name, n in CHECKS:
        dtype = getattr(torch, dtype_name)
        q, k, v = qkv_views(n, dtype, n)
        error = errors(poisoned(lambda: forward(q, k, v), q.shape, dtype), reference(q, k, v))
        row[f"{dtype_name} {n}"] = [error["max_abs"], error["rel"]]
    q, k, v = qkv_views(TOKENS, torch.bfloat16, 5)
    row["ms"] = triton.testing.do_bench(lambda: forward(q, k, v), warmup=25, rep=200, return_mode="median")
    row["sdpa_ms"] = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(q, k, v), warmup=25, rep=100, return_mode="median")
    print("ROW " + json.dumps(row), flush=True)


def run(name, timeout_s):
    start = time.time()
    try:
        done = subprocess.run([sys.executable, __file__, "--variant", name], capture_output=True, text=True, timeout=timeout_s)
        rows = [json.loads(line[4:]) for line in done.stdout.splitlines() if line.startswith("ROW ")]
        row = rows[0] if rows else {"variant": name, "error": " ".join((done.stderr or done.stdout).split())[-300:]}
    except subprocess.TimeoutExpired:
        row = {"variant": name, "error": f"no result in {timeout_s} s (deadlock?)"}
    row["wall_s"] = round(time.time() - start, 1)
    print(json.dumps(row), flush=True)
    return row


def report(rows, device, versions):
    check_cols = [f"{d} {n}" for d, n in CHECKS]
    lines = [
        f"## Warp-specialized head-dim-384 attention: {device}, {versions}",
        "",
        f"`python3 benchmarks/kernels/attention_ws_kernel.py`; 1 head, dim 384, {TOKENS} tokens, bf16, do_bench median;",
        f"floor 4*N^2*d at 790 TFLOP/s = {FLOOR_MS:.2f} ms; SDPA's default kernel timed in the same process.",
        "",
        "| variant | ms | SDPA ms | x over SDPA | floor/time % | max abs bf16 27,556 | rel bf16 27,556 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['error']} | | | | | |")
            continue
        abs_err, rel_err = r[f"bfloat16 {TOKENS}"]
        lines.append(f"| {r['variant']} | {r['ms']:.3f} | {r['sdpa_ms']:.2f} | {r['sdpa_ms'] / r['ms']:.2f} | "
                     f"{100 * FLOOR_MS / r['ms']:.1f} | {abs_err:.1e} | {rel_err:.1e} |")
    lines += ["", "Max abs error vs fp32 math attention by dtype and token count:", "",
              "| variant | " + " | ".join(check_cols) + " |", "|---" * (len(check_cols) + 1) + "|"]
    for r in rows:
        if "error" not in r:
            lines.append(f"| {r['variant']} | " + " | ".join(f"{r[c][0]:.1e}" for c in check_cols) + " |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--variant")
    parser.add_argument("--timeout", type=float, default=150)
    args = parser.parse_args()
    if args.variant:
        measure(args.variant)
        return
    import torch
    import triton

    rows = [run(name, args.timeout) for name in ["triton", *VARIANTS, "triton"]]
    text = report(rows, torch.cuda.get_device_name(), f"torch {torch.__version__}, Triton {triton.__version__}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attention_ws_kernel_h100.md").write_text(text)
    (out / "attention_ws_kernel_h100.json").write_text(json.dumps(rows, indent=1))
    print(text)


if __name__ == "__main__":
    main()
