"""Warp-specialized head-dim-384 attention forward for Hopper in Gluon (FlashAttention-3's ping-pong).

Imported only when the CUDA path of `vaebuild.kernels.attention` runs: it needs Triton 3.6 (Gluon).

One program owns 128 query rows of one (batch, head) and a key range. Its two warpgroups are separate
partitions (`gl.warp_specialize`) of 64 query rows each, with 256 registers per thread (`setmaxnreg`):
a warpgroup keeps its Q tile in shared memory and three 64x128 fp32 output accumulators in registers.
Iteration j issues the scores S = Q Kᵀ of key block j + 1 and O += P V of block j (P in registers) as
asynchronous wgmma, waits, and computes the next online-softmax step. The two warpgroups take turns
issuing (`PINGPONG`, a pair of mbarriers), so one's softmax runs while the other's products use the
tensor cores; the Triton kernel of `vaebuild.kernels.attention_fwd_triton` holds them in lock-step instead. K and V
stream through separate two-stage TMA rings: a stage is refilled (by the second warpgroup, once both
released it) two blocks ahead of its use. `lazy_rescale` rescales the accumulators only when a row's
running max grew by more than 2^8 (exact: numerator and denominator share the stale max). Key splits and
their combine kernel are shared with the Triton kernel (`attention_splits`).

Measured on an H100 (docs/design/attention_kernel_notes.md, run 5): 2.28 ms at 27,556 tokens against
2.69 ms for the Triton kernel and 9.0 ms for SDPA. Its register budget is the design's limit: with a
separate producer warp the consumers get 240 registers, and ptxas serializes every wgmma (C7512).
"""

import functools
from dataclasses import dataclass

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

from vaebuild.kernels.attention_splits import QK_SCALE, RESCALE_THRESHOLD, combine, plan_splits
from vaebuild.kernels.tma import loadable, set_tma_allocator

HEAD_DIM = gl.constexpr(384)
CHUNK = gl.constexpr(128)  # TMA boxes are at most 256 wide: the head dim is moved in three 128-wide chunks
ROWS = gl.constexpr(64)  # query rows per consumer warpgroup (one wgmma M)


@dataclass(frozen=True)
class GluonConfig:
    """Schedule of the warp-specialized kernel; `splits=0` picks the key split from the grid size."""

    block_n: int = 32
    pingpong: bool = True
    lazy_rescale: bool = True
    consumer_regs: int = 256
    splits: int = 0


DEFAULT_GLUON_CONFIG = GluonConfig()


