"""Machine-readable run summaries for CI (`--json FILE`): what was built, skipped or failed, where, how long.

One JSON object per run, written atomically when the run ends, also when it fails:
`{"summary_version", "command", "folder", "ok", "error", "counts": {status: n}, <status>: [items],
"details", "seconds"}`. Each item has a `path` relative to `folder` plus per-command fields.
"""

import contextlib
import time
from dataclasses import dataclass, field

from vaebuild.errors import one_line
from vaebuild.fileio import write_json

SUMMARY_VERSION = 1
BUILD_STATUSES = ("built", "skipped", "failed")
VERIFY_STATUSES = ("passed", "failed", "not_run", "skipped")


@dataclass
class RunSummary:
    """Items per status of one command run; `ok` when nothing failed and no error stopped the run."""

    command: str
    folder: str
    statuses: tuple[str, ...]
    items: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0

    def add(self, status: str, path: str, **fields):
        """Record one item (an engine, or a verify row) under `status`."""
        if status not in self.statuses:
            raise ValueError(f"unknown status {status!r}; known: {', '.join(self.statuses)}")
        self.items.setdefault(status, []).append({"path": path, **fields})

    @property
    def ok(self) -> bool:
        return self.error is None and not self.items.get("failed")

    def to_dict(self) -> dict:
        lists = {status: self.items.get(status, []) for status in self.statuses}
        return {
            "summary_version": SUMMARY_VERSION,
            "command": self.command,
            "folder": self.folder,
            "ok": self.ok,
            "error": self.error,
            "counts": {status: len(items) for status, items in lists.items()},
            **lists,
            "details": self.details,
            "seconds": round(self.seconds, 2),
        }


@contextlib.contextmanager
def summary_written(json_path, command: str, folder, statuses: tuple[str, ...]):
    """Yield a `RunSummary`; when the block ends (even by an error, which is recorded) write it to `json_path`
    (nothing when `json_path` is None)."""
    summary = RunSummary(command, str(folder), statuses)
    start = time.perf_counter()
    try:
        yield summary
    except BaseException as err:
        summary.error = one_line(err)
        raise
    finally:
        summary.seconds = time.perf_counter() - start
        if json_path is not None:
            write_json(json_path, summary.to_dict())
