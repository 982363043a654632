"""The terminal table of a `vaebuild verify` report."""

import math

from vaebuild.verify.report import PASS, VerifyReport, shape_text


def format_table(report: VerifyReport) -> str:
    """The terminal table: one line per row, reasons after the status."""
    header = ("engine", "profile", "shape", "runner", "max abs", "mean abs", "rel", "PSNR dB", "status")
    lines = []
    for row in report.rows:
        status = row.status if not row.reason or row.status == PASS else f"{row.status}: {row.reason}"
        lines.append((
            row.engine,
            f"{row.profile} [{row.profile_index}] {row.levels}",
            shape_text(row.shape),
            row.runner,
            _number(row.max_abs),
            _number(row.mean_abs),
            _number(row.rel),
            "n/a" if row.graph == "encoder" else _number(row.psnr, ".1f"),
            status,
        ))
    widths = [max(len(str(line[i])) for line in [header, *lines]) for i in range(len(header) - 1)]
    text = []
    for line in [header, *lines]:
        text.append("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)) + "  " + line[-1])
    text.insert(1, "  ".join("-" * width for width in widths) + "  " + "-" * len(header[-1]))
    return "\n".join(text)


def _number(value, spec=".3g"):
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, spec)
