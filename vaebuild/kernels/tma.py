"""Helpers for kernels that read through TMA tensor descriptors (Triton and Gluon alike)."""

import threading

import torch
import triton

_THREAD = threading.local()


def _scratch(size, align, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def set_tma_allocator():
    """Give Triton the scratch allocator device-side tensor descriptors need, once in each calling thread.

    Triton keeps the allocator in a context variable, so a thread that never set it gets the null allocator, whose
    error fails the launch (seen as a package's `run_func_ ... API call failed` when 8 threads called the runtime on
    an H200): set per thread, not once per process.
    """
    if not getattr(_THREAD, "allocator_set", False):
        triton.set_allocator(_scratch)
        _THREAD.allocator_set = True


def loadable(t, tma):
    """Whether a kernel reads `t` in place: unit column stride, and 16-byte alignment for TMA."""
    size = t.element_size()
    aligned = (t.storage_offset() * size) % 16 == 0 and all((s * size) % 16 == 0 for s in t.stride()[:-1])
    return t.stride(-1) == 1 and (aligned or not tma)
