"""Time and profile AOTInductor packages of the 2-D graphs at one size, one variant per package (issue 10).

    python benchmarks/packages/graph_profile.py --size 1328x1328 --out DIR [--variants a,b] [--jobs 8] [--compile-only | --reuse]

A variant is a graph (encoder or decoder), the graph rewrites (`build_graphs` flags and the weights'
layout) and inductor settings. Every variant's package is compiled in its own process, all at once (embedded weights: the
Qwen-Image VAE architecture, random weights of seed 0, bf16, CUDA). Then, in this process and one after
another: diffusers' 3-D eager `encode`/`decode` (the baseline users have), each package (CUDA-event median
of 20 calls after 3 warm-ups), its max abs difference from the fp32 2-D eager graph on the same input,
the median again with `torch.backends.cudnn.benchmark` on (cuDNN picks convolution algorithms by timing),
the median of CUDA-graph replays (a second, single-threaded loader of the package, captured once; then the
plain median again, for the spread), and a torch.profiler kernel table (CUDA time per call by kernel, grouped). Writes DIR/graph_profile.json
and DIR/graph_profile.md. Needs a CUDA GPU, diffusers and vaebuild importable.
"""

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch

# name: (build_graphs flags, convolution weights channels-last). "shipped" is what inductor packages compile
# (with SETTINGS["shipped"]); "rewrites" is it with contiguous weights.
REWRITES = {
    "sdpa": ({}, False),
    "attention": ({"fast_attention": True}, False),
    "rewrites": ({"fast_attention": True, "conv_rewrites": True}, False),
    "unfused": ({"fast_attention": True, "conv_rewrites": True}, True),  # shipped before step 19
    "shipped": ({"fast_attention": True, "conv_rewrites": True, "fused_norms": True}, True),
}
SETTINGS = {  # on top of the packages' own settings (`package_configs`, embedded weights)
    "default": {"coordinate_descent_tuning": False},
    "shipped": {},
    "autotune": {"max_autotune": True},
    "atenautotune": {"max_autotune": True, "max_autotune_conv_backends": "ATEN"},
    "persistent": {},  # shipped, compiled under `persistent_reductions()` (step 16)
}
# name: (graph, rewrites, settings); "<graph>/<rewrites>+<settings>".
VARIANTS = {
    f"{graph}/{rewrites}+{settings}": (graph, rewrites, settings)
    for graph in ("decoder", "encoder")
    for rewrites in REWRITES
    for settings in SETTINGS
}
DEFAULT_VARIANTS = "decoder/attention+default,decoder/shipped+shipped,encoder/attention+default,encoder/shipped+shipped"
CATEGORIES = (  # (category, kernel name prefixes or substrings), first match wins
    ("attention", ("_attention_fwd", "_combine", "fmha", "flash")),
    ("conv + norm (Gluon)", ("_conv3x3_fwd",)),
    ("triton conv/mm template", ("triton_tem",)),
    ("triton fused", ("triton_",)),
    ("cuDNN/cuBLAS conv/gemm", ("xmma", "cutlass", "cudnn", "nvjet", "gemm")),
)


def make_vae():
    from vaebuild.model.source import ModelSource, load_vae

    return load_vae(ModelSource(random_init=True, seed=0))


