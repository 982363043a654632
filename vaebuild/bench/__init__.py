"""`vaebuild bench`: standalone VAE latency per image size, diffusers 3-D vs vaebuild 2-D vs built engines.

Rows, for the encoder and the decoder separately at each size:
    3-D eager   diffusers `AutoencoderKLQwenImage.encode()` / `.decode()`: the PyTorch baseline
    2-D eager   vaebuild's exact single-frame graphs (`graphs.build_graphs`), eager PyTorch
    engine      for each `--engines DIR` (repeatable: folders are compared in the same run), the
                engine that serves the size, through `runtime.VaeRuntime` (never its PyTorch
                fallback); otherwise the row says "not run: <reason>"

Engine costs users plan around: per engine row `load_ms` and `gpu_mb_held` measured in a fresh
process (`vaebuild.bench.load_probe`, one subprocess per static pair, encoder first: the first weight-free
package of a folder also reads the shared weights), `first_call_ms` (the first call after the load,
in this process); per folder `resident_mb` (every engine loaded at once, weights included, in a fresh
process) and `disk_mb` (engine files plus the weights file).

Timing: `warmup` untimed calls, then `runs` timed calls; CUDA events on a GPU, `time.perf_counter`
on a CPU; median and p90 (nearest rank). Speedup = the 3-D median of the same size and graph, measured
in the same run, divided by the row's median. Peak memory is `torch.cuda.max_memory_allocated`, reset
before each row (it includes resident weights, and not TensorRT's own allocations). FLOPs are counted
once per size on the meta device (`torch.utils.flop_counter`), so they cost no device time.
"""

import copy
import math
import statistics
import time
import warnings
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import vaebuild
from vaebuild.env import device_info, device_name, package_versions
from vaebuild.errors import UserInputError, VaebuildError

GPU_WARMUP, GPU_RUNS = 3, 10
CPU_WARMUP, CPU_RUNS = 1, 3
GRAPHS = ("decoder", "encoder")  # table order
ROW_3D, ROW_2D = "3-D eager", "2-D eager"
NOT_RUN = "not run"


@dataclass(frozen=True)
class BenchSize:
    """One image size; `name` says where it came from (a spec profile name or the `--sizes` text)."""

    name: str
    height: int
    width: int

    @property
    def label(self) -> str:
        """`WxH`, as the tables print sizes."""
        return f"{self.width}x{self.height}"


