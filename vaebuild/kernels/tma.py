"""Helpers for kernels that read through TMA tensor descriptors (Triton and Gluon alike)."""

import functools

import torch
import triton


@functools.cache
def set_tma_allocator():
    """Device-side tensor descriptors need a global scratch allocator (Triton asks for one)."""
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))


def loadable(t, tma):
    """Whether a kernel reads `t` in place: unit column stride, and 16-byte alignment for TMA."""
    size = t.element_size()
    aligned = (t.storage_offset() * size) % 16 == 0 and all((s * size) % 16 == 0 for s in t.stride()[:-1])
    return t.stride(-1) == 1 and (aligned or not tma)
