"""The `vaebuild` command line. Commands only parse options and call library functions."""

from typing import Annotated

import typer

import vaebuild
from vaebuild.cli.bench import bench
from vaebuild.cli.build import multiprofile, static
from vaebuild.cli.export import export
from vaebuild.cli.verify import verify

app = typer.Typer(
    name="vaebuild",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # help texts are Markdown: lists render as lists
)


def _print_version(value: bool):
    if value:
        typer.echo(f"vaebuild {vaebuild.__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", callback=_print_version, is_eager=True)
    ] = False,
):
    """Build fast, verified inference engines for the Qwen-Image VAE.

    Exit codes:

    - 0: success
    - 2: user error (bad path, option or spec)
    - 3: backend not installed
    - 4: mismatch against PyTorch
    - 5: file-system error (the path and the cause are named)
    - 130: interrupted

    VAEBUILD_DEBUG=1 shows tracebacks.
    """


app.command(name="export")(export)
app.command(name="static")(static)
app.command(name="multiprofile")(multiprofile)
app.command(name="verify")(verify)
app.command(name="bench")(bench)


def main():
    """Console-script entry point."""
    app()
