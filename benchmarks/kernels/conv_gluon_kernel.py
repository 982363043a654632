"""The Gluon 3x3 convolution with fused epilogues (vaebuild/kernels/conv3x3_gluon.py) on a Hopper GPU.

    python3 benchmarks/kernels/conv_gluon_kernel.py --out results_dir [--variants th,tw,stages,regs ...]

The residual blocks' 96 -> 96 convolutions at 1328x1328, bf16, channels-last, random weights, with each epilogue
(EPILOGUES): the bias only; the RMS norm and SiLU (`conv1 -> norm2 -> SiLU`, op `conv3x3_rms_silu`); the residual
add with the downsampler's zero padding (`conv2(x) + h`, op `conv3x3_add`). In one process, what the packages ran
before: cuDNN's convolution alone (channels-last weight, as the packages store it) and with the norm and SiLU or
the add and pad compiled by inductor with the packages' coordinate-descent setting. Then every kernel variant in
its own process (a kernel that deadlocks is reported, not waited for): max abs error against the fp32 computation
at 1328x1328 and at small shapes whose sides the tiles do not divide (37x53, batch 2 at 24x40), output memory
poisoned with NaN first, then the `triton.testing.do_bench` median (L2 flushed between runs) of each epilogue.
Writes conv_gluon_kernel.md and .json under --out.
"""

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

SIZE = 1328
CHANNELS = 96
FLOP = 2 * SIZE * SIZE * CHANNELS * CHANNELS * 9
CHECK_SHAPES = [(1, 37, 53), (2, 24, 40), (1, SIZE, SIZE)]
VARIANTS = ["8,16,4,232", "16,8,4,232"]


def make_inputs(batch, height, width, seed=0):
    """Channels-last bf16 input, channels-last conv weight (as the packages store it), bias and norm gamma."""
    import torch

    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(batch, CHANNELS, height, width, device="cuda", generator=gen).to(torch.bfloat16)
    w = (torch.randn(CHANNELS, CHANNELS, 3, 3, device="cuda", generator=gen) / math.sqrt(9 * CHANNELS)).to(torch.bfloat16)
    b = (0.1 * torch.randn(CHANNELS, device="cuda", generator=gen)).to(torch.bfloat16)
    g = (1 + 0.1 * torch.randn(CHANNELS, device="cuda", generator=gen)).to(torch.bfloat16)
    cl = torch.channels_last
    return x.contiguous(memory_format=cl), w.contiguous(memory_format=cl), b, g


EPILOGUES = ("bias", "norm + SiLU", "residual, padded")


def reference(x, w, b, g, epilogue):
    """The fp32 convolution, then per EPILOGUES: nothing, RMS norm over channels with gamma and SiLU, or + x (as the
    residual: the blocks' identity shortcut) with one zero row and column after the image."""
    import torch.nn.functional as F

    h = F.conv2d(x.float(), w.float(), b.float(), padding=1)
    if epilogue == "norm + SiLU":
        return F.silu(F.normalize(h, dim=1) * math.sqrt(CHANNELS) * g.float()[:, None, None])
    if epilogue == "residual, padded":
        return F.pad(h + x.float(), (0, 1, 0, 1))
    return h


def packaged_path(x, w, b, g):
    """What the packages compute: cuDNN's conv, then diffusers' RMS norm (fp32 normalise, cast, scale, gamma), SiLU."""
    import torch.nn.functional as F

    h = F.conv2d(x, w, b, padding=1)
    h = F.normalize(h.float(), dim=1).to(h.dtype) * math.sqrt(CHANNELS) * g[:, None, None]
    return F.silu(h)


def packaged_residual_path(x, w, b):
    """What the packages computed before `conv3x3_add`: cuDNN's conv, then the residual add and the downsampler's pad."""
    import torch.nn.functional as F

    return F.pad(F.conv2d(x, w, b, padding=1) + x, (0, 1, 0, 1))


