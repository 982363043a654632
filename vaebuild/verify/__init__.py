"""`vaebuild verify`: every engine of a build, at every shape it claims, against PyTorch.

What is compared. The build's `manifest.json` lists each engine with its optimization profiles.
For every engine, every profile and each of its min, opt and max input shapes (identical shapes
within a profile are run once, so a static engine gives one shape), one seeded input
(`vaebuild.model.inputs.sample_input`: images in [-1, 1], latents at pipeline scale) is rounded to the
engine's precision and fed, through Polygraphy's `Comparator`, to:

- the reference: diffusers `AutoencoderKLQwenImage.encode(x).latent_dist.parameters` /
  `.decode(z).sample` (the unfolded causal 3-D model, with its feature cache) in float32, on the
  GPU when one is visible; weights re-loaded from the manifest's `model` entry (or `--model`) and
  required to hash to the manifest's `weights_sha256`;
- `onnxrt`: ONNX Runtime on the exported ONNX graph (a bf16 graph runs as its float32 twin, the
  same bf16-rounded weights computed in float32, since ONNX Runtime's CPU provider has no bf16
  convolution). Each (graph, input) is compared once, even when several profiles share the shape;
- the engine itself, through its backend's Polygraphy runner: `trt` (`TrtRunner` with the profile's
  index selected) or `inductor` (the AOTInductor package, with the folder's shared weights). Engines
  built from PyTorch (inductor) have no ONNX file, so no `onnxrt` row.

Metrics per row (one output per graph): max |out - ref|, mean |out - ref|, rel = max |out - ref| /
max |ref| (normalised by the reference's peak, not element-wise), and for the decoder the PSNR of
both images mapped from [-1, 1] to [0, 255] (unrounded). The encoder's latents have no fixed peak,
so its PSNR is n/a and the max-error check alone gates it.

Pass rule (strict; nothing is ever downgraded to a warning): outputs have the reference's shape and
are finite, max |out - ref| <= max(atol, rtol * max |ref|) (checked by Polygraphy's
`SimpleCompareFunc` on the max statistic), and, for the decoder, PSNR >= min_psnr. Default
tolerances depend on the engine's precision (`DEFAULT_TOLERANCES`).

Row statuses: `pass`; `FAIL` (a metric beyond tolerance, a runner error, an engine or ONNX file that
does not match the manifest, or a `--require`d runner that could not run); `not run` (the runner
cannot run here, e.g. no CUDA GPU: the reason is in the row, and it is not a pass); `skipped` (the
image side exceeds `max_side`). Only `FAIL` rows make `VerifyReport.raise_on_failures` raise
`MismatchError` (exit code 4).

`max_side`: None means 0 (no limit) when the reference runs on a GPU (at 1920x1920 it takes 1.0 s to
encode, 1.6 s to decode and 25 GiB on an H100) and `CPU_MAX_SIDE` on the CPU, where the full-size
float32 model takes minutes per shape; 0 always means no limit. ONNX Runtime runs on the CPU unless
onnxruntime-gpu is installed: `--skip onnxrt` saves that time on a GPU host.
"""

import contextlib
import hashlib
import math
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vaebuild.backends import get_backend
from vaebuild.errors import MismatchError, UserInputError, VaebuildError, one_line
from vaebuild.fileio import sha256_file

REPORT_VERSION = 1
CPU_MAX_SIDE = 1024
RUNNERS = ("onnxrt", "trt", "inductor")
PASS, FAIL, NOT_RUN, SKIPPED = "pass", "FAIL", "not run", "skipped"
_SUMMARY_STATUS = {PASS: "passed", FAIL: "failed", NOT_RUN: "not_run", SKIPPED: "skipped"}
LEVELS = ("min", "opt", "max")
REFERENCE_NAME = "pytorch"


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
        return f"{self.engine} profile {self.profile} {self.levels} {_shape_text(self.shape)}"

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


