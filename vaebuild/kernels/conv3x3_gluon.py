"""A 3x3 convolution with the RMS norm and SiLU after it fused, for Hopper in Gluon (TMA + wgmma).

Imported only when the CUDA path of `vaebuild.kernels.conv_norm` runs: it needs Triton 3.6 (Gluon).

Implicit GEMM over one channels-last (NHWC) image, 96 input and 96 output channels. A program is persistent and
warp-specialized: two consumer warpgroups take alternate output tiles of TH x TW = 128 pixels (so one's epilogue
overlaps the other's products), each fed by its own producer warp through its own TMA ring. The reduction
(K = 9 taps x 96) runs in steps of one tap and 32 input channels: one TMA box per step at the tap's shifted
coordinates, so the convolution's zero padding is TMA's out-of-bounds fill. The whole weight stays in shared
memory (166 KB, loaded once per program); the 96 output channels are two accumulators of 64 and 32 (Triton's
tensor shapes are powers of two), each tile two 64-pixel wgmma pieces. The epilogue adds the bias and, with
NORM, normalises each pixel over its channels (diffusers' `QwenImageRMS_norm`: x / max(||x||, 1e-12) * sqrt(C)
* gamma) and applies SiLU in fp32 registers, or adds a residual, then stores the tile (pixels outside the image
masked; the output may have zero rows and columns after the image, as the downsamplers pad it).

Measured on an H100 at 1328x1328 (benchmarks/results/h100/conv_gluon_kernel_h100.md): 0.74 ms with the norm and SiLU
against 0.89 ms for cuDNN's convolution plus inductor's norm kernel; the convolution alone runs at ~420 TFLOP/s
against cuDNN's ~475 in the same run, so the gain is the norm's memory pass.
"""

import functools
from dataclasses import dataclass

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

from vaebuild.kernels.tma import set_tma_allocator


@dataclass(frozen=True)
class ConvConfig:
    """Tile (TH x TW = 128 pixels), stages of each consumer's input ring, registers per consumer thread."""

    th: int = 8
    tw: int = 16
    stages: int = 4
    consumer_regs: int = 232


DEFAULT_CONV_CONFIG = ConvConfig()

KC = gl.constexpr(32)  # input channels per reduction step: a 64-byte TMA box row (64-byte swizzle)
N0 = gl.constexpr(64)  # output channels of the first accumulator
N1 = gl.constexpr(32)  # and of the second
PIECE = gl.constexpr(64)  # pixel rows per wgmma (M): a tile of 128 pixels is two pieces


