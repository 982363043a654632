"""Seeded inputs shared by export validation, verification and benchmarks."""

import torch


def sample_images(shape, seed=0):
    """Images in [-1, 1] with smooth structure plus noise, shaped `[B, 3, 1, H, W]`, float32."""
    generator = torch.Generator().manual_seed(seed)
    batch, channels, frames, height, width = shape
    coarse = torch.rand((batch, channels, frames, max(1, height // 16), max(1, width // 16)), generator=generator)
    smooth = torch.nn.functional.interpolate(coarse.flatten(1, 2), size=(height, width), mode="bilinear")
    noise = 0.1 * torch.randn(shape, generator=generator)
    return (smooth.view(shape) * 2 - 1 + noise).clamp(-1, 1)


def sample_latents(shape, vae_config, seed=0):
    """De-normalized latents `[B, z, 1, h, w]` at the scale a pipeline feeds the decoder (mean + std * N(0,1))."""
    generator = torch.Generator().manual_seed(seed)
    z_dim = shape[1]
    mean = torch.tensor(vae_config.latents_mean[:z_dim]).view(1, z_dim, 1, 1, 1)
    std = torch.tensor(vae_config.latents_std[:z_dim]).view(1, z_dim, 1, 1, 1)
    return mean + std * torch.randn(shape, generator=generator)


def sample_input(graph_name, shape, vae_config, seed=0):
    """The seeded float32 input of the named graph ("encoder" or "decoder")."""
    if graph_name == "encoder":
        return sample_images(shape, seed)
    return sample_latents(shape, vae_config, seed)
