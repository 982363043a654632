"""Running built engines: the only module that creates TensorRT runtime objects (through Polygraphy).

`runtime_unavailable_reason` says, before anything is loaded, why engines of a backend cannot run
on this machine; `load_trt_runner` returns Polygraphy's `TrtRunner` for one engine and profile.
"""

from pathlib import Path

from vaebuild.backends.trt_import import import_polygraphy_trt
from vaebuild.errors import BackendMissingError, UserInputError

# Compute capabilities the TensorRT-RTX 1.x runtime accepts (it refuses Hopper, 9.0).
RTX_RUNTIME_COMPUTE_CAPABILITIES = ((7, 5), (8, 0), (8, 6), (8, 9), (12, 0), (12, 1))


def runtime_unavailable_reason(backend):
    """None if engines of `backend` can run here, else a one-line reason (package, GPU, compute capability)."""
    try:
        import_polygraphy_trt(backend)
    except BackendMissingError as err:
        return str(err)
    except UserInputError as err:
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
