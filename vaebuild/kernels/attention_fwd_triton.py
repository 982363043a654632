"""Triton flash-attention forward for head dim 384 (the Qwen-Image VAE mid-block attention) on Hopper.

Imported only when the CUDA path of `vaebuild.kernels.attention` runs: it needs Triton. The op runs this kernel with a
Triton older than 3.6; with 3.6 it runs the warp-specialized kernel of `attention_fwd_gluon`, which shares its key-split
planning and combine (`attention_splits`) and TMA helpers (`tma`) with this one.

One program owns BLOCK_M query rows of one (batch, head) and all 384 output columns, split into three
128-wide chunks (three fp32 accumulators); S = q0·k0ᵀ + q1·k1ᵀ + q2·k2ᵀ; online softmax in the exp2
domain with the scale folded into one multiply. `lazy_rescale` rescales the accumulators only when some
row's running max grew by more than 2^8 (exact: numerator and denominator use the same stale max).
`splits` > 1 splits the key range of each query block over several programs (flash-decoding) that write
fp32 partial outputs and log-sum-exps, merged by `_combine`; it evens out the last wave of programs.
`tma` loads tiles through tensor descriptors instead of pointers. The default config is the fastest
measured on an H100 (docs/design/attention_kernel_notes.md): pointer loads, lazy rescale, key split chosen
by `choose_splits`: 2.68 ms at 27,556 tokens against 8.8 ms for SDPA.
"""

from dataclasses import dataclass

import triton
import triton.language as tl

from vaebuild.kernels.attention_splits import QK_SCALE, RESCALE_THRESHOLD, combine, plan_splits
from vaebuild.kernels.tma import loadable, set_tma_allocator


@dataclass(frozen=True)
class KernelConfig:
    """Tile and schedule of the forward kernel; `splits=0` picks the key split from the grid size."""

    block_m: int = 128
    block_n: int = 32
    num_warps: int = 8
    num_stages: int = 2
    tma: bool = False
    lazy_rescale: bool = True
    warp_specialize: bool = False
    splits: int = 0


DEFAULT_CONFIG = KernelConfig()


@triton.jit
def _load_chunk(desc, ptr, row0, col, stride_n, N, BLOCK: tl.constexpr, TMA: tl.constexpr):
    """Rows row0..row0+BLOCK of one 128-wide column chunk (rows >= N read as zeros)."""
    if TMA:
        return desc.load([row0, col])
    rows = row0 + tl.arange(0, BLOCK)
    cols = col + tl.arange(0, 128)
    return tl.load(ptr + rows[:, None] * stride_n + cols[None, :], mask=rows[:, None] < N, other=0.0)


