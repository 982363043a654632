"""How the CLI reports errors: one line on stderr and a documented exit code; VAEBUILD_DEBUG=1 shows tracebacks."""

import functools
import os
import warnings

import typer

from vaebuild.errors import VaebuildError


def format_error(err: VaebuildError) -> str:
    """The single line printed for a user-facing error."""
    return f"error: {err}"


def reports_errors(command):
    """Turn `VaebuildError` into one stderr line and its exit code, and warnings into one line each."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        def show_warning(message, category, filename, lineno, file=None, line=None):
            typer.echo(f"warning: {message}", err=True)

        previous = warnings.showwarning
        warnings.showwarning = show_warning
        try:
            return command(*args, **kwargs)
        except VaebuildError as err:
            if os.environ.get("VAEBUILD_DEBUG"):
                raise
            typer.echo(format_error(err), err=True)
            raise typer.Exit(err.exit_code) from None
        finally:
            warnings.showwarning = previous

    return wrapper
