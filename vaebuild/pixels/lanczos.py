"""Pillow's LANCZOS resize of uint8 RGB and L images, in torch, bit-identical to Pillow.

`resize_lanczos(pixels, size)` returns the bytes of `Image.fromarray(pixels).resize(size, Image.LANCZOS)`
(Pillow's default `box` and `reducing_gap=None`, as diffusers' `VaeImageProcessor.resize` passes them with
its default config and the Qwen-Image pipelines' processors) on the device the pixels are on.
It reproduces `src/libImaging/Resample.c` of Pillow 13.0.0 (the tests compare against Pillow 13.0.0):
- `precompute_coeffs`: per output pixel, its first input pixel, its number of taps and the lanczos3 weights,
  computed in float64 on the CPU with the C library's `sin` (Python's `math.sin`), in the C code's order of
  operations, normalized by their sum, then `normalize_coeffs_8bpc`'s rounding to 22-bit fixed point
  (`PRECISION_BITS` = 32 - 8 - 2), half away from zero;
- each pass: an int32 accumulator starting at `1 << (PRECISION_BITS - 1)`, plus each tap's uint8 value times its
  int coefficient, then `clip8`: `>> PRECISION_BITS` (arithmetic) and clamp to 0..255, so the intermediate
  image between the passes is uint8, as in Pillow;
- `ImagingResampleInner`'s plan: a dimension whose size is unchanged gets no pass; the vertical pass runs first
  when the height shrinks by more than twice what the width shrinks by, else the horizontal one (on only the
  rows the vertical pass reads).
The weight tables are small (one row per output pixel per axis) and cached per (input size, output size);
only the integer accumulation runs on the device, exact on any device.
"""

import functools
import math

import numpy as np
import torch

PRECISION_BITS = 32 - 8 - 2
LANCZOS_SUPPORT = 3.0
MODES = ("RGB", "L")
_INT32_MAX = 2**31 - 1


def _sinc(x):
    # Resample.c sinc_filter.
    if x == 0.0:
        return 1.0
    x = x * math.pi
    return math.sin(x) / x


def _lanczos(x):
    # Resample.c lanczos_filter: truncated sinc.
    if -3.0 <= x < 3.0:
        return _sinc(x) * _sinc(x / 3)
    return 0.0


class _Taps:
    """One axis's resampling: `index[out, k]` the input pixel of tap k, `coeff[out, k]` its fixed-point weight
    (0 past the pixel's taps), `first` and `last` the range of input pixels any output pixel reads."""

    def __init__(self, index, coeff, first, last):
        self.index = index
        self.coeff = coeff
        self.first = first
        self.last = last


@functools.lru_cache(maxsize=128)
def _taps(in_size, out_size):
    """Resample.c `precompute_coeffs` (box 0..in_size, the LANCZOS filter) and `normalize_coeffs_8bpc`."""
    in0, in1 = 0.0, float(in_size)  # the box, floats in C (exact for any image size)
    scale = (in1 - in0) / out_size
    filterscale = max(scale, 1.0)
    support = LANCZOS_SUPPORT * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    inv_filterscale = 1.0 / filterscale
    index = np.zeros((out_size, ksize), dtype=np.int64)
    coeff = np.zeros((out_size, ksize), dtype=np.int32)
    first, last = in_size, 0
    for xx in range(out_size):
        center = in0 + (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)  # int() truncates toward zero, as C's cast
        xmax = min(int(center + support + 0.5), in_size) - xmin
        weights = []
        ww = 0.0
        for x in range(xmax):
            w = _lanczos((x + xmin - center + 0.5) * inv_filterscale)
            weights.append(w)
            ww += w
        if ww != 0.0:
            weights = [w / ww for w in weights]
        one = 1 << PRECISION_BITS
        fixed = [int(-0.5 + w * one) if w < 0 else int(0.5 + w * one) for w in weights]
        # Pillow accumulates in a C int: make sure no sum of taps can overflow it (else int32 here would not match).
        positive = sum(k for k in fixed if k > 0)
        negative = sum(k for k in fixed if k < 0)
        if 255 * positive + (1 << (PRECISION_BITS - 1)) > _INT32_MAX or 255 * negative < -(2**31):
            raise ValueError(f"LANCZOS {in_size} -> {out_size}: Pillow's int accumulator could overflow")
        coeff[xx, :xmax] = fixed
        # Taps past xmax have weight 0; point them inside the pixel's own range so shifted rows stay in bounds.
        index[xx] = np.minimum(xmin + np.arange(ksize), xmin + xmax - 1)
        first = min(first, xmin)
        last = max(last, xmin + xmax)
    index.setflags(write=False)
    coeff.setflags(write=False)
    return _Taps(index, coeff, first, last)


