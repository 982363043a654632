"""Build a TensorRT or TensorRT-RTX engine from an ONNX file through Polygraphy.

Networks are always strongly typed: precision comes from the ONNX tensor types (the FP16/BF16 builder
flags are deprecated in TensorRT 10.12 and removed in 11). All optimization profiles go into one
engine, in the order given; TensorRT numbers them from 0 in that order.

TensorRT-RTX builds on hosts without a GPU; by default its engines target compute capabilities 8.0,
8.6, 8.9 and 12.x (7.5 must be asked for; 9.0, H100/H200, is not supported). Its runtime needs a CUDA
driver even to deserialize an engine, so the profiles reported after a build are read back from the
optimization profiles handed to the builder, never from the engine file.
"""

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vaebuild.backends.trt_import import PolygraphyTrt, check_backend_name, import_polygraphy_trt
from vaebuild.errors import UserInputError, VaebuildError
from vaebuild.fileio import atomic_output, sha256_file

Shape = tuple[int, ...]
ShapeRange = tuple[Shape, Shape, Shape]  # (min, opt, max)
ProfileShapes = Mapping[str, ShapeRange]  # input name -> (min, opt, max)

_GIB = 1 << 30


@dataclass(frozen=True)
class BuildOptions:
    """Builder settings; everything left None keeps the backend's default.

    timing_cache (full TensorRT only) is loaded if it exists and updated after the build; it is
    rejected for tensorrt_rtx, whose timing cache is a no-op. compute_capabilities (TensorRT-RTX only)
    are (major, minor) targets, e.g. ((8, 6), (12, 0)); None keeps TensorRT-RTX's default targets
    (8.0, 8.6, 8.9, 12.x).
    """

    backend: str
    builder_optimization_level: int | None = None
    workspace_gib: float | None = None
    timing_cache: Path | None = None
    compute_capabilities: tuple[tuple[int, int], ...] | None = None

    def __post_init__(self):
        check_backend_name(self.backend)
        level = self.builder_optimization_level
        if level is not None and (not _is_int(level) or not 0 <= level <= 5):
            raise UserInputError(f"builder_optimization_level must be an integer from 0 to 5, got {level!r}")
        gib = self.workspace_gib
        if gib is not None and not (_is_real(gib) and math.isfinite(gib) and gib > 0):
            raise UserInputError(f"workspace_gib must be a positive number, got {gib!r}")
        if self.timing_cache is not None and self.backend != "tensorrt":
            raise UserInputError(
                "timing_cache works with the tensorrt backend only (TensorRT-RTX ignores timing caches)"
            )
        targets = self.compute_capabilities
        if targets is not None:
            if self.backend != "tensorrt_rtx":
                raise UserInputError("compute_capabilities works with the tensorrt_rtx backend only")
            if not targets or not all(len(cc) == 2 and all(_is_int(n) and n >= 0 for n in cc) for cc in targets):
                raise UserInputError(f"compute_capabilities must be (major, minor) integer pairs, got {targets!r}")


@dataclass(frozen=True)
class EngineInfo:
    """What was built: profiles are read back from the builder, one mapping per profile index."""

    backend: str
    backend_version: str
    engine_path: Path
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    profiles: tuple[dict[str, ShapeRange], ...]
    size_bytes: int
    sha256: str
    build_seconds: float


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

    try:
        builder, network, parser = pg.loaders.network_from_onnx_path(str(onnx_path), strongly_typed=True)
    except PolygraphyException as exc:
        raise UserInputError(f"cannot parse ONNX file {onnx_path}: {_first_line(exc)}") from exc
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    input_dims = {tensor.name: tuple(tensor.shape) for tensor in inputs}
    output_names = tuple(network.get_output(i).name for i in range(network.num_outputs))
    _check_profiles(profiles, input_dims, onnx_path)

    polygraphy_profiles = [_polygraphy_profile(pg, profile) for profile in profiles]
    try:
        config = _create_config(pg, options, polygraphy_profiles)(builder, network)
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
        raise VaebuildError(f"engine build from {onnx_path} failed: {_first_line(exc)}") from exc
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


def _create_config(pg: PolygraphyTrt, options: BuildOptions, polygraphy_profiles):
    """Polygraphy's config loader for the backend: the one place the backends' builder settings differ."""
    memory_pool_limits = None
    if options.workspace_gib is not None:
        memory_pool_limits = {pg.trt.MemoryPoolType.WORKSPACE: int(options.workspace_gib * _GIB)}
    common = dict(
        profiles=polygraphy_profiles,
        builder_optimization_level=options.builder_optimization_level,
        memory_pool_limits=memory_pool_limits,
    )
    if pg.backend == "tensorrt_rtx":
        targets = options.compute_capabilities
        if targets is not None:
            _check_compute_capabilities(pg, targets)
            targets = list(targets)
        return pg.create_config(compute_capabilities=targets, **common)
    return pg.create_config(load_timing_cache=_optional_str(options.timing_cache), **common)


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


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _optional_str(path) -> str | None:
    return None if path is None else str(path)


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
