"""Exact tiles against whole-image packages (and diffusers' tiled decode): time, peak memory and max abs difference.

    vaebuild static --backend inductor --random-init --spec large_static --ratios 3840x2160 --tile 512x512 \
        --jobs 8 --out build/tiles
    python benchmarks/packages/tiles_bench.py --engines build/tiles --out results/tiles \
        [--sizes 3840x2160,7680x4320] [--tiles 512x512,384x384,256x256] [--diffusers-sizes 3840x2160]

For each size (WxH) and graph (decoder, encoder), in this order:
- untiled: the whole-image package that serves the size (`VaeRuntime(DIR2, tiling=False)`; `--untiled DIR2`, default
  DIR); "not served" when none does, "out of memory" recorded, not raised;
- tiled, once per `--tiles` core (default: the folder's own tile; smaller cores run through the same dynamic tile
  packages, larger ones do not fit their windows): `VaeRuntime(DIR, tiling=True)`, tile packages only; "not served"
  when the decoder head / encoder rest package does not take the whole latent (a size past 8192 a side);
- decoder at `--diffusers-sizes`: diffusers' `AutoencoderKLQwenImage.decode` (3-D eager, the folder's precision,
  weights from the manifest's model or `--model`) untiled and with `enable_tiling()` (its defaults, or
  `--diffusers-tile N`: tiles of N, stride 3N/4), for comparison.
Every runtime loads lazily and never falls back to PyTorch. Each row: median / p90 / min ms over --runs calls after
--warmup (CUDA events on a GPU); peak memory = `torch.cuda.max_memory_allocated` during the timed calls (resident
weights and packages included, as `vaebuild bench`'s peak_mem_mib), activations = that minus what was allocated
before them; the packages' resident memory (`VaeRuntime.resident_bytes`). max abs (and decoder PSNR, images in
[-1, 1]) of each row's output against the untiled package's, and the diffusers rows also against diffusers untiled;
"x untiled" = median / the untiled package's median. Inputs are seeded random: latents N(0, 1.5^2), images U(-1, 1).
Writes OUTDIR/tiles_bench.json and OUTDIR/tiles_bench.md (and prints the table).

`--device cpu` runs the same on the CPU (no memory figures): a smoke test of the script on a tiny CPU folder.
"""

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

GRAPHS = ("decoder", "encoder")


def parse_pairs(text, what):
    """[(a, b)] of 'AxB,AxB' (multiples of 8); [] for ''."""
    pairs = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        a, sep, b = part.lower().partition("x")
        if not (sep and a.isdigit() and b.isdigit()) or int(a) % 8 or int(b) % 8:
            raise SystemExit(f"{what} {part!r}: use two multiples of 8, e.g. 3840x2160")
        pairs.append((int(a), int(b)))
    return pairs


def parse_sizes(text, what="--sizes"):
    """[(height, width)] of 'W1xH1,W2xH2'."""
    return [(h, w) for w, h in parse_pairs(text, what)]


def compare(out, reference, graph):
    """max abs (and, for decoded images in [-1, 1], PSNR with peak-to-peak 2) of `out` against `reference`."""
    diff = (out.float().cpu() - reference.float().cpu()).abs()
    result = {"max_abs": float(diff.max())}
    if graph == "decoder":
        mse = float((diff.double() ** 2).mean())
        result["psnr_db"] = math.inf if mse == 0 else 10 * math.log10(4 / mse)
    return result


def _number(value, fmt):
    return "-" if value is None else format(value, fmt)


def _mb(value):
    return None if value is None else value / 1e6


