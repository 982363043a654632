"""`manifest.json`: what was built beside the engines, and whether an engine is still up to date.

One manifest per output folder. Each engine entry records its profiles (input min/opt/max as
read back from the builder), precision, backend and version, ONNX and weights hashes, build
time, file size and sha256, plus a `build_key` hashing every input of the build: an entry whose
key and file hash still match is skipped on the next run.

Several processes may build into one folder at once: each engine file is renamed into place by its
builder, and each manifest update re-reads the manifest under an exclusive lock on the folder
(`flock` on `.manifest.lock`) and replaces only its own engine's entry. The top-level fields describe
the latest build that updated the manifest.
"""

import contextlib
import fcntl
import hashlib
import json
from pathlib import Path

from vaebuild.errors import UserInputError
from vaebuild.fileio import sha256_file, write_json

MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".manifest.lock"
MANIFEST_VERSION = 1


def build_key(**inputs) -> str:
    """A stable hash of everything that determines an engine's bytes."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def read_manifest(out_dir):
    """The manifest in `out_dir`, or None when there is none; a clear error if it is corrupt."""
    path = Path(out_dir) / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserInputError(f"{path} is not valid JSON ({err}); delete it to rebuild everything") from None
    if manifest.get("manifest_version") != MANIFEST_VERSION:
        raise UserInputError(f"{path} has manifest_version {manifest.get('manifest_version')!r}, expected 1")
    return manifest


def read_build_manifest(folder):
    """The manifest of an engine folder the user pointed at; a clear error when it is not one."""
    folder = Path(folder)
    usage = "pass the --out folder of `vaebuild static` or `vaebuild multiprofile`"
    if not folder.is_dir():
        raise UserInputError(f"{folder} is not a directory; {usage}")
    manifest = read_manifest(folder)
    if manifest is None:
        raise UserInputError(f"{folder} has no {MANIFEST_NAME}; {usage}")
    return manifest


def write_manifest(out_dir, manifest):
    """Write the manifest atomically."""
    write_json(Path(out_dir) / MANIFEST_NAME, manifest)


@contextlib.contextmanager
def manifest_lock(out_dir):
    """Hold the exclusive lock on `out_dir`'s manifest, waiting while another process holds it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / LOCK_NAME, "a") as lock_file:  # closing the file releases the lock
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        yield


def update_manifest(out_dir, header, entry):
    """Merge one engine's `entry` into `out_dir`'s manifest under the folder lock; return the manifest written.

    The manifest is re-read under the lock: entries of other engines whose files exist are kept, and
    `entry` replaces the entry with its path, moving to the end; `header` gives the top-level fields.
    When another process has since replaced the engine file, the entry that matches the file stays
    (or none), so the manifest never lists an engine its file does not match.
    """
    out_dir = Path(out_dir)
    with manifest_lock(out_dir):
        engines = (read_manifest(out_dir) or {"engines": []})["engines"]
        same_path = [e for e in engines if e["path"] == entry["path"]]
        listed = next((e for e in [entry, *same_path] if engine_file_problem(out_dir, e) is None), None)
        others = [e for e in engines if e["path"] != entry["path"] and (out_dir / e["path"]).is_file()]
        manifest = {**header, "engines": others + ([listed] if listed else [])}
        write_manifest(out_dir, manifest)
    return manifest


def engine_file_problem(folder, entry):
    """None if the engine file of `entry` is present with its recorded size and sha256, else why not."""
    rel = entry["path"]
    path = Path(folder) / rel
    if not path.is_file():
        return f"{rel}: file missing; rebuild it"
    size = path.stat().st_size
    if size != entry["size_bytes"]:
        return f"{rel}: {size} bytes but the manifest says {entry['size_bytes']} (truncated or replaced); rebuild it"
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        return (
            f"{rel}: sha256 {digest[:12]}... differs from the manifest's {entry['sha256'][:12]}... "
            "(corrupt or replaced); rebuild it"
        )
    return None


def engine_is_current(out_dir, entry, key) -> bool:
    """Whether `entry` was built from the same inputs (`key`) and its file is intact."""
    return entry is not None and entry.get("build_key") == key and engine_file_problem(out_dir, entry) is None
