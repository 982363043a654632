"""What `vaebuild verify` checks: the options, and which engines, profiles, shapes and runners make rows.

What is compared. The build's `manifest.json` lists each engine with its optimization profiles.
For every engine, every profile and each of its min, opt and max input shapes (identical shapes
within a profile are run once, so a static engine gives one shape), one seeded input
(`vaebuild.model.inputs.sample_input`: images in [-1, 1], latents at pipeline scale) is rounded to the
engine's precision and fed, through Polygraphy's `Comparator`, to:

- the reference: diffusers `AutoencoderKLQwenImage` in float32 (`vaebuild.verify.reference`);
- `onnxrt`: ONNX Runtime on the exported ONNX graph (a bf16 graph runs as its float32 twin, the
  same bf16-rounded weights computed in float32, since ONNX Runtime's CPU provider has no bf16
  convolution). Each (graph, input) is compared once, even when several profiles share the shape;
- the engine itself, through its backend's Polygraphy runner: `trt` (`TrtRunner` with the profile's
  index selected) or `inductor` (the AOTInductor package, with the folder's shared weights). Engines
  built from PyTorch (inductor) have no ONNX file, so no `onnxrt` row.

`max_side`: None means 0 (no limit) when the reference runs on a GPU (at 1920x1920 it takes 1.0 s to
encode, 1.6 s to decode and 25 GiB on an H100) and `CPU_MAX_SIDE` on the CPU, where the full-size
float32 model takes minutes per shape; 0 always means no limit. ONNX Runtime runs on the CPU unless
onnxruntime-gpu is installed: `--skip onnxrt` saves that time on a GPU host.

`--sizes WxH,...` (`VerifyOptions.sizes`) adds, for each graph, a row per size at the whole-image engine and profile
that the runtime would run it on (levels "size"); a size that no engine of a graph serves (neither a whole-image
engine nor the tiles) is a one-line UserInputError naming it and the ranges served (`vaebuild.verify.sizes`).

A folder built with `--tile`: its tile engines get no rows of their own; `plan_tiled_rows` adds, per graph, at each
size of the whole-image engines' profiles and of `--sizes` that the tiles serve, the tiled output through
`VaeRuntime(tiling=True)` against the float32 reference and, where a whole-image engine serves the size, against
that engine through `VaeRuntime(tiling=False)` ("tiled vs untiled"). An engine check problem of any engine a row
uses fails it; `--skip`, `--require` and `--max-side` apply to them as to the others (runner: the tile engines').

A planned row either has its status already (`FAIL` for an engine or ONNX file that does not match
the manifest, `skipped`, `not run`) or None: to be run by `vaebuild.verify.compare.run_row`.
"""

import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from vaebuild.backends import get_backend
from vaebuild.errors import UserInputError
from vaebuild.fileio import sha256_file
from vaebuild.verify.report import DEFAULT_TOLERANCES, FAIL, NOT_RUN, SKIPPED, Row, Tolerances

CPU_MAX_SIDE = 1024
RUNNERS = ("onnxrt", "trt", "inductor")
LEVELS = ("min", "opt", "max")


@dataclass(frozen=True)
class VerifyOptions:
    """How to verify. Tolerances left None take the engine precision's default."""

    atol: float | None = None
    rtol: float | None = None
    min_psnr: float | None = None
    max_side: int | None = None  # None: no limit on GPU, CPU_MAX_SIDE on CPU; 0: no limit
    require: tuple[str, ...] = ()  # runners whose `not run` rows count as failures
    skip: tuple[str, ...] = ()  # runners not to run at all
    device: str = "auto"  # where the PyTorch reference runs: auto | cpu | cuda
    onnx_dir: Path | None = None  # instead of the manifest's onnx_dir
    model: str | None = None  # instead of the manifest's model entry
    allow_pickle: bool = False  # let a model folder without safetensors load pickled weights
    seed: int = 0
    sizes: tuple = ()  # `--sizes`: more image sizes (BenchSize: height, width), beyond every profile's min/opt/max

    def __post_init__(self):
        for name in ("atol", "rtol", "min_psnr"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise UserInputError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value!r}")
        if self.max_side is not None and self.max_side < 0:
            raise UserInputError(f"--max-side must be >= 0 (0: no limit), got {self.max_side}")
        for option, runners in (("--require", self.require), ("--skip", self.skip)):
            for runner in runners:
                if runner not in RUNNERS:
                    raise UserInputError(f"{option} {runner!r}: choose from {', '.join(RUNNERS)}")
        both = sorted(set(self.require) & set(self.skip))
        if both:
            raise UserInputError(f"--require {both[0]} and --skip {both[0]} contradict each other")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UserInputError(f"unknown --device '{self.device}'; use auto, cpu or cuda")

    def tolerances(self, precision):
        """The tolerances for engines of `precision`: its defaults with this object's overrides."""
        base = DEFAULT_TOLERANCES.get(precision, DEFAULT_TOLERANCES["fp16"])
        return Tolerances(
            atol=base.atol if self.atol is None else float(self.atol),
            rtol=base.rtol if self.rtol is None else float(self.rtol),
            min_psnr=base.min_psnr if self.min_psnr is None else float(self.min_psnr),
        )


