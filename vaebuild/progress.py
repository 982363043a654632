"""Progress of long steps (export tracing, engine builds, verification) for the `log=` callables.

On a terminal, every line is printed on that terminal's stream (stderr) and a live line below it
shows a spinner, the step being worked on (the last line) and the time since that line appeared;
whatever else is printed meanwhile (warnings) goes above the live line. Elsewhere (CI logs, pipes)
lines go to `echo` unchanged and nothing else is written.
"""

import contextlib
import sys


@contextlib.contextmanager
def progress_log(echo, stream=None, live=None):
    """Yield a `log(line)` callable. `live` (default: whether `stream`, default stderr, is a terminal)
    shows the live line on `stream` and prints lines there; otherwise each line goes to `echo`."""
    stream = stream if stream is not None else sys.stderr
    if live is None:
        live = stream.isatty()
    if not live:
        yield echo
        return

    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.table import Column

    console = Console(file=stream, force_terminal=True)
    step = TextColumn("{task.description}", table_column=Column(no_wrap=True, overflow="ellipsis"))
    columns = (SpinnerColumn(), step, TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:  # other prints go above the live line too
        task = bar.add_task("starting ...")

        def log(line):
            bar.console.print(line, markup=False, highlight=False, soft_wrap=True)
            bar.reset(task, description=str(line))  # the elapsed time restarts with each step

        yield log
