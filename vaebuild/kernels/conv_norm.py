"""The residual blocks' 96-channel convolutions with what follows them fused, as custom ops.

`vaebuild::conv3x3_rms_silu` is `conv1 -> norm2 -> SiLU` (the normalised tensor is written once instead of written,
read back and written again); `vaebuild::conv3x3_add` is `conv2(x) + h` with the zero padding of a downsampler after
the block. On a Hopper GPU with bf16 or fp16 tensors, a `[96, 96, 3, 3]` weight and Triton >= 3.6 they run the Gluon
kernel of `vaebuild.kernels.conv3x3_gluon`; everywhere else they compute what diffusers computes (`reference`, or conv + residual
+ pad). Like `vaebuild::attention_d384` they are operators with plain dispatcher kernels (CPU, CUDA) and fake kernels,
so an AOTInductor package calls them by name at run time (`backends.inductor.load.load_package` imports this module).
Their outputs are channels-last on every path (the fake kernels say so to the compiler).
`FusedNormResidualBlock` is diffusers' `QwenImageResidualBlock` through these ops; `PaddedInputDownsample` the
downsampler after such a block, given its input already padded.
"""

import torch
import torch.nn.functional as F
from torch import nn

from vaebuild.kernels import gluon_available

CHANNELS = 96  # the only width the kernel takes: its whole weight stays in shared memory (166 KB)


def kernel_usable(x, weight):
    """Whether the Hopper kernel handles this `[B, C, H, W]` x and conv weight (else the op runs `reference`)."""
    return (
        x.is_cuda
        and x.dtype in (torch.bfloat16, torch.float16)
        and x.dtype == weight.dtype
        and x.dim() == 4
        and tuple(weight.shape) == (CHANNELS, CHANNELS, 3, 3)
        and x.shape[1] == CHANNELS
        and gluon_available()
        and torch.cuda.get_device_capability(x.device)[0] == 9
    )


def reference(x, weight, bias, gamma):
    """diffusers' computation: conv2d (padding 1), `QwenImageRMS_norm` (normalise over channels in fp32, cast back,
    times sqrt(C) and gamma), SiLU."""
    h = F.conv2d(x, weight, bias, padding=1)
    h = F.normalize(h.float(), dim=1).to(h.dtype) * h.shape[1] ** 0.5 * gamma.reshape(-1, 1, 1)
    return F.silu(h)


def conv3x3_rms_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """silu(rms_norm(conv2d(x, weight, bias, padding=1)) * gamma) for a `[B, C, H, W]` x, returned channels-last."""
    if kernel_usable(x, weight):
        from vaebuild.kernels.conv3x3_gluon import conv3x3_forward

        return conv3x3_forward(x, weight, bias, gamma)
    return reference(x, weight, bias, gamma).contiguous(memory_format=torch.channels_last)


def conv3x3_add(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor, pad_end: int) -> torch.Tensor:
    """F.pad(conv2d(x, weight, bias, padding=1) + residual, (0, pad_end, 0, pad_end)), returned channels-last: a residual
    block's `conv2(x) + h` with the zero padding of the downsampler after it."""
    if kernel_usable(x, weight) and residual.dtype == x.dtype and residual.shape == x.shape:
        from vaebuild.kernels.conv3x3_gluon import conv3x3_forward

        return conv3x3_forward(x, weight, bias, residual=residual, pad_end=pad_end)
    out = F.pad(F.conv2d(x, weight, bias, padding=1) + residual, (0, pad_end, 0, pad_end))
    return out.contiguous(memory_format=torch.channels_last)


def _empty_like_output(x, weight, pad_end=0):
    shape = (x.shape[0], weight.shape[0], x.shape[2] + pad_end, x.shape[3] + pad_end)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)


def _register():
    """Define the two ops with plain dispatcher kernels (as `vaebuild.kernels.attention` does its op)."""
    library = torch.library.Library("vaebuild", "FRAGMENT")
    library.define("conv3x3_rms_silu(Tensor x, Tensor weight, Tensor bias, Tensor gamma) -> Tensor")
    library.define("conv3x3_add(Tensor x, Tensor weight, Tensor bias, Tensor residual, int pad_end) -> Tensor")
    for name, kernel in (("conv3x3_rms_silu", conv3x3_rms_silu), ("conv3x3_add", conv3x3_add)):
        library.impl(name, kernel, "CPU")
        library.impl(name, kernel, "CUDA")
    torch.library.register_fake("vaebuild::conv3x3_rms_silu", lambda x, weight, bias, gamma: _empty_like_output(x, weight),
                                lib=library)
    torch.library.register_fake("vaebuild::conv3x3_add", lambda x, weight, bias, residual, pad_end:
                                _empty_like_output(x, weight, pad_end), lib=library)
    return library


_LIBRARY = _register()


class FusedNormResidualBlock(nn.Module):
    """diffusers' `QwenImageResidualBlock` (same submodules and state-dict names; its convolutions already
    `SingleFrameConv`s) with `conv1 -> norm2 -> SiLU` through `vaebuild::conv3x3_rms_silu` (dropout: eval only).

    With `pad_end` (set when a downsampler follows, see `PaddedInputDownsample`) it also computes `conv2(x) + h` through
    `vaebuild::conv3x3_add` and returns it with the downsampler's zero padding: one pass over the tensor fewer."""

    def __init__(self, block):
        super().__init__()
        self.pad_end = 0
        self.norm1 = block.norm1
        self.conv1 = block.conv1
        self.norm2 = block.norm2
        self.conv2 = block.conv2
        self.conv_shortcut = block.conv_shortcut
        self.nonlinearity = block.nonlinearity

    def forward(self, x, feat_cache=None, feat_idx=(0,)):
        if feat_cache is not None:
            raise ValueError("FusedNormResidualBlock computes single frames without a feature cache")
        h = self.conv_shortcut(x)
        x = self.nonlinearity(self.norm1(x))
        conv = self.conv1.conv
        # Channels-last going in: a compiled graph then writes the op's input in the layout the kernel reads (traced
        # in another layout, the package copies it on every call: 0.9 ms at 1328x1328 on an H100).
        x = x.squeeze(2).contiguous(memory_format=torch.channels_last)
        x = torch.ops.vaebuild.conv3x3_rms_silu(x, conv.weight, conv.bias, self.norm2.gamma)
        if self.pad_end:
            conv2, h = self.conv2.conv, h.squeeze(2).contiguous(memory_format=torch.channels_last)
            return torch.ops.vaebuild.conv3x3_add(x, conv2.weight, conv2.bias, h, self.pad_end).unsqueeze(2)
        return self.conv2(x.unsqueeze(2)) + h


class PaddedInputDownsample(nn.Module):
    """diffusers' `QwenImageResample` in a downsampling mode (zero padding of one row and column after the image, then a
    stride-2 3x3 convolution; same submodules and state-dict names) for a single frame that arrives already padded (from
    a `FusedNormResidualBlock` with `pad_end=1`)."""

    def __init__(self, resample):
        super().__init__()
        self.mode = resample.mode
        self.resample = resample.resample

    def forward(self, x, feat_cache=None, feat_idx=(0,)):
        if feat_cache is not None:
            raise ValueError("PaddedInputDownsample computes single frames without a feature cache")
        return self.resample[1](x.squeeze(2)).unsqueeze(2)