def resolve_max_side(options, device):
    """The image-side limit in effect: `options.max_side`, or by default 0 (none) on a GPU, CPU_MAX_SIDE on the CPU."""
    return options.max_side if options.max_side is not None else (0 if device == "cuda" else CPU_MAX_SIDE)


def check_engine_file(folder, entry, installed_version=None, weights_hash=None):
    """None if the engine file matches its manifest entry, else a one-line reason naming the file."""
    from vaebuild.manifest import engine_file_problem

    problem = engine_file_problem(folder, entry)
    if problem:
        return problem
    rel = entry["path"]
    if installed_version is not None and entry.get("backend_version") != installed_version:
        return (
            f"{rel}: built with {entry['backend']} {entry.get('backend_version')} but {installed_version} is installed; "
            "engines only load in the version that built them: rebuild it"
        )
    if weights_hash is not None and entry.get("weights_sha256", weights_hash) != weights_hash:
        return (
            f"{rel}: built from other weights (sha256 {entry['weights_sha256'][:12]}...) than the manifest's model; "
            "rebuild it"
        )
    return None


@dataclass(frozen=True)
class _OnnxFile:
    path: Path
    sha256: str | None
    problem: str | None  # why it cannot run at all (missing), else None


def find_onnx_files(onnx_dir, manifest):
    """graph -> its ONNX file in `onnx_dir` (path, sha256, problem), hashed once."""
    import json

    from vaebuild.export import RECORD_NAME
    from vaebuild.model import ONNX_FILES

    record_path = onnx_dir / RECORD_NAME
    names = dict(ONNX_FILES)
    if record_path.is_file():
        names.update({g: r["file"] for g, r in json.loads(record_path.read_text()).get("graphs", {}).items()})
    files = {}
    for graph in sorted({e["graph"] for e in manifest["engines"] if "onnx_sha256" in e}):
        path = onnx_dir / names[graph]
        if path.is_file():
            files[graph] = _OnnxFile(path, sha256_file(path), None)
        else:
            problem = f"ONNX file {path} not found; pass --onnx DIR (the `vaebuild export` folder)"
            files[graph] = _OnnxFile(path, None, problem)
    return files


def _distinct_shapes(profile):
    """[(levels label, input shape, image (h, w))] with identical shapes of one profile merged."""
    merged = OrderedDict()
    for level in LEVELS:
        shape = tuple(profile["input"][level])
        merged.setdefault(shape, ([], tuple(profile["image"][level])))[0].append(level)
    return [("=".join(levels), shape, image) for shape, (levels, image) in merged.items()]


def plan_rows(folder, entry, precision, engine_problem, onnx_files, unavailable, max_side, options, extra=()):
    """(Row, context) for every shape and runner of one whole-image engine; Row.status None means "to run".

    `extra`: [(profile index, image (h, w), input shape)] of `--sizes` this engine serves
    (`FolderSizes.extra_rows`): rows with levels "size" after the profile's own shapes (a shape the profile already
    has is not repeated)."""
    plans = []
    onnx = onnx_files.get(entry["graph"])
    for index, profile in enumerate(entry["profiles"]):
        shapes = _distinct_shapes(profile)
        seen = {shape for _, shape, _ in shapes}
        for profile_index, image, shape in extra:
            if profile_index == index and shape not in seen:
                seen.add(shape)
                shapes.append(("size", shape, tuple(image)))
        for levels, shape, image in shapes:
            base = dict(engine=entry["path"], graph=entry["graph"], profile=profile.get("name", str(index)),
                        profile_index=index, levels=levels, shape=shape, image=image)
            context = {"entry": entry, "engine_path": Path(folder) / entry["path"], "precision": precision, "onnx": onnx,
                       "tolerances": options.tolerances(precision)}
            engine_runner = get_backend(entry["backend"]).runner_name
            runners = (["onnxrt"] if "onnx_sha256" in entry else []) + [engine_runner]
            for runner in runners:
                problem, not_run = None, None
                if runner == "onnxrt":
                    if onnx.problem:
                        not_run = onnx.problem
                    elif onnx.sha256 != entry["onnx_sha256"]:
                        problem = (f"{onnx.path.name} sha256 {onnx.sha256[:12]}... differs from the "
                                   f"{entry['onnx_sha256'][:12]}... this engine was built from")
                else:
                    problem = engine_problem and f"engine check: {engine_problem}"
                    not_run = unavailable[entry["path"]]
                row = Row(**base, runner=runner, status=None)
                _set_status(row, runner, problem, not_run, max_side, options)
                plans.append((row, context))
    return plans


