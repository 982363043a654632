"""The run of `vaebuild bench`: `run_bench` measures, for the encoder and the decoder separately at each size:
    3-D eager   diffusers `AutoencoderKLQwenImage.encode()` / `.decode()`: the PyTorch baseline
    2-D eager   vaebuild's exact single-frame graphs (`graphs.build_graphs`), eager PyTorch
    engine      for each `--engines DIR` (repeatable: folders are compared in the same run), the
                engine that serves the size, through `runtime.VaeRuntime` (never its PyTorch
                fallback); otherwise the row says "not run: <reason>"
    engine ... tiled  for each of those folders built with `--tile`, one more engine row (its own folder column):
                every size through the folder's exact tiles (`VaeRuntime(tiling=True)`), also sizes no
                whole-image engine serves; not run where the tile engines do not take the size

Per engine row also `first_call_ms` (the first call after the load, in this process) and, from fresh
processes (`vaebuild.bench.loads`), `load_ms` and `gpu_mb_held`; per folder `disk_mb` (engine files plus
the weights file) and, from a fresh process, `resident_mb`.

Timing as `vaebuild.bench.timing` does it. Speedup = the 3-D median of the same size and graph, measured
in the same run, divided by the row's median. Peak memory is `torch.cuda.max_memory_allocated`, reset
before each row (it includes resident weights, and not TensorRT's own allocations). FLOPs are counted
once per size on the meta device (`torch.utils.flop_counter`), so they cost no device time.
"""

import copy
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import vaebuild
from vaebuild.bench.loads import measure_fresh_loads
from vaebuild.bench.options import BenchOptions
from vaebuild.bench.report import TABLE_ORDER
from vaebuild.bench.timing import summarize, time_calls
from vaebuild.env import device_info, device_name, package_versions
from vaebuild.errors import UserInputError, VaebuildError

ROW_3D, ROW_2D = "3-D eager", "2-D eager"
NOT_RUN = "not run"


