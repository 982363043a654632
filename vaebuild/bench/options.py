"""What `vaebuild bench` measures: `BenchOptions` (device, precision, warm-up and timed calls, engine folders)
and the image sizes (`BenchSize`, `parse_sizes` for `--sizes`, `default_sizes` from the shipped specs)."""

import warnings
from dataclasses import dataclass
from pathlib import Path

from vaebuild.errors import UserInputError

GPU_WARMUP, GPU_RUNS = 3, 10
CPU_WARMUP, CPU_RUNS = 1, 3


@dataclass(frozen=True)
class BenchSize:
    """One image size; `name` says where it came from (a spec profile name or the `--sizes` text)."""

    name: str
    height: int
    width: int

    @property
    def label(self) -> str:
        """`WxH`, as the tables print sizes."""
        return f"{self.width}x{self.height}"


@dataclass(frozen=True)
class BenchOptions:
    """What to measure; None means the device's default (see `resolve`)."""

    sizes: tuple[BenchSize, ...]
    device: str = "auto"  # auto | cpu | cuda
    precision: str | None = None  # default: bf16 on cuda, fp32 on cpu
    warmup: int | None = None
    runs: int | None = None
    batch: int = 1
    engines: tuple = ()  # engine folders (a single path is accepted too)
    flops: bool = True
    seed: int = 0
    fresh_process_loads: bool = True  # measure engine loads in subprocesses (see vaebuild.bench.loads)
    cuda_graphs: bool = False  # also time each folder's packages replayed from CUDA graphs (more engine rows)

    def __post_init__(self):
        engines = (self.engines,) if isinstance(self.engines, (str, Path)) else self.engines or ()
        object.__setattr__(self, "engines", tuple(Path(e) for e in engines))
        if not self.sizes:
            raise UserInputError("no sizes to benchmark; pass --sizes WxH[,WxH...]")
        if self.cuda_graphs and not self.engines:
            raise UserInputError("--cuda-graphs times engine folders; pass --engines DIR")
        for name, value, low in (("--warmup", self.warmup, 0), ("--runs", self.runs, 1), ("--batch", self.batch, 1)):
            if value is not None and value < low:
                raise UserInputError(f"{name} {value} must be at least {low}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UserInputError(f"--device {self.device!r}: use auto, cpu or cuda")
        if self.precision is not None:
            from vaebuild.model.precision import get_precision

            get_precision(self.precision)

    def resolve(self):
        """(torch device, precision name, warmup, runs) with the device defaults filled in."""
        import torch

        if self.device == "cuda" and not torch.cuda.is_available():
            raise UserInputError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
        use_cuda = self.device == "cuda" or (self.device == "auto" and torch.cuda.is_available())
        device = torch.device("cuda" if use_cuda else "cpu")
        precision = self.precision or ("bf16" if use_cuda else "fp32")
        warmup = self.warmup if self.warmup is not None else (GPU_WARMUP if use_cuda else CPU_WARMUP)
        runs = self.runs if self.runs is not None else (GPU_RUNS if use_cuda else CPU_RUNS)
        return device, precision, warmup, runs


def default_sizes():
    """The five T2I static sizes and the nine I2I multi-profile opt sizes of the shipped specs, in file order."""
    from vaebuild.builder.specs import RoundingWarning, default_spec_path, load_spec

    sizes, seen = [], set()
    for kind in ("static", "multiprofile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RoundingWarning)  # 4_3: 1140 -> 1136, documented in the spec
            spec = load_spec(default_spec_path(kind))
        for profile in spec.profiles:
            key = (profile.opt.height, profile.opt.width)
            if key not in seen:
                seen.add(key)
                sizes.append(BenchSize(profile.name, *key))
    return tuple(sizes)


def parse_sizes(text):
    """`"1328x1328,512x512"` (width x height) -> BenchSizes; sides must be multiples of 8, at least 16."""
    sizes = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        width, sep, height = item.lower().partition("x")
        if not (sep and width.isdigit() and height.isdigit()):
            raise UserInputError(f"--sizes entry {item!r} must look like 1328x1328 (width x height)")
        width, height = int(width), int(height)
        for side in (width, height):
            if side < 16 or side % 8:
                raise UserInputError(f"--sizes entry {item!r}: sides must be multiples of 8 and at least 16")
        sizes.append(BenchSize(item, height, width))
    if not sizes:
        raise UserInputError("--sizes is empty; pass e.g. 1328x1328,512x512")
    return tuple(sizes)