def plan_tiled_rows(folder, manifest, sizes, problems, unavailable, max_side, options):
    """(Row, context) of the tiled rows of a folder built with `--tile` (see `vaebuild.verify.report`).

    For each graph whose two tile engines the folder holds, at each image size of `sizes.tiled_sizes(graph,
    options.sizes)`: "<runner> tiled" (against the float32 reference) and, where a whole-image engine serves the
    size, "<runner> tiled vs untiled" (against it). `problems` and `unavailable`: engine path -> the engine check's
    problem / why it cannot run here (None: none)."""
    from vaebuild.model.tiling import TILE_IO
    from vaebuild.verify.reference import REFERENCE_NAME
    from vaebuild.verify.report import UNTILED

    plans = []
    entries = {e["graph"]: e for e in manifest["engines"]}
    by_path = {e["path"]: e for e in manifest["engines"]}
    tile = manifest["tiles"]["tile"]
    for graph in sizes.tiled_graphs():
        pieces = [entries[name] for name in sizes.pieces(graph)]
        precision = pieces[0].get("precision", manifest["precision"])
        io = (TILE_IO[pieces[0]["graph"]][0], TILE_IO[pieces[1]["graph"]][1])
        runner_name = get_backend(pieces[0]["backend"]).runner_name
        for image, whole in sizes.tiled_sizes(graph, options.sizes):
            base = dict(engine=",".join(p["path"] for p in pieces), graph=graph, profile=f"tile {tile[0]}x{tile[1]}",
                        profile_index=0, levels="size", shape=sizes.input_shape(graph, image), image=image)
            against = [(REFERENCE_NAME, f"{runner_name} tiled", pieces)]
            if whole is not None:
                against.append((UNTILED, f"{runner_name} tiled vs untiled", pieces + [by_path[whole]]))
            for reference, runner, used in against:
                problem = "; ".join(f"engine check: {problems[e['path']]}" for e in used if problems[e["path"]])
                not_run = "; ".join(unavailable[e["path"]] for e in used if unavailable[e["path"]])
                row = Row(**base, runner=runner, status=None)
                _set_status(row, runner_name, problem or None, not_run or None, max_side, options)
                context = {"tiled": True, "against": reference, "io": io, "precision": precision,
                           "tolerances": options.tolerances(precision)}
                plans.append((row, context))
    return plans


def _set_status(row, runner, problem, not_run, max_side, options):
    """The planned status of `row` (run by `runner`, one of RUNNERS): FAIL for a `problem`, skipped (--skip,
    --max-side), FAIL or not run when it cannot run here (`not_run`, --require), else None: to run."""
    side = max(row.image)
    if runner in options.skip:
        row.status, row.reason = SKIPPED, f"--skip {runner}"
    elif problem:
        row.status, row.reason = FAIL, problem
    elif max_side and side > max_side:
        row.status = SKIPPED
        row.reason = (f"image side {side} > --max-side {max_side}"
                      + (" (the CPU default; --max-side 0 runs every shape)" if options.max_side is None else ""))
    elif not_run and runner in options.require:
        row.status, row.reason = FAIL, f"--require {runner}, but it cannot run: {not_run}"
    elif not_run:
        row.status, row.reason = NOT_RUN, not_run


def without_repeated_onnx_rows(plans):
    """Keep one onnxrt row per (graph, input shape, precision): profiles sharing a shape share that comparison."""
    seen, kept = set(), []
    for row, context in plans:
        if row.runner == "onnxrt":
            key = (row.graph, row.shape, context["precision"], context["entry"]["onnx_sha256"])
            if key in seen:
                continue
            seen.add(key)
        kept.append((row, context))
    return kept