def run_bench(vae, model_description, options: BenchOptions, *, log=print, command=None,
              runner_factory=None, unavailable_reason=None):
    """Measure every row of `options` for `vae` (not modified: the rows run on copies); return the JSON-ready result.

    `runner_factory` and `unavailable_reason` are handed to `runtime.TrtVae` (tests inject fakes).
    """
    import torch

    from vaebuild.model.graphs import build_graphs
    from vaebuild.model.inputs import sample_images, sample_latents
    from vaebuild.model.precision import get_precision

    device, precision, warmup, runs = options.resolve()
    dtype = get_precision(precision).dtype
    started = time.perf_counter()
    config = dict(vae.config)
    scale = vae.spatial_compression_ratio
    for size in options.sizes:
        if size.height % scale or size.width % scale:
            raise UserInputError(f"size {size.label} is not a multiple of {scale}, the VAE's downsampling factor")

    from vaebuild.model.source import weights_sha256

    model_sha256 = weights_sha256(vae) if options.engines else None
    opened = [
        _open_engines(model_sha256, folder, device, runner_factory, unavailable_reason, log, cuda_graphs)
        for cuda_graphs in ((False, True) if options.cuda_graphs else (False,))
        for folder in options.engines
    ]
    for info, _ in list(opened[:len(options.engines)]):  # folders built with --tile: their tiled rows too
        if info.get("tiles"):
            opened.append(_open_engines(model_sha256, Path(info["dir"]), device, runner_factory, unavailable_reason,
                                        log, tiled=True))
    fresh_loads = [{} for _ in opened]
    for (info, runtime), loads in zip(opened, fresh_loads):
        if runtime is not None and options.fresh_process_loads and not info["cuda_graphs"] and not info["tiled"]:
            log(f"measuring engine loads of {info['dir']} in fresh processes ...")
            loads.update(measure_fresh_loads(runtime, device, info, log))
    log(f"preparing models on {device_name(device)} in {precision} ...")
    encoder2d, decoder2d = (m.to(device=device, dtype=dtype) for m in build_graphs(vae, fast_attention=True, fused_norms=True))
    # nn.Module.to: diffusers' own `to` warns about float32-kept modules even when there are none (this VAE).
    vae3d = torch.nn.Module.to(copy.deepcopy(vae), device=device, dtype=dtype).eval()
    flops = {}
    if options.flops:
        log("counting FLOPs on the meta device ...")
        flops = count_flops({k: v for k, v in config.items() if not k.startswith("_")}, options.sizes, options.batch)

    calls = {
        "encoder": {ROW_3D: lambda x: vae3d.encode(x).latent_dist.parameters, ROW_2D: encoder2d},
        "decoder": {ROW_3D: lambda z: vae3d.decode(z).sample, ROW_2D: decoder2d},
    }
    rows = []
    total = len(options.sizes) * len(TABLE_ORDER) * (2 + len(opened))
    with torch.no_grad():
        for size in options.sizes:
            batch = options.batch
            inputs = {
                "encoder": sample_images((batch, config["input_channels"], 1, size.height, size.width), options.seed),
                "decoder": sample_latents(
                    (batch, config["z_dim"], 1, size.height // scale, size.width // scale), vae.config, options.seed
                ),
            }
            for graph in TABLE_ORDER:
                x = inputs[graph].to(device=device, dtype=dtype)
                baseline = None
                for row_name, fn in calls[graph].items():
                    row = _Row(size, graph, row_name, "pytorch-3d" if row_name == ROW_3D else "pytorch-2d")
                    flop = flops.get((size.label, graph), {}).get(row_name)
                    row.data.update(flop=flop, tflop=None if flop is None else round(flop / 1e12, 3))
                    _measure_row(row, lambda fn=fn: fn(x), device, warmup, runs)
                    if row_name == ROW_3D:
                        baseline = row.data["median_ms"]
                    rows.append(_finish(row, baseline, rows, total, log))
                for index, ((info, runtime), loads) in enumerate(zip(opened, fresh_loads)):
                    row = _engine_row(runtime, info, index, size, graph, x, device, warmup, runs)
                    row.data.update(loads.get(row.data.get("engine"), {}))
                    rows.append(_finish(row, baseline, rows, total, log))
                    if runtime is not None:
                        runtime.release()  # one folder's engines at a time on the GPU
    return {
        "benchmark": "vaebuild bench",
        "vaebuild_version": vaebuild.__version__,
        "timestamp_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "device": device_info(device),
        "versions": package_versions(),
        "precision": precision,
        "batch": options.batch,
        "warmup": warmup,
        "runs": runs,
        "timer": "cuda-event" if device.type == "cuda" else "perf_counter (CPU)",
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "model": model_description,
        "engines": [info for info, _ in opened],
        "sizes": [asdict(s) | {"label": s.label} for s in options.sizes],
        "rows": rows,
        "total_seconds": round(time.perf_counter() - started, 1),
    }


def _open_engines(model_sha256, folder, device, runner_factory, unavailable_reason, log, cuda_graphs=False,
                  tiled=False):
    """(engine info for the JSON, VaeRuntime or None); a folder that cannot be opened becomes a reason.
    `model_sha256`: `weights_sha256` of the benchmarked model, hashed once for every folder. `tiled`: the runtime
    runs every size through the folder's tile engines (`tiling=True`)."""
    from vaebuild.runtime import VaeRuntime, read_engine_dir

    info = {"dir": str(folder), "cuda_graphs": cuda_graphs, "tiled": tiled}
    try:
        manifest, _ = read_engine_dir(folder)
    except UserInputError as err:
        info["error"] = str(err)
        return info, None
    engines = manifest["engines"]
    info.update(
        kind=manifest["kind"],
        precision=manifest["precision"],
        backends=sorted({e["backend"] for e in engines}),
        backend_versions=sorted({e["backend_version"] for e in engines}),
        files=[e["path"] for e in engines],
        model=manifest.get("model"),
        weights_match=manifest.get("weights_sha256") == model_sha256,
        tiles=manifest.get("tiles", {}).get("tile"),
    )
    if not info["weights_match"] and not cuda_graphs and not tiled:
        log(f"note: the engines in {folder} were built from other weights than the benchmarked model")
    info["disk_mb"] = round(_folder_disk_bytes(folder, manifest) / 1e6, 1)
    try:
        trt_vae = VaeRuntime(
            folder,
            device=device,
            resident="lazy",
            allow_fallback=False,
            runner_factory=runner_factory,
            unavailable_reason=unavailable_reason,
            cuda_graphs=cuda_graphs,
            tiling=True if tiled else "auto",
        )
    except UserInputError as err:  # e.g. CUDA graphs asked for TensorRT engines or a CPU run
        info["error"] = str(err)
        return info, None
    return info, trt_vae


def _engine_row(trt_vae, info, index, size, graph, x, device, warmup, runs):
    from vaebuild.model.tiling import TILE_PARENT
    from vaebuild.runtime import EngineUnavailableError

    graphs = ", CUDA graphs" if info["cuda_graphs"] else ""
    tiled = " tiled" if info["tiled"] else ""
    label = f"engine {Path(info['dir']).name}{tiled} ({info.get('kind', '?')} {info.get('precision', '')}{graphs})"
    row = _Row(size, graph, label, "engine")
    row.data["folder"] = index
    if trt_vae is None:
        row.not_run(info.get("error", "no engine folder"))
        return row
    run = trt_vae.encode if graph == "encoder" else trt_vae.decode
    loaded_before = dict(trt_vae.load_seconds)
    try:
        # Load the engines first: their cost is reported apart.
        if info["tiled"]:
            for entry in trt_vae.manifest["engines"]:
                if TILE_PARENT.get(entry["graph"]) == graph:
                    trt_vae.load(entry["path"])
        else:
            trt_vae.prepare(graph, tuple(x.shape))
        first_call_ms = time_calls(lambda: run(x), device, 0, 1)[0]
    except (EngineUnavailableError, VaebuildError) as err:
        row.not_run(str(err))
        return row
    route = trt_vae.last_route[graph]
    row.data.update(engine=route.engine, profile=route.profile, first_call_ms=round(first_call_ms, 3))
    loaded = [seconds for rel, seconds in trt_vae.load_seconds.items() if loaded_before.get(rel) != seconds]
    if loaded:
        row.data["load_seconds"] = round(sum(loaded), 3)
    _measure_row(row, lambda: run(x), device, max(0, warmup - 1), runs)
    return row


def _folder_disk_bytes(folder, manifest):
    files = [e["path"] for e in manifest["engines"]]
    if manifest.get("weights_file"):
        files.append(manifest["weights_file"]["path"])
    return sum((Path(folder) / f).stat().st_size for f in files if (Path(folder) / f).is_file())


def _finish(row, baseline, rows, total, log):
    data = row.data
    if data["status"] == "ok" and baseline:
        data["speedup_vs_3d"] = round(baseline / data["median_ms"], 3)
    for key in ("median_ms", "p90_ms", "min_ms"):
        data[key] = _round(data[key], 3)
    where = f"[{len(rows) + 1}/{total}] {data['size']} {data['graph']} {data['row']}"
    if data["status"] == "ok":
        speedup = f", {data['speedup_vs_3d']:.2f}x vs 3-D" if data["speedup_vs_3d"] else ""
        log(f"{where}: median {data['median_ms']:.2f} ms, p90 {data['p90_ms']:.2f} ms{speedup}")
    else:
        log(f"{where}: not run: {data['reason']}")
    return data


def _round(value, digits):
    return None if value is None else round(value, digits)


def count_flops(vae_config, sizes, batch):
    """{(size label, graph): {row: FLOP count}} for the 3-D and 2-D rows, counted on the meta device."""
    import torch
    from diffusers import AutoencoderKLQwenImage
    from torch.utils.flop_counter import FlopCounterMode

    from vaebuild.model.graphs import build_graphs

    with torch.device("meta"):
        meta_vae = AutoencoderKLQwenImage.from_config(vae_config).eval()
    encoder2d, decoder2d = build_graphs(meta_vae)
    calls = {
        "encoder": {ROW_3D: lambda x: meta_vae.encode(x), ROW_2D: encoder2d},
        "decoder": {ROW_3D: lambda z: meta_vae.decode(z), ROW_2D: decoder2d},
    }
    scale = meta_vae.spatial_compression_ratio
    flops = {}
    for size in sizes:
        inputs = {
            "encoder": torch.empty(batch, vae_config["input_channels"], 1, size.height, size.width, device="meta"),
            "decoder": torch.empty(
                batch, vae_config["z_dim"], 1, size.height // scale, size.width // scale, device="meta"
            ),
        }
        for graph in TABLE_ORDER:
            for row, fn in calls[graph].items():
                with torch.no_grad(), FlopCounterMode(display=False) as counter:
                    fn(inputs[graph])
                flops.setdefault((size.label, graph), {})[row] = counter.get_total_flops()
    return flops


class _Row:
    """Accumulates one result row as a JSON-ready dict."""

    def __init__(self, size, graph, row, kind):
        self.data = {
            "size": size.label,
            "name": size.name,
            "height": size.height,
            "width": size.width,
            "graph": graph,
            "row": row,
            "kind": kind,
            "status": "ok",
            "reason": None,
            "median_ms": None,
            "p90_ms": None,
            "min_ms": None,
            "times_ms": None,
            "speedup_vs_3d": None,
            "flop": None,
            "tflop": None,
            "peak_mem_mib": None,
            "load_seconds": None,
            "load_ms": None,
            "first_call_ms": None,
            "gpu_mb_held": None,
        }

    def not_run(self, reason):
        self.data.update(status=NOT_RUN, reason=reason)


def _measure_row(row, fn, device, warmup, runs):
    """Time `fn` into `row`; a CUDA out-of-memory error marks the row not run instead of ending the run."""
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        times = time_calls(fn, device, warmup, runs)
    except torch.OutOfMemoryError as err:
        row.not_run(f"CUDA out of memory ({' '.join(str(err).split())[:160]})")
        return
    row.data.update(summarize(times), times_ms=[round(t, 4) for t in times])
    if device.type == "cuda":
        row.data["peak_mem_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
