"""`vaebuild verify`: every engine of a build, at every shape it claims, against PyTorch.

Each engine of a build folder's manifest, at each distinct min/opt/max shape of each profile, is fed
one seeded input through Polygraphy, next to the float32 diffusers reference and ONNX Runtime on the
export; every comparison is a row of the report, judged by a strict pass rule.

Modules:

- `report`: the result model (`Row`, `VerifyReport`, their JSON), `Tolerances`, `DEFAULT_TOLERANCES`,
  the row statuses and the pass rule;
- `plan`: `VerifyOptions`, and which engines, profiles, shapes and runners make rows (engine and
  ONNX file checks, `--max-side`, `--skip`, `--require`);
- `reference`: the PyTorch reference (diffusers `AutoencoderKLQwenImage` in float32) and its runner;
- `compare`: running one row through Polygraphy and judging it (metrics, PSNR);
- `table`: `format_table`, the terminal table;
- `run`: `verify_build`, which ties them together.

Importing this package imports only the standard library and vaebuild's light modules; torch,
Polygraphy, ONNX Runtime and diffusers are imported inside the functions that use them.
"""

from vaebuild.verify.plan import CPU_MAX_SIDE, RUNNERS, VerifyOptions, check_engine_file
from vaebuild.verify.report import DEFAULT_TOLERANCES, FAIL, NOT_RUN, PASS, SKIPPED, Row, Tolerances, VerifyReport
from vaebuild.verify.run import verify_build
from vaebuild.verify.table import format_table

__all__ = [
    "CPU_MAX_SIDE",
    "DEFAULT_TOLERANCES",
    "FAIL",
    "NOT_RUN",
    "PASS",
    "RUNNERS",
    "SKIPPED",
    "Row",
    "Tolerances",
    "VerifyOptions",
    "VerifyReport",
    "check_engine_file",
    "format_table",
    "verify_build",
]
