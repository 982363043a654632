"""Experiment (issue 10, not shipped): a Triton 3x3 convolution with the RMS norm and SiLU after it fused.

In each residual block, `conv1` is followed by `norm2` (an RMS norm over channels, per pixel) and SiLU;
the packages run cuDNN's convolution, then an inductor kernel that reads its output back. This kernel
computes a tile of pixels with all output channels (implicit GEMM over 9 taps x input channels, pointer
loads with zero padding by mask, software-pipelined), normalises and activates the tile in registers and
writes only the result. Output channels are split into two power-of-two chunks (96 = 64 + 32) or padded to
one. Measured on the H100 (results/conv_norm_kernel_h100.md): no faster than what the packages run (the
convolution itself runs at ~330-480 TFLOP/s against cuDNN's ~600-680), so it was not shipped.


    python3 benchmarks/conv_norm_kernel.py --out results_dir [--quick]

For each residual-block `conv1 -> norm2 -> SiLU` shape of the 1328x1328 graphs (CASES), bf16, channels-last,
random weights: what the packages run today (cuDNN convolution + inductor's fused norm/SiLU kernel, from
`torch.compile` with the packages' coordinate-descent setting), the cuDNN convolution alone, and every
ConvConfig of the sweep: `triton.testing.do_bench` median and max abs difference from the fp32 computation
(the packages' own max abs printed next to it). Kernels are compiled first in parallel worker processes
(Triton's disk cache), then timed one at a time. Writes conv_norm_kernel.md and conv_norm_kernel.json.
"""

import argparse
import itertools
import json
import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# name: (channels in, channels out, height = width)
CASES = {
    "decoder 1328 (96->96)": (96, 96, 1328),
    "decoder 664 (192->192)": (192, 192, 664),
    "encoder 664 (96->192)": (96, 192, 664),
}


@dataclass(frozen=True)
class ConvConfig:
    """Pixel tile (rows x columns of one image), input-channel step and schedule of the kernel."""

    block_h: int = 2
    block_w: int = 64
    block_k: int = 32
    num_warps: int = 4
    num_stages: int = 4
    pad_channels: bool = False  # one power-of-two chunk of output channels, zero-padded, instead of two
    taps_inner: bool = False  # loop over the 9 taps inside each input-channel step (L1 reuse of a window)


DEFAULT_CONFIG = ConvConfig()


def channel_chunks(channels, pad=False):
    """Two power-of-two widths that add up to `channels` (the second may be 0), or None; with `pad`, the
    smallest power of two that holds `channels` and 0."""
    if pad:
        return 1 << (channels - 1).bit_length(), 0
    first = 1 << (channels.bit_length() - 1)
    second = channels - first
    if first < 16 or (second and (second < 16 or second & (second - 1))):
        return None
    return first, second


