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
    Optional[str],
    typer.Option("--spec", help="Profile spec: a YAML path or a shipped spec's name, e.g. t2i_static_lightx2v_main "
                 "(default: the shipped one for this command; an unknown name lists the shipped ones)."),
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
    typer.Option("--backend", help="tensorrt (full TensorRT, on your GPU), tensorrt_rtx (builds on CPU-only hosts) "
                 "or inductor (AOTInductor packages of the PyTorch model; run by torch).",
                 rich_help_panel="Builder"),
]
EmbedWeightsOption = Annotated[
    bool,
    typer.Option("--embed-weights", help="inductor: each package carries its own weights instead of sharing "
                 "OUT/weights.safetensors.", rich_help_panel="Builder"),
]
JobsOption = Annotated[
    int, typer.Option("--jobs", help="inductor: packages compiled in parallel processes.", rich_help_panel="Builder")
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
AllowNonFp16Option = Annotated[
    bool,
    typer.Option("--allow-non-fp16", help="Build TensorRT engines from a bf16 or fp32 export. LightX2V would read "
                 "them wrongly (it feeds and reads fp16), so the folder's runtime_contract is vaebuild.",
                 rich_help_panel="Builder"),
]
JsonSummaryOption = Annotated[
    Optional[Path],
    typer.Option("--json", help="Write a summary for CI here: engines built, skipped and failed, paths, times."),
]
TileOption = Annotated[
    Optional[str],
    typer.Option("--tile", help="inductor: also build exact-tile packages for cores of HxW image pixels (multiples of 8, "
                 "e.g. 512x512): any size up to max_side decodes and encodes in bounded memory, equal to untiled.",
                 rich_help_panel="Builder"),
]
StaticSpecOption = Annotated[
    Optional[str],
    typer.Option("--static-spec", help="Also build one static-shape pair per entry of this static spec "
                 "(a YAML path or a shipped name, e.g. qwen_image_edit) into the same folder, sharing its weights and "
                 "manifest: the runtime serves those exact sizes from them and every other size from the multi-profile "
                 "pair."),
]
StaticRatiosOption = Annotated[
    Optional[str],
    typer.Option("--static-ratios", help="Comma-separated --static-spec entries to build, e.g. "
                 "1024x1024,1184x896 (default: all)."),
]
# `vaebuild static` builds static pairs from --spec: the two options above are hidden there (and refused if given).
_HiddenStaticSpec = Annotated[Optional[str], typer.Option("--static-spec", hidden=True)]
_HiddenStaticRatios = Annotated[Optional[str], typer.Option("--static-ratios", hidden=True)]
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


def _split(names):
    return tuple(name.strip() for name in (names or "").split(",") if name.strip())


def _build_command(kind, summary):
    """The Typer command for one build kind; `static` and `multiprofile` share every option (`--static-spec` and
    `--static-ratios` are multiprofile's)."""
    multi = kind == "multiprofile"

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
        precision: PrecisionOption = None,
        opset: OpsetOption = None,
        fold: Fold3dOption = True,
        device: DeviceOption = "auto",
        backend: BackendOption = "tensorrt",
        opt_level: OptLevelOption = None,
        workspace_gib: WorkspaceOption = None,
        timing_cache: TimingCacheOption = None,
        compute_capability: ComputeCapabilityOption = None,
        embed_weights: EmbedWeightsOption = False,
        jobs: JobsOption = 1,
        allow_non_fp16: AllowNonFp16Option = False,
        tile: TileOption = None,
        static_spec: StaticSpecOption if multi else _HiddenStaticSpec = None,
        static_ratios: StaticRatiosOption if multi else _HiddenStaticRatios = None,
        json_path: JsonSummaryOption = None,
    ):
        from vaebuild.builder.run import BuilderSettings, BuildRequest, ExportSettings, run_build
        from vaebuild.builder.tiles import parse_tile
        from vaebuild.progress import progress_log
        from vaebuild.summary import BUILD_STATUSES, summary_written

        with summary_written(json_path, kind, out, BUILD_STATUSES) as summary, progress_log(typer.echo) as log:
            request = BuildRequest(
                kind=kind,
                out=out,
                model=model_source(model, random_init, seed, config, allow_pickle) if (model or random_init) else None,
                onnx=onnx,
                spec=spec,
                ratios=_split(ratios),
                export=ExportSettings(precision=precision, opset=opset, fold=fold, device=device),
                builder=BuilderSettings(
                    backend=backend, opt_level=opt_level, workspace_gib=workspace_gib, timing_cache=timing_cache,
                    compute_capabilities=_parse_compute_capabilities(compute_capability), embed_weights=embed_weights,
                    jobs=jobs, allow_non_fp16=allow_non_fp16,
                ),
                tile=parse_tile(tile),
                static_spec=static_spec,
                static_ratios=_split(static_ratios),
            )
            manifest = run_build(request, log=log, summary=summary)
        typer.echo(f"{len(manifest['engines'])} engine(s) in {out}; manifest: {out}/manifest.json")

    command.__name__ = kind
    command.__doc__ = summary
    return reports_errors(command)


static = _build_command(
    "static", "Build one static-shape engine pair per aspect ratio: OUT/RATIO/vae_{encoder,decoder}.trt (.pt2 for inductor)."
)
multiprofile = _build_command(
    "multiprofile", "Build one encoder and one decoder engine holding every profile of the spec, in spec order (with "
    "--static-spec, also static pairs of exact sizes beside them)."
)