@dataclass(frozen=True)
class BenchOptions:
    """What to measure; None means the device's default (see `resolve`)."""

    sizes: tuple[BenchSize, ...]
    device: str = "auto"  # auto | cpu | cuda
    precision: str | None = None  # default: bf16 on cuda, fp32 on cpu
    warmup: int | None = None
    runs: int | None = None
    batch: int = 1
    engines: tuple = ()  # engine folders (a single path is accepted too)
    flops: bool = True
    seed: int = 0
    fresh_process_loads: bool = True  # measure engine loads in subprocesses (see vaebuild.bench.load_probe)
    cuda_graphs: bool = False  # also time each folder's packages replayed from CUDA graphs (more engine rows)

    def __post_init__(self):
        engines = (self.engines,) if isinstance(self.engines, (str, Path)) else self.engines or ()
        object.__setattr__(self, "engines", tuple(Path(e) for e in engines))
        if not self.sizes:
            raise UserInputError("no sizes to benchmark; pass --sizes WxH[,WxH...]")
        if self.cuda_graphs and not self.engines:
            raise UserInputError("--cuda-graphs times engine folders; pass --engines DIR")
        for name, value, low in (("--warmup", self.warmup, 0), ("--runs", self.runs, 1), ("--batch", self.batch, 1)):
            if value is not None and value < low:
                raise UserInputError(f"{name} {value} must be at least {low}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UserInputError(f"--device {self.device!r}: use auto, cpu or cuda")
        if self.precision is not None:
            from vaebuild.model.precision import get_precision

            get_precision(self.precision)

    def resolve(self):
        """(torch device, precision name, warmup, runs) with the device defaults filled in."""
        import torch

        if self.device == "cuda" and not torch.cuda.is_available():
            raise UserInputError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
        use_cuda = self.device == "cuda" or (self.device == "auto" and torch.cuda.is_available())
        device = torch.device("cuda" if use_cuda else "cpu")
        precision = self.precision or ("bf16" if use_cuda else "fp32")
        warmup = self.warmup if self.warmup is not None else (GPU_WARMUP if use_cuda else CPU_WARMUP)
        runs = self.runs if self.runs is not None else (GPU_RUNS if use_cuda else CPU_RUNS)
        return device, precision, warmup, runs


def default_sizes():
    """The five T2I static sizes and the nine I2I multi-profile opt sizes of the shipped specs, in file order."""
    from vaebuild.builder.specs import RoundingWarning, default_spec_path, load_spec

    sizes, seen = [], set()
    for kind in ("static", "multiprofile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RoundingWarning)  # 4_3: 1140 -> 1136, documented in the spec
            spec = load_spec(default_spec_path(kind))
        for profile in spec.profiles:
            key = (profile.opt.height, profile.opt.width)
            if key not in seen:
                seen.add(key)
                sizes.append(BenchSize(profile.name, *key))
    return tuple(sizes)


def parse_sizes(text):
    """`"1328x1328,512x512"` (width x height) -> BenchSizes; sides must be multiples of 8, at least 16."""
    sizes = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        width, sep, height = item.lower().partition("x")
        if not (sep and width.isdigit() and height.isdigit()):
            raise UserInputError(f"--sizes entry {item!r} must look like 1328x1328 (width x height)")
        width, height = int(width), int(height)
        for side in (width, height):
            if side < 16 or side % 8:
                raise UserInputError(f"--sizes entry {item!r}: sides must be multiples of 8 and at least 16")
        sizes.append(BenchSize(item, height, width))
    if not sizes:
        raise UserInputError("--sizes is empty; pass e.g. 1328x1328,512x512")
    return tuple(sizes)


# ---------------------------------------------------------------------------- measuring


def time_calls(fn, device, warmup, runs):
    """Milliseconds of `runs` calls of `fn` after `warmup` untimed ones (CUDA events on a GPU)."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(runs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(runs):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return times


def summarize(times):
    """median, p90 (nearest rank) and min of a list of milliseconds."""
    ordered = sorted(times)
    p90 = ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]
    return {"median_ms": statistics.median(ordered), "p90_ms": p90, "min_ms": ordered[0]}


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
        for graph in GRAPHS:
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


# ---------------------------------------------------------------------------- the run


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
    fresh_loads = [{} for _ in opened]
    for (info, runtime), loads in zip(opened, fresh_loads):
        if runtime is not None and options.fresh_process_loads and not info["cuda_graphs"]:
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
    total = len(options.sizes) * len(GRAPHS) * (2 + len(opened))
    with torch.no_grad():
        for size in options.sizes:
            batch = options.batch
            inputs = {
                "encoder": sample_images((batch, config["input_channels"], 1, size.height, size.width), options.seed),
                "decoder": sample_latents(
                    (batch, config["z_dim"], 1, size.height // scale, size.width // scale), vae.config, options.seed
                ),
            }
            for graph in GRAPHS:
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


def _open_engines(model_sha256, folder, device, runner_factory, unavailable_reason, log, cuda_graphs=False):
    """(engine info for the JSON, VaeRuntime or None); a folder that cannot be opened becomes a reason.
    `model_sha256`: `weights_sha256` of the benchmarked model, hashed once for every folder."""
    from vaebuild.runtime import VaeRuntime, read_engine_dir

    info = {"dir": str(folder), "cuda_graphs": cuda_graphs}
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
    )
    if not info["weights_match"] and not cuda_graphs:
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
        )
    except UserInputError as err:  # e.g. CUDA graphs asked for TensorRT engines or a CPU run
        info["error"] = str(err)
        return info, None
    return info, trt_vae


def _engine_row(trt_vae, info, index, size, graph, x, device, warmup, runs):
    from vaebuild.runtime import EngineUnavailableError

    graphs = ", CUDA graphs" if info["cuda_graphs"] else ""
    label = f"engine {Path(info['dir']).name} ({info.get('kind', '?')} {info.get('precision', '')}{graphs})"
    row = _Row(size, graph, label, "engine")
    row.data["folder"] = index
    if trt_vae is None:
        row.not_run(info.get("error", "no engine folder"))
        return row
    run = trt_vae.encode if graph == "encoder" else trt_vae.decode
    loaded_before = dict(trt_vae.load_seconds)
    try:
        route = trt_vae.prepare(graph, tuple(x.shape))  # loads the engine: its cost is reported apart
        first_call_ms = time_calls(lambda: run(x), device, 0, 1)[0]
    except (EngineUnavailableError, VaebuildError) as err:
        row.not_run(str(err))
        return row
    row.data.update(engine=route.engine, profile=route.profile, first_call_ms=round(first_call_ms, 3))
    if trt_vae.load_seconds.get(route.engine) != loaded_before.get(route.engine):
        row.data["load_seconds"] = round(trt_vae.load_seconds[route.engine], 3)
    _measure_row(row, lambda: run(x), device, max(0, warmup - 1), runs)
    return row


def measure_fresh_loads(runtime, device, info, log=print):
    """{engine: {"load_ms", "gpu_mb_held"}} from fresh processes (one per static pair, one for a multi-profile
    folder); `info` gets the folder's `resident_mb` (everything loaded at once, in one more process)."""
    import json
    import subprocess
    import sys
    import tempfile

    groups = {}
    for rel_path in runtime.engine_paths:
        groups.setdefault(Path(rel_path).parent.as_posix(), []).append(rel_path)
    # The encoder first, as a pipeline that encodes then decodes loads them.
    ordered = [sorted(group, key=lambda rel: "decoder" in rel) for group in groups.values()]

    def run_probe(engines):
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "probe.json"
            command = [sys.executable, "-m", "vaebuild.bench.load_probe", str(runtime.engine_dir), str(result),
                       "--device", str(device)]
            if engines:
                command += ["--engines", ",".join(engines)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode or not result.is_file():
                raise VaebuildError(f"load probe failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
            return json.loads(result.read_text())

    loads = {}
    try:
        for engines in ordered:
            loads.update(run_probe(engines)["engines"])
        info["resident_mb"] = run_probe(None)["resident_mb"]
    except VaebuildError as err:
        log(f"note: {err}")
        info["load_probe_error"] = str(err)
    return loads


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


# ---------------------------------------------------------------------------- output


def render_markdown(result, details=True):
    """The seed guide's table shape (size | decoder ... | encoder ...), notes, and optionally every row."""
    rows = result["rows"]
    folders = result["engines"]
    by_key = {(r["size"], r["graph"], r["kind"], r.get("folder")): r for r in rows}
    cpu = result["device"]["type"] != "cuda"
    title = f"VAE latency: {result['device']['name']}, {result['precision']}, batch {result['batch']}"
    lines = [f"## {title}", ""]
    if cpu:
        lines += ["**CPU run**: perf_counter timings on the CPU; not comparable with GPU results.", ""]
    lines += [
        f"{result['timer']} timing, {result['warmup']} warm-up calls, median of {result['runs']} runs; "
        f"torch {result['versions']['torch']}, diffusers {result['versions']['diffusers']}, "
        f"vaebuild {result['vaebuild_version']}; model {_model_text(result['model'])}; {result['timestamp_utc']}.",
        "",
    ]
    columns = [("3-D", "pytorch-3d", None), ("2-D", "pytorch-2d", None)]
    columns += [(f"E{i + 1}" if len(folders) > 1 else "engine", "engine", i) for i in range(len(folders))]
    names = [name for name, _, _ in columns]
    header = ["size WxH"]
    for graph in GRAPHS:
        header += [
            f"{graph} TFLOP 3-D / 2-D",
            f"{graph} ms {' / '.join(names)}",
            f"{graph} speedup {' / '.join(names[1:])}",
        ]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for size in result["sizes"]:
        cells = [size["label"]]
        for graph in GRAPHS:
            found = [by_key.get((size["label"], graph, kind, folder)) for _, kind, folder in columns]
            cells.append(" / ".join(_fmt(r and r["tflop"], 2) for r in found[:2]))
            cells.append(" / ".join(_fmt(r and r["median_ms"], 1) for r in found))
            cells.append(" / ".join(_fmt(r and r["speedup_vs_3d"], 2, "x") for r in found[1:]))
        lines.append("| " + " | ".join(cells) + " |")
    reasons = {}
    for r in rows:
        if r["status"] != "ok":
            reasons.setdefault(r["reason"], []).append(f"{r['size']} {r['graph']} {r['row']}")
    if reasons:
        lines += ["", "Not run (shown as -):"]
        for reason, where in reasons.items():
            lines.append(f"- {reason} ({len(where)} row(s), e.g. {where[0]})")
    for index, e in enumerate(folders):
        if e.get("kind"):
            name = names[2 + index]
            graphs = ", replayed from CUDA graphs (first call captures)" if e.get("cuda_graphs") else ""
            lines += [
                "",
                f"{name}: {e['dir']} ({e['kind']}, {e['precision']}, {', '.join(e['backends'])} "
                f"{', '.join(e['backend_versions'])}{graphs}; same weights as the PyTorch rows: {e['weights_match']}).",
            ]
            if not e.get("cuda_graphs"):
                lines += _load_table(result, index, e)
    if result.get("command"):
        lines += ["", f"Command: `{result['command']}`"]
    if details:
        lines += ["", "### All rows", "",
                  "| size WxH | graph | row | median ms | p90 ms | speedup vs 3-D | TFLOP | peak MiB | load s | note |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            note = r["reason"] if r["status"] != "ok" else (r.get("engine") or "")
            lines.append(
                f"| {r['size']} | {r['graph']} | {r['row']} | {_fmt(r['median_ms'], 2)} | {_fmt(r['p90_ms'], 2)} | "
                f"{_fmt(r['speedup_vs_3d'], 2, 'x')} | {_fmt(r['tflop'], 2)} | {_fmt(r['peak_mem_mib'], 0)} | "
                f"{_fmt(r['load_seconds'], 2)} | {note} |"
            )
    return "\n".join(lines) + "\n"


def _load_table(result, index, e):
    """Load and memory costs per engine of one folder, and its totals, beside LightX2V's TensorRT figures."""
    lines = ["", f"Loading and memory, {Path(e['dir']).name}:", "",
             "| engine | load ms (fresh process) | first call ms | GPU MB held after load |", "|---|---|---|---|"]
    seen = set()
    for r in result["rows"]:
        if r["kind"] != "engine" or r.get("folder") != index or r["status"] != "ok" or r.get("engine") in seen:
            continue
        seen.add(r.get("engine"))
        lines.append(f"| {r['engine']} | {_fmt(r['load_ms'], 1)} | {_fmt(r['first_call_ms'], 1)} | "
                     f"{_fmt(r['gpu_mb_held'], 1)} |")
    lines += ["", f"Folder: every engine resident at once: {_fmt(e.get('resident_mb'), 1)} MB of GPU memory "
              f"(weights included); on disk: {_fmt(e.get('disk_mb'), 1)} MB. For reference, LightX2V's Qwen-Image VAE "
              "TensorRT guide (static engines, H100): about 5 GB of GPU memory per engine pair, first load 178-344 ms."]
    return lines


def _fmt(value, digits, suffix=""):
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def _model_text(model):
    if not model:
        return "?"
    if model.get("kind") == "random-init":
        return f"random-init (seed {model.get('seed')})"
    return f"{model.get('kind')} {model.get('model', '')}".strip()


def write_results(result, json_path=None, markdown_path=None):
    """Write the JSON result and/or the Markdown tables (parent folders are created)."""
    from vaebuild.fileio import write_json, write_text

    if json_path:
        write_json(Path(json_path), result)
    if markdown_path:
        write_text(Path(markdown_path), render_markdown(result))
