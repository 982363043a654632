"""`vaebuild bench`."""

import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from vaebuild.cli.errors import reports_errors
from vaebuild.cli.options import (
    AllowPickleOption,
    ConfigOption,
    ModelOption,
    RandomInitOption,
    SeedOption,
    model_source,
)

SizesOption = Annotated[
    Optional[str],
    typer.Option(
        "--sizes",
        help="Comma-separated WxH image sizes, e.g. 1328x1328,512x512 (default: the 5 T2I static sizes and the "
        "9 I2I multi-profile opt sizes of the shipped specs).",
    ),
]
EnginesOption = Annotated[
    Optional[list[Path]],
    typer.Option("--engines", help="Folder of a vaebuild static or multiprofile build: adds one engine row per size "
                 "(repeatable: several folders are compared in the same run)."),
]
BenchPrecisionOption = Annotated[
    Optional[str], typer.Option("--precision", help="PyTorch rows' precision: bf16, fp16 or fp32 (default: bf16 on "
                                "a GPU, fp32 on a CPU). Engines run in the precision they were built in.")
]
BenchDeviceOption = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]
RunsOption = Annotated[
    Optional[int], typer.Option("--runs", help="Timed calls per row (default: 10 on a GPU, 3 on a CPU).")
]
WarmupOption = Annotated[
    Optional[int], typer.Option("--warmup", help="Untimed calls before each row (default: 3 on a GPU, 1 on a CPU).")
]
BatchOption = Annotated[int, typer.Option("--batch", help="Images per call.")]
FlopsOption = Annotated[bool, typer.Option("--flops/--no-flops", help="Count FLOPs per size (on the meta device).")]
JsonOption = Annotated[
    Optional[Path], typer.Option("--json", help="Write every row, timing and environment detail as JSON here.")
]
MarkdownOption = Annotated[Optional[Path], typer.Option("--markdown", help="Write the Markdown tables here.")]
CudaGraphsOption = Annotated[
    bool, typer.Option("--cuda-graphs", help="Also time each --engines folder's AOTInductor packages replayed from "
                       "CUDA graphs (one more engine column; CUDA only).")
]
LoadProbeOption = Annotated[
    bool, typer.Option("--load-probe/--no-load-probe", help="Measure each engine's load in a fresh process "
                       "(one process per static pair: minutes for a folder of many sizes).")
]


@reports_errors
def bench(
    sizes: SizesOption = None,
    engines: EnginesOption = None,
    model: ModelOption = None,
    random_init: RandomInitOption = False,
    seed: SeedOption = 0,
    config: ConfigOption = None,
    allow_pickle: AllowPickleOption = False,
    precision: BenchPrecisionOption = None,
    device: BenchDeviceOption = "auto",
    runs: RunsOption = None,
    warmup: WarmupOption = None,
    batch: BatchOption = 1,
    flops: FlopsOption = True,
    json_path: JsonOption = None,
    markdown_path: MarkdownOption = None,
    cuda_graphs: CudaGraphsOption = False,
    load_probe: LoadProbeOption = True,
):
    """Measure VAE encoder and decoder latency per size: diffusers 3-D, vaebuild 2-D, and built engines."""
    from vaebuild.bench import BenchOptions, default_sizes, parse_sizes, render_markdown, run_bench, write_results
    from vaebuild.model.source import load_vae

    source = model_source(model, random_init, seed, config, allow_pickle)
    options = BenchOptions(
        sizes=parse_sizes(sizes) if sizes else default_sizes(),
        device=device,
        precision=precision,
        warmup=warmup,
        runs=runs,
        batch=batch,
        engines=tuple(engines or ()),
        flops=flops,
        cuda_graphs=cuda_graphs,
        fresh_process_loads=load_probe,
    )
    options.resolve()  # fail on a bad --device before loading the model
    log = lambda text: typer.echo(text, err=True)  # noqa: E731  progress on stderr, tables on stdout
    log(f"loading VAE ({source.describe()['kind']}) ...")
    vae = load_vae(source)
    command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
    result = run_bench(vae, source.describe(), options, log=log, command=command)
    write_results(result, json_path, markdown_path)
    typer.echo(render_markdown(result, details=False))
    for path in (json_path, markdown_path):
        if path:
            log(f"wrote {path}")