@functools.lru_cache(maxsize=128)
def _device_taps(in_size, out_size, device):
    taps = _taps(in_size, out_size)
    return (
        torch.from_numpy(taps.index.copy()).to(device),
        torch.from_numpy(taps.coeff.copy()).to(device),
    )


def _accumulate(x, index, coeff, dim):
    """The int32 accumulators of one pass over `dim` (0 rows, 1 columns) of `x` [H, W, C] uint8: the rounding
    offset plus the sum over taps of pixel * coefficient (before `clip8`)."""
    out_size, ksize = index.shape
    shape = list(x.shape)
    shape[dim] = out_size
    acc = torch.full(shape, 1 << (PRECISION_BITS - 1), dtype=torch.int32, device=x.device)
    view = [1, 1, 1]
    view[dim] = out_size
    for k in range(ksize):
        acc += x.index_select(dim, index[:, k]).to(torch.int32) * coeff[:, k].view(view)
    return acc


def _clip8(acc):
    # Resample.c clip8: the lookup of acc >> PRECISION_BITS, which is the clamp to 0..255.
    return (acc >> PRECISION_BITS).clamp_(0, 255).to(torch.uint8)


def _resample(x, in_size, out_size, dim, first=0):
    index, coeff = _device_taps(in_size, out_size, x.device)
    if first:
        index = index - first
    return _clip8(_accumulate(x, index, coeff, dim))


def resize_lanczos(pixels, size):
    """Pillow's `Image.resize(size, Image.LANCZOS)` of uint8 `pixels` [H, W, C] (C 3 for RGB, 1 for L) on their
    device: `size` is (width, height) as Pillow takes it; returns uint8 [height, width, C] on the same device,
    byte-identical to Pillow 13's Resample.c."""
    if not isinstance(pixels, torch.Tensor) or pixels.dtype != torch.uint8 or pixels.dim() != 3:
        raise ValueError(f"resize_lanczos takes a uint8 tensor [H, W, C], not {_describe(pixels)}")
    if pixels.shape[2] not in (1, 3):
        raise ValueError(
            f"resize_lanczos takes C 3 (RGB) or 1 (L), not {pixels.shape[2]} (Pillow resizes RGBA premultiplied)"
        )
    out_w, out_h = (int(s) for s in size)
    if out_w < 1 or out_h < 1:
        raise ValueError(f"height and width must be > 0, not {tuple(size)}")
    in_h, in_w = pixels.shape[0], pixels.shape[1]
    if in_h < 1 or in_w < 1:
        raise ValueError(f"resize_lanczos takes a non-empty image, not {tuple(pixels.shape)}")
    need_horizontal = out_w != in_w
    need_vertical = out_h != in_h
    x = pixels
    if not (need_horizontal or need_vertical):
        return x.clone()
    horizontal_first = not ((in_h - out_h) > 0 and (in_h - out_h) > (in_w - out_w) * 2)
    if horizontal_first:
        first = 0
        if need_horizontal:
            if need_vertical:
                rows = _taps(in_h, out_h)
                first = rows.first
                x = x[rows.first : rows.last]
            x = _resample(x, in_w, out_w, 1)
        if need_vertical:
            x = _resample(x, in_h, out_h, 0, first)
    else:
        x = _resample(x, in_h, out_h, 0)
        if need_horizontal:
            x = _resample(x, in_w, out_w, 1)
    return x


def resize_pil_lanczos(image, size, device):
    """`image.resize(size, Image.LANCZOS)` of a PIL RGB or L image, computed on `device` by `resize_lanczos`;
    returns a PIL image of the same mode, byte-identical to Pillow 13's."""
    if image.mode not in MODES:
        raise ValueError(f"resize_pil_lanczos takes RGB or L images, not mode {image.mode!r}")
    from vaebuild.pixels.pil import to_pil_images, upload_pixels

    # `upload_pixels` copies Pillow's own RGBX rows on several threads: np.asarray's packing to RGB would cost
    # more than the resize (benchmarks/results/h100/edit_input_profile.md has the stages).
    return to_pil_images(resize_lanczos(upload_pixels([image], device)[0], size)[None])[0]


def _describe(value):
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
