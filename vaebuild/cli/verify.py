"""`vaebuild verify`."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from vaebuild.cli.errors import reports_errors
from vaebuild.cli.options import AllowPickleOption
from vaebuild.verify import CPU_MAX_SIDE, DEFAULT_TOLERANCES, RUNNERS  # stdlib-only imports: --help stays fast

_TOLERANCES = "Tolerances (default: per engine precision)"


def _defaults(field):
    return ", ".join(f"{precision} {getattr(t, field):g}" for precision, t in DEFAULT_TOLERANCES.items())



FolderArgument = Annotated[
    Path, typer.Argument(help="Folder written by `vaebuild static` or `vaebuild multiprofile` (holds manifest.json).")
]
ReportOption = Annotated[Optional[Path], typer.Option("--report", help="Also write every row as JSON to this file.")]
JsonSummaryOption = Annotated[
    Optional[Path],
    typer.Option("--json", help="Write a summary for CI here: rows passed, failed, not run and skipped, times."),
]
AtolOption = Annotated[
    Optional[float],
    typer.Option("--atol", help=f"Absolute limit on max |out - ref| ({_defaults('atol')}).",
                 rich_help_panel=_TOLERANCES),
]
RtolOption = Annotated[
    Optional[float],
    typer.Option("--rtol", help="Limit on max |out - ref| / max |ref|; the max-error check passes within --atol "
                 f"OR --rtol ({_defaults('rtol')}).", rich_help_panel=_TOLERANCES),
]
MinPsnrOption = Annotated[
    Optional[float],
    typer.Option("--min-psnr", help="Decoder only: minimum PSNR in dB of images mapped to [0, 255] "
                 f"({_defaults('min_psnr')}).", rich_help_panel=_TOLERANCES),
]
MaxSideOption = Annotated[
    Optional[int],
    typer.Option("--max-side", help="Skip shapes whose image side exceeds N (reported as skipped). Default: no limit "
                 f"when PyTorch runs on a GPU, {CPU_MAX_SIDE} on the CPU; 0: no limit."),
]
RequireOption = Annotated[
    Optional[list[str]],
    typer.Option("--require", help=f"Fail (exit 4) when this runner cannot run here: {' or '.join(RUNNERS)} (repeatable)."),
]
SkipOption = Annotated[
    Optional[list[str]], typer.Option("--skip", help=f"Do not run this runner: {' or '.join(RUNNERS)} (repeatable).")
]
OnnxDirOption = Annotated[
    Optional[Path], typer.Option("--onnx", help="The `vaebuild export` folder, if not at the manifest's onnx_dir.")
]
ModelOverrideOption = Annotated[
    Optional[str],
    typer.Option("--model", help="Load the PyTorch reference from here instead of the manifest's model entry; its "
                 "weights must still hash to the manifest's weights_sha256."),
]
SizesOption = Annotated[
    Optional[str],
    typer.Option("--sizes", help="More image sizes to check, comma-separated WxH (e.g. 1184x896,896x1184), beyond "
                 "every profile's min/opt/max: each on the engine and profile that serves it, and tiled in a folder "
                 "built with --tile. A size no engine serves is an error."),
]
DeviceOption = Annotated[str, typer.Option("--device", help="Where the PyTorch reference runs: auto, cpu or cuda.")]
SeedOption = Annotated[int, typer.Option("--seed", help="Seed of the generated inputs.")]


@reports_errors
def verify(
    folder: FolderArgument,
    report: ReportOption = None,
    json_path: JsonSummaryOption = None,
    atol: AtolOption = None,
    rtol: RtolOption = None,
    min_psnr: MinPsnrOption = None,
    max_side: MaxSideOption = None,
    sizes: SizesOption = None,
    require: RequireOption = None,
    skip: SkipOption = None,
    onnx: OnnxDirOption = None,
    model: ModelOverrideOption = None,
    allow_pickle: AllowPickleOption = False,
    device: DeviceOption = "auto",
    seed: SeedOption = 0,
):
    """Compare every engine, at every shape it claims, with PyTorch (and ONNX Runtime on the export); tiles
    (--tile folders) against the untiled engine and PyTorch.

    Exit codes:

    - 0: every comparison that ran passed (rows `not run` or `skipped` say why)
    - 2: user error (no manifest, model not loadable or not the built weights, a --sizes size no engine
      serves)
    - 4: a row failed: a metric beyond tolerance, an engine or ONNX file that does not match the
      manifest, or a `--require`d runner that cannot run here
    """
    from vaebuild.bench.options import parse_sizes
    from vaebuild.fileio import write_json
    from vaebuild.progress import progress_log
    from vaebuild.summary import VERIFY_STATUSES, summary_written
    from vaebuild.verify import VerifyOptions, format_table, verify_build

    with summary_written(json_path, "verify", folder, VERIFY_STATUSES) as summary:
        options = VerifyOptions(
            atol=atol, rtol=rtol, min_psnr=min_psnr, max_side=max_side, require=tuple(require or ()),
            skip=tuple(skip or ()), device=device, onnx_dir=onnx, model=model, allow_pickle=allow_pickle,
            seed=seed, sizes=parse_sizes(sizes) if sizes else (),
        )
        with progress_log(lambda line: typer.echo(line, err=True)) as log:
            result = verify_build(folder, options, log=log)
        result.add_to_summary(summary)
        typer.echo(format_table(result))
        typer.echo(result.summary())
        if report:
            write_json(report, result.to_dict())
            summary.details["report"] = str(report)
            typer.echo(f"report: {report}")
        result.raise_on_failures()
