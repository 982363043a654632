"""The residual blocks' `conv1 -> norm2 -> SiLU` at 96 channels as the custom op `vaebuild::conv3x3_rms_silu`.

On a Hopper GPU with bf16 or fp16 tensors, a `[96, 96, 3, 3]` weight and Triton >= 3.6 the op runs the Gluon kernel
of `vaebuild.conv_gluon` (the convolution with diffusers' RMS norm and SiLU fused into its epilogue: the normalised
tensor is written once instead of written, read back and written again); everywhere else it computes what diffusers
computes (`reference`). Like `vaebuild::attention_d384` it is an operator with plain dispatcher kernels (CPU, CUDA) and
a fake kernel, so an AOTInductor package calls it by name at run time (`backends.inductor.load_package` imports this
module). Its output is channels-last on every path (the fake kernel says so to the compiler).
`FusedNormResidualBlock` is diffusers' `QwenImageResidualBlock` with `conv1 -> norm2 -> SiLU` through the op.
"""

import functools
import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

CHANNELS = 96  # the only width the kernel takes: its whole weight stays in shared memory (166 KB)


@functools.cache
def _gluon_available():
    """Whether Triton has the Gluon API the kernel is written in (3.6 and later)."""
    if importlib.util.find_spec("triton") is None:
        return False
    import triton

    return tuple(int(v) for v in triton.__version__.split(".")[:2]) >= (3, 6)


def kernel_usable(x, weight):
    """Whether the Hopper kernel handles this `[B, C, H, W]` x and conv weight (else the op runs `reference`)."""
    return (
        x.is_cuda
        and x.dtype in (torch.bfloat16, torch.float16)
        and x.dtype == weight.dtype
        and x.dim() == 4
        and tuple(weight.shape) == (CHANNELS, CHANNELS, 3, 3)
        and x.shape[1] == CHANNELS
        and _gluon_available()
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
        from vaebuild.conv_gluon import conv3x3_forward

        return conv3x3_forward(x, weight, bias, gamma)
    return reference(x, weight, bias, gamma).contiguous(memory_format=torch.channels_last)


def _fake(x, weight, bias, gamma):
    shape = (x.shape[0], weight.shape[0], x.shape[2], x.shape[3])
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)


def _register():
    """Define `vaebuild::conv3x3_rms_silu` with plain dispatcher kernels (as `vaebuild.attention` does its op)."""
    library = torch.library.Library("vaebuild", "FRAGMENT")
    library.define("conv3x3_rms_silu(Tensor x, Tensor weight, Tensor bias, Tensor gamma) -> Tensor")
    library.impl("conv3x3_rms_silu", conv3x3_rms_silu, "CPU")
    library.impl("conv3x3_rms_silu", conv3x3_rms_silu, "CUDA")
    torch.library.register_fake("vaebuild::conv3x3_rms_silu", _fake, lib=library)
    return library


_LIBRARY = _register()


def fusable(block):
    """Whether a (single-frame) `QwenImageResidualBlock`'s conv1 -> norm2 -> SiLU can run as the op: a 3x3 conv with
    padding 1 and a bias, and a norm without a bias (diffusers' default)."""
    conv = block.conv1.conv
    return (
        conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1) and conv.dilation == (1, 1)
        and conv.groups == 1 and conv.bias is not None
        and not isinstance(block.norm2.bias, torch.Tensor) and block.norm2.channel_first
        and type(block.nonlinearity) is nn.SiLU
    )


class FusedNormResidualBlock(nn.Module):
    """diffusers' `QwenImageResidualBlock` (same submodules and state-dict names; its convolutions already
    `SingleFrameConv`s) with `conv1 -> norm2 -> SiLU` through `vaebuild::conv3x3_rms_silu` (dropout: eval only)."""

    def __init__(self, block):
        super().__init__()
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
        x = torch.ops.vaebuild.conv3x3_rms_silu(x, conv.weight, conv.bias, self.norm2.gamma).unsqueeze(2)
        return self.conv2(x) + h
