"""The `vaebuild` command line. Commands only parse options and call library functions."""

import typer

from vaebuild.cli.bench import bench
from vaebuild.cli.build import multiprofile, static
from vaebuild.cli.export import export
from vaebuild.cli.verify import verify

app = typer.Typer(
    name="vaebuild",
    help="Build fast, verified inference engines for the Qwen-Image VAE.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def root():
    """Build fast, verified inference engines for the Qwen-Image VAE.

    Exit codes: 0 ok, 2 user error, 3 backend not installed, 4 mismatch against PyTorch, 5 file-system
    error, 130 interrupted. VAEBUILD_DEBUG=1 shows tracebacks.
    """


app.command(name="export")(export)
app.command(name="static")(static)
app.command(name="multiprofile")(multiprofile)
app.command(name="verify")(verify)
app.command(name="bench")(bench)


def main():
    """Console-script entry point."""
    app()
