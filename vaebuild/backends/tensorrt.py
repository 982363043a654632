"""TensorRT and TensorRT-RTX engines, built from ONNX and run through Polygraphy.

Networks are always strongly typed: precision comes from the ONNX tensor types (the FP16/BF16 builder
flags are deprecated in TensorRT 10.12 and removed in 11). All optimization profiles go into one
engine, in the order given; TensorRT numbers them from 0 in that order.

TensorRT-RTX builds on hosts without a GPU; by default its engines target compute capabilities 8.0,
8.6, 8.9 and 12.x (7.5 must be asked for; 9.0, H100/H200, is not supported). Its runtime needs a CUDA
driver even to deserialize an engine, so the profiles reported after a build are read back from the
optimization profiles handed to the builder, never from the engine file.

This module and `trt_import` are the only ones that touch TensorRT objects; the two flavours differ
only in `_create_config`, `check_options` and `unavailable_reason`.

Ctrl-C during a build cancels it and raises KeyboardInterrupt once TensorRT returns, before any file is
written (`_CtrlCDeferred`: TensorRT's callbacks would swallow it).
"""

import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from vaebuild.backends.base import (
    BuildOptions,
    EngineInfo,
    ProfileShapes,
    Shape,
    ShapeRange,
    _is_int,
    reject_options,
)
from vaebuild.backends.trt_import import PolygraphyTrt, import_polygraphy_trt
from vaebuild.errors import BackendMissingError, UserInputError, VaebuildError, one_line
from vaebuild.fileio import atomic_output, sha256_file

_GIB = 1 << 30

# Compute capabilities the TensorRT-RTX 1.x runtime accepts (it refuses Hopper, 9.0).
RTX_RUNTIME_COMPUTE_CAPABILITIES = ((7, 5), (8, 0), (8, 6), (8, 9), (12, 0), (12, 1))


class TensorRTBackend:
    """Full TensorRT (`tensorrt`) or TensorRT for RTX (`tensorrt_rtx`), both through Polygraphy."""

    builds_from = "onnx"
    file_suffix = ".trt"
    runner_name = "trt"
    runs_on_caller_stream = False  # Polygraphy's TrtRunner works on its own stream
    # An engine from another TensorRT version in a folder is a build problem (verify fails it).
    version_mismatch_fails = True

    def __init__(self, name):
        self.name = name

    def check_options(self, options: BuildOptions) -> None:
        """Reject options that do not apply to this TensorRT flavour."""
        reject_options(options, ("builder_optimization_level", "workspace_gib", "timing_cache",
                                 "compute_capabilities"), self.name)
        if options.timing_cache is not None and self.name != "tensorrt":
            raise UserInputError(
                "timing_cache works with the tensorrt backend only (TensorRT-RTX ignores timing caches)"
            )
        targets = options.compute_capabilities
        if targets is not None:
            if self.name != "tensorrt_rtx":
                raise UserInputError("compute_capabilities works with the tensorrt_rtx backend only")
            if not targets or not all(len(cc) == 2 and all(_is_int(n) and n >= 0 for n in cc) for cc in targets):
                raise UserInputError(f"compute_capabilities must be (major, minor) integer pairs, got {targets!r}")

    def kernel_choices(self, record, graph, profiles) -> dict:
        """TensorRT engines run none of vaebuild's ops (the build key records that)."""
        return {"fast_kernels": False, "fused_norms": False}

    def version(self) -> str:
        """The installed TensorRT version (engines only load in the version that built them)."""
        return import_polygraphy_trt(self.name).trt.__version__

    def build_target(self, options) -> dict:
        """Engines are tied to the TensorRT version only (recorded as backend_version); checks RTX targets."""
        if options.compute_capabilities is not None:
            _check_compute_capabilities(import_polygraphy_trt(self.name), options.compute_capabilities)
        return {}

    def build_engine(self, source, graph, engine_path, profiles, options) -> EngineInfo:
        """Build the engine of `graph` from the source's ONNX file."""
        return build_engine(source.onnx_path(graph), engine_path, profiles, options)

    def unavailable_reason(self, entry, device) -> str | None:
        """None if engines of this backend can run on `device` here, else a one-line reason."""
        return runtime_unavailable_reason(self.name)

    def load_runner(self, engine_path, entry, profile_index=0, weights=None, name=None, device=None, cuda_graphs=False):
        """Polygraphy `TrtRunner` for the engine, using optimization profile `profile_index`."""
        if cuda_graphs:
            raise UserInputError(f"CUDA graphs are offered for AOTInductor packages, not TensorRT engines ({engine_path}); "
                                 "drop cuda_graphs (--cuda-graphs)")
        return load_trt_runner(engine_path, self.name, profile_index, name=name)


