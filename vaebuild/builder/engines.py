"""Engines from a build source and a profile spec: the plan, the build loop and the manifest entries.

Static: one engine pair per spec entry, `OUT/<name>/vae_{encoder,decoder}.trt`.
Multi-profile: `OUT/vae_{encoder,decoder}_multi_profile.trt`, profile index = spec order.
Both write `OUT/manifest.json`, skip engines whose inputs did not change, and write each
engine under a temporary name first. The backend decides the file suffix (`.trt` engines, `.pt2`
AOTInductor packages) and what an engine is built from (`backends.base`); inductor folders also hold
`weights.safetensors`, the one copy of the weights their packages share.
"""

import json
import signal
from collections import deque
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from multiprocessing import get_context, resource_tracker
from multiprocessing.connection import wait
from pathlib import Path

import vaebuild
from vaebuild.backends import get_backend
from vaebuild.backends.base import BuildOptions
from vaebuild.contracts import runtime_contract
from vaebuild.errors import UserInputError, VaebuildError, one_line
from vaebuild.export import RECORD_NAME
from vaebuild.manifest import MANIFEST_VERSION, build_key, engine_is_current, read_manifest, update_manifest
from vaebuild.model import GRAPHS


def read_export_record(onnx_dir):
    """The export record of a `vaebuild export` folder, with both ONNX files present."""
    onnx_dir = Path(onnx_dir)
    record_path = onnx_dir / RECORD_NAME
    if not record_path.is_file():
        raise UserInputError(f"{onnx_dir} has no {RECORD_NAME}; pass a folder written by `vaebuild export`")
    record = json.loads(record_path.read_text())
    for graph in record["graphs"].values():
        if not (onnx_dir / graph["file"]).is_file():
            raise UserInputError(f"{onnx_dir / graph['file']} is missing; re-run `vaebuild export`")
    return record


@dataclass
class BuildSource:
    """What engines are built from: a `vaebuild export` folder (TensorRT backends) or the VAE itself (inductor).

    `record` has the export record's shape either way: model, weights_sha256, vae_config, precision,
    single_frame_fold and, per graph, its input and output names (plus file and sha256 for ONNX).
    """

    record: dict
    onnx_dir: Path | None = None
    vae: object = None
    weights_path: Path | None = None  # the folder's weights file, once written (pytorch builds)

    @classmethod
    def from_onnx_dir(cls, onnx_dir):
        """The export in `onnx_dir`."""
        return cls(read_export_record(onnx_dir), onnx_dir=Path(onnx_dir).resolve())

    @classmethod
    def from_vae(cls, vae, described, precision):
        """A loaded VAE (`described`: its `ModelSource.describe()`), compiled at `precision`."""
        from vaebuild.model.graphs import describe_graphs
        from vaebuild.model.source import weights_sha256
        from vaebuild.model.precision import get_precision

        get_precision(precision)
        record = {
            "model": described,
            "weights_sha256": weights_sha256(vae),
            "vae_config": {k: v for k, v in dict(vae.config).items() if not k.startswith("_")},
            "precision": precision,
            "single_frame_fold": True,
            "graphs": {
                g.name: {"input": {"name": g.input_name}, "output": {"name": g.output_name},
                         "spatial_multiple": round(1 / g.scale) if g.scale < 1 else 1}
                for g in describe_graphs(vae)
            },
        }
        return cls(record, vae=vae)

    def onnx_path(self, graph):
        """The ONNX file of `graph` (TensorRT backends)."""
        if self.onnx_dir is None:
            raise UserInputError("TensorRT backends build from ONNX; pass --onnx DIR or the model options")
        return self.onnx_dir / self.record["graphs"][graph]["file"]

    def write_weights(self, out_dir):
        """Write the 2-D graphs' weights at the build precision to `out_dir` (pytorch builds); return the record."""
        from vaebuild.model.graphs import build_graphs
        from vaebuild.model.precision import get_precision
        from vaebuild.weights_file import WEIGHTS_NAME, write_weights_file

        if self.vae is None:
            raise UserInputError("the inductor backend compiles the PyTorch model; pass --model or --random-init, not --onnx")
        dtype = get_precision(self.record["precision"]).dtype
        graphs = [module.to(dtype=dtype) for module in build_graphs(self.vae)]
        self.weights_path = Path(out_dir) / WEIGHTS_NAME
        return write_weights_file(self.weights_path, graphs)


