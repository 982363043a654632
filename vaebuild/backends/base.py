"""What every engine backend shares: build options, what a build returns, and the backend interface.

A backend is one engine format (Polygraphy's `backend/` folder is the model). Each module in
`vaebuild/backends/` provides one `EngineBackend`:

- `builds_from`: "onnx" (TensorRT engines are built from the exported ONNX graphs) or "pytorch"
  (AOTInductor packages are compiled from the single-frame 2-D graph modules themselves);
- `check_options(options)`: reject options that do not apply to it (one line, UserInputError);
- `version()`: the version engines are tied to (raises BackendMissingError when not installed);
- `kernel_choices(record, graph, profiles)`: which of vaebuild's ops an engine runs (part of its build key);
- `build_engine(source, graph, engine_path, profiles, options)`: one engine holding `profiles`,
  written atomically, described by an `EngineInfo`; backends that build in worker processes (`jobs`) also
  give `build_request(...)` (plain data, same arguments) and `build_from_request(request)`;
- `unavailable_reason(entry, device)`: None when the engine a manifest entry describes can run on
  `device` here, else one line saying why not;
- `load_runner(engine_path, entry, profile_index, weights=None, name=None)`: a Polygraphy runner
  (activate / infer / set_profile / deactivate) for one engine and profile; `weights` gives
  weight-free engines their tensors;
- `runs_on_caller_stream`: whether the engine runs on the caller's CUDA stream (else callers
  synchronize before handing it inputs);
- `runner_name`: the name of its rows in `vaebuild verify` ("trt", "inductor");
- `version_mismatch_fails`: whether an engine built by another installed version is a verification
  failure (TensorRT) or merely cannot run here (AOTInductor: `unavailable_reason` says why).
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from vaebuild.errors import UserInputError

Shape = tuple[int, ...]
ShapeRange = tuple[Shape, Shape, Shape]  # (min, opt, max)
ProfileShapes = Mapping[str, ShapeRange]  # input name -> (min, opt, max)

BACKENDS = ("tensorrt", "tensorrt_rtx", "inductor")


def check_backend_name(backend: str) -> None:
    """Raise UserInputError unless `backend` is one of BACKENDS."""
    if backend not in BACKENDS:
        raise UserInputError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")


@dataclass(frozen=True)
class BuildOptions:
    """Builder settings; everything left None keeps the backend's default.

    TensorRT backends: builder_optimization_level, workspace_gib, timing_cache (full TensorRT only;
    TensorRT-RTX's is a no-op), compute_capabilities ((major, minor) targets, TensorRT-RTX only).
    inductor: device ("cuda" or "cpu": where the packages run; default cuda), embed_weights (each
    package carries its own weights instead of sharing the folder's weights file), jobs (packages
    compiled in parallel processes).
    """

    backend: str
    builder_optimization_level: int | None = None
    workspace_gib: float | None = None
    timing_cache: Path | None = None
    compute_capabilities: tuple[tuple[int, int], ...] | None = None
    device: str | None = None
    embed_weights: bool = False
    jobs: int = 1

    def __post_init__(self):
        check_backend_name(self.backend)
        level = self.builder_optimization_level
        if level is not None and (not _is_int(level) or not 0 <= level <= 5):
            raise UserInputError(f"builder_optimization_level must be an integer from 0 to 5, got {level!r}")
        gib = self.workspace_gib
        if gib is not None and not (_is_real(gib) and math.isfinite(gib) and gib > 0):
            raise UserInputError(f"workspace_gib must be a positive number, got {gib!r}")
        if not _is_int(self.jobs) or self.jobs < 1:
            raise UserInputError(f"jobs must be a positive integer, got {self.jobs!r}")
        if self.device not in (None, "cuda", "cpu"):
            raise UserInputError(f"unknown build device {self.device!r}; use cuda or cpu")
        from vaebuild.backends import get_backend

        get_backend(self.backend).check_options(self)

    def set_fields(self):
        """Names of the options given a non-default value (for 'works with X only' errors)."""
        defaults = BuildOptions.__dataclass_fields__
        return [
            name for name, f in defaults.items()
            if name != "backend" and getattr(self, name) != f.default
        ]


@dataclass(frozen=True)
class EngineInfo:
    """What was built: profiles are read back from the builder, one mapping per profile index.

    `manifest_fields` holds backend-specific facts for the manifest entry (e.g. the torch and CUDA
    versions and GPU an AOTInductor package was compiled for).
    """

    backend: str
    backend_version: str
    engine_path: Path
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    profiles: tuple[dict[str, ShapeRange], ...]
    size_bytes: int
    sha256: str
    build_seconds: float
    manifest_fields: dict = field(default_factory=dict)


def reject_options(options: BuildOptions, allowed, backend_label):
    """Raise UserInputError for the first option set in `options` that is not in `allowed`."""
    for name in options.set_fields():
        if name not in allowed:
            flag = "--" + name.replace("_", "-").replace("builder-optimization-level", "opt-level").replace(
                "compute-capabilities", "compute-capability")
            raise UserInputError(f"{flag} does not apply to the {backend_label} backend; drop it")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