def build_engine(
    onnx_path, engine_path, profiles: Sequence[ProfileShapes], options: BuildOptions
) -> EngineInfo:
    """Build one engine holding all `profiles`, written atomically to `engine_path`."""
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise UserInputError(f"ONNX file not found: {onnx_path}")
    if not profiles:
        raise UserInputError("at least one optimization profile is required")
    pg = import_polygraphy_trt(options.backend)
    from polygraphy.exception import PolygraphyException  # only after the backend is bound

    with _CtrlCDeferred(pg) as ctrl_c:
        try:
            builder, network, parser = pg.loaders.network_from_onnx_path(str(onnx_path), strongly_typed=True)
        except PolygraphyException as exc:
            raise UserInputError(f"cannot parse ONNX file {onnx_path}: {one_line(exc, first_line=True)}") from exc
        inputs = [network.get_input(i) for i in range(network.num_inputs)]
        input_dims = {tensor.name: tuple(tensor.shape) for tensor in inputs}
        output_names = tuple(network.get_output(i).name for i in range(network.num_outputs))
        _check_profiles(profiles, input_dims, onnx_path)

        polygraphy_profiles = [_polygraphy_profile(pg, profile) for profile in profiles]
        try:
            config = _create_config(pg, options, polygraphy_profiles, ctrl_c.monitor)(builder, network)
            if config.num_optimization_profiles != len(profiles):
                raise VaebuildError(
                    f"the builder config holds {config.num_optimization_profiles} optimization profiles, "
                    f"expected {len(profiles)}"
                )
            start = time.perf_counter()
            engine_bytes = pg.loaders.engine_bytes_from_network(
                (builder, network, parser), config=config, save_timing_cache=_optional_str(options.timing_cache)
            )
            build_seconds = time.perf_counter() - start
        except PolygraphyException as exc:
            raise VaebuildError(f"engine build from {onnx_path} failed: {one_line(exc, first_line=True)}") from exc
        built_profiles = tuple(_read_back_profile(builder, network, profile) for profile in polygraphy_profiles)

    with atomic_output(engine_path) as tmp:
        with open(tmp, "wb") as f:
            f.write(engine_bytes)
    return EngineInfo(
        backend=options.backend,
        backend_version=pg.trt.__version__,
        engine_path=engine_path,
        input_names=tuple(input_dims),
        output_names=output_names,
        profiles=built_profiles,
        size_bytes=engine_path.stat().st_size,
        sha256=sha256_file(engine_path),
        build_seconds=build_seconds,
    )


def _create_config(pg: PolygraphyTrt, options: BuildOptions, polygraphy_profiles, progress_monitor=None):
    """Polygraphy's config loader for the backend: the one place the backends' builder settings differ."""
    memory_pool_limits = None
    if options.workspace_gib is not None:
        memory_pool_limits = {pg.trt.MemoryPoolType.WORKSPACE: int(options.workspace_gib * _GIB)}
    common = dict(
        profiles=polygraphy_profiles,
        builder_optimization_level=options.builder_optimization_level,
        memory_pool_limits=memory_pool_limits,
        progress_monitor=progress_monitor,
    )
    if pg.backend == "tensorrt_rtx":
        targets = options.compute_capabilities
        if targets is not None:
            _check_compute_capabilities(pg, targets)
            targets = list(targets)
        return pg.create_config(compute_capabilities=targets, **common)
    return pg.create_config(load_timing_cache=_optional_str(options.timing_cache), **common)


class _CtrlCDeferred:
    """Within the block SIGINT only sets `requested`: `monitor` then cancels TensorRT's build, and leaving the
    block raises KeyboardInterrupt (in place of the cancelled build's error, kept as its `__context__`).

    Python's default handler raises KeyboardInterrupt at the next bytecode, which during a build is usually
    inside Polygraphy's logger callback, where TensorRT catches it (`Exception caught in log()`) and builds on.
    Polygraphy's messages about the cancelled build are muted. Active only in the main thread over Python's
    default SIGINT handler (a program with its own handler, or ignoring SIGINT, keeps its behaviour).
    """

    def __init__(self, pg: PolygraphyTrt):
        from polygraphy.logger import G_LOGGER

        self._logger = G_LOGGER
        self._severity = G_LOGGER.module_severity
        self._previous = None
        self.requested = False
        ctrl_c = self

        class StopOnCtrlC(pg.trt.IProgressMonitor):
            def __init__(self):
                pg.trt.IProgressMonitor.__init__(self)

            def phase_start(self, phase_name, parent_phase, num_steps):
                pass

            def phase_finish(self, phase_name):
                pass

            def step_complete(self, phase_name, step):
                return not ctrl_c.requested  # False cancels the build

        self.monitor = StopOnCtrlC()

    def _record(self, signum, frame):
        self.requested = True
        self._logger.module_severity = self._logger.CRITICAL + 1

    def __enter__(self):
        if threading.current_thread() is threading.main_thread() and (
            signal.getsignal(signal.SIGINT) is signal.default_int_handler
        ):
            self._previous = signal.signal(signal.SIGINT, self._record)
        return self

    def __exit__(self, exc_type, exc, tb):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        if self.requested:
            self._logger.module_severity = self._severity
            raise KeyboardInterrupt
        return False