def planned_engines(spec, kind, suffix=".trt"):
    """(relative path, graph, [profile]) for every engine a build of `spec` produces."""
    if kind == "static":
        if spec.kind != "static":
            raise UserInputError(f"{spec.path} is a {spec.kind} spec; use `vaebuild multiprofile --spec {spec.path}`")
        return [(f"{p.name}/vae_{graph}{suffix}", graph, [p]) for p in spec.profiles for graph in GRAPHS]
    return [(f"vae_{graph}_multi_profile{suffix}", graph, list(spec.profiles)) for graph in GRAPHS]


def check_before_export(kind, spec, options: BuildOptions):
    """Raise the errors a build would raise that need no export or model (spec kind, backend missing, no GPU)."""
    backend = get_backend(options.backend)
    planned_engines(spec, kind, backend.file_suffix)
    backend.version()
    backend.build_target(options)


def profile_shapes(graph, profile, record):
    """(min, opt, max) input shapes of `graph` for one spec profile, sized for the exported model."""
    if hasattr(profile, "input_shapes"):  # a tile package's profile (builder.tiles)
        return profile.input_shapes
    config = record["vae_config"]
    if graph == "encoder":
        return profile.encoder_shapes(image_channels=config["input_channels"])
    return profile.decoder_shapes(latent_channels=config["z_dim"])


def build_engines(kind, spec, source, out_dir, options: BuildOptions, log=print, allow_non_fp16=False, summary=None,
                  tile=None, static_spec=None):
    """Build (or skip, if up to date) every engine of `spec`; return the manifest written to `out_dir`.

    `source` is a `BuildSource` (or, for the TensorRT backends, a `vaebuild export` folder). With
    `options.jobs > 1` packages compile in that many worker processes, where a package that fails twice
    does not stop the others (`_build_in_workers`). A non-fp16 TensorRT build needs
    `allow_non_fp16` (see `vaebuild.contracts`); `summary`, a `vaebuild.summary.RunSummary`, records
    each engine as built, skipped or failed. `tile` (height, width image pixels; inductor only) adds the exact-tile
    packages (`vaebuild.builder.tiles`). `static_spec` (a static spec; multiprofile builds only) adds its static
    pairs to the folder, `<name>/vae_{encoder,decoder}`: a mixed folder (docs/runtime.md#mixed-folders).
    """
    if not isinstance(source, BuildSource):
        source = BuildSource.from_onnx_dir(source)
    backend = get_backend(options.backend)
    out_dir = Path(out_dir)
    record = source.record
    contract = runtime_contract(options.backend, record["precision"], allow_non_fp16)
    previous = read_manifest(out_dir) or {"kind": kind, "engines": []}
    if previous["kind"] != kind:
        raise UserInputError(f"{out_dir} already holds a {previous['kind']} build; pass another --out")
    plan = planned_engines(spec, kind, backend.file_suffix)
    if static_spec is not None:  # exact-size pairs beside the multi-profile pair (vaebuild.builder.run checks the kinds)
        plan += planned_engines(static_spec, "static", backend.file_suffix)
    if tile:
        from vaebuild.builder.tiles import add_tile_graphs, tile_plan

        record = source.record = add_tile_graphs(record)
        plan += tile_plan(spec, record, tile, backend.file_suffix)
    # Engines only load in the builder's own version (and packages on their own GPU): a change rebuilds them.
    backend_version = backend.version()
    target = backend.build_target(options)
    previous_entries = {e["path"]: e for e in previous["engines"]}
    options_dict = _options_dict(options)
    header = {
        "manifest_version": MANIFEST_VERSION,
        "vaebuild_version": vaebuild.__version__,
        "kind": kind,
        "spec": {"path": str(spec.path), "names": list(spec.names)},
        "onnx_dir": None if source.onnx_dir is None else str(source.onnx_dir),
        "model": record["model"],
        "weights_sha256": record["weights_sha256"],
        "vae_config": record["vae_config"],
        "precision": record["precision"],
        "runtime_contract": contract,
        "single_frame_fold": record["single_frame_fold"],
        "build_options": options_dict,
    }
    if static_spec is not None:
        header["static_spec"] = {"path": str(static_spec.path), "names": list(static_spec.names)}
    if tile:
        from vaebuild.builder.tiles import tiles_header

        header["tiles"] = tiles_header(record, tile)
    if backend.builds_from == "pytorch":
        weights = header["weights_file"] = source.write_weights(out_dir)
        log(f"weights: {weights['path']} ({weights['size_bytes'] / 1e6:.1f} MB, {weights['tensors']} tensors)")

    manifest = None
    unfinished = []  # engines started or queued and not yet listed

    def listed(entry):
        nonlocal manifest
        manifest = update_manifest(out_dir, header, entry)
        if entry["path"] in unfinished:
            unfinished.remove(entry["path"])

    def finished(prefix, rel_path, graph, profiles, info, key):
        log(f"{prefix}: built in {info.build_seconds:.1f} s, {info.size_bytes / 1e6:.1f} MB")
        if summary:
            summary.add("built", rel_path, seconds=round(info.build_seconds, 2), size_bytes=info.size_bytes)
        listed(_engine_entry(rel_path, graph, profiles, record["graphs"][graph], info, key, record, target))

    def failed(rel_path, error):
        if summary:
            summary.add("failed", rel_path, error=error)
        unfinished.remove(rel_path)

    # Skip the current engines and build the others, in plan order (or in worker processes).
    try:
        todo = []
        for index, (rel_path, graph, profiles) in enumerate(plan, start=1):
            graph_record = record["graphs"][graph]
            requested = [{graph_record["input"]["name"]: profile_shapes(graph, p, record)} for p in profiles]
            key = build_key(
                source_sha256=graph_record.get("sha256", record["weights_sha256"]),
                precision=record["precision"],
                profiles=requested,
                options={k: v for k, v in options_dict.items() if k != "jobs"},
                backend=options.backend,
                backend_version=backend_version,
                target=target,
                **backend.kernel_choices(record, graph, requested),
            )
            prefix = f"[{index}/{len(plan)}] {rel_path}"
            old = previous_entries.get(rel_path)
            if engine_is_current(out_dir, old, key):
                log(f"{prefix}: up to date, skipped")
                if summary:
                    summary.add("skipped", rel_path)
                listed(old)
            elif options.jobs > 1:
                todo.append((prefix, rel_path, graph, profiles, requested, key))
                unfinished.append(rel_path)
            else:
                unfinished.append(rel_path)
                log(f"{prefix}: building {len(profiles)} profile(s) with {options.backend} ...")
                info = backend.build_engine(source, graph, out_dir / rel_path, requested, options)
                finished(prefix, rel_path, graph, profiles, info, key)
        if todo:
            _build_in_workers(source, out_dir, todo, options, log, finished, failed)
    except BaseException as err:
        if summary:
            for rel_path in unfinished:
                summary.add("failed", rel_path, error=one_line(err))
        raise
    return manifest


