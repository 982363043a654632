"""Exact tiles against whole-image packages on a CUDA GPU: time, peak memory and max abs difference.

    vaebuild static --backend inductor --random-init --spec large_static --tile 512x512 --jobs 8 --out build/tiles
    python benchmarks/packages/tiles_bench.py --engines build/tiles --out results/tiles [--sizes 3840x2160,7680x4320]

For each size (WxH) and graph (decoder, encoder): the tiled run (`VaeRuntime(DIR, tiling=True,
allow_fallback=False)`: the folder's tile packages) and, where a whole-image package serves the size (`--untiled
DIR2`, default DIR), the untiled run (`tiling=False`). Each row: CUDA-event median / p90 / min ms over --runs calls
after --warmup; `torch.cuda.max_memory_allocated` during the calls above what was allocated before them (the
activations), and the packages' resident memory (the runtime's `resident_bytes`: the CUDA free-memory drop at
each load, shared weights with the first); the untiled rows' out-of-memory is recorded, not raised. Tiled against
untiled: max abs and PSNR of the outputs (decoder images in [-1, 1]; encoder moments). Inputs are seeded random:
latents N(0, 1.5^2), images U(-1, 1). Writes OUTDIR/tiles_bench.{json,md}.
"""

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

GRAPHS = ("decoder", "encoder")


def parse_sizes(text):
    """[(height, width)] of 'W1xH1,W2xH2' (multiples of 8)."""
    sizes = []
    for part in text.split(","):
        width, sep, height = part.strip().lower().partition("x")
        if not (sep and width.isdigit() and height.isdigit()) or int(width) % 8 or int(height) % 8:
            raise SystemExit(f"--sizes {part!r}: use WxH with multiples of 8, e.g. 3840x2160")
        sizes.append((int(height), int(width)))
    return sizes


def compare(tiled, untiled):
    """max abs and PSNR (peak-to-peak 2: the [-1, 1] range) of tiled against untiled, in float32."""
    diff = (tiled.float() - untiled.float()).abs()
    mse = float((diff**2).mean())
    return {"max_abs": float(diff.max()), "psnr_db": math.inf if mse == 0 else 10 * math.log10(4 / mse)}


def markdown(rows, header):
    """The report table of `rows` (dicts as `run_row` returns)."""
    lines = [f"# Exact tiles vs whole-image packages ({header})", "",
             "| size (WxH) | graph | mode | median ms | p90 ms | peak activations MB | packages MB | max abs vs untiled | PSNR dB | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def number(value, fmt):
        return "-" if value is None else format(value, fmt)

    for r in rows:
        lines.append(
            f"| {r['size']} | {r['graph']} | {r['mode']} | {number(r.get('median_ms'), '.2f')} | "
            f"{number(r.get('p90_ms'), '.2f')} | {number(r.get('peak_bytes') and r['peak_bytes'] / 1e6, '.0f')} | "
            f"{number(r.get('resident_bytes') and r['resident_bytes'] / 1e6, '.0f')} | "
            f"{number(r.get('max_abs'), '.3g')} | {number(r.get('psnr_db'), '.1f')} | {r.get('note', '')} |"
        )
    return "\n".join(lines) + "\n"


def make_input(graph, height, width, z_dim, device, seed=0):
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    if graph == "decoder":
        x = 1.5 * torch.randn(1, z_dim, 1, height // 8, width // 8, generator=g)
    else:
        x = torch.rand(1, 3, 1, height, width, generator=g) * 2 - 1
    return x.to(device=device, dtype=torch.bfloat16)


def run_row(runtime, graph, x, size, mode, warmup, runs):
    """(row, output) of one runtime on one input; output None when it ran out of memory."""
    import torch

    from vaebuild.bench import summarize, time_calls

    run = runtime.decode if graph == "decoder" else runtime.encode
    row = {"size": size, "graph": graph, "mode": mode}
    device = runtime.device
    try:
        out = run(x)  # the first call: loads what is lazy, captures nothing
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        times = time_calls(lambda: run(x), device, warmup, runs)
        row["peak_bytes"] = torch.cuda.max_memory_allocated(device) - before
    except Exception as err:  # CUDA out of memory: record it, keep going
        if "out of memory" not in str(err).lower():
            raise
        torch.cuda.empty_cache()
        row["note"] = "out of memory"
        return row, None
    row.update(summarize(times))
    row["resident_bytes"] = runtime.resident_bytes
    route = runtime.last_route[graph]
    row["route"] = {"kind": route.kind, "engine": route.engine, "reason": route.reason}
    return row, out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", required=True, type=Path, help="a CUDA inductor folder built with --tile")
    parser.add_argument("--untiled", type=Path, help="a folder with whole-image packages at the sizes (default: --engines)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--sizes", default="3840x2160,7680x4320", help="WxH,WxH")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    sizes = parse_sizes(args.sizes)

    import torch

    from vaebuild.env import device_info, package_versions
    from vaebuild.fileio import write_json, write_text
    from vaebuild.manifest import read_build_manifest
    from vaebuild.runtime import VaeRuntime

    if not torch.cuda.is_available():
        raise SystemExit("tiles_bench.py measures CUDA packages: run it on a GPU host")
    manifest = read_build_manifest(args.engines)
    if not manifest.get("tiles"):
        raise SystemExit(f"{args.engines} has no tile packages: build it with --tile HxW")
    z_dim = manifest["vae_config"]["z_dim"]
    rows = []
    for height, width in sizes:
        size = f"{width}x{height}"
        for graph in GRAPHS:
            x = make_input(graph, height, width, z_dim, "cuda")
            tiled_rt = VaeRuntime(args.engines, device="cuda", tiling=True, allow_fallback=False)
            tiled, tiled_out = run_row(tiled_rt, graph, x, size, "tiled", args.warmup, args.runs)
            tiled_rt.release()
            del tiled_rt
            torch.cuda.empty_cache()
            untiled_rt = VaeRuntime(args.untiled or args.engines, device="cuda", tiling=False, allow_fallback=False,
                                    resident="lazy")
            try:
                untiled_rt.prepare(graph, tuple(x.shape))
            except Exception as err:  # no whole-image package for this size (or it cannot load)
                untiled = {"size": size, "graph": graph, "mode": "untiled", "note": str(err).splitlines()[0][:120]}
                untiled_out = None
            else:
                untiled, untiled_out = run_row(untiled_rt, graph, x, size, "untiled", args.warmup, args.runs)
            untiled_rt.release()
            del untiled_rt
            if tiled_out is not None and untiled_out is not None:
                tiled.update(compare(tiled_out, untiled_out))
            rows += [tiled, untiled]
            del tiled_out, untiled_out
            torch.cuda.empty_cache()
            print(tiled, untiled, flush=True)
    record = {"engines": str(args.engines), "untiled": str(args.untiled or args.engines), "tiles": manifest["tiles"],
              "warmup": args.warmup, "runs": args.runs, "device": device_info(torch.device("cuda")),
              "versions": package_versions(), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "tiles_bench.json", record)
    write_text(args.out / "tiles_bench.md", markdown(rows, f"tile {manifest['tiles']['tile']}, "
                                                         f"halo {manifest['tiles']['halo']}"))
    print(f"wrote {args.out / 'tiles_bench.json'} and {args.out / 'tiles_bench.md'}")


if __name__ == "__main__":
    main()