def verify_build(folder, options: VerifyOptions = VerifyOptions(), log=print) -> VerifyReport:
    """Check and run every engine of the build in `folder`; return the report (never raises on a mismatch)."""
    start = time.perf_counter()
    folder = Path(folder)
    manifest = _read_build_manifest(folder)

    # Bind Polygraphy to the engines' backend before anything imports it (see backends.trt_import).
    backends = sorted({e["backend"] for e in manifest["engines"]})
    unavailable = {e["path"]: get_backend(e["backend"]).unavailable_reason(e, e.get("device", "cuda"))
                   for e in manifest["engines"]}
    installed = {b: _installed_version(b) for b in backends}

    device = _reference_device(options.device)
    max_side = options.max_side if options.max_side is not None else (0 if device == "cuda" else CPU_MAX_SIDE)
    source = _model_source(manifest, options, folder)
    log(f"loading the PyTorch reference ({source.describe()['kind']}) ...")
    vae, weights_hash = _load_reference(source, manifest["weights_sha256"])
    reference = _ReferenceCache(vae, device)
    onnx_dir = options.onnx_dir or manifest["onnx_dir"]
    onnx_files = _onnx_files(Path(onnx_dir), manifest) if onnx_dir else {}  # inductor builds have no ONNX

    report = VerifyReport(
        folder=folder,
        kind=manifest["kind"],
        model=manifest["model"],
        weights_sha256=weights_hash,
        reference={"api": "diffusers AutoencoderKLQwenImage.encode/decode (unfolded 3-D)", "dtype": "float32",
                   "device": device, "seed": options.seed},
        max_side=max_side,
        tolerances={},
        engines=[],
        onnx=[{"graph": g, "path": str(f.path), "sha256": f.sha256, "problem": f.problem} for g, f in onnx_files.items()],
    )
    plans = []
    for entry in manifest["engines"]:
        precision = entry.get("precision", manifest["precision"])
        report.tolerances.setdefault(precision, options.tolerances(precision))
        version_checked = get_backend(entry["backend"]).version_mismatch_fails
        problem = check_engine_file(folder, entry, installed.get(entry["backend"]) if version_checked else None,
                                    weights_hash)
        report.engines.append({
            "path": entry["path"], "graph": entry["graph"], "backend": entry["backend"],
            "backend_version": entry.get("backend_version"), "installed_version": installed.get(entry["backend"]),
            "precision": precision, "check": problem,
        })
        if problem:
            log(f"error: engine {problem}")
        plans.extend(_plan_rows(folder, entry, precision, problem, onnx_files, unavailable, max_side, options))

    plans = _without_repeated_onnx_rows(plans)
    weights = _folder_weights(folder, manifest)
    for index, (row, context) in enumerate(plans, start=1):
        if row.status is None:
            _run_row(row, context, reference, options, weights)
        report.rows.append(row)
        detail = f": {row.reason}" if row.reason and row.status != PASS else ""
        log(f"[{index}/{len(plans)}] {row.where} {row.runner}: {row.status}{detail}")
    report.seconds = time.perf_counter() - start
    return report


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


