"""Exact single-head attention for the VAE mid-block as the custom op `vaebuild::attention_d384`.

On a Hopper GPU (compute capability 9.x) with bf16 or fp16 q, k, v of head dim 384 the op runs the
warp-specialized Gluon kernel of `vaebuild.kernels.attention_fwd_gluon` (the Triton kernel of `vaebuild.kernels.attention_fwd_triton`
with a Triton older than 3.6); everywhere else (CPU, fp32, other head dims, no Triton) it is
`F.scaled_dot_product_attention`. It is an operator with plain dispatcher kernels (CPU and CUDA) and a fake
kernel: `torch.export` keeps it as one node and an AOTInductor package calls it by name at run time (through
torch's proxy executor, as Gluon kernels cannot be compiled into a package), so a process that runs such a
package imports this module first (`backends.inductor.load.load_package` does). Triton compiles the kernel on its
first call in a process and keeps it in its disk cache (that first call: 0.9-1.2 s with the cache warm, ~6 s
cold, on the H100 host).
`FastAttentionBlock` is diffusers' `QwenImageAttentionBlock` with this op in place of SDPA.
"""

import functools
import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

from vaebuild.kernels import gluon_available

HEAD_DIM = 384


def kernel_usable(q, k, v):
    """Whether the Hopper kernels handle these `[B, H, N, D]` inputs (else the op runs SDPA)."""
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


@functools.cache
def _kernel():
    """The kernel for Hopper: the warp-specialized Gluon kernel (`attention_fwd_gluon`, Triton >= 3.6), else the
    Triton kernel (`attention_fwd_triton`, older Triton without the Gluon API it uses)."""
    if gluon_available():
        from vaebuild.kernels.attention_fwd_gluon import attention_forward
    else:
        from vaebuild.kernels.attention_fwd_triton import attention_forward
    return attention_forward


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(D)) v, equal to `F.scaled_dot_product_attention(q, k, v)` (returned contiguous)."""
    if not kernel_usable(q, k, v):
        return F.scaled_dot_product_attention(q, k, v).contiguous()
    return _kernel()(q, k, v)


def _register():
    """Define `vaebuild::attention_d384` with plain dispatcher kernels. (`torch.library.custom_op` would wrap each
    call in code whose first run imports torch._dynamo and sympy: 1.6 s here, 7 s on the H100 host.)"""
    library = torch.library.Library("vaebuild", "DEF")
    library.define("attention_d384(Tensor q, Tensor k, Tensor v) -> Tensor")
    library.impl("attention_d384", attention, "CPU")
    library.impl("attention_d384", attention, "CUDA")
    torch.library.register_fake("vaebuild::attention_d384", lambda q, k, v: q.new_empty(q.shape), lib=library)
    return library


_LIBRARY = _register()


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
        qkv = self.to_qkv(x).reshape(batch_size * time, 1, channels * 3, -1).permute(0, 1, 3, 2)
        # Each one contiguous: a package hands the op's inputs over as buffers of their own, and views of one qkv
        # tensor would each get a buffer of qkv's size (2.4 GB more at 7680x4320).
        q, k, v = (t.contiguous() for t in qkv.chunk(3, dim=-1))
        x = torch.ops.vaebuild.attention_d384(q, k, v)
        x = x.squeeze(1).permute(0, 2, 1).reshape(batch_size * time, channels, height, width)
        x = self.proj(x).view(batch_size, time, channels, height, width).permute(0, 2, 1, 3, 4)
        return x + identity
