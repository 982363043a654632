"""PIL images <-> uint8 arrays without Pillow's slow paths, byte for byte what Pillow's own calls give.

Pillow stores an RGB image as 4 bytes per pixel (RGBX) in row blocks, and its two array routes copy pixel by pixel:
`np.asarray(image)` packs the whole image to RGB on one thread (45 ms for a 12 MP photo on an H200's host), and
`Image.fromarray(rgb)` unpacks it again (1.5 ms at 1328x1328). Here:

- `read_storage(image, out)`: the pixels as Pillow stores them (4 bytes per RGB pixel), copied row by row by
  Pillow's own paste into an image whose storage is `out` (a pinned buffer, say): a memcpy per row that releases
  the GIL, in horizontal strips on several threads (3.8 ms on one thread for the 12 MP photo on a 2-core CPU,
  where `np.asarray` takes 42 ms); the first 3 bytes of each RGB pixel are `np.asarray`'s, and the pad byte is
  dropped on the device;
- `rgb_images_from_rgbx(rgbx)`: RGB images that use an RGBX buffer as their own storage (Pillow's `map_buffer`,
  which `Image.frombuffer` calls, asked for mode "RGB"): no copy; `tobytes()` and `np.asarray` give the RGB bytes.

`upload_pixels` and `to_pil_images` put the two together with the device: PIL images -> a pinned staging buffer ->
uint8 `[B, H, W, C]` on the device, and uint8 pixels on the device -> RGBX there -> pinned host memory -> PIL images.
"""

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from vaebuild.pixels.convert import rgb_to_rgbx, to_host

# Modes read from Pillow's own storage, with the bytes per pixel there: RGB images keep 4 (the 4th is padding).
STORAGE_CHANNELS = {"RGB": 4, "RGBA": 4, "RGBX": 4, "L": 1}
PIXEL_CHANNELS = {"RGB": 3, "RGBA": 4, "RGBX": 4, "L": 1}  # np.asarray's channels of the same modes
STRIP_MIN_PIXELS = 1 << 20  # below a megapixel one thread copies it (thread hand-offs cost more than they save)
THREADS = max(1, min(16, os.cpu_count() or 1))
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(THREADS, thread_name_prefix="vaebuild-pixels")
        return _POOL


def storage_shape(image: Image.Image) -> tuple[int, ...]:
    """The shape of `image`'s pixels as Pillow stores them (a mode of `STORAGE_CHANNELS`): (H, W, 4), or (H, W) for
    "L"."""
    channels = STORAGE_CHANNELS[image.mode]
    return (image.height, image.width) if channels == 1 else (image.height, image.width, channels)


def _copy_rows(image: Image.Image, top: int, bottom: int, out: np.ndarray) -> None:
    """Rows top..bottom of `image` into `out`'s rows top..bottom: Pillow's paste into an image whose storage is those
    rows of `out` (`map_buffer`); the source is placed `top` rows up, so paste clips it to them (a memcpy per row,
    without the GIL)."""
    rows = Image.core.map_buffer(out[top:bottom], (image.width, bottom - top), "raw", 0, (image.mode, 0, 1))
    rows.paste(image.im, (0, -top, image.width, image.height - top))


