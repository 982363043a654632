"""The runtime: vaebuild's engine folders served to Python callers.

- `VaeRuntime` (`engines`): encode and decode through a folder's engines of any backend, with the exact
  PyTorch 2-D model as fallback; `TrtVae` is its name from before other backends existed.
- `EngineVae` (`diffusers`): the drop-in for diffusers' `AutoencoderKLQwenImage`; imported on first use,
  since it imports diffusers.
- `folder`: the manifest's engines and profiles, and the profile choice.
"""

from vaebuild.runtime.engines import EngineUnavailableError, Route, VaeRuntime
from vaebuild.runtime.folder import EngineEntry, EngineProfile, choose_profile, read_engine_dir

TrtVae = VaeRuntime


def __getattr__(name):
    """`vaebuild.runtime.EngineVae`, imported on first use (it imports diffusers)."""
    if name == "EngineVae":
        from vaebuild.runtime.diffusers import EngineVae

        return EngineVae
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["EngineEntry", "EngineProfile", "EngineUnavailableError", "EngineVae", "Route", "TrtVae", "VaeRuntime",
           "choose_profile", "read_engine_dir"]