@triton.jit
def _conv3x3_norm_silu(
    X, Wt, Bias, Gamma, Out,
    H, W,
    stride_xb, stride_xh, stride_xw, stride_ob, stride_oh, stride_ow,
    C_IN: tl.constexpr, C_OUT: tl.constexpr, N_A: tl.constexpr, N_B: tl.constexpr, SCALE: tl.constexpr, EPS: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr,
    TAPS_INNER: tl.constexpr,
):
    """Out[b, y, x, :] = silu(rms_norm(conv3x3(X)[b, y, x, :] + Bias) * Gamma) for one pixel tile (NHWC)."""
    BLOCK_M: tl.constexpr = BLOCK_H * BLOCK_W
    K_STEPS: tl.constexpr = C_IN // BLOCK_K
    N_ALL: tl.constexpr = N_A + N_B
    pid_w = tl.program_id(0)
    pid_h = tl.program_id(1)
    b = tl.program_id(2)
    pix = tl.arange(0, BLOCK_M)
    rows = pid_h * BLOCK_H + pix // BLOCK_W
    cols = pid_w * BLOCK_W + pix % BLOCK_W
    ks = tl.arange(0, BLOCK_K)
    x_base = X + b * stride_xb
    acc_a = tl.zeros([BLOCK_M, N_A], tl.float32)
    if N_B > 0:
        acc_b = tl.zeros([BLOCK_M, N_B], tl.float32)
    for step in range(9 * K_STEPS):
        if TAPS_INNER:
            kc = (step // 9) * BLOCK_K
            tap = step % 9
        else:
            tap = step // K_STEPS
            kc = (step - tap * K_STEPS) * BLOCK_K
        yy = rows + (tap // 3 - 1)
        xx = cols + (tap % 3 - 1)
        inside = (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
        a_ptr = x_base + yy[:, None] * stride_xh + xx[:, None] * stride_xw + (kc + ks)[None, :]
        a = tl.load(a_ptr, mask=inside[:, None], other=0.0)
        w_rows = (tap * C_IN + kc + ks)[:, None] * N_ALL
        acc_a = tl.dot(a, tl.load(Wt + w_rows + tl.arange(0, N_A)[None, :]), acc_a)
        if N_B > 0:
            acc_b = tl.dot(a, tl.load(Wt + w_rows + N_A + tl.arange(0, N_B)[None, :]), acc_b)
    ch_a = tl.arange(0, N_A)
    acc_a += tl.load(Bias + ch_a, mask=ch_a < C_OUT, other=0.0).to(tl.float32)[None, :]
    sum_sq = tl.sum(acc_a * acc_a, 1)
    if N_B > 0:
        ch_b = N_A + tl.arange(0, N_B)
        acc_b += tl.load(Bias + ch_b, mask=ch_b < C_OUT, other=0.0).to(tl.float32)[None, :]
        sum_sq += tl.sum(acc_b * acc_b, 1)
    inv = SCALE / tl.maximum(tl.sqrt(sum_sq), EPS)
    out_mask = ((rows < H) & (cols < W))[:, None]
    o_ptr = Out + b * stride_ob + rows[:, None] * stride_oh + cols[:, None] * stride_ow
    y_a = acc_a * inv[:, None] * tl.load(Gamma + ch_a, mask=ch_a < C_OUT, other=0.0).to(tl.float32)[None, :]
    y_a = y_a * tl.sigmoid(y_a)
    tl.store(o_ptr + ch_a[None, :], y_a.to(Out.dtype.element_ty), mask=out_mask & (ch_a < C_OUT)[None, :])
    if N_B > 0:
        y_b = acc_b * inv[:, None] * tl.load(Gamma + ch_b, mask=ch_b < C_OUT, other=0.0).to(tl.float32)[None, :]
        y_b = y_b * tl.sigmoid(y_b)
        tl.store(o_ptr + ch_b[None, :], y_b.to(Out.dtype.element_ty), mask=out_mask & (ch_b < C_OUT)[None, :])


def gemm_weight(weight, pad=False):
    """A `[C_out, C_in, 3, 3]` conv weight as the kernel's `[9 * C_in, N]` matrix (tap-major rows), its
    columns zero-padded to the width of `channel_chunks(C_out, pad)`."""
    n_a, n_b = channel_chunks(weight.shape[0], pad)
    matrix = weight.permute(2, 3, 1, 0).reshape(-1, weight.shape[0])
    return F.pad(matrix, (0, n_a + n_b - weight.shape[0])).contiguous()


def conv3x3_norm_silu_forward(x, weight_gemm, bias, gamma, eps=1e-12, config=None, wrap=lambda kernel: kernel):
    """silu(rms_norm(conv2d(x, w, bias, padding=1)) * gamma) for CUDA bf16/fp16 `x` `[B, C_in, H, W]`.

    `weight_gemm` is `gemm_weight(w, config.pad_channels)`; the output is channels-last; `wrap` = torch.library.wrap_triton.
    """
    config = config or DEFAULT_CONFIG
    batch, c_in, height, width = x.shape
    c_out = bias.shape[0]
    n_a, n_b = channel_chunks(c_out, config.pad_channels)
    x = x.contiguous(memory_format=torch.channels_last)
    out = torch.empty((batch, c_out, height, width), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    grid = (triton.cdiv(width, config.block_w), triton.cdiv(height, config.block_h), batch)
    wrap(_conv3x3_norm_silu)[grid](
        x, weight_gemm, bias, gamma, out,
        height, width,
        x.stride(0), x.stride(2), x.stride(3), out.stride(0), out.stride(2), out.stride(3),
        C_IN=c_in, C_OUT=c_out, N_A=n_a, N_B=n_b, SCALE=math.sqrt(c_out), EPS=eps,
        BLOCK_H=config.block_h, BLOCK_W=config.block_w, BLOCK_K=config.block_k,
        TAPS_INNER=config.taps_inner,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out


def configs(c_in, quick):
    # (rows, columns, warps): run 1's best (2, 64, 4 warps) and larger pixel tiles, which re-read the
    # weights from L2 less often per multiply-add
    tiles = [(2, 64, 4), (4, 64, 8), (2, 128, 8), (8, 64, 16), (4, 128, 16)] if not quick else [(2, 64, 4)]
    stages = [3, 4] if not quick else [4]
    flags = [False, True] if not quick else [False]
    return [
        ConvConfig(h, w, 32, nw, ns, pad, inner)
        for (h, w, nw), ns, pad, inner in itertools.product(tiles, stages, flags, flags)
    ]


def make_inputs(c_in, c_out, size, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(1, c_in, size, size, device="cuda", generator=gen).to(torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(c_out, c_in, 3, 3, device="cuda", generator=gen) / math.sqrt(9 * c_in)).to(torch.bfloat16)
    b = (0.1 * torch.randn(c_out, device="cuda", generator=gen)).to(torch.bfloat16)
    g = (1 + 0.1 * torch.randn(c_out, device="cuda", generator=gen)).to(torch.bfloat16)
    return x, w, b, g


def reference_fp32(x, w, b, g):
    h = F.conv2d(x.float(), w.float(), b.float(), padding=1)
    h = F.normalize(h, dim=1) * math.sqrt(w.shape[0]) * g.float()[:, None, None]
    return F.silu(h)


def packaged_path(x, w, b, g):
    """What the packages compute: diffusers' RMS norm (fp32 normalise, cast, scale and gamma) after the conv."""
    h = F.conv2d(x, w, b, padding=1)
    h = F.normalize(h.float(), dim=1).to(h.dtype) * math.sqrt(w.shape[0]) * g[:, None, None]
    return F.silu(h)


def _compile_worker(case, config):
    c_in, c_out, size = CASES[case]
    x, w, b, g = make_inputs(c_in, c_out, size)
    try:
        conv3x3_norm_silu_forward(x, gemm_weight(w, config.pad_channels), b, g, config=config)
        torch.cuda.synchronize()
        return None
    except Exception as error:  # a config that does not compile (shared memory) is reported, not fatal
        return f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--jobs", type=int, default=14)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [(case, config) for case, (c_in, _, _) in CASES.items() for config in configs(c_in, args.quick)]
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        errors = dict(zip(jobs, pool.map(_compile_worker, *zip(*jobs))))
    rows = []
    for case, (c_in, c_out, size) in CASES.items():
        x, w, b, g = make_inputs(c_in, c_out, size)
        ref = reference_fp32(x, w, b, g)
        flop = 2 * size * size * c_out * c_in * 9
        torch._inductor.config.coordinate_descent_tuning = True
        packaged = torch.compile(packaged_path)
        baseline = {
            "packages today (cuDNN + inductor norm/SiLU)": lambda: packaged(x, w, b, g),
            "cuDNN conv alone": lambda: F.conv2d(x, w, b, padding=1),
        }
        for name, fn in baseline.items():
            out = fn()
            err = (out.float() - ref).abs().max().item() if out.shape == ref.shape and "alone" not in name else float("nan")
            ms = triton.testing.do_bench(fn, warmup=50, rep=300)
            rows.append({"case": case, "variant": name, "ms": ms, "max_abs": err, "tflops": flop / ms / 1e9})
            print(rows[-1], flush=True)
        for (job_case, config), error in errors.items():
            if job_case != case:
                continue
            wg = gemm_weight(w, config.pad_channels)
            row = {"case": case, "variant": "triton " + json.dumps(asdict(config)), "config": asdict(config)}
            if error:
                rows.append({**row, "ms": float("nan"), "max_abs": float("nan"), "tflops": 0.0, "error": error})
                continue
            fn = lambda: conv3x3_norm_silu_forward(x, wg, b, g, config=config)  # noqa: E731
            out = fn()
            row["max_abs"] = (out.float() - ref).abs().max().item()
            row["ms"] = triton.testing.do_bench(fn, warmup=50, rep=300)
            row["tflops"] = flop / row["ms"] / 1e9
            rows.append(row)
            print(row, flush=True)
    (args.out / "conv_norm_kernel.json").write_text(json.dumps(rows, indent=1))
    lines = [
        f"# Fused conv3x3 + RMS norm + SiLU ({torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, do_bench medians)",
        "",
        "| case | variant | ms | TFLOP/s (conv) | max abs vs fp32 |",
        "|---|---|---|---|---|",
    ]
    for case in CASES:
        case_rows = [r for r in rows if r["case"] == case]
        best = sorted((r for r in case_rows if r["variant"].startswith("triton") and r["ms"] == r["ms"]), key=lambda r: r["ms"])
        for r in [r for r in case_rows if not r["variant"].startswith("triton")] + best[:8]:
            lines.append(f"| {case} | {r['variant']} | {r['ms']:.3f} | {r['tflops']:.0f} | {r['max_abs']:.4f} |")
    failed = [r for r in rows if r.get("error")]
    lines += ["", f"{len(rows) - len(failed)} rows timed, {len(failed)} configs failed to compile or run."]
    (args.out / "conv_norm_kernel.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
