"""The result model of `vaebuild verify`: rows, the report, their JSON, and the pass rule.

Pass rule (strict; nothing is ever downgraded to a warning): outputs have the reference's shape and
are finite, max |out - ref| <= max(atol, rtol * max |ref|) (checked by Polygraphy's
`SimpleCompareFunc` on the max statistic), and, for the decoder, PSNR >= min_psnr. Default
tolerances depend on the engine's precision (`DEFAULT_TOLERANCES`).

Row statuses: `pass`; `FAIL` (a metric beyond tolerance, a runner error, an engine or ONNX file that
does not match the manifest, or a `--require`d runner that could not run); `not run` (the runner
cannot run here, e.g. no CUDA GPU: the reason is in the row, and it is not a pass); `skipped` (the
image side exceeds `max_side`). Only `FAIL` rows make `VerifyReport.raise_on_failures` raise
`MismatchError` (exit code 4).

Tiled rows (folders built with `--tile`): `engine` names the two tile engines of the graph, `profile` the tile
("tile 512x512"), `levels` is "size"; `runner` is "<backend runner> tiled" (the tiled output against the float32
reference) or "<backend runner> tiled vs untiled" (against the whole-image engine that serves the size, both through
`VaeRuntime`). Rows of `--sizes` on whole-image engines have `levels` "size" too. The same rule and tolerances judge
them all.
"""

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vaebuild.errors import MismatchError

REPORT_VERSION = 1
PASS, FAIL, NOT_RUN, SKIPPED = "pass", "FAIL", "not run", "skipped"
UNTILED = "untiled"  # the reference of a "<runner> tiled vs untiled" row: the whole-image engine, through the runtime
_SUMMARY_STATUS = {PASS: "passed", FAIL: "failed", NOT_RUN: "not_run", SKIPPED: "skipped"}


@dataclass(frozen=True)
class Tolerances:
    """Limits for one comparison: max |out - ref| <= max(atol, rtol * max |ref|); decoder PSNR >= min_psnr."""

    atol: float
    rtol: float
    min_psnr: float  # dB, decoded images mapped to [0, 255]

    def max_abs_limit(self, peak):
        """The largest max |out - ref| allowed when the reference's largest |value| is `peak`."""
        return max(self.atol, self.rtol * peak)


# Measured (H100, full-size Qwen-Image VAE with seeded random weights, 512^2 to 1328^2): the folded
# graphs run in fp16 / bf16 differ from the float32 diffusers reference by max abs 0.0034 / 0.027
# (rel 0.0036 / 0.027, PSNR 71.8 / 53.8 dB) on the decoder and 0.0015 / 0.012 (rel 0.0024 / 0.020)
# on the encoder. The limits leave 4-15x headroom on the max error for real weights and other
# kernels, and the PSNR floors are a visual bar rather than a kernel-noise bar: 40 dB is an RMS
# error of 2.5 of 255 levels, 35 dB 4.5 levels. Any NaN/inf or a wrong graph fails by far.
DEFAULT_TOLERANCES = {
    "fp32": Tolerances(atol=1e-3, rtol=1e-3, min_psnr=60.0),
    "fp16": Tolerances(atol=5e-2, rtol=2e-2, min_psnr=40.0),
    "bf16": Tolerances(atol=1.5e-1, rtol=1e-1, min_psnr=35.0),
}


@dataclass
class Row:
    """One engine x shape x runner comparison."""

    engine: str
    graph: str
    profile: str
    profile_index: int
    levels: str  # e.g. "min=opt=max", "opt"
    shape: tuple[int, ...]  # the engine's input shape
    image: tuple[int, int]  # (height, width) in pixels
    runner: str
    status: str
    reason: str | None = None  # why not run / skipped / failed
    max_abs: float | None = None
    mean_abs: float | None = None
    rel: float | None = None
    psnr: float | None = None  # decoder only
    max_abs_limit: float | None = None
    min_psnr: float | None = None
    seconds: float | None = None

    @property
    def where(self):
        """Engine, profile, levels and shape: what a failure message names."""
        return f"{self.engine} profile {self.profile} {self.levels} {shape_text(self.shape)}"

    def to_dict(self):
        data = asdict(self)
        data["shape"], data["image"] = list(self.shape), list(self.image)
        for key in ("max_abs", "mean_abs", "rel", "psnr", "max_abs_limit", "min_psnr"):
            data[key] = _json_float(data[key])
        return data


@dataclass
class VerifyReport:
    """Everything `verify_build` found; `rows` has one entry per engine x shape x runner."""

    folder: Path
    kind: str
    model: dict
    weights_sha256: str
    reference: dict
    max_side: int
    tolerances: dict  # precision -> Tolerances
    engines: list  # per engine: path, graph, backend, versions, check (None or the failure)
    onnx: list  # per graph: path, sha256, problem
    rows: list = field(default_factory=list)
    seconds: float = 0.0

    def counts(self):
        """Rows per status."""
        return {status: sum(r.status == status for r in self.rows) for status in (PASS, FAIL, NOT_RUN, SKIPPED)}

    @property
    def failures(self):
        return [r for r in self.rows if r.status == FAIL]

    @property
    def passed(self):
        return not self.failures

    def summary(self):
        """One line: counts per status and the time taken."""
        counts = self.counts()
        text = ", ".join(f"{n} {status.lower()}" for status, n in counts.items() if n or status in (PASS, FAIL))
        return f"{len(self.rows)} comparisons: {text} ({self.seconds:.1f} s)"

    def raise_on_failures(self):
        """Raise one MismatchError naming the first failing engine, shape, runner and metric."""
        failures = self.failures
        if failures:
            first = failures[0]
            more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
            raise MismatchError(f"verification failed: {first.where} {first.runner}: {first.reason}{more}")

    def add_to_summary(self, summary):
        """Record every row in a `vaebuild.summary.RunSummary` (statuses passed, failed, not_run, skipped)."""
        for row in self.rows:
            summary.add(
                _SUMMARY_STATUS[row.status], row.engine, profile=row.profile, levels=row.levels, shape=list(row.shape),
                runner=row.runner, reason=row.reason, seconds=row.seconds,
            )
        summary.details["kind"] = self.kind

    def to_dict(self):
        from vaebuild.env import package_versions

        return {
            "report_version": REPORT_VERSION,
            "folder": str(self.folder),
            "kind": self.kind,
            "model": self.model,
            "weights_sha256": self.weights_sha256,
            "reference": self.reference,
            "max_side": self.max_side,
            "tolerances": {p: asdict(t) for p, t in self.tolerances.items()},
            "engines": self.engines,
            "onnx": self.onnx,
            "rows": [r.to_dict() for r in self.rows],
            "summary": self.counts(),
            "passed": self.passed,
            "seconds": round(self.seconds, 2),
            "versions": package_versions(),
        }


def shape_text(shape):
    """A shape as "1x4x1x8x12" (failure messages and the table)."""
    return "x".join(str(d) for d in shape)


def _json_float(value):
    if value is None or math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
