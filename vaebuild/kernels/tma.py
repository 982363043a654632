"""Helpers for kernels that read through TMA tensor descriptors (Triton and Gluon alike)."""

import torch
import triton


def _scratch(size, align, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def set_tma_allocator():
    """Give Triton the scratch allocator device-side tensor descriptors need, in the calling thread.

    Call it before every launch: Triton keeps the allocator in a context variable, so a thread that never set it
    gets the null allocator, whose error fails the launch (seen as a package's `run_func_ ... API call failed` when
    8 threads called the runtime on an H200). Setting it costs a context-variable write.
    """
    triton.set_allocator(_scratch)
