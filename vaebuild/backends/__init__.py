"""Engine backends, one module per format: `tensorrt` (TensorRT and TensorRT-RTX through Polygraphy)
and `inductor` (AOTInductor packages). `base` describes the interface they share."""

import functools

from vaebuild.backends.base import BACKENDS, check_backend_name


@functools.cache
def get_backend(name):
    """The `EngineBackend` called `name` (one of BACKENDS), made once per process; heavy imports stay lazy."""
    check_backend_name(name)
    if name == "inductor":
        from vaebuild.backends.inductor import InductorBackend

        return InductorBackend()
    from vaebuild.backends.tensorrt import TensorRTBackend

    return TensorRTBackend(name)


__all__ = ["BACKENDS", "get_backend"]
