"""`vaebuild bench` without installing vaebuild: `python3 scripts/bench.py [bench options]`.

For a GPU machine that has PyTorch but not vaebuild, with diffusers carried as wheels
(see benchmarks/README.md). Puts the repository root on sys.path, then runs the bench command.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import typer  # noqa: E402

from vaebuild.cli.bench import bench  # noqa: E402

if __name__ == "__main__":
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(bench)
    app()
