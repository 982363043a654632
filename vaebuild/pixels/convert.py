"""Exact pixel arithmetic of diffusers' `VaeImageProcessor`, as torch functions for any device (no diffusers import).

Decoded images -> pixels (`postprocess(..., "pil")` in diffusers):

    images = (images * 0.5 + 0.5).clamp(0, 1)                   # denormalize, in the tensor's own dtype
    images = images.cpu().permute(0, 2, 3, 1).float().numpy()   # pt_to_numpy
    images = (images * 255).round().astype("uint8")             # numpy_to_pil: float32 x255, half to even

`images_to_uint8` does the same operations, one torch op each (so no fusion into an FMA), on the tensor's device:
`torch.round` rounds half to even like numpy's. Only where diffusers' result is left to the platform do we pick
one: NaN becomes 0, what numpy's float32 -> uint8 cast gives on x86-64 and Arm64.

Pixels -> VAE inputs (`preprocess` of PIL images in diffusers):

    images = np.array(image).astype(np.float32) / 255.0          # pil_to_numpy
    images = torch.from_numpy(images.transpose(0, 3, 1, 2))      # numpy_to_pt
    images = 2.0 * images - 1.0                                  # normalize

The result depends on each uint8 value alone, so `uint8_to_images` looks it up in a 256-entry table computed with
exactly those operations on the CPU: no device division (CUDA divides by a scalar as a multiplication by its
reciprocal, which differs in the last bit for some values) and no fused kernels can change a bit.
"""

import threading

import numpy as np
import torch

_TABLES: dict[tuple[bool, torch.device], torch.Tensor] = {}
_TABLES_LOCK = threading.Lock()


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] in the tensor's own dtype and device: diffusers' `(images * 0.5 + 0.5).clamp(0, 1)`."""
    return (images * 0.5 + 0.5).clamp(0, 1)


def unit_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """`[B, C, H, W]` in [0, 1] (any float dtype) -> uint8 `[B, H, W, C]` on the same device, as diffusers' numpy_to_pil.

    `.float()`, `* 255` in float32, round half to even, NaN -> 0, to uint8; the result is contiguous.
    Values outside [0, 1] are the caller's business (diffusers' uint8 cast of those is platform-defined).
    """
    if images.ndim != 4:
        raise ValueError(f"expected a [B, C, H, W] tensor, got shape {tuple(images.shape)}")
    scaled = torch.round(images.float() * 255)
    scaled = torch.nan_to_num(scaled, nan=0.0)
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def images_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """`[B, C, H, W]` in [-1, 1] (any float dtype, any device) -> uint8 `[B, H, W, C]` on the same device.

    Exactly what diffusers' `VaeImageProcessor.postprocess(images, "pil")` puts into its PIL images:
    `denormalize` in the tensor's dtype, then `unit_to_uint8`. Values outside [-1, 1] are clamped, as there.
    """
    return unit_to_uint8(denormalize(images))


def _table(normalize: bool, device: torch.device) -> torch.Tensor:
    """The 256 float32 values diffusers' preprocess gives each uint8 value, cached per device."""
    key = (normalize, device)
    table = _TABLES.get(key)
    if table is None:
        with _TABLES_LOCK:
            table = _TABLES.get(key)
            if table is None:
                values = np.arange(256, dtype=np.uint8).astype(np.float32) / 255.0
                table = torch.from_numpy(values)
                if normalize:
                    table = 2.0 * table - 1.0
                table = table.to(device)
                _TABLES[key] = table
    return table


def uint8_to_images(pixels: torch.Tensor, dtype: torch.dtype = torch.float32, normalize: bool = True) -> torch.Tensor:
    """uint8 `[B, H, W, C]` (or `[H, W, C]`) -> `[B, C, H, W]` in [-1, 1], on the pixels' device.

    Bit-identical to diffusers' preprocess of PIL images: `astype(float32) / 255.0`, then `2.0 * x - 1.0`
    (left out with `normalize=False`, like `do_normalize=False`), in float32, then cast to `dtype` if another.
    The result is a channels-last view `[B, C, H, W]` with the same strides as diffusers' tensor.
    """
    if pixels.dtype != torch.uint8:
        raise TypeError(f"expected uint8 pixels, got {pixels.dtype}")
    if pixels.ndim == 3:
        pixels = pixels.unsqueeze(0)
    if pixels.ndim != 4:
        raise ValueError(f"expected [B, H, W, C] or [H, W, C] pixels, got shape {tuple(pixels.shape)}")
    table = _table(normalize, pixels.device)
    values = table.index_select(0, pixels.reshape(-1).to(torch.int32)).view(pixels.shape)
    images = values.permute(0, 3, 1, 2)
    return images if dtype == torch.float32 else images.to(dtype)


def rgb_to_rgbx(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 `[..., 3]` -> uint8 `[..., 4]` with 255 as the 4th byte: the layout of Pillow's RGB images."""
    rgbx = torch.empty((*pixels.shape[:-1], 4), dtype=torch.uint8, device=pixels.device)
    rgbx[..., 3] = 255
    rgbx[..., :3] = pixels
    return rgbx


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy of `tensor`, in page-locked memory from torch's caching host allocator when it is on CUDA.

    The copy is a new tensor (nothing else writes to it), and its block returns to the allocator's cache when the
    last reference to it goes, so a steady stream of calls reuses the same pinned blocks.
    """
    if tensor.device.type != "cuda":
        return tensor.detach().cpu()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor.detach())  # blocking: landed when it returns
    return host

