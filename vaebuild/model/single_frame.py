"""The single-frame rewrite: for one frame (T=1), each causal Conv3d is a Conv2d.

A `QwenImageCausalConv3d` pads 2*p zero frames in front of the input, so for a single frame
only the last temporal slice of its kernel meets data: its output equals
`conv2d(x[:, :, 0], weight[:, :, -1], bias)` with the same spatial padding and stride.
The temporal `time_conv` layers of the resamplers only run from the second frame on, so the
rewrite drops them. `nearest-exact` upsampling at scale 2 equals `nearest` (exact for integer
scales), which every ONNX exporter and TensorRT support.

For the graphs PyTorch runs (AOTInductor packages), `conv_rewrites=True` also turns each "nearest x2
upsample, then 3x3 convolution" pair into one stride-2 transposed convolution (`TransposedUpsampleConv`:
4/9 of the multiply-adds, no 4x-sized upsampled tensor) and the convolution of the RGB input into a 1x1
convolution over its taps (`TapsConv`), and the convolution to RGB into a matrix product to its taps' planes,
summed shifted (`TapPlanesConv`). All are exact up to float summation order (`TapPlanesConv` rounds each
tap plane to the working precision before summing).

`fold_single_frame` returns a new model and never mutates its input. tests/test_single_frame.py
proves the rewrite equal to diffusers' own `encode()`/`decode()`.
"""

import copy

import torch
import torch.nn.functional as F
from torch import nn

from vaebuild.kernels.attention import FastAttentionBlock
from vaebuild.kernels.conv_norm import CHANNELS as FUSED_NORM_CHANNELS
from vaebuild.kernels.conv_norm import FusedNormResidualBlock, PaddedInputDownsample


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


def _is_plain_3x3(conv):
    """Whether a Conv2d is 3x3 with stride 1, padding 1, dilation 1 and one group (what the rewrites assume)."""
    return (conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups) == ((3, 3), (1, 1), (1, 1), (1, 1), 1)


def _transposed_taps(weight, dim):
    """The 4-tap kernel that a 3-tap kernel (t0, t1, t2) along `dim` becomes behind a nearest x2 upsample.

    Output row 2i reads upsampled rows 2i-1, 2i, 2i+1 = input rows i-1, i, i (taps t0 | t1 + t2); output
    row 2i+1 reads 2i, 2i+1, 2i+2 = input rows i, i, i+1 (taps t0 + t1 | t2). A stride-2 transposed
    convolution with padding 1 gives output row p the input rows i with kernel index p + 1 - 2i, so its
    kernel is [t2, t1 + t2, t0 + t1, t0].
    """
    t0, t1, t2 = weight.unbind(dim)
    return torch.stack((t2, t1 + t2, t0 + t1, t0), dim)


class TransposedUpsampleConv(nn.Sequential):
    """diffusers' upsample2d `resample` (nearest x2 upsample, then a 3x3 conv with padding 1) as one stride-2
    transposed convolution with a 4x4 kernel: 4/9 of the multiply-adds and no 4x-sized upsampled tensor.

    Same submodules and state-dict names (`0` the upsampler, unused; `1` the conv); the 4x4 kernel is
    summed from the conv's taps in float32 (at least), which AOTInductor folds once, at load time.
    """

    def __init__(self, resample):
        super().__init__(*resample)
        conv = self[1]
        if not _is_plain_3x3(conv):
            raise ValueError(f"unexpected upsample convolution {conv}; only 3x3, stride 1, padding 1 is folded")

    def forward(self, x):
        conv = self[1]
        weight = conv.weight.to(torch.promote_types(conv.weight.dtype, torch.float32))
        weight = _transposed_taps(_transposed_taps(weight, 2), 3).transpose(0, 1).to(conv.weight.dtype)
        return F.conv_transpose2d(x, weight, conv.bias, stride=2, padding=1)


class TapsConv(SingleFrameConv):
    """A `SingleFrameConv` with few input channels (the encoder's first, on RGB) as a 1x1 convolution over its
    kernel taps: cuDNN runs a 3x3 convolution of 3 channels with the channels padded to 8 on a slow path
    (0.57 ms at 1328x1328 on the H100), a 1x1 over 27 taps padded to 32 at memory speed."""

    def __init__(self, conv3d):
        super().__init__(conv3d)
        conv = self.conv
        if conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError(f"unexpected convolution {conv}; only stride 1, dilation 1, one group is rewritten")

    def forward(self, x, cache_x=None):
        conv = self.conv
        x = x.squeeze(2)
        (kh, kw), (ph, pw) = conv.kernel_size, conv.padding
        height, width = x.shape[-2] + 2 * ph - kh + 1, x.shape[-1] + 2 * pw - kw + 1
        padded = F.pad(x, (pw, pw, ph, ph))
        taps = torch.cat([padded[:, :, dy:dy + height, dx:dx + width] for dy in range(kh) for dx in range(kw)], 1)
        extra = -taps.shape[1] % 8
        taps = F.pad(taps, (0, 0, 0, 0, 0, extra))
        weight = F.pad(conv.weight.permute(0, 2, 3, 1).flatten(1), (0, extra))[..., None, None]
        return F.conv2d(taps, weight, conv.bias).unsqueeze(2)


