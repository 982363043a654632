"""The one exception family the CLI turns into a one-line message and an exit code.

Exit codes (documented in the README):
    2  user error: bad path, bad option, bad spec, bad model folder
    3  backend missing: the chosen runtime/builder package is not installed
    4  mismatch: an export or engine disagrees with PyTorch beyond tolerance
    5  file-system error: an `OSError` while reading or writing (permission denied, read-only file system,
       disk full, a path component that is a file, ...); the CLI names the path and the cause
  130  interrupted (Ctrl-C / SIGINT)
In every case nothing half-written is left under a final name.
"""

FILE_SYSTEM_EXIT_CODE = 5
INTERRUPTED_EXIT_CODE = 130


def one_line(err, with_type=False, first_line=False) -> str:
    """An exception (or any text) as one line of at most 300 characters, for error messages.

    `first_line`: only the text's first line (for libraries whose messages continue with details).
    """
    text = f"{type(err).__name__}: {err}" if with_type else str(err)
    if first_line:
        text = text.strip().split("\n", 1)[0]
    text = " ".join(text.split()) or type(err).__name__
    return text if len(text) < 300 else text[:297] + "..."


class VaebuildError(Exception):
    """Base class: a problem the user can fix; printed as one line without a traceback."""

    exit_code = 2


class UserInputError(VaebuildError):
    """A path, option or file given by the user is wrong."""


class SpecError(UserInputError):
    """A profile spec file is invalid; the message names the file and the YAML key."""


class ModelLoadError(UserInputError):
    """The VAE could not be loaded from the given source."""


class BackendMissingError(VaebuildError):
    """The backend package (TensorRT, TensorRT-RTX, Polygraphy, ...) is not installed."""

    exit_code = 3


class MismatchError(VaebuildError):
    """An exported graph or built engine differs from the PyTorch reference beyond tolerance."""

    exit_code = 4