def format_table(report: VerifyReport) -> str:
    """The terminal table: one line per row, reasons after the status."""
    header = ("engine", "profile", "shape", "runner", "max abs", "mean abs", "rel", "PSNR dB", "status")
    lines = []
    for row in report.rows:
        status = row.status if not row.reason or row.status == PASS else f"{row.status}: {row.reason}"
        lines.append((
            row.engine,
            f"{row.profile} [{row.profile_index}] {row.levels}",
            _shape_text(row.shape),
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


# --- planning -------------------------------------------------------------------------------------


def _read_build_manifest(folder):
    from vaebuild.manifest import MANIFEST_NAME, read_build_manifest

    manifest = read_build_manifest(folder)
    if manifest.get("kind") not in ("static", "multiprofile") or not manifest.get("engines"):
        raise UserInputError(f"{folder / MANIFEST_NAME} lists no engines; rebuild the folder")
    return manifest


@dataclass(frozen=True)
class _OnnxFile:
    path: Path
    sha256: str | None
    problem: str | None  # why it cannot run at all (missing), else None


def _onnx_files(onnx_dir, manifest):
    """graph -> its ONNX file in `onnx_dir`, hashed once."""
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


def _plan_rows(folder, entry, precision, engine_problem, onnx_files, unavailable, max_side, options):
    """(Row, context) for every shape and runner of one engine; Row.status None means "to run"."""
    plans = []
    onnx = onnx_files.get(entry["graph"])
    for index, profile in enumerate(entry["profiles"]):
        for levels, shape, image in _distinct_shapes(profile):
            base = dict(engine=entry["path"], graph=entry["graph"], profile=profile.get("name", str(index)),
                        profile_index=index, levels=levels, shape=shape, image=image)
            context = {"entry": entry, "engine_path": Path(folder) / entry["path"], "precision": precision, "onnx": onnx,
                       "tolerances": options.tolerances(precision)}
            too_big = max_side and max(image) > max_side
            skip_reason = (
                f"image side {max(image)} > --max-side {max_side}"
                + (" (the CPU default; --max-side 0 runs every shape)" if options.max_side is None else "")
            )
            engine_runner = get_backend(entry["backend"]).runner_name
            runners = (["onnxrt"] if "onnx_sha256" in entry else []) + [engine_runner]
            for runner in runners:
                if runner in options.skip:
                    plans.append((Row(**base, runner=runner, status=SKIPPED, reason=f"--skip {runner}"), context))
                    continue
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
                if problem:
                    row = Row(**base, runner=runner, status=FAIL, reason=problem)
                elif too_big:
                    row = Row(**base, runner=runner, status=SKIPPED, reason=skip_reason)
                elif not_run and runner in options.require:
                    row = Row(**base, runner=runner, status=FAIL, reason=f"--require {runner}, but it cannot run: {not_run}")
                elif not_run:
                    row = Row(**base, runner=runner, status=NOT_RUN, reason=not_run)
                else:
                    row = Row(**base, runner=runner, status=None)
                plans.append((row, context))
    return plans


def _without_repeated_onnx_rows(plans):
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


# --- the reference ----------------------------------------------------------------------------------


def _model_source(manifest, options, folder):
    from vaebuild.manifest import MANIFEST_NAME
    from vaebuild.model.source import ModelSource

    if options.model:
        return ModelSource(model=options.model, allow_pickle=options.allow_pickle)
    model = manifest.get("model") or {}
    source = ModelSource.from_description(model, allow_pickle=options.allow_pickle)
    if source is not None:
        return source
    raise UserInputError(
        f"{folder / MANIFEST_NAME}: model {model!r} cannot be re-loaded for the PyTorch reference; "
        "pass --model PATH_OR_HF_ID"
    )


def _load_reference(source, expected_hash):
    from vaebuild.model.source import load_vae, weights_sha256

    vae = load_vae(source)
    actual = weights_sha256(vae)
    if actual != expected_hash:
        raise UserInputError(
            f"the weights of {source.describe()} (sha256 {actual[:12]}...) are not the ones these engines were built "
            f"from ({expected_hash[:12]}...); pass --model with the exported model"
        )
    return vae, actual


def _reference_device(device):
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserInputError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return device


class _ReferenceCache:
    """diffusers encode/decode in float32, each distinct input computed once."""

    def __init__(self, vae, device):
        self.vae, self.device, self.outputs = vae, device, {}
        self._on_device = False

    def __call__(self, graph, feed):
        import torch

        key = (graph, tuple(feed.shape), hashlib.sha256(feed.numpy().tobytes()).hexdigest())
        if key not in self.outputs:
            if not self._on_device:
                self.vae.to(self.device)  # load_vae gives float32 already
                self._on_device = True
            start = time.perf_counter()
            x = feed.to(self.device)
            with torch.no_grad(), _strict_fp32():
                if graph == "encoder":
                    out = self.vae.encode(x).latent_dist.parameters
                else:
                    out = self.vae.decode(x).sample
            self.outputs[key] = (out.float().cpu(), time.perf_counter() - start)
        return self.outputs[key]


@contextlib.contextmanager
def _strict_fp32():
    """Disable TF32 matmuls/convolutions for the reference (they would cost ~3 decimal digits)."""
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _reference_runner(graph, input_name, output_name, shape, dtype, reference):
    """A Polygraphy runner serving the cached diffusers reference output (it accepts inputs of `dtype`)."""
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata
    from polygraphy.datatype import DataType

    class DiffusersReferenceRunner(BaseRunner):
        def __init__(self):
            super().__init__(name=REFERENCE_NAME)

        def get_input_metadata_impl(self):
            return TensorMetadata().add(input_name, DataType.from_dtype(dtype), shape)

        def infer_impl(self, feed_dict):
            import torch

            output, seconds = reference(graph, torch.as_tensor(feed_dict[input_name]).float().cpu())
            self.inference_time = seconds
            return OrderedDict([(output_name, output)])

    return DiffusersReferenceRunner()


# --- running one row --------------------------------------------------------------------------------


def _seeded_feed(graph, shape, vae_config, precision, seed):
    """The seeded float32 input, rounded to the engine's precision so every runner sees the same values."""
    import torch

    from vaebuild.model.inputs import sample_input

    feed = sample_input(graph, shape, vae_config, seed=seed)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    return feed.to(dtype).float() if dtype else feed


def _run_row(row, context, reference, options, weights):
    """Run the reference and the row's runner on one input through Polygraphy, and fill the row's metrics."""
    entry, tolerances = context["entry"], context["tolerances"]
    feed = _seeded_feed(row.graph, row.shape, reference.vae.config, context["precision"], options.seed)
    feed = feed.to(_feed_dtype(row.runner, context["precision"]))
    row.max_abs_limit, row.min_psnr = None, tolerances.min_psnr if row.graph == "decoder" else None
    start = time.perf_counter()
    try:
        reference(row.graph, feed.float())
    except Exception as err:  # e.g. out of memory at a large shape
        row.status, row.reason = FAIL, f"PyTorch reference failed: {one_line(err)}"
        return
    try:
        runner = _make_runner(row, context, weights)
        runs = _polygraphy_run(row, entry, runner, feed, reference)
    except VaebuildError as err:
        row.status, row.reason = FAIL, str(err)
        return
    except Exception as err:  # ORT / TensorRT / Polygraphy errors: the row fails, the others still run
        row.status, row.reason = FAIL, f"{row.runner} failed: {one_line(err)}"
        return
    finally:
        row.seconds = round(time.perf_counter() - start, 3)
    _judge(row, runs, entry, tolerances)


def _make_runner(row, context, weights):
    if row.runner == "onnxrt":
        return _onnxrt_runner(context["onnx"].path, context["precision"])
    entry = context["entry"]
    return get_backend(entry["backend"]).load_runner(
        context["engine_path"], entry, row.profile_index, weights=weights, name=row.runner, device=entry.get("device")
    )


def _feed_dtype(runner, precision):
    """The input dtype a runner checks for: the engine's precision, or the ONNX graph's input type
    (a bf16 graph runs as its float32 twin)."""
    import torch

    from vaebuild.model.precision import get_precision

    if runner == "onnxrt" and precision == "bf16":
        return torch.float32
    return get_precision(precision).dtype


def _folder_weights(folder, manifest):
    """The folder's shared weights for weight-free packages (loaded on first use), or None."""
    from vaebuild.weights_file import FolderWeights

    record = manifest.get("weights_file")
    return FolderWeights(folder, record) if record else None


def _onnxrt_runner(path, precision):
    import onnx
    import onnxruntime
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    from vaebuild.export.check import fp32_twin

    model = str(path)
    first_input = onnx.load(str(path), load_external_data=False).graph.input[0]
    if first_input.type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16:
        model = fp32_twin(onnx.load(str(path))).SerializeToString()
    providers = ["cuda", "cpu"] if "CUDAExecutionProvider" in onnxruntime.get_available_providers() else ["cpu"]
    return OnnxrtRunner(SessionFromOnnx(model, providers=providers), name="onnxrt")


def _polygraphy_run(row, entry, runner, feed, reference):
    """Comparator.run on [reference, runner] with one feed dict; outputs as float32 numpy."""
    from polygraphy.comparator import Comparator
    from polygraphy.logger import G_LOGGER

    ref_runner = _reference_runner(row.graph, entry["input"], entry["output"], row.shape, feed.dtype, reference)
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        runs = Comparator.run([ref_runner, runner], data_loader=[OrderedDict([(entry["input"], feed)])])
        return Comparator.postprocess(runs, _to_float32_numpy)


def _to_float32_numpy(iteration):
    import numpy as np
    import torch

    for name in list(iteration.keys()):
        value = iteration[name]
        if isinstance(value, torch.Tensor):
            value = value.detach().float().cpu().numpy()
        iteration[name] = np.asarray(value, dtype=np.float32).copy()
    return iteration


def _judge(row, runs, entry, tolerances):
    """Fill the metrics of `row` from the two runs and decide pass or FAIL."""
    import numpy as np
    from polygraphy.comparator import Comparator, OutputCompareResult, SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    name = entry["output"]
    ref_iteration, out_iteration = runs[REFERENCE_NAME][0], runs[row.runner][0]
    if name not in out_iteration:
        row.status, row.reason = FAIL, f"{row.runner} produced no output named {name!r} (got {list(out_iteration.keys())})"
        return
    ref, out = ref_iteration[name], out_iteration[name]
    if ref.shape != out.shape:
        row.status, row.reason = FAIL, f"output shape {list(out.shape)} != reference {list(ref.shape)}"
        return
    peak = float(np.abs(ref).max()) if ref.size else 0.0
    row.max_abs_limit = tolerances.max_abs_limit(peak)
    compare = SimpleCompareFunc(atol=row.max_abs_limit, rtol=0.0, check_error_stat="max")
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        accuracy = Comparator.compare_accuracy(runs, comparisons=[(1, 0)], compare_func=compare)
    result = accuracy[0][(row.runner, REFERENCE_NAME)][0].get(name)
    if not isinstance(result, OutputCompareResult):
        row.status, row.reason = FAIL, f"Polygraphy could not compare output {name!r}"
        return
    row.max_abs, row.mean_abs = result.max_absdiff, result.mean_absdiff
    row.rel = row.max_abs / peak if peak else (0.0 if row.max_abs == 0 else math.inf)
    failures = []
    if not np.isfinite(out).all():
        failures.append(f"{int((~np.isfinite(out)).sum())} non-finite values")
    if not bool(result):
        failures.append(
            f"max abs {row.max_abs:.3g} > {row.max_abs_limit:.3g} "
            f"(max of atol {tolerances.atol:g}, rtol {tolerances.rtol:g} x peak {peak:.3g})"
        )
    if row.graph == "decoder":
        row.psnr = _psnr_255(out, ref)
        if not row.psnr >= tolerances.min_psnr:
            failures.append(f"PSNR {row.psnr:.1f} dB < {tolerances.min_psnr:g} dB")
    row.status = FAIL if failures else PASS
    row.reason = "; ".join(failures) or None


def _psnr_255(out, ref):
    """PSNR of two [-1, 1] images mapped to [0, 255] (unrounded); inf when identical."""
    import numpy as np

    mse = float(np.mean(((out.astype(np.float64) - ref.astype(np.float64)) * 127.5) ** 2))
    if not math.isfinite(mse):
        return math.nan
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


# --- backends ---------------------------------------------------------------------------------------


def _installed_version(backend):
    """The installed version of `backend`, or None when it is not installed here."""
    try:
        return get_backend(backend).version()
    except VaebuildError:
        return None


# --- formatting -------------------------------------------------------------------------------------


def _shape_text(shape):
    return "x".join(str(d) for d in shape)


def _number(value, spec=".3g"):
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, spec)


def _json_float(value):
    if value is None or math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
