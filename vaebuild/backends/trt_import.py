"""The one place that chooses between full TensorRT and TensorRT-RTX for Polygraphy.

Polygraphy binds its TensorRT module once per process: `polygraphy.config` reads
`POLYGRAPHY_USE_TENSORRT_RTX` when it is first imported, and each Polygraphy module that uses TensorRT
binds `tensorrt` or `tensorrt_rtx` when it is imported (through `polygraphy.mod.trt_importer`).
So the backend must be chosen before that code is imported, and one process serves one backend.
Any vaebuild code that imports Polygraphy calls `select_polygraphy_backend` (or
`import_polygraphy_trt`) first.
"""

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from types import ModuleType

from vaebuild.errors import BackendMissingError, UserInputError

TRT_BACKENDS = ("tensorrt", "tensorrt_rtx")  # the backends of `vaebuild.backends` that Polygraphy serves

_BACKEND_LABELS = {"tensorrt": "full TensorRT", "tensorrt_rtx": "TensorRT-RTX"}
_INSTALL_COMMANDS = {
    "tensorrt": "pip install tensorrt (on a machine with a CUDA GPU)",
    "tensorrt_rtx": "pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings",
}
_POLYGRAPHY_SWITCH = "POLYGRAPHY_USE_TENSORRT_RTX"


@dataclass(frozen=True)
class PolygraphyTrt:
    """What engine building needs from one backend, with Polygraphy bound to it."""

    backend: str
    trt: ModuleType  # the `tensorrt` or `tensorrt_rtx` module itself
    loaders: ModuleType  # polygraphy.backend.trt: Profile, network_from_onnx_path, engine_bytes_from_network
    create_config: type  # CreateConfig (full TensorRT) or CreateConfigRTX (TensorRT-RTX)


def check_trt_backend(backend: str) -> None:
    """Raise UserInputError unless `backend` is one of TRT_BACKENDS."""
    if backend not in TRT_BACKENDS:
        raise UserInputError(f"{backend!r} is not a TensorRT backend; choose one of: {', '.join(TRT_BACKENDS)}")


def import_polygraphy_trt(backend: str) -> PolygraphyTrt:
    """Check that `backend` is installed, bind Polygraphy to it, and return its loaders and config class."""
    trt = _import_backend_module(backend)
    select_polygraphy_backend(backend)
    from polygraphy.backend import trt as loaders
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.WARNING  # vaebuild prints its own per-engine status lines

    if backend == "tensorrt_rtx":
        from polygraphy.backend.tensorrt_rtx import CreateConfigRTX as create_config
    else:
        create_config = loaders.CreateConfig
    return PolygraphyTrt(backend=backend, trt=trt, loaders=loaders, create_config=create_config)


def select_polygraphy_backend(backend: str) -> None:
    """Make Polygraphy use `backend`; raise if this process already bound Polygraphy to the other one."""
    check_trt_backend(backend)
    use_rtx = backend == "tensorrt_rtx"
    if "polygraphy.mod.trt_importer" in sys.modules:
        bound_to_rtx = sys.modules["polygraphy.config"].USE_TENSORRT_RTX
        if bound_to_rtx != use_rtx:
            bound = "tensorrt_rtx" if bound_to_rtx else "tensorrt"
            raise UserInputError(
                f"Polygraphy is already bound to the {bound} backend in this process; "
                f"run the {backend} backend in a separate process"
            )
        return
    os.environ[_POLYGRAPHY_SWITCH] = "1" if use_rtx else "0"
    if "polygraphy.config" in sys.modules:
        # `import polygraphy` alone has read the switch but bound no TensorRT module yet.
        sys.modules["polygraphy.config"].USE_TENSORRT_RTX = use_rtx


def _import_backend_module(backend: str) -> ModuleType:
    """Import the backend's TensorRT module without importing Polygraphy, or raise BackendMissingError."""
    check_trt_backend(backend)
    if importlib.util.find_spec("polygraphy") is None:
        raise BackendMissingError("Polygraphy is not installed: pip install polygraphy")
    try:
        if backend == "tensorrt":
            return importlib.import_module("tensorrt")
        return _import_tensorrt_rtx()
    except (ImportError, OSError) as exc:
        raise BackendMissingError(
            f"the {backend} backend needs {_BACKEND_LABELS[backend]}, which is not importable ({exc}): "
            f"{_INSTALL_COMMANDS[backend]}"
        ) from exc


def _import_tensorrt_rtx() -> ModuleType:
    """Import `tensorrt_rtx`, or alias it to `tensorrt_rtx_bindings` so Polygraphy's import finds it."""
    try:
        return importlib.import_module("tensorrt_rtx")
    except ImportError:
        bindings = importlib.import_module("tensorrt_rtx_bindings")
        # The `tensorrt-rtx` metapackage that provides `tensorrt_rtx` may not build; its bindings wheel
        # is the same module under another name, with the `__version__` Polygraphy checks (>=1.0).
        sys.modules["tensorrt_rtx"] = bindings
        return bindings
