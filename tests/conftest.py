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
    from vaebuild.export.onnx import ExportOptions, export_onnx

    out = tmp_path_factory.mktemp("tiny_onnx")
    export_onnx(tiny_vae, {"kind": "test"}, out, ExportOptions(precision="fp32"), log=lambda *a, **k: None)
    return out


def assert_graphs_match_diffusers(vae, sizes, tol=1e-4, **graph_options):
    """`build_graphs(vae, **graph_options)` equals diffusers' own encode()/decode() at each (batch, height, width)."""
    import torch

    from vaebuild.model.graphs import build_graphs

    encoder, decoder = build_graphs(vae, **graph_options)
    z_dim = vae.config.z_dim
    scale = vae.spatial_compression_ratio
    for index, (batch, height, width) in enumerate(sizes):
        images = torch.rand(batch, 3, 1, height, width, generator=torch.Generator().manual_seed(index)) * 2 - 1
        latents = 1.5 * torch.randn(batch, z_dim, 1, height // scale, width // scale,
                                    generator=torch.Generator().manual_seed(index))
        with torch.no_grad():
            expected_h = vae.encode(images).latent_dist.parameters
            actual_h = encoder(images)
            expected_x = vae.decode(latents).sample
            actual_x = decoder(latents)
        assert actual_h.shape == expected_h.shape == (batch, 2 * z_dim, 1, height // scale, width // scale)
        assert actual_x.shape == expected_x.shape == (batch, 3, 1, height, width)
        # Guard against a trivial comparison: outputs are non-constant and not saturated everywhere.
        assert expected_h.std() > 1e-3 and (expected_x.abs() < 1).float().mean() > 0.5
        diff_h = (actual_h - expected_h).abs().max().item()
        diff_x = (actual_x - expected_x).abs().max().item()
        assert diff_h < tol, f"encoder at {(batch, height, width)}: max abs diff {diff_h}"
        assert diff_x < tol, f"decoder at {(batch, height, width)}: max abs diff {diff_x}"