def _build_in_workers(source, out_dir, todo, options, log, finished, failed):
    """Build engines in up to `options.jobs` worker processes (`BuildOptions` allows jobs for inductor only, whose
    backend provides `build_request` and `build_from_request`); the manifest is updated here as each one ends.

    Each package compiles in a fresh spawned process of its own, so a fault that kills or poisons a process (a
    CUDA illegal memory access, a segfault, the OOM killer) fails only that package. It is retried once in
    another fresh process (a `VaebuildError`, a problem with the input, is not); if that fails too, the package
    is reported failed in one line and the others go on. Then a `VaebuildError` names the failed packages.
    """
    backend = get_backend(options.backend)
    context = get_context("spawn")
    jobs = min(options.jobs, len(todo))
    queue = deque((item, 1) for item in todo)
    running = {}  # the reading end of a worker's pipe -> (process, engine path, todo item, attempt)
    failures = []
    log(f"compiling {len(todo)} package(s) in {jobs} worker processes ...")
    # Started before any worker: when it starts, the tracker unblocks SIGINT (CPython), which must stay blocked
    # while a worker starts (below).
    resource_tracker.ensure_running()
    try:
        while queue or running:
            while queue and len(running) < jobs:
                item, attempt = queue.popleft()
                prefix, rel_path, graph, profiles, requested, key = item
                request = backend.build_request(source, graph, out_dir / rel_path, requested, options)
                reader, writer = context.Pipe(duplex=False)
                process = context.Process(target=_compile_in_worker, args=(backend.build_from_request, request, writer))
                # Started with SIGINT blocked, which it inherits for good: Ctrl-C is this process's to handle
                # (it ends the workers), and a worker still starting up prints no traceback of its own.
                unblocked = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT])
                try:
                    process.start()
                    running[reader] = (process, out_dir / rel_path, item, attempt)
                finally:
                    signal.pthread_sigmask(signal.SIG_SETMASK, unblocked)
                writer.close()  # the worker's end: EOF here once the worker is gone
            for reader in wait(list(running)):
                process, engine_path, item, attempt = running[reader]
                prefix, rel_path, graph, profiles, requested, key = item
                try:
                    message = reader.recv()  # ("built", info) or ("failed", error, retry)
                except EOFError:
                    message = None
                _end_worker(process, engine_path)
                del running[reader]
                reader.close()
                if message is not None and message[0] == "built":
                    finished(prefix, rel_path, graph, profiles, message[1], key)
                    continue
                error, retry = message[1:] if message is not None else (_how_it_died(process), True)
                if attempt == 1 and retry:
                    log(f"{prefix}: compile failed ({error}); retrying in a fresh process")
                    queue.appendleft((item, 2))
                else:
                    log(f"{prefix}: failed: {error}")
                    failed(rel_path, error)
                    failures.append(rel_path)
    finally:  # Ctrl-C or an error here: no worker outlives the build, nor its temporary files
        for process, engine_path, _, _ in running.values():
            _end_worker(process, engine_path, wait_s=0)
    if failures:
        failures = [rel_path for _, rel_path, *_ in todo if rel_path in failures]  # in plan order
        raise VaebuildError(
            f"{len(failures)} of {len(todo)} package(s) failed to compile: {', '.join(failures)}; the others are "
            "built and listed in the manifest; re-run to retry the failed ones"
        )


