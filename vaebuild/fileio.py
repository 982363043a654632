"""Atomic file output and hashing: nothing half-written is ever left under a final name.

Files written here get the mode of any ordinary new file (0666 less the process umask), not the
0600 of the temporary file they start as.
"""

import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from vaebuild.errors import UserInputError


@functools.cache
def process_umask() -> int:
    """The process umask, read once (from /proc where it can be: setting it to read it races with threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output(final_path, suffix=".partial"):
    """Yield a temporary path beside `final_path`; rename it into place only if the block succeeds."""
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final_path.name}.", suffix=suffix, dir=final_path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        tmp.chmod(0o666 & ~process_umask())  # mkstemp's 0600 would survive the rename
        yield tmp
        os.replace(tmp, final_path)
    except OSError as err:
        _name_final_path(err, tmp, final_path)
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_directory(final_dir):
    """Yield a temporary directory beside `final_dir`; move its contents into place only if the block succeeds.

    The temporary directory (mkdtemp's 0700) is never moved itself: `final_dir` is created with the umask.
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.", suffix=".partial", dir=final_dir.parent))
    try:
        yield tmp
        final_dir.mkdir(parents=True, exist_ok=True)
        for item in tmp.iterdir():
            os.replace(item, final_dir / item.name)
    except OSError as err:
        _name_final_path(err, tmp, final_dir)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _name_final_path(err: OSError, tmp: Path, final: Path):
    """Make an error raised while writing under `tmp` name the matching path under `final`, the one asked for."""
    written = Path(err.filename) if isinstance(err.filename, (str, os.PathLike)) else tmp
    if written == tmp or tmp in written.parents:
        err.filename, err.filename2 = str(final / written.relative_to(tmp)), None


def not_a_folder(path):
    """Why `path` cannot be a folder ("it is a file" or "PARENT is a file", then "not a folder"), or None."""
    path = Path(path)
    existing = next((p for p in (path, *path.parents) if os.path.exists(p)), None)
    if existing is None or existing.is_dir():
        return None
    return f"{'it' if existing == path else existing} is a file, not a folder"


def check_output_folder(path):
    """Raise a one-line `UserInputError` when `--out path` cannot be a folder because a file is in the way."""
    why = not_a_folder(path)
    if why is not None:
        raise UserInputError(f"--out {path}: {why}; pass a folder path")


def write_text(path, text):
    """Write `text` to `path` atomically (its folder is created)."""
    with atomic_output(path) as tmp:
        tmp.write_text(text)


def write_json(path, data):
    """Write `data` as indented JSON, atomically."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def sha256_file(path, chunk_size=1 << 20):
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()