@gluon.jit
def _load(desc, smem, ready, j, lo, BLOCK_N: gl.constexpr):
    """Start the TMA loads of key block j's tile (K or V: three 128-wide chunks) into ring stage j % 2."""
    stage = j % 2
    mbarrier.expect(ready.index(stage), 3 * BLOCK_N * CHUNK * desc.dtype.primitive_bitwidth // 8)
    for c in gl.static_range(3):
        tma.async_copy_global_to_shared(desc, [lo + j * BLOCK_N, c * CHUNK], ready.index(stage), smem.index(stage * 3 + c))


@gluon.jit
def _release(desc, smem, ready, empty, j, lo, n_blocks, WG: gl.constexpr, BLOCK_N: gl.constexpr):
    """This consumer is done with block j's tile. The second consumer (it issues its products after the first's)
    waits until both released the stage and refills it with block j + 2."""
    stage = j % 2
    mbarrier.arrive(empty.index(stage))
    if WG == 1:
        if j + 2 < n_blocks:
            mbarrier.wait(empty.index(stage), (j // 2) & 1)
            _load(desc, smem, ready, j + 2, lo, BLOCK_N)


@gluon.jit
def _scores(q_smem, k_smem, stage, s_layout: gl.constexpr, BLOCK_N: gl.constexpr):
    """Issue S = Q Kᵀ of one key stage as three asynchronous wgmma (one per 128-wide chunk)."""
    s = gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout)
    s = warpgroup_mma(q_smem.index(0), k_smem.index(stage * 3).permute((1, 0)), s, use_acc=False, is_async=True)
    s = warpgroup_mma(q_smem.index(1), k_smem.index(stage * 3 + 1).permute((1, 0)), s, is_async=True)
    return warpgroup_mma(q_smem.index(2), k_smem.index(stage * 3 + 2).permute((1, 0)), s, is_async=True)


@gluon.jit
def _softmax(s, m_i, l_i, start, N, s_layout: gl.constexpr, BLOCK_N: gl.constexpr, LAZY: gl.constexpr):
    """Online-softmax step: P = exp2(S·scale - m), the accumulators' rescale factor, the new max and sums, and
    whether the accumulators need the rescale. LAZY keeps the running max (and skips the rescale) unless some row's
    max grew by more than 2^8: exact, as numerator and denominator use the same max."""
    if start + BLOCK_N > N:
        cols = start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        s = gl.where(cols[None, :] < N, s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1) * QK_SCALE)
    if LAZY:
        rescale = gl.max(m_new - m_i, 0) > RESCALE_THRESHOLD
        m_new = gl.where(rescale, m_new, m_i)
    else:
        rescale = True
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(s * QK_SCALE - m_new[:, None])
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, alpha, m_new, l_i, rescale


@gluon.jit
def _pv(p, v_smem, stage, acc0, acc1, acc2):
    """Issue O += P V of one V stage as three asynchronous wgmma (P from registers)."""
    acc0 = warpgroup_mma(p, v_smem.index(stage * 3), acc0, is_async=True)
    acc1 = warpgroup_mma(p, v_smem.index(stage * 3 + 1), acc1, is_async=True)
    acc2 = warpgroup_mma(p, v_smem.index(stage * 3 + 2), acc2, is_async=True)
    return acc0, acc1, acc2


@gluon.jit
def _consumer(
    q_smem, k_desc, v_desc, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty, turn, o_ptr, lse_ptr,
    stride_on, row0, N, lo, n_blocks,
    WG: gl.constexpr, BLOCK_N: gl.constexpr, SPLIT: gl.constexpr, PINGPONG: gl.constexpr, LAZY: gl.constexpr,
):
    """64 query rows: O = softmax(Q Kᵀ·scale) V over the key range, written (fp32 partials and log-sum-exps if SPLIT).

    Iteration j issues the scores of block j + 1 and P V of block j in one turn; K and V have separate two-stage
    rings, so K of block j + 3 and V of block j + 2 are requested two iterations before they are needed."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, CHUNK, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, o_layout)
    dtype: gl.constexpr = k_desc.dtype

    acc0 = gl.zeros([ROWS, CHUNK], gl.float32, o_layout)
    acc1 = gl.zeros([ROWS, CHUNK], gl.float32, o_layout)
    acc2 = gl.zeros([ROWS, CHUNK], gl.float32, o_layout)
    m_i = gl.full([ROWS], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([ROWS], gl.float32, gl.SliceLayout(1, s_layout))

    mbarrier.wait(q_bar, 0)
    mbarrier.wait(k_ready.index(0), 0)
    if PINGPONG:
        mbarrier.wait(turn.index(WG), WG ^ 1)
    s = _scores(q_smem, k_smem, 0, s_layout, BLOCK_N)
    if PINGPONG:
        mbarrier.arrive(turn.index(1 - WG))
    s = warpgroup_mma_wait(0, deps=(s,))
    _release(k_desc, k_smem, k_ready, k_empty, 0, lo, n_blocks, WG, BLOCK_N)
    p, alpha, m_i, l_i, rescale = _softmax(s, m_i, l_i, lo, N, s_layout, BLOCK_N, LAZY)
    p = gl.convert_layout(p.to(dtype), p_layout)

    for j in range(n_blocks - 1):
        if PINGPONG:
            mbarrier.wait(turn.index(WG), ((j + 1) & 1) ^ WG ^ 1)
        mbarrier.wait(k_ready.index((j + 1) % 2), ((j + 1) // 2) & 1)
        s = _scores(q_smem, k_smem, (j + 1) % 2, s_layout, BLOCK_N)
        mbarrier.wait(v_ready.index(j % 2), (j // 2) & 1)
        acc0, acc1, acc2 = _pv(p, v_smem, j % 2, acc0, acc1, acc2)
        if PINGPONG:
            mbarrier.arrive(turn.index(1 - WG))
        s, acc0, acc1, acc2 = warpgroup_mma_wait(0, deps=(s, acc0, acc1, acc2))
        _release(k_desc, k_smem, k_ready, k_empty, j + 1, lo, n_blocks, WG, BLOCK_N)
        _release(v_desc, v_smem, v_ready, v_empty, j, lo, n_blocks, WG, BLOCK_N)
        p, alpha, m_i, l_i, rescale = _softmax(s, m_i, l_i, lo + (j + 1) * BLOCK_N, N, s_layout, BLOCK_N, LAZY)
        if rescale:
            scale = gl.convert_layout(alpha, row_layout)[:, None]
            acc0 = acc0 * scale
            acc1 = acc1 * scale
            acc2 = acc2 * scale
        p = gl.convert_layout(p.to(dtype), p_layout)

    last = n_blocks - 1
    if PINGPONG:
        mbarrier.wait(turn.index(WG), (n_blocks & 1) ^ WG ^ 1)
    mbarrier.wait(v_ready.index(last % 2), (last // 2) & 1)
    acc0, acc1, acc2 = _pv(p, v_smem, last % 2, acc0, acc1, acc2)
    if PINGPONG:
        mbarrier.arrive(turn.index(1 - WG))
    acc0, acc1, acc2 = warpgroup_mma_wait(0, deps=(acc0, acc1, acc2))

    inv_l = gl.convert_layout(1.0 / l_i, row_layout)[:, None]
    rows = row0 + gl.arange(0, ROWS, layout=row_layout)
    cols = gl.arange(0, CHUNK, layout=gl.SliceLayout(0, o_layout))
    offsets = rows[:, None] * stride_on + cols[None, :]
    mask = rows[:, None] < N
    out_ty: gl.constexpr = o_ptr.dtype.element_ty
    gl.store(o_ptr + offsets, (acc0 * inv_l).to(out_ty), mask=mask)
    gl.store(o_ptr + offsets + CHUNK, (acc1 * inv_l).to(out_ty), mask=mask)
    gl.store(o_ptr + offsets + 2 * CHUNK, (acc2 * inv_l).to(out_ty), mask=mask)
    if SPLIT:
        lse_rows = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
        gl.store(lse_ptr + lse_rows, m_i + gl.log2(l_i), mask=lse_rows < N)


@gluon.jit
def _attention_fwd_ws(
    Q, K, V, Out, Lse,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_os, stride_on,
    H, N, blocks_per_split,
    BLOCK_N: gl.constexpr, SPLIT: gl.constexpr, PINGPONG: gl.constexpr, LAZY: gl.constexpr,
    CONSUMER_REGS: gl.constexpr, Q_LAYOUT: gl.constexpr, KV_LAYOUT: gl.constexpr,
):
    """Out[b, h, (split,) rows] = softmax(Q Kᵀ / sqrt(384)) V over this program's key range."""
    pid_m = gl.program_id(0)
    pid_bh = gl.program_id(1)
    split = gl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    dtype: gl.constexpr = Q.dtype.element_ty
    q_layout: gl.constexpr = Q_LAYOUT
    kv_layout: gl.constexpr = KV_LAYOUT
    q_desc = tma.make_tensor_descriptor(Q + b * stride_qb + h * stride_qh, [N, HEAD_DIM], [stride_qn, 1], [ROWS, CHUNK], q_layout)
    k_desc = tma.make_tensor_descriptor(K + b * stride_kb + h * stride_kh, [N, HEAD_DIM], [stride_kn, 1], [BLOCK_N, CHUNK], kv_layout)
    v_desc = tma.make_tensor_descriptor(V + b * stride_vb + h * stride_vh, [N, HEAD_DIM], [stride_vn, 1], [BLOCK_N, CHUNK], kv_layout)

    q_smem0 = gl.allocate_shared_memory(dtype, [3, ROWS, CHUNK], q_layout)
    q_smem1 = gl.allocate_shared_memory(dtype, [3, ROWS, CHUNK], q_layout)
    k_smem = gl.allocate_shared_memory(dtype, [6, BLOCK_N, CHUNK], kv_layout)
    v_smem = gl.allocate_shared_memory(dtype, [6, BLOCK_N, CHUNK], kv_layout)
    k_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    q_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(v_empty.index(i), count=2)
        mbarrier.init(turn.index(i), count=1)
        mbarrier.init(q_bar.index(i), count=1)
    fence_async_shared()

    lo = split * blocks_per_split * BLOCK_N
    n_blocks = gl.minimum(blocks_per_split, (N - lo + BLOCK_N - 1) // BLOCK_N)
    row0 = pid_m * 2 * ROWS
    mbarrier.expect(q_bar.index(0), 3 * ROWS * CHUNK * dtype.primitive_bitwidth // 8)
    mbarrier.expect(q_bar.index(1), 3 * ROWS * CHUNK * dtype.primitive_bitwidth // 8)
    for c in gl.static_range(3):
        tma.async_copy_global_to_shared(q_desc, [row0, c * CHUNK], q_bar.index(0), q_smem0.index(c))
        tma.async_copy_global_to_shared(q_desc, [row0 + ROWS, c * CHUNK], q_bar.index(1), q_smem1.index(c))
    for j in gl.static_range(2):
        if j < n_blocks:
            _load(k_desc, k_smem, k_ready, j, lo, BLOCK_N)
            _load(v_desc, v_smem, v_ready, j, lo, BLOCK_N)
    o_ptr = Out + b * stride_ob + h * stride_oh + split * stride_os
    lse_ptr = Lse + (pid_bh * gl.num_programs(2) + split) * N
    gl.warp_specialize(
        [
            (_consumer, (q_smem0, k_desc, v_desc, k_smem, v_smem, q_bar.index(0), k_ready, k_empty, v_ready, v_empty, turn, o_ptr, lse_ptr,
                         stride_on, row0, N, lo, n_blocks, 0, BLOCK_N, SPLIT, PINGPONG, LAZY)),
            (_consumer, (q_smem1, k_desc, v_desc, k_smem, v_smem, q_bar.index(1), k_ready, k_empty, v_ready, v_empty, turn, o_ptr, lse_ptr,
                         stride_on, row0 + ROWS, N, lo, n_blocks, 1, BLOCK_N, SPLIT, PINGPONG, LAZY)),
        ],
        [4],
        [CONSUMER_REGS],
    )


@functools.cache
def shared_layout(rows, dtype):
    """The swizzled shared-memory layout of a `[rows, 128]` tile that TMA writes and wgmma reads."""
    return gl.NVMMASharedLayout.get_default_for([rows, CHUNK.value], gl.bfloat16 if dtype == torch.bfloat16 else gl.float16)


def attention_forward(q, k, v, config=None):
    """softmax(q kᵀ / sqrt(384)) v for CUDA bf16/fp16 `[B, H, N, 384]` q, k, v."""
    config = config or DEFAULT_GLUON_CONFIG
    set_tma_allocator()
    q, k, v = (t if loadable(t, tma=True) else t.contiguous() for t in (q, k, v))
    plan = plan_splits(q, 2 * ROWS.value, config.block_n, config.splits)
    _attention_fwd_ws[plan.grid](
        q, k, v, plan.target, plan.lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        *plan.target_strides,
        q.shape[1], q.shape[2], plan.blocks_per_split,
        BLOCK_N=config.block_n, SPLIT=plan.grid[2] > 1, PINGPONG=config.pingpong, LAZY=config.lazy_rescale,
        CONSUMER_REGS=config.consumer_regs,
        Q_LAYOUT=shared_layout(ROWS.value, q.dtype), KV_LAYOUT=shared_layout(config.block_n, q.dtype),
        num_warps=4,
    )
    return combine(plan)
