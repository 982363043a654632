"""`vaebuild static` and `vaebuild multiprofile`: engines from an export and a profile spec.

Static: one engine pair per spec entry, `OUT/<name>/vae_{encoder,decoder}.trt`.
Multi-profile: `OUT/vae_{encoder,decoder}_multi_profile.trt`, profile index = spec order.
Both write `OUT/manifest.json`, skip engines whose inputs did not change, and write each
engine under a temporary name first.
"""

import json
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import vaebuild
from vaebuild.backends.trt_import import import_polygraphy_trt
from vaebuild.engine_build import BuildOptions, build_engine
from vaebuild.errors import UserInputError
from vaebuild.export import RECORD_NAME
from vaebuild.manifest import MANIFEST_VERSION, build_key, engine_is_current, read_manifest, update_manifest

GRAPHS = ("encoder", "decoder")


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


def planned_engines(spec, kind):
    """(relative path, graph, [profile]) for every engine a build of `spec` produces."""
    if kind == "static":
        if spec.kind != "static":
            raise UserInputError(f"{spec.path} is a {spec.kind} spec; use `vaebuild multiprofile --spec {spec.path}`")
        return [(f"{p.name}/vae_{graph}.trt", graph, [p]) for p in spec.profiles for graph in GRAPHS]
    return [(f"vae_{graph}_multi_profile.trt", graph, list(spec.profiles)) for graph in GRAPHS]


def check_before_export(kind, spec, options: BuildOptions):
    """Raise the errors a build would raise that need no export (spec kind, backend not installed)."""
    planned_engines(spec, kind)
    import_polygraphy_trt(options.backend)


def profile_shapes(graph, profile, record):
    """(min, opt, max) input shapes of `graph` for one spec profile, sized for the exported model."""
    config = record["vae_config"]
    if graph == "encoder":
        return profile.encoder_shapes(image_channels=config["input_channels"])
    return profile.decoder_shapes(latent_channels=config["z_dim"])


def build_engines(kind, spec, onnx_dir, out_dir, options: BuildOptions, log=print):
    """Build (or skip, if up to date) every engine of `spec`; return the manifest written to `out_dir`."""
    onnx_dir, out_dir = Path(onnx_dir).resolve(), Path(out_dir)
    record = read_export_record(onnx_dir)
    previous = read_manifest(out_dir) or {"kind": kind, "engines": []}
    if previous["kind"] != kind:
        raise UserInputError(f"{out_dir} already holds a {previous['kind']} build; pass another --out")
    plan = planned_engines(spec, kind)
    # Engines only load in the builder's own version: an upgraded backend must rebuild them.
    backend_version = import_polygraphy_trt(options.backend).trt.__version__
    previous_entries = {e["path"]: e for e in previous["engines"]}
    options_dict = _options_dict(options)
    header = {
        "manifest_version": MANIFEST_VERSION,
        "vaebuild_version": vaebuild.__version__,
        "kind": kind,
        "spec": {"path": str(spec.path), "names": list(spec.names)},
        "onnx_dir": str(onnx_dir),
        "model": record["model"],
        "weights_sha256": record["weights_sha256"],
        "vae_config": record["vae_config"],
        "precision": record["precision"],
        "single_frame_fold": record["single_frame_fold"],
        "build_options": options_dict,
    }
    for index, (rel_path, graph, profiles) in enumerate(plan, start=1):
        graph_record = record["graphs"][graph]
        requested = [{graph_record["input"]["name"]: profile_shapes(graph, p, record)} for p in profiles]
        key = build_key(
            onnx_sha256=graph_record["sha256"],
            profiles=requested,
            options=options_dict,
            backend=options.backend,
            backend_version=backend_version,
        )
        prefix = f"[{index}/{len(plan)}] {rel_path}"
        old = previous_entries.get(rel_path)
        if engine_is_current(out_dir, old, key):
            log(f"{prefix}: up to date, skipped")
            entry = old
        else:
            log(f"{prefix}: building {len(profiles)} profile(s) with {options.backend} ...")
            info = build_engine(onnx_dir / graph_record["file"], out_dir / rel_path, requested, options)
            log(f"{prefix}: built in {info.build_seconds:.1f} s, {info.size_bytes / 1e6:.1f} MB")
            entry = _engine_entry(rel_path, graph, profiles, graph_record, info, key, record)
        manifest = update_manifest(out_dir, header, entry)
    return manifest


def _engine_entry(rel_path, graph, profiles, graph_record, info, key, record):
    input_name = graph_record["input"]["name"]
    return {
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
        "onnx_sha256": graph_record["sha256"],
        "weights_sha256": record["weights_sha256"],
        "built_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(info.build_seconds, 2),
        "size_bytes": info.size_bytes,
        "sha256": info.sha256,
        "build_key": key,
    }


def _options_dict(options):
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()}


def export_for_build(source, export_options, out_dir, log=print):
    """Export `source` into `OUT/onnx` (skipped when already current); return that folder."""
    from vaebuild.export import export_unless_current
    from vaebuild.model_source import load_vae

    onnx_dir = Path(out_dir) / "onnx"
    described = source.describe()
    log(f"loading VAE ({described['kind']}) ...")
    export_unless_current(load_vae(source), described, onnx_dir, export_options, log)
    return onnx_dir
