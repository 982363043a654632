"""`vaebuild static` and `vaebuild multiprofile`."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from vaebuild.cli.errors import reports_errors
from vaebuild.cli.options import (
    AllowPickleOption,
    ConfigOption,
    DeviceOption,
    Fold3dOption,
    ModelOption,
    OpsetOption,
    PrecisionOption,
    RandomInitOption,
    SeedOption,
    export_options,
    model_source,
)
from vaebuild.errors import UserInputError

OutOption = Annotated[Path, typer.Option("--out", help="Output folder for the engines and manifest.json.")]
SpecOption = Annotated[
    Optional[Path], typer.Option("--spec", help="Profile spec YAML (default: the shipped one for this command).")
]
RatiosOption = Annotated[
    Optional[str], typer.Option("--ratios", help="Comma-separated spec entries to build, e.g. 16_9,1_1 (default: all).")
]
OnnxOption = Annotated[
    Optional[Path],
    typer.Option("--onnx", help="Folder written by `vaebuild export`; otherwise the model options export into OUT/onnx."),
]
BackendOption = Annotated[
    str,
    typer.Option("--backend", help="tensorrt (full TensorRT, on your GPU) or tensorrt_rtx (builds on CPU-only hosts).",
                 rich_help_panel="Builder"),
]
OptLevelOption = Annotated[
    Optional[int], typer.Option("--opt-level", help="Builder optimization level 0-5.", rich_help_panel="Builder")
]
WorkspaceOption = Annotated[
    Optional[float], typer.Option("--workspace-gib", help="Workspace memory-pool limit in GiB.", rich_help_panel="Builder")
]
TimingCacheOption = Annotated[
    Optional[Path],
    typer.Option("--timing-cache", help="Timing cache file, loaded and updated (tensorrt only).", rich_help_panel="Builder"),
]
ComputeCapabilityOption = Annotated[
    Optional[list[str]],
    typer.Option("--compute-capability", help="Target GPU, e.g. 8.6 (tensorrt_rtx only; repeatable).",
                 rich_help_panel="Builder"),
]


def _parse_compute_capabilities(values):
    if not values:
        return None
    targets = []
    for value in values:
        major, dot, minor = value.partition(".")
        if not (dot and major.isdigit() and minor.isdigit()):
            raise UserInputError(f"--compute-capability {value!r} must look like 8.6")
        targets.append((int(major), int(minor)))
    return tuple(targets)


def _run_build(kind, out, spec, ratios, onnx, source_args, export_args, builder_args):
    from vaebuild.builds import build_engines, check_before_export, export_for_build
    from vaebuild.engine_build import BuildOptions
    from vaebuild.fileio import check_output_folder
    from vaebuild.specs import default_spec_path, load_spec

    backend, opt_level, workspace_gib, timing_cache, compute_capability = builder_args
    options = BuildOptions(
        backend=backend,
        builder_optimization_level=opt_level,
        workspace_gib=workspace_gib,
        timing_cache=timing_cache,
        compute_capabilities=_parse_compute_capabilities(compute_capability),
    )
    loaded = load_spec(spec or default_spec_path(kind))
    if ratios:
        loaded = loaded.select([name.strip() for name in ratios.split(",") if name.strip()])
    check_output_folder(out)
    if onnx is None:
        check_before_export(kind, loaded, options)  # fail now, not after a long export
        onnx = export_for_build(model_source(*source_args), export_options(*export_args), out, log=typer.echo)
    elif any(source_args[:2]):
        raise UserInputError("pass either --onnx or the model options (--model/--random-init), not both")
    manifest = build_engines(kind, loaded, onnx, out, options, log=typer.echo)
    typer.echo(f"{len(manifest['engines'])} engine(s) in {out}; manifest: {out}/manifest.json")


def _build_command(kind, summary):
    """The Typer command for one build kind; `static` and `multiprofile` share every option."""

    def command(
        out: OutOption,
        spec: SpecOption = None,
        ratios: RatiosOption = None,
        onnx: OnnxOption = None,
        model: ModelOption = None,
        random_init: RandomInitOption = False,
        seed: SeedOption = 0,
        config: ConfigOption = None,
        allow_pickle: AllowPickleOption = False,
        precision: PrecisionOption = "fp16",
        opset: OpsetOption = None,
        fold: Fold3dOption = True,
        device: DeviceOption = "auto",
        backend: BackendOption = "tensorrt",
        opt_level: OptLevelOption = None,
        workspace_gib: WorkspaceOption = None,
        timing_cache: TimingCacheOption = None,
        compute_capability: ComputeCapabilityOption = None,
    ):
        _run_build(
            kind, out, spec, ratios, onnx,
            (model, random_init, seed, config, allow_pickle), (precision, opset, fold, device),
            (backend, opt_level, workspace_gib, timing_cache, compute_capability),
        )

    command.__name__ = kind
    command.__doc__ = summary
    return reports_errors(command)


static = _build_command("static", "Build one static-shape engine pair per aspect ratio: OUT/<ratio>/vae_{encoder,decoder}.trt.")
multiprofile = _build_command(
    "multiprofile", "Build one encoder and one decoder engine holding every profile of the spec, in spec order."
)
