"""The two graphs vaebuild exports and builds, with the LightX2V engine I/O contract.

Encoder graph: `quant_conv(encoder(images))`, `[B, 3, 1, H, W]` in [-1, 1] -> `[B, 2*z, 1, H/8, W/8]`
(the first z channels are the posterior mean). Decoder graph:
`clamp(decoder(post_quant_conv(latents)), -1, 1)`, `[B, z, 1, h, w]` -> `[B, 3, 1, 8h, 8w]`.
Both call diffusers' modules without a feature cache, which for one frame is what
`AutoencoderKLQwenImage.encode()`/`decode()` compute.
"""

from dataclasses import dataclass

import torch
from torch import nn

from vaebuild.model import ONNX_FILES
from vaebuild.model.single_frame import fold_single_frame


class EncoderGraph(nn.Module):
    """`quant_conv(encoder(images))` of a Qwen-Image VAE."""

    def __init__(self, vae):
        super().__init__()
        self.encoder = vae.encoder
        self.quant_conv = vae.quant_conv

    def forward(self, images):
        return self.quant_conv(self.encoder(images))


class DecoderGraph(nn.Module):
    """`clamp(decoder(post_quant_conv(latents)), -1, 1)` of a Qwen-Image VAE."""

    def __init__(self, vae):
        super().__init__()
        self.post_quant_conv = vae.post_quant_conv
        self.decoder = vae.decoder

    def forward(self, latents):
        return torch.clamp(self.decoder(self.post_quant_conv(latents)), -1.0, 1.0)


@dataclass(frozen=True)
class GraphDescription:
    """What one exported graph is: its file, tensor names, channels and spatial scale (optimum-style)."""

    name: str  # "encoder" | "decoder"
    file_name: str
    input_name: str
    output_name: str
    input_channels: int
    output_channels: int
    scale: float  # output side / input side

    def input_shape(self, batch, height, width):
        """The 5-D input shape for an input of the given spatial size."""
        return (batch, self.input_channels, 1, height, width)

    def output_shape(self, batch, height, width):
        """The 5-D output shape for an input of the given spatial size."""
        return (batch, self.output_channels, 1, int(height * self.scale), int(width * self.scale))


def describe_graphs(vae):
    """The encoder and decoder descriptions of `vae`, in that order."""
    z_dim = vae.config.z_dim
    image_channels = vae.config.input_channels
    scale = vae.spatial_compression_ratio
    return (
        GraphDescription("encoder", ONNX_FILES["encoder"], "images", "latents", image_channels, 2 * z_dim, 1 / scale),
        GraphDescription("decoder", ONNX_FILES["decoder"], "latents", "images", z_dim, image_channels, scale),
    )


def build_graphs(vae, fold=True, fast_attention=False, conv_rewrites=False, fused_norms=False):
    """The (encoder, decoder) graph modules of `vae`; `fold=True` applies the single-frame 2-D rewrite.

    With `fold`: `fast_attention=True` runs the mid-block attention through `vaebuild::attention_d384`,
    `conv_rewrites=True` runs the upsamplers as transposed convolutions and the RGB convolution over its taps,
    `fused_norms=True` the 96-channel residual blocks through `vaebuild::conv3x3_rms_silu` / `conv3x3_add`.
    """
    source = fold_single_frame(vae, fast_attention, conv_rewrites, fused_norms) if fold else vae
    return EncoderGraph(source).eval(), DecoderGraph(source).eval()


def build_graph_modules_from_weights(vae_config, weights_path, precision, device, fast_attention=False,
                                     conv_rewrites=False, fused_norms=False):
    """{"encoder", "decoder"}: the 2-D graphs of the architecture `vae_config` holding a weights file's tensors."""
    from diffusers import AutoencoderKLQwenImage

    from vaebuild.model.precision import get_precision
    from vaebuild.weights_file import load_into

    with torch.device("meta"):
        vae = AutoencoderKLQwenImage.from_config(vae_config).eval()
    encoder, decoder = build_graphs(vae, fast_attention=fast_attention, conv_rewrites=conv_rewrites,
                                    fused_norms=fused_norms)
    dtype = get_precision(precision).dtype
    modules = {"encoder": encoder.to_empty(device="cpu"), "decoder": decoder.to_empty(device="cpu")}
    load_into(modules.values(), weights_path)
    return {name: module.to(device=device, dtype=dtype) for name, module in modules.items()}