def markdown(record):
    """The report: every row, then time and memory against tile size."""
    rows = record["rows"]
    tiles = record["tiles"]
    lines = [f"# Exact tiles vs whole-image packages ({record['device']['name']}, {record['precision']})", "",
             f"Folder {record['engines']} (untiled: {record['untiled']}), built tile {tiles['tile']} (HxW), halo "
             f"{tiles['halo']}; {record['warmup']} warm-up calls, median of {record['runs']} runs "
             f"({record['diffusers_runs']} for diffusers); diffusers tiling {record['diffusers_tiling']}.", "",
             "| size (WxH) | graph | mode | tile | median ms | p90 ms | x untiled | peak MB | activations MB | "
             "packages MB | max abs vs untiled | PSNR dB | max abs vs diffusers untiled | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['size']} | {r['graph']} | {r['mode']} | {r.get('tile') or '-'} | "
            f"{_number(r.get('median_ms'), '.2f')} | {_number(r.get('p90_ms'), '.2f')} | "
            f"{_number(r.get('x_untiled'), '.2f')} | {_number(_mb(r.get('peak_bytes')), '.0f')} | "
            f"{_number(_mb(r.get('activation_bytes')), '.0f')} | {_number(_mb(r.get('resident_bytes')), '.0f')} | "
            f"{_number(r.get('max_abs'), '.3g')} | {_number(r.get('psnr_db'), '.1f')} | "
            f"{_number(r.get('max_abs_vs_diffusers_untiled'), '.3g')} | {r.get('note', '')} |"
        )
    tiled = sorted((r for r in rows if r["mode"] == "tiled" and r.get("median_ms") is not None),
                   key=lambda r: (r["graph"], r["size"], -math.prod(map(int, r["tile"].split("x")))))
    if len({r["tile"] for r in tiled}) > 1:
        lines += ["", "## Time and memory against tile size", "",
                  "| graph | size (WxH) | tile (HxW) | median ms | x untiled | peak MB | activations MB |",
                  "|---|---|---|---|---|---|---|"]
        for r in tiled:
            lines.append(f"| {r['graph']} | {r['size']} | {r['tile']} | {r['median_ms']:.2f} | "
                         f"{_number(r.get('x_untiled'), '.2f')} | {_number(_mb(r.get('peak_bytes')), '.0f')} | "
                         f"{_number(_mb(r.get('activation_bytes')), '.0f')} |")
    not_run = [f"{r['size']} {r['graph']} {r['mode']}{' ' + r['tile'] if r.get('tile') else ''}: {r['note']}"
               for r in rows if r.get("median_ms") is None]
    if not_run:
        lines += ["", "Not run:"] + [f"- {line}" for line in not_run]
    return "\n".join(lines) + "\n"