class TapPlanesConv(SingleFrameConv):
    """A 3x3 `SingleFrameConv` with few output channels (the decoder's last, to RGB) as one matrix product of the
    channels-last input with its 9 x C_out taps (padded to a multiple of 8), then the sum of the 9 shifted tap
    planes: cuDNN runs a 3x3 convolution to 3 channels on a slow path (0.42 ms at 1328x1328 on the H100),
    cuBLAS the product at memory speed (0.15 ms)."""

    def __init__(self, conv3d):
        super().__init__(conv3d)
        conv = self.conv
        if not _is_plain_3x3(conv):
            raise ValueError(f"unexpected convolution {conv}; only 3x3, stride 1, padding 1 is rewritten")

    def forward(self, x, cache_x=None):
        conv = self.conv
        x = x.squeeze(2)
        batch, channels, height, width = x.shape
        taps = conv.weight.permute(0, 2, 3, 1).reshape(-1, channels)  # row: output channel * 9 + 3 * dy + dx
        planes = x.permute(0, 2, 3, 1).reshape(-1, channels) @ F.pad(taps, (0, 0, 0, -taps.shape[0] % 8)).t()
        planes = planes.view(batch, height, width, -1)[..., :taps.shape[0]].unflatten(3, (conv.out_channels, 9))
        planes = F.pad(planes, (0, 0, 0, 0, 1, 1, 1, 1))
        out = sum(planes[:, dy:dy + height, dx:dx + width, :, 3 * dy + dx] for dy in range(3) for dx in range(3))
        if conv.bias is not None:
            out = out + conv.bias
        return out.permute(0, 3, 1, 2).unsqueeze(2)


TAPS_CONV_MAX_CHANNELS = 4  # input (or output) channels up to which a convolution runs as `TapsConv` (`TapPlanesConv`)


def _fusable(block):
    """Whether a (single-frame) `QwenImageResidualBlock` can run as `FusedNormResidualBlock`: 3x3 convolutions with
    padding 1 and a bias, a norm2 without a bias (diffusers' default) and SiLU."""
    return (
        all(_is_plain_3x3(c.conv) and c.conv.bias is not None for c in (block.conv1, block.conv2))
        and not isinstance(block.norm2.bias, torch.Tensor) and block.norm2.channel_first
        and type(block.nonlinearity) is nn.SiLU
    )


def _pads_like_downsampler(module):
    """Whether `module` is a single-frame downsampling `QwenImageResample` that pads one zero row and column after the
    image before its stride-2 convolution (what `PaddedInputDownsample` expects to have been done)."""
    resample = getattr(module, "resample", None)
    return (
        getattr(module, "mode", None) in ("downsample2d", "downsample3d") and not hasattr(module, "time_conv")
        and isinstance(resample, nn.Sequential) and len(resample) == 2
        and isinstance(resample[0], nn.ZeroPad2d) and tuple(resample[0].padding) == (0, 1, 0, 1)
    )


def fold_single_frame(vae, fast_attention=False, conv_rewrites=False, fused_norms=False):
    """Return a copy of `vae` whose encoder, decoder and quant convs are single-frame 2-D graphs.

    `fast_attention=True` also swaps each mid-block attention for `attention.FastAttentionBlock` (the
    `vaebuild::attention_d384` op: Triton on Hopper, SDPA elsewhere); `fused_norms=True` runs each 96-channel
    residual block's `conv1 -> norm2 -> SiLU` as `vaebuild::conv3x3_rms_silu` (`conv_norm.FusedNormResidualBlock`:
    a Gluon kernel on Hopper, diffusers' computation elsewhere), and where such a block is followed by a downsampler,
    its `conv2(x) + h` with the downsampler's zero padding as `vaebuild::conv3x3_add`; `conv_rewrites=True` runs each
    upsampler as `TransposedUpsampleConv`, convolutions of RGB input as `TapsConv` and 3x3 convolutions to
    RGB as `TapPlanesConv`. ONNX export uses none of them (TensorRT picks its own kernels).
    """
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import (
        QwenImageAttentionBlock,
        QwenImageCausalConv3d,
        QwenImageResample,
        QwenImageResidualBlock,
        QwenImageUpsample,
    )

    folded = copy.deepcopy(vae)
    for module in list(folded.modules()):
        if isinstance(module, QwenImageResample) and hasattr(module, "time_conv"):
            del module.time_conv
    if conv_rewrites:
        for module in list(folded.modules()):
            if isinstance(module, QwenImageResample) and module.mode in ("upsample2d", "upsample3d"):
                module.resample = TransposedUpsampleConv(module.resample)
    for parent in list(folded.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, QwenImageCausalConv3d):
                rgb_in = conv_rewrites and child.in_channels <= TAPS_CONV_MAX_CHANNELS
                rgb_out = conv_rewrites and child.out_channels <= TAPS_CONV_MAX_CHANNELS and child.kernel_size == (3, 3, 3)
                conv = TapsConv if rgb_in else TapPlanesConv if rgb_out else SingleFrameConv
                setattr(parent, name, conv(child))
            elif isinstance(child, QwenImageUpsample):
                if child.scale_factor != (2.0, 2.0) or child.mode != "nearest-exact":
                    raise ValueError(f"unexpected upsampler {child}; only nearest-exact x2 is folded")
                setattr(parent, name, NearestUpsample2x())
            elif fast_attention and isinstance(child, QwenImageAttentionBlock):
                setattr(parent, name, FastAttentionBlock(child))
    if fused_norms:
        for parent in list(folded.modules()):
            for name, child in list(parent.named_children()):
                if (isinstance(child, QwenImageResidualBlock) and child.in_dim == child.out_dim == FUSED_NORM_CHANNELS
                        and _fusable(child)):
                    setattr(parent, name, FusedNormResidualBlock(child))
        # A fused block followed by a downsampler (the encoder's flat list) writes its output already padded.
        layers = folded.encoder.down_blocks
        for i in range(len(layers) - 1):
            if isinstance(layers[i], FusedNormResidualBlock) and _pads_like_downsampler(layers[i + 1]):
                layers[i].pad_end = 1
                layers[i + 1] = PaddedInputDownsample(layers[i + 1])
    return folded