def _check_compute_capabilities(pg: PolygraphyTrt, compute_capabilities) -> None:
    """Raise UserInputError for a compute capability this TensorRT-RTX cannot target."""
    targets = [name for name in pg.trt.ComputeCapability.__members__ if name.startswith("SM")]
    for major, minor in compute_capabilities:
        if f"SM{major}{minor}" not in targets:
            supported = ", ".join(f"{name[2:-1]}.{name[-1]}" for name in targets)
            raise UserInputError(
                f"compute capability {major}.{minor} is not a TensorRT-RTX {pg.trt.__version__} target; "
                f"supported: {supported}"
            )


def _check_profiles(profiles: Sequence[ProfileShapes], input_dims: dict[str, Shape], onnx_path: Path) -> None:
    """Raise UserInputError unless each profile gives every network input valid min <= opt <= max shapes."""
    for index, profile in enumerate(profiles):
        if set(profile) != set(input_dims):
            raise UserInputError(
                f"profiles[{index}] names input(s) {sorted(profile)}, "
                f"but {onnx_path.name} has input(s) {sorted(input_dims)}"
            )
        for name, shape_range in profile.items():
            where = f"profiles[{index}].{name}"
            if len(shape_range) != 3:
                raise UserInputError(f"{where} must be (min, opt, max) shapes, got {shape_range!r}")
            dims = input_dims[name]
            for label, shape in zip(("min", "opt", "max"), shape_range):
                if len(shape) != len(dims) or not all(_is_int(d) and d > 0 for d in shape):
                    raise UserInputError(
                        f"{where}.{label}={tuple(shape)} must be {len(dims)} positive integers"
                    )
                for axis, (size, fixed) in enumerate(zip(shape, dims)):
                    if fixed >= 0 and size != fixed:
                        raise UserInputError(
                            f"{where}.{label}[{axis}]={size}, but {onnx_path.name} fixes that axis at {fixed}"
                        )
            low, opt, high = shape_range
            if not all(a <= b <= c for a, b, c in zip(low, opt, high)):
                got = tuple(map(tuple, shape_range))
                raise UserInputError(f"{where}: need min <= opt <= max on every axis, got {got}")


def _polygraphy_profile(pg: PolygraphyTrt, profile: ProfileShapes):
    """A Polygraphy Profile holding `profile`'s (min, opt, max) shapes."""
    polygraphy_profile = pg.loaders.Profile()
    for name, (low, opt, high) in profile.items():
        polygraphy_profile.add(name, min=tuple(low), opt=tuple(opt), max=tuple(high))
    return polygraphy_profile


def _read_back_profile(builder, network, polygraphy_profile) -> dict[str, ShapeRange]:
    """The shapes TensorRT holds for a profile: the IOptimizationProfile Polygraphy makes of it, read back."""
    trt_profile = polygraphy_profile.to_trt(builder, network)
    return {
        name: tuple(tuple(int(d) for d in shape) for shape in trt_profile.get_shape(name))
        for name in polygraphy_profile
    }


def _optional_str(path) -> str | None:
    return None if path is None else str(path)


def runtime_unavailable_reason(backend):
    """None if engines of `backend` can run here, else a one-line reason (package, GPU, compute capability)."""
    try:
        import_polygraphy_trt(backend)
    except (BackendMissingError, UserInputError) as err:
        return str(err)
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine"
    capability = torch.cuda.get_device_capability()
    if backend == "tensorrt_rtx" and capability not in RTX_RUNTIME_COMPUTE_CAPABILITIES:
        name = torch.cuda.get_device_name()
        return (
            f"the TensorRT-RTX runtime does not support compute capability {capability[0]}.{capability[1]} "
            f"({name}); run these engines on an RTX-class GPU or build with --backend tensorrt"
        )
    return None


def load_trt_runner(engine_path, backend, profile_index=0, name=None):
    """Polygraphy `TrtRunner` for `engine_path` using optimization profile `profile_index` (not yet activated)."""
    pg = import_polygraphy_trt(backend)
    engine_path = Path(engine_path)
    if not engine_path.is_file():
        raise UserInputError(f"engine file not found: {engine_path}")
    engine = pg.loaders.EngineFromBytes(pg.loaders.BytesFromPath(str(engine_path)))
    return pg.loaders.TrtRunner(engine, name=name or engine_path.name, optimization_profile=profile_index)
