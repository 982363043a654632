"""One `vaebuild static` / `vaebuild multiprofile` run: a `BuildRequest` in, the folder's manifest out.

The CLI parses its options into the request's parts (the model, the export settings, the builder settings) and
calls `run_build`; tests call it too. Everything that can fail without a model or an export (spec, backend
installed, GPU present, output folder) fails before the model is loaded or exported.
"""

from dataclasses import dataclass, field
from pathlib import Path

from vaebuild.errors import UserInputError


@dataclass(frozen=True)
class ExportSettings:
    """How the model is exported or compiled; `precision` None is the backend's default (fp16; bf16 for inductor)."""

    precision: str | None = None
    opset: int | None = None
    fold: bool = True
    device: str = "auto"  # where PyTorch traces and runs: auto, cpu or cuda


@dataclass(frozen=True)
class BuilderSettings:
    """The builder's settings, as the CLI's "Builder" options give them (None: the backend's default)."""

    backend: str = "tensorrt"
    opt_level: int | None = None
    workspace_gib: float | None = None
    timing_cache: Path | None = None
    compute_capabilities: tuple[tuple[int, int], ...] | None = None
    embed_weights: bool = False
    jobs: int = 1
    allow_non_fp16: bool = False


@dataclass(frozen=True)
class BuildRequest:
    """What to build: `kind` ("static" or "multiprofile") into `out`, from `model` (a `ModelSource`) or `onnx`."""

    kind: str
    out: Path
    model: object = None  # vaebuild.model.source.ModelSource
    onnx: Path | None = None
    spec: str | None = None  # a YAML path or a shipped spec's name; None: the kind's shipped spec
    ratios: tuple[str, ...] = ()  # spec entries to build; empty: all
    export: ExportSettings = field(default_factory=ExportSettings)
    builder: BuilderSettings = field(default_factory=BuilderSettings)
    tile: tuple[int, int] | None = None  # exact-tile packages: the tile's core (height, width) in image pixels
    # multiprofile only: a static spec whose exact-size pairs join the multi-profile pair (a mixed folder)
    static_spec: str | None = None
    static_ratios: tuple[str, ...] = ()  # entries of static_spec to build; empty: all


def run_build(request: BuildRequest, log=print, summary=None):
    """Build (or skip, if current) every engine `request` asks for; return the manifest written to `request.out`.

    `summary`, a `vaebuild.summary.RunSummary`, records each engine as built, skipped or failed.
    """
    from vaebuild.backends import get_backend
    from vaebuild.backends.base import BuildOptions
    from vaebuild.builder.engines import build_engines, check_before_export, export_for_build, model_for_build
    from vaebuild.builder.specs import default_spec_path, find_spec, load_spec
    from vaebuild.contracts import runtime_contract
    from vaebuild.export.onnx import ExportOptions
    from vaebuild.fileio import check_output_folder

    builder, export, out = request.builder, request.export, request.out
    compiles_pytorch = get_backend(builder.backend).builds_from == "pytorch"
    options = BuildOptions(
        backend=builder.backend,
        builder_optimization_level=builder.opt_level,
        workspace_gib=builder.workspace_gib,
        timing_cache=builder.timing_cache,
        compute_capabilities=builder.compute_capabilities,
        device=("cpu" if export.device == "cpu" else "cuda") if compiles_pytorch else None,
        embed_weights=builder.embed_weights,
        jobs=builder.jobs,
    )
    precision = export.precision or ("bf16" if compiles_pytorch else "fp16")
    if request.tile is not None:
        from vaebuild.builder.tiles import parse_tile

        parse_tile("x".join(map(str, request.tile)))  # the one-line checks
        if not compiles_pytorch:
            raise UserInputError(f"--tile builds exact-tile packages for the inductor backend only for now, not "
                                 f"{builder.backend}; pass --backend inductor or drop --tile")
    spec = load_spec(find_spec(request.spec) if request.spec else default_spec_path(request.kind))
    if request.ratios:
        spec = spec.select(list(request.ratios))
    static_spec = _static_spec(request)
    check_output_folder(out)
    if request.onnx is not None and request.model is not None:
        raise UserInputError("pass either --onnx or the model options (--model/--random-init), not both")
    if compiles_pytorch:
        if request.onnx is not None:
            raise UserInputError(
                f"the {builder.backend} backend compiles the PyTorch model; pass --model or --random-init, not --onnx"
            )
        check_before_export(request.kind, spec, options)  # fail now, not after loading the model
        source = model_for_build(_model(request), precision, log=log)
    elif request.onnx is None:
        # Fail now, not after a long export.
        check_before_export(request.kind, spec, options)
        runtime_contract(builder.backend, precision, builder.allow_non_fp16)
        export_options = ExportOptions(precision=precision, opset=export.opset, fold=export.fold, device=export.device)
        source = export_for_build(_model(request), export_options, out, log=log)
    else:
        source = request.onnx
    extra = {"static_spec": static_spec} if static_spec is not None else {}
    manifest = build_engines(request.kind, spec, source, out, options, log=log,
                             allow_non_fp16=builder.allow_non_fp16, summary=summary, tile=request.tile, **extra)
    if summary:
        summary.details.update(manifest=str(Path(out) / "manifest.json"), runtime_contract=manifest["runtime_contract"],
                               spec=str(spec.path), backend=builder.backend)
        if static_spec is not None:
            summary.details["static_spec"] = str(static_spec.path)
    return manifest


def _static_spec(request):
    """The validated `--static-spec` of a multiprofile request (restricted to `--static-ratios`), or None."""
    from vaebuild.builder.specs import find_spec, load_spec

    if request.static_spec is None:
        if request.static_ratios:
            raise UserInputError("--static-ratios selects entries of --static-spec; pass --static-spec too "
                                 "(e.g. --static-spec qwen_image_edit)")
        return None
    if request.kind != "multiprofile":
        raise UserInputError(f"--static-spec adds exact-size pairs to a multiprofile folder; `vaebuild {request.kind}` "
                             "builds static pairs from --spec already: drop --static-spec")
    spec = load_spec(find_spec(request.static_spec))
    if spec.kind != "static":
        raise UserInputError(f"--static-spec {spec.path} is a {spec.kind} spec; pass a static spec "
                             "(e.g. qwen_image_edit, all_static or a YAML file with kind: static)")
    return spec.select(list(request.static_ratios)) if request.static_ratios else spec


def _model(request):
    """The request's `ModelSource`; without one, ModelSource's own "choose the VAE" error."""
    from vaebuild.model.source import ModelSource

    return request.model if request.model is not None else ModelSource()
