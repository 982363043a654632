"""vaebuild: offline engine-build toolchain for the Qwen-Image VAE."""

__version__ = "0.1.0"
