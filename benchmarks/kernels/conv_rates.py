"""The convolutions of the 2-D graphs at 1328x1328: cuDNN's rate per shape, alone and inside the packages
(issue 10: where the packages' 11 ms of decoder convolutions go).

    python benchmarks/kernels/conv_rates.py [--engines DIR] [--out DIR]

1. Alone: each distinct 3x3 convolution of the decoder and encoder (channels-last bf16 input and weight, no
   bias: the packages add it in the next fused kernel) timed by itself (CUDA-event median of 50 after 10
   warm-ups), with cuDNN's kernel name from torch.profiler, its TFLOP/s and the time it would take at
   790 TFLOP/s (the measured bf16 GEMM rate), weighted by how often it occurs per graph.
2. In the packages (`--engines`, a `vaebuild static --backend inductor` folder): each package profiled at its
   size with input shapes recorded; `aten::convolution` calls grouped by input and weight shape, with their
   CUDA time per call of the package.
Prints Markdown tables; writes DIR/conv_rates.md and .json when --out is given. Needs a CUDA GPU.
"""

import argparse
import json
import statistics
from types import SimpleNamespace
from pathlib import Path

import torch
import torch.nn.functional as F

# (side of the output grid at 1328x1328, in channels, out channels, stride, decoder count, encoder count)
CONVS = [
    (166, 384, 384, 1, 10, 8),
    (332, 384, 384, 1, 5, 3),
    (332, 192, 384, 1, 1, 1),
    (664, 192, 192, 1, 6, 3),
    (664, 96, 192, 1, 0, 1),
    (1328, 96, 96, 1, 6, 4),
    (664, 96, 96, 2, 0, 1),
    (332, 192, 192, 2, 0, 1),
    (166, 384, 384, 2, 0, 1),
    (1328, 128, 128, 1, 0, 0),  # not in the graphs: 96 and 192 channels against the next multiples of 64/128
    (664, 256, 256, 1, 0, 0),
]


GEMM_RATE = 790e12  # bf16 FLOP/s of a large cuBLAS GEMM on the H100 (docs/design/speed_notes.md)


def median_ms(fn, runs=50, warmup=10):
    """CUDA-event median of `runs` calls of `fn()` after `warmup` ones (`vaebuild bench`'s timer)."""
    from vaebuild.bench import time_calls

    return statistics.median(time_calls(fn, torch.device("cuda"), warmup, runs))