def measure_baselines():
    """Child process: the packages' computations; prints one JSON row each."""
    import torch
    import torch.nn.functional as F
    import triton

    torch._inductor.config.coordinate_descent_tuning = True
    compiled = torch.compile(packaged_path)
    compiled_residual = torch.compile(packaged_residual_path)
    x, w, b, g = make_inputs(1, SIZE, SIZE)
    for name, fn, epilogue in [("cuDNN conv alone (packages)", lambda: F.conv2d(x, w, b, padding=1), "bias"),
                               ("cuDNN conv alone, no bias (error: the bias)", lambda: F.conv2d(x, w, None, padding=1), "bias"),
                               ("cuDNN conv + inductor norm/SiLU (packages)", lambda: compiled(x, w, b, g), "norm + SiLU"),
                               ("cuDNN conv + inductor add/pad (packages)", lambda: compiled_residual(x, w, b), "residual, padded")]:
        error = (fn().float() - reference(x, w, b, g, epilogue)).abs().max().item()
        ms = triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
        print("ROW " + json.dumps({"variant": name, "epilogue": epilogue, "ms": ms, "max_abs": error}), flush=True)


def measure(variant):
    """Child process: errors and times of one kernel variant "th,tw,stages,consumer_regs" (`ConvConfig`); prints one JSON row each."""
    import torch
    import triton

    from vaebuild.kernels.conv3x3_gluon import ConvConfig, conv3x3_forward

    config = ConvConfig(*(int(v) for v in variant.split(",")))
    for epilogue in EPILOGUES:
        row = {"variant": f"gluon {config}", "epilogue": epilogue}

        def run(x, w, b, g):
            if epilogue == "residual, padded":
                return conv3x3_forward(x, w, b, residual=x, pad_end=1, config=config)
            return conv3x3_forward(x, w, b, g if epilogue == "norm + SiLU" else None, config=config)

        for batch, height, width in CHECK_SHAPES:
            x, w, b, g = make_inputs(batch, height, width)
            torch.cuda.empty_cache()
            torch.empty(batch * CHANNELS * height * width, device="cuda", dtype=torch.bfloat16).fill_(float("nan"))
            out = run(x, w, b, g)
            row[f"max_abs {batch}x{height}x{width}"] = (out.float() - reference(x, w, b, g, epilogue)).abs().max().item()
        row["ms"] = triton.testing.do_bench(lambda: run(x, w, b, g), warmup=50, rep=300, return_mode="median")
        print("ROW " + json.dumps(row), flush=True)


def child(arguments, timeout_s):
    """Run this script's child mode; its rows, or one error row."""
    try:
        done = subprocess.run([sys.executable, __file__, *arguments], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return [{"variant": arguments[-1], "error": f"no result in {timeout_s} s (deadlock?)"}]
    rows = [json.loads(line[4:]) for line in done.stdout.splitlines() if line.startswith("ROW ")]
    if done.returncode or not rows:
        rows.append({"variant": arguments[-1], "error": (done.stderr.strip().splitlines() or ["?"])[-1][:300]})
    return rows


def report(rows, device):
    lines = [f"# Gluon conv3x3 (+ RMS norm + SiLU), {SIZE}x{SIZE}, {CHANNELS} -> {CHANNELS} channels, bf16 ({device})", "",
             "do_bench medians (L2 flushed); max abs against fp32; TFLOP/s of the convolution's 3x3 multiply-adds.", "",
             "| variant | epilogue | ms | TFLOP/s | max abs (1328x1328) | max abs (small shapes) |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | | error: {r['error']} | | | |")
            continue
        small = max((v for k, v in r.items() if k.startswith("max_abs ") and str(SIZE) not in k), default=float("nan"))
        big = r.get(f"max_abs 1x{SIZE}x{SIZE}", r.get("max_abs"))
        lines.append(f"| {r['variant']} | {r['epilogue']} | {r['ms']:.3f} | {FLOP / r['ms'] / 1e9:.0f} | {big:.4f} | {small:.4f} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path)
    parser.add_argument("--variants", nargs="*", default=VARIANTS)
    parser.add_argument("--timeout", type=float, default=180)
    parser.add_argument("--child", choices=["baselines", "variant"])
    parser.add_argument("variant", nargs="?")
    args = parser.parse_args()
    if args.child == "baselines":
        return measure_baselines()
    if args.child == "variant":
        return measure(args.variant)
    import torch

    rows = child(["--child", "baselines", "baselines"], args.timeout * 2)
    for variant in args.variants:
        rows += child(["--child", "variant", variant], args.timeout)
        print(rows[-1], flush=True)
    text = report(rows, f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "conv_gluon_kernel.json").write_text(json.dumps(rows, indent=1))
        (args.out / "conv_gluon_kernel.md").write_text(text)


if __name__ == "__main__":
    main()