@gluon.jit
def _producer(x_desc, a_smem, ready, empty, first_tile, tile_step, n_tiles, tiles_w,
              TH: gl.constexpr, TW: gl.constexpr, C_IN: gl.constexpr, STAGES: gl.constexpr, BOX_LAYOUT: gl.constexpr):
    """One warp: the TMA loads of one consumer's input boxes (tiles first_tile, first_tile + tile_step, ...; per tile
    one box per tap and 32 input channels, at the tap's shifted coordinates) into its ring."""
    C_CHUNKS: gl.constexpr = C_IN // KC
    g = 0
    for tile in range(first_tile, n_tiles, tile_step):
        h0 = (tile // tiles_w) * TH - 1
        w0 = (tile % tiles_w) * TW - 1
        for k in range(9 * C_CHUNKS):
            stage = g % STAGES
            mbarrier.wait(empty.index(stage), ((g // STAGES) & 1) ^ 1)
            mbarrier.expect(ready.index(stage), TH * TW * KC * x_desc.dtype.primitive_bitwidth // 8)
            tap = k // C_CHUNKS
            box = a_smem.index(stage)._reinterpret(x_desc.dtype, [TH, TW, KC], BOX_LAYOUT)
            tma.async_copy_global_to_shared(x_desc, [h0 + tap // 3, w0 + tap % 3, (k % C_CHUNKS) * KC], ready.index(stage), box)
            g += 1


@gluon.jit
def _mma(a_smem, row, w0_smem, w1_smem, step, acc0, acc1):
    """Issue acc0 += A Wᵀ (first 64 output channels) and acc1 += A Wᵀ (last 32) for the 64 pixel rows of `a_smem`
    from `row` on and reduction step `step`, as asynchronous wgmma."""
    a = a_smem.slice(row, PIECE)
    acc0 = warpgroup_mma(a, w0_smem.index(step).permute((1, 0)), acc0, is_async=True)
    acc1 = warpgroup_mma(a, w1_smem.index(step).permute((1, 0)), acc1, is_async=True)
    return acc0, acc1


@gluon.jit
def _epilogue(acc0, acc1, bias0, bias1, gamma0, gamma1, Res, Out, H, W, OUT_W, h0, w0, row0, TW: gl.constexpr,
              NORM: gl.constexpr, RESIDUAL: gl.constexpr):
    """Bias (then with NORM the RMS norm over the 96 channels, gamma and SiLU; with RESIDUAL plus the NHWC residual)
    for 64 pixels of a tile (from the tile's pixel row0 on), stored to the NHWC output of OUT_W pixels per row
    (pixels outside the image masked)."""
    C_OUT: gl.constexpr = N0 + N1
    l0: gl.constexpr = acc0.type.layout
    l1: gl.constexpr = acc1.type.layout
    cols0 = gl.arange(0, N0, layout=gl.SliceLayout(0, l0))
    cols1 = N0 + gl.arange(0, N1, layout=gl.SliceLayout(0, l1))
    pix0 = row0 + gl.arange(0, PIECE, layout=gl.SliceLayout(1, l0))
    pix1 = row0 + gl.arange(0, PIECE, layout=gl.SliceLayout(1, l1))
    r0 = h0 + pix0 // TW
    c0 = w0 + pix0 % TW
    r1 = h0 + pix1 // TW
    c1 = w0 + pix1 % TW
    inside0 = ((r0 < H) & (c0 < W))[:, None]
    inside1 = ((r1 < H) & (c1 < W))[:, None]
    y0 = acc0 + bias0[None, :]
    y1 = acc1 + bias1[None, :]
    if RESIDUAL:
        y0 += gl.load(Res + ((r0 * W + c0) * C_OUT)[:, None] + cols0[None, :], mask=inside0).to(gl.float32)
        y1 += gl.load(Res + ((r1 * W + c1) * C_OUT)[:, None] + cols1[None, :], mask=inside1).to(gl.float32)
    if NORM:
        ss = gl.sum(y0 * y0, 1) + gl.convert_layout(gl.sum(y1 * y1, 1), gl.SliceLayout(1, l0))
        inv = (C_OUT ** 0.5) / gl.maximum(gl.sqrt(ss), 1e-12)
        y0 = y0 * inv[:, None] * gamma0[None, :]
        y1 = y1 * gl.convert_layout(inv, gl.SliceLayout(1, l1))[:, None] * gamma1[None, :]
        y0 = y0 / (1.0 + gl.exp(-y0))
        y1 = y1 / (1.0 + gl.exp(-y1))
    out_ty: gl.constexpr = Out.dtype.element_ty
    gl.store(Out + ((r0 * OUT_W + c0) * C_OUT)[:, None] + cols0[None, :], y0.to(out_ty), mask=inside0)
    gl.store(Out + ((r1 * OUT_W + c1) * C_OUT)[:, None] + cols1[None, :], y1.to(out_ty), mask=inside1)


@gluon.jit
def _consumer(a_smem, ready, empty, w0_smem, w1_smem, w_bar, Bias, Gamma, Res, Out, H, W, OUT_W, first_tile, tile_step,
              n_tiles, tiles_w, TH: gl.constexpr, TW: gl.constexpr, C_IN: gl.constexpr, STAGES: gl.constexpr,
              NORM: gl.constexpr, RESIDUAL: gl.constexpr):
    """One warpgroup: tiles first_tile, first_tile + tile_step, ... of TH x TW = 128 pixels (two 64-pixel pieces) and all
    96 output channels (per piece two accumulators: 64 + 32), and each tile's epilogue."""
    K_STEPS: gl.constexpr = 9 * (C_IN // KC)
    l0: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, N0, 16])
    l1: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, N1, 16])
    cols0 = gl.arange(0, N0, layout=gl.SliceLayout(0, l0))
    cols1 = N0 + gl.arange(0, N1, layout=gl.SliceLayout(0, l1))
    bias0 = gl.load(Bias + cols0).to(gl.float32)
    bias1 = gl.load(Bias + cols1).to(gl.float32)
    gamma0 = gl.load(Gamma + cols0).to(gl.float32)
    gamma1 = gl.load(Gamma + cols1).to(gl.float32)
    mbarrier.wait(w_bar, 0)

    g = 0
    for tile in range(first_tile, n_tiles, tile_step):
        acc00 = gl.zeros([PIECE, N0], gl.float32, l0)
        acc01 = gl.zeros([PIECE, N1], gl.float32, l1)
        acc10 = gl.zeros([PIECE, N0], gl.float32, l0)
        acc11 = gl.zeros([PIECE, N1], gl.float32, l1)
        for k in range(K_STEPS):
            stage = g % STAGES
            mbarrier.wait(ready.index(stage), (g // STAGES) & 1)
            acc00, acc01 = _mma(a_smem.index(stage), 0, w0_smem, w1_smem, k, acc00, acc01)
            acc10, acc11 = _mma(a_smem.index(stage), PIECE, w0_smem, w1_smem, k, acc10, acc11)
            acc00, acc01, acc10, acc11 = warpgroup_mma_wait(4, deps=(acc00, acc01, acc10, acc11))
            if k > 0:
                mbarrier.arrive(empty.index((g - 1) % STAGES))
            g += 1
        acc00, acc01, acc10, acc11 = warpgroup_mma_wait(0, deps=(acc00, acc01, acc10, acc11))
        mbarrier.arrive(empty.index((g - 1) % STAGES))
        h0 = (tile // tiles_w) * TH
        w0 = (tile % tiles_w) * TW
        _epilogue(acc00, acc01, bias0, bias1, gamma0, gamma1, Res, Out, H, W, OUT_W, h0, w0, 0, TW, NORM, RESIDUAL)
        _epilogue(acc10, acc11, bias0, bias1, gamma0, gamma1, Res, Out, H, W, OUT_W, h0, w0, PIECE, TW, NORM, RESIDUAL)


@gluon.jit
def _conv3x3_fwd(
    X, Wt, Bias, Gamma, Res, Out,
    H, W, OUT_W, n_tiles, tiles_w,
    C_IN: gl.constexpr, TH: gl.constexpr, TW: gl.constexpr, STAGES: gl.constexpr, NORM: gl.constexpr, RESIDUAL: gl.constexpr,
    CONSUMER_REGS: gl.constexpr, A_LAYOUT: gl.constexpr, BOX_LAYOUT: gl.constexpr, W0_LAYOUT: gl.constexpr,
    W1_LAYOUT: gl.constexpr,
):
    """Out[h, w, :] = conv3x3(X)[h, w, :] + bias (then RMS norm and SiLU with NORM, or + Res[h, w, :] with RESIDUAL),
    one image, NHWC, 96 output channels, OUT_W pixels per output row. Two consumer warpgroups take alternate tiles,
    each fed by its own producer warp and TMA ring."""
    dtype: gl.constexpr = X.dtype.element_ty
    K_STEPS: gl.constexpr = 9 * (C_IN // KC)
    BM: gl.constexpr = TH * TW
    C_OUT: gl.constexpr = N0 + N1
    pid = gl.program_id(0)
    nprog = gl.num_programs(0)

    x_desc = tma.make_tensor_descriptor(X, [H, W, C_IN], [W * C_IN, C_IN, 1], [TH, TW, KC], BOX_LAYOUT)
    w0_desc = tma.make_tensor_descriptor(Wt, [C_OUT, 9 * C_IN], [9 * C_IN, 1], [N0, KC], W0_LAYOUT)
    w1_desc = tma.make_tensor_descriptor(Wt + N0 * 9 * C_IN, [N1, 9 * C_IN], [9 * C_IN, 1], [N1, KC], W1_LAYOUT)

    a0_smem = gl.allocate_shared_memory(dtype, [STAGES, BM, KC], A_LAYOUT)
    a1_smem = gl.allocate_shared_memory(dtype, [STAGES, BM, KC], A_LAYOUT)
    w0_smem = gl.allocate_shared_memory(dtype, [K_STEPS, N0, KC], W0_LAYOUT)
    w1_smem = gl.allocate_shared_memory(dtype, [K_STEPS, N1, KC], W1_LAYOUT)
    ready0 = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty0 = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    ready1 = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty1 = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    w_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready0.index(i), count=1)
        mbarrier.init(empty0.index(i), count=1)
        mbarrier.init(ready1.index(i), count=1)
        mbarrier.init(empty1.index(i), count=1)
    mbarrier.init(w_bar, count=1)
    fence_async_shared()

    mbarrier.expect(w_bar, K_STEPS * C_OUT * KC * dtype.primitive_bitwidth // 8)
    for step in gl.static_range(K_STEPS):
        tma.async_copy_global_to_shared(w0_desc, [0, step * KC], w_bar, w0_smem.index(step))
        tma.async_copy_global_to_shared(w1_desc, [0, step * KC], w_bar, w1_smem.index(step))

    gl.warp_specialize(
        [
            (_consumer, (a0_smem, ready0, empty0, w0_smem, w1_smem, w_bar, Bias, Gamma, Res, Out, H, W, OUT_W, pid, 2 * nprog,
                         n_tiles, tiles_w, TH, TW, C_IN, STAGES, NORM, RESIDUAL)),
            (_consumer, (a1_smem, ready1, empty1, w0_smem, w1_smem, w_bar, Bias, Gamma, Res, Out, H, W, OUT_W, pid + nprog,
                         2 * nprog, n_tiles, tiles_w, TH, TW, C_IN, STAGES, NORM, RESIDUAL)),
            (_producer, (x_desc, a0_smem, ready0, empty0, pid, 2 * nprog, n_tiles, tiles_w, TH, TW, C_IN, STAGES, BOX_LAYOUT)),
            (_producer, (x_desc, a1_smem, ready1, empty1, pid + nprog, 2 * nprog, n_tiles, tiles_w, TH, TW, C_IN, STAGES,
                         BOX_LAYOUT)),
        ],
        [4, 1, 1],
        [CONSUMER_REGS, 40, 40],
    )


@functools.cache
def layouts():
    """The shared-memory layouts of the kernel's input rings, their TMA box and the weight tiles."""
    def nvmma(swizzle, rank=2):
        return gl.NVMMASharedLayout(swizzle_byte_width=swizzle, element_bitwidth=16, rank=rank)

    return dict(A_LAYOUT=nvmma(64), BOX_LAYOUT=nvmma(64, 3), W0_LAYOUT=nvmma(64), W1_LAYOUT=nvmma(64))


@functools.cache
def _sm_count(device):
    return torch.cuda.get_device_properties(device).multi_processor_count


def conv3x3_forward(x, weight, bias, gamma=None, residual=None, pad_end=0, config=None):
    """conv2d(x, weight, bias, padding=1) for a CUDA bf16/fp16 `[B, 96, H, W]` x and `[96, 96, 3, 3]` weight, then with
    `gamma` (96 values) diffusers' RMS norm over channels and SiLU, or with `residual` (`[B, 96, H, W]`) plus it;
    returned channels-last, with `pad_end` zero rows and columns after the image (the downsamplers' padding)."""
    config = config or DEFAULT_CONV_CONFIG
    set_tma_allocator()
    batch, c_in, height, width = x.shape
    c_out = weight.shape[0]
    x = x.contiguous(memory_format=torch.channels_last)
    w2d = weight.permute(0, 2, 3, 1).reshape(c_out, 9 * c_in).contiguous()  # a view of a channels-last weight
    out = torch.empty((batch, c_out, height + pad_end, width + pad_end), device=x.device, dtype=x.dtype,
                      memory_format=torch.channels_last)
    if pad_end:
        out[:, :, height:].zero_()
        out[:, :, :, width:].zero_()
    res = residual.contiguous(memory_format=torch.channels_last) if residual is not None else out
    tiles_w = -(-width // config.tw)
    n_tiles = -(-height // config.th) * tiles_w
    grid = (min(n_tiles, _sm_count(x.device)),)
    gamma_arg = (gamma if gamma is not None else bias).reshape(-1)
    for b in range(batch):
        _conv3x3_fwd[grid](
            x[b], w2d, bias, gamma_arg, res[b], out[b], height, width, width + pad_end, n_tiles, tiles_w,
            C_IN=c_in, TH=config.th, TW=config.tw, STAGES=config.stages, NORM=gamma is not None,
            RESIDUAL=residual is not None,
            CONSUMER_REGS=config.consumer_regs, **layouts(), num_warps=4,
        )
    return out
