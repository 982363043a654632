"""Options shared by several commands, defined once as `Annotated` aliases."""

from pathlib import Path
from typing import Annotated, Optional

import typer

ModelOption = Annotated[
    Optional[str],
    typer.Option(
        "--model",
        help="Diffusers pipeline folder (uses vae/), VAE folder, single-file checkpoint, or a Hugging Face id "
        "already in the local cache.",
        rich_help_panel="Model",
    ),
]
RandomInitOption = Annotated[
    bool,
    typer.Option(
        "--random-init",
        help="Use the Qwen-Image VAE architecture with seeded random weights (never used unless asked for).",
        rich_help_panel="Model",
    ),
]
SeedOption = Annotated[int, typer.Option("--seed", help="Seed for --random-init.", rich_help_panel="Model")]
ConfigOption = Annotated[
    Optional[Path],
    typer.Option("--config", help="config.json for a single-file checkpoint (default: Qwen-Image).", rich_help_panel="Model"),
]
AllowPickleOption = Annotated[
    bool,
    typer.Option(
        "--allow-pickle",
        help="Let a model folder without safetensors load pickled .bin weights (they can run code when loaded: "
        "only for files you trust).",
        rich_help_panel="Model",
    ),
]
PrecisionOption = Annotated[
    Optional[str],
    typer.Option("--precision", help="Tensor precision: fp16, bf16 or fp32 (default: fp16; bf16 for --backend inductor).",
                 rich_help_panel="Export"),
]
OpsetOption = Annotated[
    Optional[int],
    typer.Option("--opset", help="ONNX opset (default: 18; 22 for bf16).", rich_help_panel="Export"),
]
Fold3dOption = Annotated[
    bool,
    typer.Option(
        "--fold/--no-fold",
        help="Export the exact single-frame 2-D graph (default) or the unfolded causal 3-D graph.",
        rich_help_panel="Export",
    ),
]
DeviceOption = Annotated[
    str, typer.Option("--device", help="Where to trace and run PyTorch: auto, cpu or cuda.", rich_help_panel="Export")
]


def model_source(model, random_init, seed, config, allow_pickle):
    """The `ModelSource` the model options describe."""
    from vaebuild.model.source import ModelSource

    config = str(config) if config else None
    return ModelSource(model=model, random_init=random_init, seed=seed, config=config, allow_pickle=allow_pickle)


def export_options(precision, opset, fold, device):
    """The `ExportOptions` the export options describe."""
    from vaebuild.export.onnx import ExportOptions

    return ExportOptions(precision=precision or "fp16", opset=opset, fold=fold, device=device)
