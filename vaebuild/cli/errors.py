"""How the CLI reports errors: one line on stderr and a documented exit code; VAEBUILD_DEBUG=1 shows tracebacks.

`VaebuildError` exits with its own code, any `OSError` with `FILE_SYSTEM_EXIT_CODE` (its path and
cause in one line), Ctrl-C with `INTERRUPTED_EXIT_CODE`. Writes are atomic, so none of these leaves a
half-written file behind.
"""

import errno
import functools
import os
import warnings

import typer

from vaebuild.errors import FILE_SYSTEM_EXIT_CODE, INTERRUPTED_EXIT_CODE, VaebuildError, one_line
from vaebuild.fileio import not_a_folder

_FREE_SPACE = "free some space or choose another location"
_OS_ERROR_CAUSES = {
    errno.EACCES: "permission denied; fix its permissions or choose another location",
    errno.EPERM: "operation not permitted; fix its permissions or choose another location",
    errno.EROFS: "read-only file system; choose a writable location",
    errno.ENOSPC: f"no space left on device; {_FREE_SPACE}",
    errno.EDQUOT: f"disk quota exceeded; {_FREE_SPACE}",
    errno.EISDIR: "is a folder, not a file; pass a file path",
    errno.ENOENT: "no such file or folder; check the path",
}


def format_error(err: VaebuildError) -> str:
    """The single line printed for a user-facing error."""
    return f"error: {err}"


def format_os_error(err: OSError) -> str:
    """The single line printed for a file-system error: the path, the cause and the fix."""
    path = err.filename
    cause = _OS_ERROR_CAUSES.get(err.errno) or (err.strerror or one_line(err, with_type=True))
    if err.errno in (errno.ENOTDIR, errno.EEXIST) and isinstance(path, (str, os.PathLike)):
        why = not_a_folder(path)
        if why is not None:
            cause = f"{why}; pass a folder path"
    return f"error: {path}: {cause}" if path is not None else f"error: {cause}"


def _exit(err, line, code):
    if os.environ.get("VAEBUILD_DEBUG"):
        raise err
    typer.echo(line, err=True)
    raise typer.Exit(code) from None


def reports_errors(command):
    """Turn errors into one stderr line and a documented exit code, and warnings into one line each."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        def show_warning(message, category, filename, lineno, file=None, line=None):
            typer.echo(f"warning: {message}", err=True)

        previous = warnings.showwarning
        warnings.showwarning = show_warning
        try:
            return command(*args, **kwargs)
        except VaebuildError as err:
            _exit(err, format_error(err), err.exit_code)
        except OSError as err:
            _exit(err, format_os_error(err), FILE_SYSTEM_EXIT_CODE)
        except KeyboardInterrupt as err:
            _exit(err, "error: interrupted; nothing partial was left, re-run to continue", INTERRUPTED_EXIT_CODE)
        finally:
            warnings.showwarning = previous

    return wrapper
