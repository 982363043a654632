"""The single-frame rewrite: for one frame (T=1), each causal Conv3d is a Conv2d.

A `QwenImageCausalConv3d` pads 2*p zero frames in front of the input, so for a single frame
only the last temporal slice of its kernel meets data: its output equals
`conv2d(x[:, :, 0], weight[:, :, -1], bias)` with the same spatial padding and stride.
The temporal `time_conv` layers of the resamplers only run from the second frame on, so the
rewrite drops them. `nearest-exact` upsampling at scale 2 equals `nearest` (exact for integer
scales), which every ONNX exporter and TensorRT support.

For the graphs PyTorch runs (AOTInductor packages), `subpixel_upsample=True` also computes each
"nearest x2 upsample, then 3x3 convolution" pair on the low-resolution grid (`SubPixelUpsampleConv`):
4/9 of the convolution's multiply-adds and no 4x-sized upsampled tensor.

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


def _phase_taps(weight, dim):
    """The two 2-tap kernels that a 3-tap kernel along `dim` becomes behind a nearest x2 upsample.

    Output row 2i reads upsampled rows 2i-1, 2i, 2i+1 = input rows i-1, i, i (taps t0 | t1 + t2);
    output row 2i+1 reads 2i, 2i+1, 2i+2 = input rows i, i, i+1 (taps t0 + t1 | t2).
    """
    t0, t1, t2 = weight.unbind(dim)
    return torch.stack((t0, t1 + t2), dim), torch.stack((t0 + t1, t2), dim)


class SubPixelUpsampleConv(nn.Sequential):
    """diffusers' upsample2d `resample` (nearest x2 upsample, then a 3x3 conv with padding 1) computed on
    the input grid: one 2x2 convolution with four output phases (2i+a, 2j+b) stacked as channels,
    then interleaved. Same submodules and state-dict names (`0` the upsampler, `1` the conv); the phase
    kernels are sums of the conv's taps (in float32 at least), which AOTInductor folds once at load time.
    """

    def __init__(self, resample):
        super().__init__(*resample)
        conv = self[1]
        if (conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups) != ((3, 3), (1, 1), (1, 1), (1, 1), 1):
            raise ValueError(f"unexpected upsample convolution {conv}; only 3x3, stride 1, padding 1 is folded")

    def forward(self, x):
        conv = self[1]
        weight = conv.weight.to(torch.promote_types(conv.weight.dtype, torch.float32))
        kernels = [column for row in _phase_taps(weight, 2) for column in _phase_taps(row, 3)]
        weight = torch.cat(kernels).to(conv.weight.dtype)  # [(a, b, out), in, 2, 2]
        bias = conv.bias.repeat(4) if conv.bias is not None else None
        phases = F.conv2d(x, weight, bias, padding=1)  # phase (a, b) at (i, j) is phases[..., i + a, j + b]
        batch, _, height, width = x.shape
        phases = phases.unflatten(1, (2, 2, conv.out_channels))
        rows = [
            torch.stack([phases[:, a, b, :, a:a + height, b:b + width] for b in (0, 1)], dim=-1) for a in (0, 1)
        ]
        return torch.stack(rows, dim=3).reshape(batch, conv.out_channels, 2 * height, 2 * width)


def fold_single_frame(vae, fast_attention=False, subpixel_upsample=False):
    """Return a copy of `vae` whose encoder, decoder and quant convs are single-frame 2-D graphs.

    `fast_attention=True` also swaps each mid-block attention for `attention.FastAttentionBlock` (the
    `vaebuild::attention_d384` op: Triton on Hopper, SDPA elsewhere); `subpixel_upsample=True` computes
    each upsampler's convolution on the input grid (`SubPixelUpsampleConv`). ONNX export uses neither.
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
    if subpixel_upsample:
        for module in list(folded.modules()):
            if isinstance(module, QwenImageResample) and module.mode in ("upsample2d", "upsample3d"):
                module.resample = SubPixelUpsampleConv(module.resample)
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