def make_input(graph, height, width, z_dim, device, dtype, seed=0):
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    if graph == "decoder":
        x = 1.5 * torch.randn(1, z_dim, 1, height // 8, width // 8, generator=g)
    else:
        x = torch.rand(1, 3, 1, height, width, generator=g) * 2 - 1
    return x.to(device=device, dtype=dtype)


def time_row(row, fn, device, warmup, runs):
    """Time `fn` into `row` (its first call untimed: loads what is lazy); the output of that first call, or None
    when it ran out of memory or nothing serves the size (the row's note says which)."""
    import torch

    from vaebuild.bench import summarize, time_calls
    from vaebuild.runtime import EngineUnavailableError

    cuda = device.type == "cuda"
    try:
        out = fn()
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        times = time_calls(fn, device, warmup, runs)
    except EngineUnavailableError as err:
        row["note"] = f"not served: {err}"
        return None
    except Exception as err:  # CUDA out of memory: record it, keep going
        if "out of memory" not in str(err).lower():
            raise
        row["note"] = "out of memory"
        return None
    finally:
        if cuda:
            torch.cuda.empty_cache()
    row.update(summarize(times))
    if cuda:
        row["peak_bytes"] = torch.cuda.max_memory_allocated(device)
        row["activation_bytes"] = row["peak_bytes"] - before
    return out.cpu()


def runtime_row(folder, graph, x, size, mode, args, tile=None):
    """(row, output on the CPU or None) of a fresh lazy `VaeRuntime(folder)`: tiled (`tile`: (h, w) core) or not."""
    import torch

    from vaebuild.runtime import VaeRuntime

    runtime = VaeRuntime(folder, device=args.device, resident="lazy", tiling=tile is not None, allow_fallback=False)
    row = {"size": size, "graph": graph, "mode": mode}
    try:
        if tile is not None:
            runtime.tiles.set_tile(*tile)
            row["tile"] = f"{tile[0]}x{tile[1]}"
        run = runtime.decode if graph == "decoder" else runtime.encode
        out = time_row(row, lambda: run(x), torch.device(args.device), args.warmup, args.runs)
        if out is not None:
            row["resident_bytes"] = runtime.resident_bytes
            route = runtime.last_route[graph]
            row["route"] = {"kind": route.kind, "engine": route.engine, "reason": route.reason}
    finally:
        runtime.release()
    return row, out


def diffusers_rows(vae, z, size, untiled_out, args):
    """The decoder rows of diffusers' VAE at `z`: untiled, then tiled (`enable_tiling`)."""
    import torch

    device = torch.device(args.device)
    rows, outputs = [], {}
    for mode in ("diffusers untiled", "diffusers tiled"):
        if mode == "diffusers tiled":
            n = args.diffusers_tile
            vae.enable_tiling(**({} if n is None else dict(tile_sample_min_height=n, tile_sample_min_width=n,
                                                            tile_sample_stride_height=n * 3 // 4,
                                                            tile_sample_stride_width=n * 3 // 4)))
        else:
            vae.disable_tiling()
        row = {"size": size, "graph": "decoder", "mode": mode}
        with torch.no_grad():
            outputs[mode] = time_row(row, lambda: vae.decode(z).sample, device, 1, args.diffusers_runs)
        rows.append(row)
    vae.disable_tiling()
    for row in rows:
        out = outputs[row["mode"]]
        if out is not None and untiled_out is not None:
            row.update(compare(out, untiled_out, "decoder"))
    tiled, untiled = outputs["diffusers tiled"], outputs["diffusers untiled"]
    if tiled is not None and untiled is not None:
        rows[1]["max_abs_vs_diffusers_untiled"] = compare(tiled, untiled, "decoder")["max_abs"]
    return rows


def load_diffusers_vae(manifest, folder, model, device, dtype):
    from vaebuild.model.source import ModelSource, load_vae

    source = ModelSource(model=model) if model else ModelSource.from_description(manifest.get("model") or {})
    if source is None:
        raise SystemExit(f"{folder}: its model entry cannot be re-loaded for the diffusers rows; pass --model")
    import torch

    # nn.Module.to: diffusers' own `to` warns about float32-kept modules even when there are none (this VAE).
    return torch.nn.Module.to(load_vae(source), device=device, dtype=dtype).eval()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", required=True, type=Path, help="an inductor folder built with --tile")
    parser.add_argument("--untiled", type=Path, help="a folder with whole-image packages at the sizes (default: --engines)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--sizes", default="3840x2160,7680x4320", help="WxH,WxH")
    parser.add_argument("--tiles", default="", help="tile cores HxW,HxW to run (default: the folder's own tile)")
    parser.add_argument("--diffusers-sizes", default="3840x2160", help="WxH,... of the diffusers decoder rows ('': none)")
    parser.add_argument("--diffusers-tile", type=int, help="diffusers tiles of N image pixels, stride 3N/4 "
                        "(default: diffusers' own, 256 / 192)")
    parser.add_argument("--model", help="the VAE of the diffusers rows (default: the folder's manifest model)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--diffusers-runs", type=int, default=3)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    sizes = parse_sizes(args.sizes)
    diffusers_sizes = parse_sizes(args.diffusers_sizes, "--diffusers-sizes")

    import torch

    from vaebuild.env import device_info, package_versions
    from vaebuild.fileio import write_json, write_text
    from vaebuild.manifest import read_build_manifest
    from vaebuild.model.precision import get_precision

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: run on a GPU host, or pass --device cpu (no memory figures)")
    manifest = read_build_manifest(args.engines)
    if not manifest.get("tiles"):
        raise SystemExit(f"{args.engines} has no tile packages: build it with --tile HxW")
    tiles = parse_pairs(args.tiles, "--tiles") or [tuple(manifest["tiles"]["tile"])]  # (h, w) cores
    dtype = get_precision(manifest["precision"]).dtype
    z_dim = manifest["vae_config"]["z_dim"]
    untiled_dir = args.untiled or args.engines
    rows = []
    for height, width in sizes:
        size = f"{width}x{height}"
        for graph in GRAPHS:
            first = len(rows)
            x = make_input(graph, height, width, z_dim, args.device, dtype)
            untiled, untiled_out = runtime_row(untiled_dir, graph, x, size, "untiled", args)
            rows.append(untiled)
            for tile in tiles:
                tiled, tiled_out = runtime_row(args.engines, graph, x, size, "tiled", args, tile)
                if tiled_out is not None and untiled_out is not None:
                    tiled.update(compare(tiled_out, untiled_out, graph))
                rows.append(tiled)
            if graph == "decoder" and (height, width) in diffusers_sizes:
                vae = load_diffusers_vae(manifest, args.engines, args.model, args.device, dtype)
                rows += diffusers_rows(vae, x, size, untiled_out, args)
                del vae  # off the GPU before the next rows measure their peaks
                if args.device == "cuda":
                    torch.cuda.empty_cache()
            base = untiled.get("median_ms")
            for row in rows[first:]:
                if base and row.get("median_ms"):
                    row["x_untiled"] = row["median_ms"] / base
                print(row, flush=True)
            del untiled_out, x
    record = {"engines": str(args.engines), "untiled": str(untiled_dir), "tiles": manifest["tiles"],
              "precision": manifest["precision"], "warmup": args.warmup, "runs": args.runs,
              "diffusers_runs": args.diffusers_runs,
              "diffusers_tiling": "default (256, stride 192)" if args.diffusers_tile is None else
              f"{args.diffusers_tile}, stride {args.diffusers_tile * 3 // 4}",
              "device": device_info(torch.device(args.device)), "versions": package_versions(),
              "command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "tiles_bench.json", record)
    text = markdown(record)
    write_text(args.out / "tiles_bench.md", text)
    print(text)
    print(f"wrote {args.out / 'tiles_bench.json'} and {args.out / 'tiles_bench.md'}")
    return record


if __name__ == "__main__":
    main()