def kernel_name(fn):
    """The name of the longest CUDA kernel `fn` launches."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    return max(events, key=lambda e: e.device_time_total).key[:90] if events else "?"


def measure_alone(side, c_in, c_out, stride):
    dtype, dev = torch.bfloat16, "cuda"
    in_side = side * stride
    x = torch.randn(1, c_in, in_side + (stride == 2), in_side + (stride == 2), device=dev, dtype=dtype)
    x = x.to(memory_format=torch.channels_last)
    w = (torch.randn(c_out, c_in, 3, 3, device=dev, dtype=dtype) / (9 * c_in) ** 0.5).to(memory_format=torch.channels_last)
    padding = 1 if stride == 1 else 0  # the downsamplers pad right and bottom themselves, then stride 2
    conv = lambda: F.conv2d(x, w, None, stride=stride, padding=padding)  # noqa: E731
    assert conv().shape[-2:] == (side, side)
    flop = 2 * side * side * c_out * 9 * c_in
    conv_ms, kernel = median_ms(conv), kernel_name(conv)
    # cuDNN's own search over every engine it offers for the shape (PyTorch tries 10 unless the limit is 0)
    with torch.backends.cudnn.flags(enabled=True, benchmark=True, deterministic=False, allow_tf32=False):
        torch.backends.cudnn.benchmark_limit = 0
        searched_ms, searched_kernel = median_ms(conv), kernel_name(conv)
    return {"side": side, "c_in": c_in, "c_out": c_out, "stride": stride, "gflop": flop / 1e9, "cudnn_ms": conv_ms,
            "cudnn_tflops": flop / conv_ms / 1e9, "floor_ms": flop / GEMM_RATE * 1e3, "kernel": kernel,
            "searched_ms": searched_ms, "searched_kernel": searched_kernel}


def conv_flop(x_shape, w_shape):
    """FLOPs of a convolution from its input and weight shapes: a 4x4 weight is a stride-2 transposed
    convolution (the upsamplers), an odd input side a stride-2 3x3 (the padded downsamplers), else stride 1."""
    _, _, height, width = x_shape
    if w_shape[-1] == 4:
        return 2 * height * width * w_shape[0] * w_shape[1] * 16
    if height % 2:
        height, width = (height - 3) // 2 + 1, (width - 3) // 2 + 1
    return 2 * height * width * w_shape[0] * w_shape[1] * w_shape[2] * w_shape[3]


def in_packages(folder, calls=5):
    """[(engine, op, input shape, weight shape, calls per run, CUDA ms per run, TFLOP/s)] of each package's
    convolution ops (every profiler key with "conv" and a 4-D weight), grouped by shapes."""
    from torch.profiler import ProfilerActivity, profile

    from vaebuild.model.inputs import sample_input
    from vaebuild.runtime import VaeRuntime, read_engine_dir

    manifest, entries_by_graph = read_engine_dir(folder)
    config = SimpleNamespace(**manifest["vae_config"])
    runtime = VaeRuntime(folder, resident="lazy", allow_fallback=False)
    rows = []
    for graph, entries in entries_by_graph.items():
        run = runtime.encode if graph == "encoder" else runtime.decode
        for entry in entries:
            shape = entry.profiles[0].opt
            x = sample_input(graph, shape, config).to("cuda", torch.bfloat16)
            run(x)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
                for _ in range(calls):
                    run(x)
                torch.cuda.synchronize()
            for event in prof.key_averages(group_by_input_shape=True):
                if "conv" not in event.key or len(event.input_shapes) < 2 or len(event.input_shapes[1]) != 4:
                    continue
                x_shape, w_shape = event.input_shapes[0], event.input_shapes[1]
                ms = event.device_time_total / 1e3 / calls
                rows.append((entry.rel_path, event.key, x_shape, w_shape, event.count / calls, ms,
                             conv_flop(x_shape, w_shape) * event.count / calls / ms / 1e9))
            runtime.release()
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", help="a vaebuild static --backend inductor folder: profile its packages too")
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = False  # the packages' setting
    rows = []
    for side, c_in, c_out, stride, dec, enc in CONVS:
        rows.append(measure_alone(side, c_in, c_out, stride) | {"decoder_count": dec, "encoder_count": enc})
    lines = [f"## 3x3 convolutions at 1328x1328: {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, "
             "channels-last", "",
             "| output grid | in -> out ch | stride | GFLOP | cuDNN ms | TFLOP/s | ms at 790 TFLOP/s | count dec / enc | "
             "cuDNN kernel | ms, every engine searched | its kernel |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['side']}x{r['side']} | {r['c_in']} -> {r['c_out']} | {r['stride']} | {r['gflop']:.0f} | "
                     f"{r['cudnn_ms']:.3f} | {r['cudnn_tflops']:.0f} | {r['floor_ms']:.3f} | "
                     f"{r['decoder_count']} / {r['encoder_count']} | `{r['kernel']}` | {r['searched_ms']:.3f} | "
                     f"`{r['searched_kernel']}` |")
    for graph in ("decoder", "encoder"):
        cudnn = sum(r["cudnn_ms"] * r[f"{graph}_count"] for r in rows)
        floor = sum(r["floor_ms"] * r[f"{graph}_count"] for r in rows)
        lines += ["", f"{graph}: these 3x3 convolutions take {cudnn:.2f} ms alone in cuDNN, {floor:.2f} ms at 790 TFLOP/s."]
    packaged = in_packages(args.engines) if args.engines else []
    if packaged:
        lines += ["", f"### In the packages of {args.engines} (convolution ops by shape, CUDA ms per package run)", "",
                  "| package | op | input | weight | calls | ms | TFLOP/s |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {e} | {op} | {x} | {w} | {n:g} | {ms:.3f} | {rate:.0f} |" for e, op, x, w, n, ms, rate in packaged]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "conv_rates.md").write_text(text)
        (Path(args.out) / "conv_rates.json").write_text(json.dumps({"alone": rows, "in_packages": packaged}, indent=1))


if __name__ == "__main__":
    main()
