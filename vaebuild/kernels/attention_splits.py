"""What both head-dim-384 attention kernels share: the softmax constants, and the key split (flash-decoding).

A launch may split each query block's key range over several programs that write fp32 partial outputs and
log-sum-exps; `combine` merges them. `plan_splits` chooses the split and allocates the partials.
"""

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

HEAD_DIM = 384
RESCALE_THRESHOLD = tl.constexpr(8.0)  # log2 units: rescale once a row max grew by more than 2^8
QK_SCALE = tl.constexpr(1.0 / math.sqrt(HEAD_DIM) * math.log2(math.e))  # softmax scale, exp2 domain


# Query-block programs, in waves of the GPU's SMs, from which a launch is never split: past them the last wave's idle
# SMs cost at most 1/SPLIT_MAX_WAVES of the time a split could win back, while the fp32 partials grow with the tokens
# (7 splits at 3840x2160's 129,600 tokens: 1.3 GB, the largest block of the exact tiles' head package on an H100).
# Every size up to 1920x1920 (57,600 tokens, 3.4 waves of an H100's 132 SMs) stays below it.
SPLIT_MAX_WAVES = 4


def choose_splits(programs, key_blocks, sm_count, max_splits=8):
    """Key splits that minimise waves x blocks per program (the last wave's idle SMs), fewest on ties; 1 from
    SPLIT_MAX_WAVES waves of programs on."""
    if programs >= SPLIT_MAX_WAVES * sm_count:
        return 1

    def cost(s):
        per_program = -(-key_blocks // s)
        return -(-programs * s // sm_count) * per_program * (1.0 + 0.02 * (s > 1))

    return min(range(1, min(max_splits, key_blocks) + 1), key=lambda s: (cost(s), s))


@dataclass(frozen=True)
class SplitPlan:
    """Grid and outputs of a key-split launch: with one split the kernel writes `out` itself, else fp32 partial
    outputs (`target`, strides `target_strides`: batch, head, split, row) and log-sum-exps (`lse`)."""

    grid: tuple
    blocks_per_split: int
    out: torch.Tensor
    target: torch.Tensor
    lse: torch.Tensor
    target_strides: tuple


def plan_splits(q, block_m, block_n, splits=0):
    """The SplitPlan for `[B, H, N, 384]` q with BLOCK_M query rows per program; `splits=0` uses `choose_splits`."""
    batch, heads, n, _ = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    key_blocks = -(-n // block_n)
    q_blocks = -(-n // block_m)
    splits = splits or choose_splits(
        q_blocks * batch * heads, key_blocks, torch.cuda.get_device_properties(q.device).multi_processor_count
    )
    blocks_per_split = -(-key_blocks // max(1, min(splits, key_blocks)))
    splits = -(-key_blocks // blocks_per_split)
    if splits == 1:
        target, lse, target_strides = out, out, (out.stride(0), out.stride(1), 0, out.stride(2))
    else:
        target = torch.empty((batch * heads, splits, n, HEAD_DIM), dtype=torch.float32, device=q.device)
        lse = torch.empty((batch * heads, splits, n), dtype=torch.float32, device=q.device)
        target_strides = (heads * target.stride(0), target.stride(0), target.stride(1), target.stride(2))
    return SplitPlan((q_blocks, batch * heads, splits), blocks_per_split, out, target, lse, target_strides)


def combine(plan):
    """The attention output of a launch planned by `plan`: its split partials merged by `_combine`."""
    splits = plan.grid[2]
    if splits > 1:
        out = plan.out
        _combine[(-(-out.shape[2] // 64), plan.grid[1])](
            plan.target, plan.lse, out, out.stride(0), out.stride(1), out.stride(2), out.shape[1], out.shape[2],
            SPLITS=splits, BLOCK_M=64, num_warps=4,
        )
    return plan.out


@triton.jit
def _combine(
    Part, Lse, Out, stride_ob, stride_oh, stride_on, H, N,
    SPLITS: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Out rows = the log-sum-exp weighted mean of the SPLITS fp32 partial outputs."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, 128)
    mask = rows < N
    lse_ptr = Lse + pid_bh * SPLITS * N + rows
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for s in tl.static_range(SPLITS):
        m = tl.maximum(m, tl.load(lse_ptr + s * N, mask=mask, other=0.0))
    total = tl.zeros([BLOCK_M], tl.float32)
    for s in tl.static_range(SPLITS):
        total += tl.math.exp2(tl.load(lse_ptr + s * N, mask=mask, other=0.0) - m)
    o_ptr = Out + (pid_bh // H) * stride_ob + (pid_bh % H) * stride_oh
    for c in tl.static_range(3):
        acc = tl.zeros([BLOCK_M, 128], tl.float32)
        for s in tl.static_range(SPLITS):
            w = tl.math.exp2(tl.load(lse_ptr + s * N, mask=mask, other=0.0) - m) / total
            part = Part + ((pid_bh * SPLITS + s) * N + rows[:, None]) * 384 + c * 128 + cols[None, :]
            acc += w[:, None] * tl.load(part, mask=mask[:, None], other=0.0)
        tl.store(o_ptr + rows[:, None] * stride_on + c * 128 + cols[None, :], acc.to(Out.dtype.element_ty), mask=mask[:, None])
