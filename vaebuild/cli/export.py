"""`vaebuild export`."""

from pathlib import Path
from typing import Annotated

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


@reports_errors
def export(
    out: Annotated[Path, typer.Option("--out", help="Directory for vae_encoder.onnx, vae_decoder.onnx and the record.")],
    model: ModelOption = None,
    random_init: RandomInitOption = False,
    seed: SeedOption = 0,
    config: ConfigOption = None,
    allow_pickle: AllowPickleOption = False,
    precision: PrecisionOption = None,
    opset: OpsetOption = None,
    fold: Fold3dOption = True,
    device: DeviceOption = "auto",
):
    """Export the VAE encoder and decoder to ONNX and check both against PyTorch."""
    from vaebuild.export.onnx import export_onnx
    from vaebuild.model.source import load_vae
    from vaebuild.progress import progress_log

    source = model_source(model, random_init, seed, config, allow_pickle)
    options = export_options(precision, opset, fold, device)
    with progress_log(typer.echo) as log:
        log(f"loading VAE ({source.describe()['kind']}) ...")
        vae = load_vae(source)
        export_onnx(vae, source.describe(), out, options, log=log)
    typer.echo(f"wrote {out}/vae_encoder.onnx, {out}/vae_decoder.onnx, {out}/export_record.json")