def read_storage(image: Image.Image, out: np.ndarray | None = None) -> np.ndarray:
    """`image`'s pixels in Pillow's storage layout (`storage_shape`), written into `out` (C-contiguous uint8) or a new
    array; horizontal strips are copied on several threads. For RGB the first 3 bytes of each pixel are
    `np.asarray(image)`'s; for the other modes the whole array is."""
    if image.mode not in STORAGE_CHANNELS:
        raise ValueError(f"read_storage takes modes {sorted(STORAGE_CHANNELS)}, not {image.mode!r}")
    image.load()
    shape = storage_shape(image)
    if out is None:
        out = np.empty(shape, dtype=np.uint8)
    elif out.shape != shape or out.dtype != np.uint8 or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous uint8 of shape {shape}, got {out.dtype} {out.shape}")
    if image.width * image.height < STRIP_MIN_PIXELS:
        _copy_rows(image, 0, image.height, out)
        return out
    strips = min(image.height, THREADS)
    bounds = [image.height * i // strips for i in range(strips + 1)]
    pool = _pool()
    for future in [pool.submit(_copy_rows, image, top, bottom, out) for top, bottom in zip(bounds, bounds[1:])]:
        future.result()
    return out


def rgb_images_from_rgbx(rgbx: np.ndarray) -> list[Image.Image]:
    """RGB PIL images, one per `[H, W, 4]` uint8 item of C-contiguous `rgbx` `[B, H, W, 4]`, storing their pixels
    in `rgbx` itself (the 4th byte of each pixel is Pillow's pad byte: give it 255, as Pillow's own RGB images have).

    The images are writable: they are the buffer's only users, so the caller must not reuse `rgbx`.
    """
    if rgbx.dtype != np.uint8 or rgbx.ndim != 4 or rgbx.shape[-1] != 4 or not rgbx.flags.c_contiguous:
        raise ValueError(f"expected C-contiguous uint8 [B, H, W, 4], got {rgbx.dtype} {rgbx.shape}")
    height, width = rgbx.shape[1:3]
    images = []
    for item in rgbx:
        image = Image.new("RGB", (0, 0))._new(Image.core.map_buffer(item, (width, height), "raw", 0, ("RGB", 0, 1)))
        image.readonly = 0
        images.append(image)
    return images


def uploadable(images: list[Image.Image]) -> bool:
    """Whether `upload_pixels` takes `images`: one mode of `STORAGE_CHANNELS`, one size."""
    return len({(i.mode, i.size) for i in images}) == 1 and images[0].mode in STORAGE_CHANNELS


def upload_pixels(images: list[Image.Image], device: torch.device | None = None) -> torch.Tensor:
    """uint8 `[B, H, W, C]` on `device` (C = 1 for "L") of PIL images of one `STORAGE_CHANNELS` mode and one size: the
    values of `np.stack([np.asarray(i) for i in images])`. Pillow's storage is copied as it is (RGB with its pad byte,
    staged in page-locked memory when `device` is CUDA) and the pad byte is dropped on the device."""
    if not uploadable(images):
        raise ValueError(f"upload_pixels takes images of one mode of {sorted(STORAGE_CHANNELS)} and one size, "
                         f"got {sorted({(i.mode, i.size) for i in images})}")
    cuda = device is not None and torch.device(device).type == "cuda"
    host = torch.empty((len(images), *storage_shape(images[0])), dtype=torch.uint8, pin_memory=cuda)
    for image, out in zip(images, host.numpy()):
        read_storage(image, out)
    if host.ndim == 3:  # "L": numpy_to_pt's images[..., None]
        host = host.unsqueeze(-1)
    pixels = host if device is None else host.to(device, non_blocking=cuda)
    return pixels[..., :PIXEL_CHANNELS[images[0].mode]].contiguous()


def to_pil_images(pixels: torch.Tensor) -> list[Image.Image]:
    """PIL images of uint8 `[B, H, W, C]` pixels on any device, as diffusers' `numpy_to_pil` makes them: "L" for
    C = 1, RGB for C = 3 (converted to RGBX on the device and wrapped without a copy), else `Image.fromarray`."""
    if pixels.dtype != torch.uint8 or pixels.ndim != 4:
        raise ValueError(f"expected uint8 [B, H, W, C] pixels, got {pixels.dtype} {tuple(pixels.shape)}")
    if pixels.shape[-1] == 3:
        return rgb_images_from_rgbx(to_host(rgb_to_rgbx(pixels)).numpy())
    host = to_host(pixels).numpy()
    if host.shape[-1] == 1:
        return [Image.fromarray(item.squeeze(), mode="L") for item in host]
    return [Image.fromarray(item) for item in host]
