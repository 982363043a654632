"""`manifest.json`: what was built beside the engines, and whether an engine is still up to date.

One manifest per output folder. Each engine entry records its profiles (input min/opt/max as
read back from the builder), precision, backend and version, ONNX and weights hashes, build
time, file size and sha256, plus a `build_key` hashing every input of the build: an entry whose
key and file hash still match is skipped on the next run.
"""

import hashlib
import json
from pathlib import Path

from vaebuild.errors import UserInputError
from vaebuild.fileio import sha256_file, write_json

MANIFEST_NAME = "manifest.json"
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


def write_manifest(out_dir, manifest):
    """Write the manifest atomically."""
    write_json(Path(out_dir) / MANIFEST_NAME, manifest)


def engine_is_current(out_dir, entry, key) -> bool:
    """Whether `entry` was built from the same inputs (`key`) and its file is intact."""
    if entry is None or entry.get("build_key") != key:
        return False
    path = Path(out_dir) / entry["path"]
    return path.is_file() and path.stat().st_size == entry["size_bytes"] and sha256_file(path) == entry["sha256"]
