"""The single-frame rewrite: for one frame (T=1), each causal Conv3d is a Conv2d.

A `QwenImageCausalConv3d` pads 2*p zero frames in front of the input, so for a single frame
only the last temporal slice of its kernel meets data: its output equals
`conv2d(x[:, :, 0], weight[:, :, -1], bias)` with the same spatial padding and stride.
The temporal `time_conv` layers of the resamplers only run from the second frame on, so the
rewrite drops them. `nearest-exact` upsampling at scale 2 equals `nearest` (exact for integer
scales), which every ONNX exporter and TensorRT support.

`fold_single_frame` returns a new model and never mutates its input. tests/test_single_frame.py
proves the rewrite equal to diffusers' own `encode()`/`decode()`.
"""

import copy

import torch
import torch.nn.functional as F
from torch import nn

from vaebuild.attention import FastAttentionBlock


class SingleFrameConv(nn.Module):
    """A causal Conv3d applied to a `[B, C, 1, H, W]` input, computed as a Conv2d."""

    def __init__(self, conv3d):
        super().__init__()
        if conv3d.stride[0] != 1:
            raise ValueError("a temporally strided causal conv has no single-frame output")
        self.conv = nn.Conv2d(
            conv3d.in_channels,
            conv3d.out_channels,
            kernel_size=conv3d.kernel_size[1:],
            stride=conv3d.stride[1:],
            padding=(conv3d._padding[2], conv3d._padding[0]),
            dilation=conv3d.dilation[1:],
            groups=conv3d.groups,
            bias=conv3d.bias is not None,
        ).to(device=conv3d.weight.device, dtype=conv3d.weight.dtype)
        with torch.no_grad():
            self.conv.weight.copy_(conv3d.weight[:, :, -1])
            if conv3d.bias is not None:
                self.conv.bias.copy_(conv3d.bias)

    def forward(self, x, cache_x=None):
        return self.conv(x.squeeze(2)).unsqueeze(2)


class NearestUpsample2x(nn.Module):
    """`QwenImageUpsample` (nearest-exact, scale 2, computed in float32) as plain nearest."""

    def forward(self, x):
        return F.interpolate(x.float(), scale_factor=2.0, mode="nearest").type_as(x)


def fold_single_frame(vae, fast_attention=False):
    """Return a copy of `vae` whose encoder, decoder and quant convs are single-frame 2-D graphs.

    `fast_attention=True` also swaps each mid-block attention for `attention.FastAttentionBlock` (the
    `vaebuild::attention_d384` op: Triton on Hopper, SDPA elsewhere); ONNX export keeps plain SDPA.
    """
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import (
        QwenImageAttentionBlock,
        QwenImageCausalConv3d,
        QwenImageResample,
        QwenImageUpsample,
    )

    folded = copy.deepcopy(vae)
    for module in list(folded.modules()):
        if isinstance(module, QwenImageResample) and hasattr(module, "time_conv"):
            del module.time_conv
    for parent in list(folded.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, QwenImageCausalConv3d):
                setattr(parent, name, SingleFrameConv(child))
            elif isinstance(child, QwenImageUpsample):
                if child.scale_factor != (2.0, 2.0) or child.mode != "nearest-exact":
                    raise ValueError(f"unexpected upsampler {child}; only nearest-exact x2 is folded")
                setattr(parent, name, NearestUpsample2x())
            elif fast_attention and isinstance(child, QwenImageAttentionBlock):
                setattr(parent, name, FastAttentionBlock(child))
    return folded
