"""vaebuild: offline engine-build toolchain for the Qwen-Image VAE."""

__version__ = "0.1.0"


def __getattr__(name):
    """`vaebuild.use_engines`, imported on first use (it imports diffusers)."""
    if name == "use_engines":
        from vaebuild.runtime.pipelines import use_engines

        return use_engines
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
