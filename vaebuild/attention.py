"""Exact single-head attention for the VAE mid-block as the custom op `vaebuild::attention_d384`.

On a Hopper GPU (compute capability 9.x) with bf16 or fp16 q, k, v of head dim 384 the op runs the
Triton kernel of `vaebuild.attention_triton`; everywhere else (CPU, fp32, other head dims, no Triton)
it is `F.scaled_dot_product_attention`. It is registered with `torch.library.triton_op`, so
`torch.export` keeps it as one node and AOTInductor compiles its Triton kernels into the package.
`FastAttentionBlock` is diffusers' `QwenImageAttentionBlock` with this op in place of SDPA.
"""

import importlib.util
import logging

import torch
import torch.nn.functional as F
from torch import nn

HEAD_DIM = 384


def kernel_usable(q, k, v):
    """Whether the Triton kernel handles these `[B, H, N, D]` inputs (else the op runs SDPA)."""
    return (
        q.is_cuda
        and q.dtype in (torch.bfloat16, torch.float16)
        and q.dtype == k.dtype == v.dtype
        and q.dim() == 4
        and q.shape == k.shape == v.shape
        and q.shape[-1] == HEAD_DIM
        and importlib.util.find_spec("triton") is not None
        and torch.cuda.get_device_capability(q.device)[0] == 9
    )


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(D)) v, equal to `F.scaled_dot_product_attention(q, k, v)`."""
    if not kernel_usable(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)
    from vaebuild.attention_triton import attention_forward

    return attention_forward(q, k, v, wrap=torch.library.wrap_triton)


def _register():
    """Register `vaebuild::attention_d384`. Without Triton installed (CPU machines) torch logs a warning at
    registration that would land in every CLI run's stderr; the op then always runs SDPA, so it is muted."""
    torch_triton_log = logging.getLogger("torch._library.triton")
    level = torch_triton_log.level
    torch_triton_log.setLevel(logging.ERROR)
    try:
        return torch.library.triton_op("vaebuild::attention_d384", mutates_args=())(_attention)
    finally:
        torch_triton_log.setLevel(level)


attention = _register()


class FastAttentionBlock(nn.Module):
    """diffusers' `QwenImageAttentionBlock` (same submodules and state-dict names) calling `attention`."""

    def __init__(self, block):
        super().__init__()
        self.norm = block.norm
        self.to_qkv = block.to_qkv
        self.proj = block.proj

    def forward(self, x):
        identity = x
        batch_size, channels, time, height, width = x.size()
        x = x.permute(0, 2, 1, 3, 4).reshape(batch_size * time, channels, height, width)
        x = self.norm(x)
        qkv = self.to_qkv(x).reshape(batch_size * time, 1, channels * 3, -1).permute(0, 1, 3, 2).contiguous()
        q, k, v = qkv.chunk(3, dim=-1)
        x = torch.ops.vaebuild.attention_d384(q, k, v)
        x = x.squeeze(1).permute(0, 2, 1).reshape(batch_size * time, channels, height, width)
        x = self.proj(x).view(batch_size, time, channels, height, width).permute(0, 2, 1, 3, 4)
        return x + identity