def graph_input(graph, width, height, device, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    if graph == "encoder":
        x = torch.rand(1, 3, 1, height, width, generator=generator) * 2 - 1
    else:
        x = torch.randn(1, 16, 1, height // 8, width // 8, generator=generator)
    return x.to(device=device, dtype=dtype)


def compile_variant(name, width, height, package_path):
    """Export and compile one variant's package (runs in a worker process); returns compile seconds."""
    from vaebuild.backends.inductor.compile import package_configs
    from vaebuild.model.graphs import build_graphs

    graph, rewrites, settings = VARIANTS[name]
    flags, channels_last = REWRITES[rewrites]
    start = time.perf_counter()
    encoder, decoder = build_graphs(make_vae(), **flags)
    module = (encoder if graph == "encoder" else decoder).to(device="cuda", dtype=torch.bfloat16)
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    x = graph_input(graph, width, height, "cuda", torch.bfloat16)
    with torch.no_grad(), (persistent_reductions() if settings == "persistent" else nullcontext()):
        exported = torch.export.export(module, (x,), strict=False)
        torch._inductor.aoti_compile_and_package(
            exported, package_path=str(package_path),
            inductor_configs={**package_configs(True, "cuda"), **SETTINGS[settings]},
        )
    return time.perf_counter() - start


@contextmanager
def persistent_reductions(max_elements=1024):
    """Inductor compiles reductions of up to `max_elements` (static) elements as persistent, one-pass kernels.

    Inductor's own rule keeps a reduction persistent up to 1024 elements only when its layout hint is
    "inner", else up to 64: the RMS norms over 96 channels of the 1328x1328 levels became looped kernels
    that read their input twice (the theory of docs/design/speed_notes.md, step 16: measured, no gain).
    """
    from torch._inductor import config
    from torch._inductor.choices import InductorChoices
    from torch._inductor.virtualized import V

    class Choices(InductorChoices):
        @staticmethod
        def should_use_persistent_reduction(features, cooperative_reduction):
            if InductorChoices.should_use_persistent_reduction(features, cooperative_reduction):
                return True
            return (config.triton.persistent_reductions and not cooperative_reduction
                    and V.graph.sizevars.statically_known_leq(features.reduction_numel, max_elements))

    with V.set_choices_handler(Choices()):
        yield


def median_ms(fn, x, warmup=3, runs=20):
    """CUDA-event median of `runs` calls of `fn(x)` after `warmup` ones (`vaebuild bench`'s timer)."""
    from vaebuild.bench import time_calls

    return statistics.median(time_calls(lambda: fn(x), torch.device("cuda"), warmup, runs))


def kernel_table(fn, x, calls=5):
    """[(kernel, category, launches per call, ms per call)] by time, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn(x)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn(x)
        torch.cuda.synchronize()
    totals, counts = defaultdict(float), defaultdict(int)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] += event.time_range.elapsed_us() / 1000
            counts[event.name] += 1
    rows = [(name, category_of(name), counts[name] / calls, ms / calls) for name, ms in totals.items()]
    return sorted(rows, key=lambda row: -row[3])


def category_of(kernel):
    for category, needles in CATEGORIES:
        if any(kernel.startswith(needle) if needle.startswith("triton") else needle in kernel for needle in needles):
            return category
    return "other"


def measure(names, packages, width, height):
    """One record per variant plus the diffusers baselines, all in this process."""
    from vaebuild.backends.inductor.load import load_package
    from vaebuild.backends.inductor.cuda_graph import GraphedCall
    from vaebuild.model.graphs import build_graphs

    torch.backends.cudnn.allow_tf32 = False  # the reference is true fp32 (cuDNN allows TF32 by default)
    torch.backends.cuda.matmul.allow_tf32 = False
    vae = make_vae()
    reference = dict(zip(("encoder", "decoder"), (g.to("cuda") for g in build_graphs(vae))))  # fp32 2-D eager
    vae3d = torch.nn.Module.to(vae, device="cuda", dtype=torch.bfloat16).eval()
    eager = {"encoder": lambda x: vae3d.encode(x).latent_dist.parameters, "decoder": lambda z: vae3d.decode(z).sample}
    records = []
    with torch.no_grad():
        for graph in ("encoder", "decoder"):
            if not any(VARIANTS[n][0] == graph for n in names):
                continue
            x = graph_input(graph, width, height, "cuda", torch.bfloat16)
            records.append({"variant": f"{graph}/diffusers-eager-3d", "graph": graph, "ms": median_ms(eager[graph], x, runs=10),
                            "max_abs_vs_fp32": (eager[graph](x).float() - reference[graph](x.float())).abs().max().item()})
        for name in names:
            graph = VARIANTS[name][0]
            x = graph_input(graph, width, height, "cuda", torch.bfloat16)
            loader = load_package(packages[name], "cuda")
            run = lambda x, loader=loader: loader.run([x])[0]  # noqa: E731
            record = {"variant": name, "graph": graph, "ms": median_ms(run, x),
                      "max_abs_vs_fp32": (run(x).float() - reference[graph](x.float())).abs().max().item()}
            with torch.backends.cudnn.flags(enabled=True, benchmark=True, deterministic=False, allow_tf32=False):
                record["ms_cudnn_benchmark"] = median_ms(run, x)
            table = kernel_table(run, x)
            record["by_category_ms"] = {c: sum(r[3] for r in table if r[1] == c) for c in sorted({r[1] for r in table})}
            record["kernels"] = [{"kernel": k, "category": c, "launches": n, "ms": ms} for k, c, n, ms in table]
            try:  # last: a failed capture can leave the CUDA context unusable
                single = load_package(packages[name], "cuda", single_threaded=True)
                replay = GraphedCall(lambda x, single=single: single.run([x])[0])
                record["ms_cuda_graph"] = median_ms(replay, x)
                record["ms_again"] = median_ms(run, x)
                record["cuda_graph_max_abs_vs_package"] = (replay(x).float() - run(x).float()).abs().max().item()
            except Exception as error:  # recorded: a package that cannot be captured
                record["cuda_graph_error"] = f"{type(error).__name__}: {error}"[:300]
            records.append(record)
            print(f"{name}: {record['ms']:.2f} ms (CUDA graph {record.get('ms_cuda_graph', float('nan')):.2f}, "
                  f"again {record.get('ms_again', float('nan')):.2f}; {record.get('cuda_graph_error', '')}), max abs {record['max_abs_vs_fp32']:.4f}, "
                  + ", ".join(f"{c} {ms:.2f}" for c, ms in record["by_category_ms"].items()), flush=True)
            del loader
    return records


def markdown(records, meta):
    lines = [f"# 2-D graph packages at {meta['size']}: time and kernel profile", "",
             f"Device: {meta['device']}; torch {meta['torch']}; bf16, batch 1, random weights (seed 0); "
             "CUDA-event medians; profile = CUDA time per call.", "",
             "| variant | ms | vs diffusers eager | ms, cudnn.benchmark | ms, CUDA graph | max abs vs fp32 2-D | by category (ms) | compile s |",
             "|---|---|---|---|---|---|---|---|"]
    baseline = {r["graph"]: r["ms"] for r in records if r["variant"].endswith("diffusers-eager-3d")}
    for r in records:
        categories = ", ".join(f"{c} {ms:.2f}" for c, ms in r.get("by_category_ms", {}).items())
        lines.append(f"| {r['variant']} | {r['ms']:.2f} | {baseline[r['graph']] / r['ms']:.2f}x | "
                     f"{r.get('ms_cudnn_benchmark', float('nan')):.2f} | {r.get('ms_cuda_graph', float('nan')):.2f} | "
                     f"{r['max_abs_vs_fp32']:.4f} | {categories} | {r.get('compile_s', 0):.0f} |")
    for r in records:
        if "kernels" not in r:
            continue
        lines += ["", f"## {r['variant']}: top kernels", "", "| ms | launches | category | kernel |", "|---|---|---|---|"]
        lines += [f"| {k['ms']:.3f} | {k['launches']:g} | {k['category']} | `{k['kernel'][:110]}` |" for k in r["kernels"][:25]]
    return "\n".join(lines) + "\n"


def _read_json(path):
    return json.loads(path.read_text()) if path.is_file() else {}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1328x1328", help="WIDTHxHEIGHT of the image")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated, from: {', '.join(VARIANTS)}")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--jobs", type=int, default=8, help="parallel compile processes")
    parser.add_argument("--compile-only", action="store_true", help="compile the packages and stop (measure later)")
    parser.add_argument("--reuse", action="store_true", help="keep packages already compiled in OUT/packages")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    folder = args.out / "packages"
    folder.mkdir(parents=True, exist_ok=True)
    packages = {n: folder / (n.replace("/", "_").replace("+", "_") + ".pt2") for n in names}
    todo = [n for n in names if not (args.reuse and packages[n].is_file())]
    compile_s = {}
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        futures = {n: pool.submit(compile_variant, n, width, height, packages[n]) for n in todo}
        for n, future in futures.items():
            compile_s[n] = future.result()
            print(f"compiled {n} in {compile_s[n]:.0f} s", flush=True)
    (args.out / "compile_seconds.json").write_text(json.dumps(
        {**_read_json(args.out / "compile_seconds.json"), **compile_s}, indent=1))
    if args.compile_only:
        return
    compile_s = _read_json(args.out / "compile_seconds.json")
    records = measure(names, packages, width, height)
    for r in records:
        r["compile_s"] = compile_s.get(r["variant"], 0.0)
    meta = {"size": args.size, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}
    (args.out / "graph_profile.json").write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    (args.out / "graph_profile.md").write_text(markdown(records, meta))
    print(markdown(records, meta).split("\n## ")[0])


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
