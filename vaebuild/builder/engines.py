"""Engines from a build source and a profile spec: the plan, the build loop and the manifest entries.

Static: one engine pair per spec entry, `OUT/<name>/vae_{encoder,decoder}.trt`.
Multi-profile: `OUT/vae_{encoder,decoder}_multi_profile.trt`, profile index = spec order.
Both write `OUT/manifest.json`, skip engines whose inputs did not change, and write each
engine under a temporary name first. The backend decides the file suffix (`.trt` engines, `.pt2`
AOTInductor packages) and what an engine is built from (`backends.base`); inductor folders also hold
`weights.safetensors`, the one copy of the weights their packages share.
"""

import json
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path

import vaebuild
from vaebuild.backends import get_backend
from vaebuild.backends.base import BuildOptions
from vaebuild.contracts import runtime_contract
from vaebuild.errors import UserInputError, one_line
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
    `options.jobs > 1` packages compile in that many worker processes. A non-fp16 TensorRT build needs
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
            _build_in_workers(source, out_dir, todo, options, log, finished)
    except BaseException as err:
        if summary:
            for rel_path in unfinished:
                summary.add("failed", rel_path, error=one_line(err))
        raise
    return manifest


def _build_in_workers(source, out_dir, todo, options, log, finished):
    """Build engines in `options.jobs` fresh processes (`BuildOptions` allows jobs for inductor only, whose backend
    provides `build_request` and `build_from_request`); the manifest is updated here as each one ends."""
    backend = get_backend(options.backend)
    requests = {
        prefix: backend.build_request(source, graph, out_dir / rel_path, requested, options)
        for prefix, rel_path, graph, profiles, requested, key in todo
    }
    log(f"compiling {len(todo)} package(s) in {min(options.jobs, len(todo))} worker processes ...")
    with ProcessPoolExecutor(max_workers=min(options.jobs, len(todo)), mp_context=get_context("spawn")) as pool:
        futures = {prefix: pool.submit(backend.build_from_request, requests[prefix]) for prefix in requests}
        for prefix, rel_path, graph, profiles, requested, key in todo:
            finished(prefix, rel_path, graph, profiles, futures[prefix].result(), key)


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
