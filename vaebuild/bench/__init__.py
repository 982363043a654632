"""`vaebuild bench`: standalone VAE latency per image size, diffusers 3-D vs vaebuild 2-D vs built engines.

Which module holds what:
    options     `BenchOptions` (what to measure, the device defaults) and the sizes: `BenchSize`,
                `parse_sizes` (`--sizes`), `default_sizes` (the shipped specs' sizes)
    timing      `time_calls` (CUDA events on a GPU, perf_counter on a CPU) and `summarize` (median, p90, min);
                scripts under benchmarks/ and scripts/ time with them too
    run         `run_bench`: every row (3-D eager, 2-D eager, one per engine folder), FLOPs, speedups
    loads       `measure_fresh_loads`: engine load costs in fresh processes (through `load_probe`)
    load_probe  the subprocess those run: `python -m vaebuild.bench.load_probe`
    report      `render_markdown` (the tables) and `write_results` (JSON and Markdown files)

Importing this package imports no torch or diffusers: those load inside the functions that use them.
"""

from vaebuild.bench.options import BenchOptions, BenchSize, default_sizes, parse_sizes
from vaebuild.bench.report import render_markdown, write_results
from vaebuild.bench.run import run_bench
from vaebuild.bench.timing import summarize, time_calls

__all__ = [
    "BenchOptions",
    "BenchSize",
    "default_sizes",
    "parse_sizes",
    "render_markdown",
    "run_bench",
    "summarize",
    "time_calls",
    "write_results",
]
