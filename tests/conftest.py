"""Shared pytest setup."""

import importlib

import pytest

from vaebuild.backends.trt_import import select_polygraphy_backend

# Polygraphy binds one TensorRT flavour per process, at its first import. Tests build engines with
# TensorRT-RTX (the one whose builder runs without a GPU), so bind it before any test imports Polygraphy.
select_polygraphy_backend("tensorrt_rtx")


def importable(module_name):
    """Whether `module_name` imports here."""
    try:
        importlib.import_module(module_name)
    except (ImportError, OSError):
        return False
    return True


requires_rtx = pytest.mark.skipif(
    not importable("tensorrt_rtx_bindings"),
    reason="TensorRT-RTX is not installed (pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings)",
)

TINY_CONFIG = {"base_dim": 16, "z_dim": 4, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1}


def make_tiny_vae(seed=0, **overrides):
    """A small, non-default AutoencoderKLQwenImage with seeded random weights (fp32, eval)."""
    import torch
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(**{**TINY_CONFIG, **overrides}).eval()
    with torch.no_grad():
        for name, param in vae.named_parameters():
            if name.endswith(".gamma"):
                param.uniform_(0.5, 1.5)
    return vae


@pytest.fixture(scope="session")
def tiny_vae():
    return make_tiny_vae()


@pytest.fixture(scope="session")
def tiny_vae_dir(tiny_vae, tmp_path_factory):
    """`tiny_vae` saved with save_pretrained (a diffusers VAE folder)."""
    path = tmp_path_factory.mktemp("tiny_vae")
    tiny_vae.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_onnx_dir(tiny_vae, tmp_path_factory):
    """`tiny_vae` exported to fp32 ONNX (both graphs and the record), once per session."""
    from vaebuild.export import ExportOptions, export_onnx

    out = tmp_path_factory.mktemp("tiny_onnx")
    export_onnx(tiny_vae, {"kind": "test"}, out, ExportOptions(precision="fp32"), log=lambda *a, **k: None)
    return out