def _compile_in_worker(build_from_request, request, conn):
    """A worker process: send ("built", EngineInfo) or ("failed", one-line error, whether a retry may help).

    Its temporary files are named `.NAME.*.PID.*` (`compile_package`), so the parent can remove those of a
    worker that was killed.
    """
    try:
        message = ("built", build_from_request(request))
    except BaseException as err:
        user_error = isinstance(err, VaebuildError)  # a problem with the input: a retry cannot help
        message = ("failed", one_line(err, with_type=not user_error), not user_error)
    conn.send(message)
    conn.close()


def _end_worker(process, engine_path, wait_s=60):
    """Wait up to `wait_s` for a worker to exit, kill it if it has not, and remove its temporary files."""
    process.join(wait_s)
    if process.is_alive():
        process.kill()
        process.join()
    for stray in engine_path.parent.glob(f".{engine_path.name}.*.{process.pid}.*"):
        stray.unlink(missing_ok=True)


def _how_it_died(process):
    """One line on how a worker that sent no result ended."""
    code = process.exitcode
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"the worker process was killed by {name}"
    return f"the worker process exited with code {code} before reporting a result"


def _engine_entry(rel_path, graph, profiles, graph_record, info, key, record, target):
    input_name = graph_record["input"]["name"]
    entry = {
        "path": rel_path,
        "graph": graph,
        "input": input_name,
        "output": graph_record["output"]["name"],
        "profiles": [
            {
                "name": profile.name,
                "image": {"min": [profile.min.height, profile.min.width], "opt": [profile.opt.height, profile.opt.width],
                          "max": [profile.max.height, profile.max.width]},
                "batch": list(profile.batch),
                "input": {level: list(shape) for level, shape in zip(("min", "opt", "max"), built[input_name])},
            }
            for profile, built in zip(profiles, info.profiles)
        ],
        "precision": record["precision"],
        "backend": info.backend,
        "backend_version": info.backend_version,
    }
    if "sha256" in graph_record:
        entry["onnx_sha256"] = graph_record["sha256"]
    entry.update(
        weights_sha256=record["weights_sha256"],
        built_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        build_seconds=round(info.build_seconds, 2),
        size_bytes=info.size_bytes,
        sha256=info.sha256,
        build_key=key,
        **target,
        **info.manifest_fields,
    )
    return entry


def _options_dict(options):
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()}


def export_for_build(source, export_options, out_dir, log=print):
    """Export `source` into `OUT/onnx` (skipped when already current); return that folder."""
    from vaebuild.export.onnx import export_unless_current
    from vaebuild.model.source import load_vae

    onnx_dir = Path(out_dir) / "onnx"
    described = source.describe()
    log(f"loading VAE ({described['kind']}) ...")
    export_unless_current(load_vae(source), described, onnx_dir, export_options, log)
    return onnx_dir


def model_for_build(source, precision, log=print):
    """Load the VAE of `source` for a backend that compiles the PyTorch model itself (inductor)."""
    from vaebuild.model.source import load_vae

    described = source.describe()
    log(f"loading VAE ({described['kind']}) ...")
    return BuildSource.from_vae(load_vae(source), described, precision)