@triton.jit
def _attend_block(
    q0, q1, q2, acc0, acc1, acc2, m_i, l_i, k_desc, v_desc, k_ptr, v_ptr, stride_kn, stride_vn,
    start_n, N,
    BLOCK_N: tl.constexpr, MASK: tl.constexpr, TMA: tl.constexpr, LAZY: tl.constexpr,
):
    """One key block: S, online-softmax update and P·V into the three accumulators."""
    k0 = _load_chunk(k_desc, k_ptr, start_n, 0, stride_kn, N, BLOCK_N, TMA)
    k1 = _load_chunk(k_desc, k_ptr, start_n, 128, stride_kn, N, BLOCK_N, TMA)
    k2 = _load_chunk(k_desc, k_ptr, start_n, 256, stride_kn, N, BLOCK_N, TMA)
    s = tl.dot(q0, tl.trans(k0))
    s = tl.dot(q1, tl.trans(k1), s)
    s = tl.dot(q2, tl.trans(k2), s)
    s = s * QK_SCALE
    if MASK:
        s = tl.where((start_n + tl.arange(0, BLOCK_N))[None, :] < N, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if LAZY:
        if tl.max(m_new - m_i, 0) > RESCALE_THRESHOLD:
            alpha = tl.math.exp2(m_i - m_new)
            acc0 = acc0 * alpha[:, None]
            acc1 = acc1 * alpha[:, None]
            acc2 = acc2 * alpha[:, None]
            l_i = l_i * alpha
            m_i = m_new
    else:
        alpha = tl.math.exp2(m_i - m_new)
        acc0 = acc0 * alpha[:, None]
        acc1 = acc1 * alpha[:, None]
        acc2 = acc2 * alpha[:, None]
        l_i = l_i * alpha
        m_i = m_new
    p = tl.math.exp2(s - m_i[:, None])
    l_i = l_i + tl.sum(p, 1)
    p = p.to(q0.dtype)
    acc0 = tl.dot(p, _load_chunk(v_desc, v_ptr, start_n, 0, stride_vn, N, BLOCK_N, TMA), acc0)
    acc1 = tl.dot(p, _load_chunk(v_desc, v_ptr, start_n, 128, stride_vn, N, BLOCK_N, TMA), acc1)
    acc2 = tl.dot(p, _load_chunk(v_desc, v_ptr, start_n, 256, stride_vn, N, BLOCK_N, TMA), acc2)
    return acc0, acc1, acc2, m_i, l_i


@triton.jit
def _store_chunk(ptr, acc, row0, col, stride_n, N, BLOCK_M: tl.constexpr):
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = col + tl.arange(0, 128)
    tl.store(ptr + rows[:, None] * stride_n + cols[None, :], acc.to(ptr.dtype.element_ty), mask=rows[:, None] < N)


@triton.jit
def _attention_fwd(
    Q, K, V, Out, Lse,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_os, stride_on,
    H, N, blocks_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr, LAZY: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr, SPLIT: tl.constexpr,
):
    """Out[b, h, (split,) rows] = softmax(Q Kᵀ / sqrt(384)) V over this program's key range."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    split = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    q_ptr = Q + b * stride_qb + h * stride_qh
    k_ptr = K + b * stride_kb + h * stride_kh
    v_ptr = V + b * stride_vb + h * stride_vh
    q_desc = None
    k_desc = None
    v_desc = None
    if TMA:
        q_desc = tl.make_tensor_descriptor(q_ptr, shape=[N, 384], strides=[stride_qn, 1], block_shape=[BLOCK_M, 128])
        k_desc = tl.make_tensor_descriptor(k_ptr, shape=[N, 384], strides=[stride_kn, 1], block_shape=[BLOCK_N, 128])
        v_desc = tl.make_tensor_descriptor(v_ptr, shape=[N, 384], strides=[stride_vn, 1], block_shape=[BLOCK_N, 128])
    row0 = pid_m * BLOCK_M
    q0 = _load_chunk(q_desc, q_ptr, row0, 0, stride_qn, N, BLOCK_M, TMA)
    q1 = _load_chunk(q_desc, q_ptr, row0, 128, stride_qn, N, BLOCK_M, TMA)
    q2 = _load_chunk(q_desc, q_ptr, row0, 256, stride_qn, N, BLOCK_M, TMA)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc0 = tl.zeros([BLOCK_M, 128], tl.float32)
    acc1 = tl.zeros([BLOCK_M, 128], tl.float32)
    acc2 = tl.zeros([BLOCK_M, 128], tl.float32)
    lo = split * blocks_per_split * BLOCK_N
    hi = lo + blocks_per_split * BLOCK_N
    if hi > N:
        hi = N
    full_hi = lo + ((hi - lo) // BLOCK_N) * BLOCK_N
    for start_n in tl.range(lo, full_hi, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        acc0, acc1, acc2, m_i, l_i = _attend_block(
            q0, q1, q2, acc0, acc1, acc2, m_i, l_i, k_desc, v_desc, k_ptr, v_ptr, stride_kn, stride_vn,
            start_n, N, BLOCK_N, False, TMA, LAZY,
        )
    if full_hi < hi:
        acc0, acc1, acc2, m_i, l_i = _attend_block(
            q0, q1, q2, acc0, acc1, acc2, m_i, l_i, k_desc, v_desc, k_ptr, v_ptr, stride_kn, stride_vn,
            full_hi, N, BLOCK_N, True, TMA, LAZY,
        )
    inv_l = 1.0 / l_i
    o_ptr = Out + b * stride_ob + h * stride_oh + split * stride_os
    _store_chunk(o_ptr, acc0 * inv_l[:, None], row0, 0, stride_on, N, BLOCK_M)
    _store_chunk(o_ptr, acc1 * inv_l[:, None], row0, 128, stride_on, N, BLOCK_M)
    _store_chunk(o_ptr, acc2 * inv_l[:, None], row0, 256, stride_on, N, BLOCK_M)
    if SPLIT:
        rows = row0 + tl.arange(0, BLOCK_M)
        tl.store(Lse + (pid_bh * tl.num_programs(2) + split) * N + rows, m_i + tl.math.log2(l_i), mask=rows < N)


def attention_forward(q, k, v, config=None):
    """softmax(q kᵀ / sqrt(384)) v for CUDA bf16/fp16 `[B, H, N, 384]` q, k, v."""
    config = config or DEFAULT_CONFIG
    if config.tma:
        set_tma_allocator()
    q, k, v = (t if loadable(t, config.tma) else t.contiguous() for t in (q, k, v))
    plan = plan_splits(q, config.block_m, config.block_n, config.splits)
    _attention_fwd[plan.grid](
        q, k, v, plan.target, plan.lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        *plan.target_strides,
        q.shape[1], q.shape[2], plan.blocks_per_split,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, TMA=config.tma, LAZY=config.lazy_rescale,
        WARP_SPECIALIZE=config.warp_specialize, SPLIT=plan.grid[2] > 1,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return combine(plan)
