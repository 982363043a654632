"""`EngineImageProcessor`: diffusers' `VaeImageProcessor` with its pixel arithmetic on the tensors' device.

    pipe.image_processor = EngineImageProcessor.from_processor(pipe.image_processor, device="cuda")

A subclass with the replaced processor's config, so pipelines and `Pipeline.from_pipe` take it as theirs. Every
result is bit-identical to diffusers' (`vaebuild.pixels.convert` says how); only where the work is done changes:

- `postprocess(tensor, "pil")`: denormalize, x255, round and uint8 on the tensor's device; only uint8 crosses to
  the host (as RGBX, the layout of Pillow's RGB images, into pinned blocks that torch's caching host allocator
  reuses), and the PIL images use those bytes as their storage (`vaebuild.pixels.pil`); one-channel images take
  diffusers' own `Image.fromarray(..., mode="L")`.
- `postprocess(tensor, "np")`, `"pt"` and `"latent"`: diffusers' own code, whose arithmetic already runs on the
  tensor's device ("np" then does only `.cpu()` and an exact `.float()` on the host; doing that `.float()` on the
  device would double the bytes that cross for bf16 and was measured slower on an H200: 2.4 ms against 1.5 ms at 1328x1328).
- `preprocess(PIL image or list of them)`: crop, resize and RGB conversion by diffusers' own PIL code, then the
  uint8 pixels (Pillow's own RGBX rows, copied on several threads into a pinned buffer) go to `device` and become float32
  there. diffusers returns a CPU tensor that the pipelines then
  `.to(device, dtype)`; with `device` set that move is a no-op. With `device=None` the tensor stays on the CPU.

Falls back to diffusers' own code (`super()`): postprocess of non-tensors, of output types other than "pil" (above,
and unknown ones: diffusers' deprecation path), of anything but `[B, C, H, W]`, and "pil" when some image is not
denormalized (diffusers' uint8 cast of values outside [0, 1] is platform-defined); preprocess of tensors and numpy
arrays (diffusers treats uint8 arrays as [0, 1] floats, without /255: we keep that as it is), of configs with
`do_binarize` or `do_convert_grayscale` (the inpaint mask processors), of PIL modes whose pixels are not uint8
("1", "I", "F", "I;16"), and of lists whose images differ in shape.
"""

import numpy as np
import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor

from vaebuild.pixels.convert import images_to_uint8, uint8_to_images
from vaebuild.pixels.pil import to_pil_images, upload_pixels, uploadable


class EngineImageProcessor(VaeImageProcessor):
    """A `VaeImageProcessor` whose postprocess and preprocess arithmetic runs on the device (see the module doc).

    `device`: where `preprocess` puts its tensors (None: the CPU, as diffusers). Construct it with
    `from_processor`, or with `VaeImageProcessor`'s own arguments and set `device` afterwards.
    """

    device: torch.device | None = None

    @classmethod
    def from_processor(cls, processor: VaeImageProcessor, device: torch.device | str | None = None):
        """A processor with `processor.config` (so `result.config == processor.config`) and tensors to `device`."""
        result = cls.from_config(processor.config)
        result.device = None if device is None else torch.device(device)
        return result

    def postprocess(self, image: torch.Tensor, output_type: str = "pil", do_denormalize: list[bool] | None = None):
        """diffusers' postprocess; for "pil", all arithmetic on the tensor's device and only uint8 to the host."""
        if not isinstance(image, torch.Tensor) or image.ndim != 4 or output_type != "pil":
            return super().postprocess(image, output_type=output_type, do_denormalize=do_denormalize)
        if do_denormalize is None:
            every = self.config.do_normalize
        else:
            every = all(do_denormalize[i] for i in range(image.shape[0]))
        if not every:  # unclamped values: diffusers' uint8 cast of those is platform-defined
            return super().postprocess(image, output_type=output_type, do_denormalize=do_denormalize)
        return to_pil_images(images_to_uint8(image))

    def preprocess(self, image, height: int | None = None, width: int | None = None, resize_mode: str = "default",
                   crops_coords: tuple[int, int, int, int] | None = None) -> torch.Tensor:
        """diffusers' preprocess; for PIL images, the float conversion runs on `self.device` (identical values)."""
        images = image if isinstance(image, list) else [image]
        plain = not (self.config.do_binarize or self.config.do_convert_grayscale)
        if not plain or not images or not all(isinstance(i, PIL.Image.Image) for i in images):
            return super().preprocess(image, height, width, resize_mode=resize_mode, crops_coords=crops_coords)
        # diffusers' PIL steps, in its order and with its own methods
        if crops_coords is not None:
            images = [i.crop(crops_coords) for i in images]
        if self.config.do_resize:
            size = self.get_default_height_width(images[0], height, width)
            images = [self.resize(i, *size, resize_mode=resize_mode) for i in images]
        if self.config.do_convert_rgb:
            images = [self.convert_to_rgb(i) for i in images]
        if uploadable(images):
            pixels = upload_pixels(images, self.device)
        else:
            arrays = [np.asarray(i) for i in images]
            if any(a.dtype != np.uint8 or a.shape != arrays[0].shape for a in arrays):
                return super().preprocess(image, height, width, resize_mode=resize_mode, crops_coords=crops_coords)
            pixels = torch.from_numpy(np.stack(arrays, axis=0))
            if pixels.ndim == 3:  # one-channel modes ("P"): numpy_to_pt's images[..., None]
                pixels = pixels.unsqueeze(-1)
            if self.device is not None:
                pixels = pixels.to(self.device)
        # diffusers normalizes unless the image has values below 0, which uint8 pixels never have
        return uint8_to_images(pixels, normalize=self.config.do_normalize)

    @property
    def resizes_on_device(self) -> bool:
        """Whether `resize` of PIL images runs on the device (Pillow-exact LANCZOS on a CUDA `device`)."""
        return (self.device is not None and self.device.type == "cuda" and self.config.resample == "lanczos"
                and self.config.reducing_gap is None)

    def resize(self, image, height: int, width: int, resize_mode: str = "default"):
        """diffusers' resize; a PIL RGB or L image's plain LANCZOS resize runs on the device, byte-identical to Pillow
        (`vaebuild.pixels.lanczos`), and comes back as a PIL image as the pipelines expect."""
        if (isinstance(image, PIL.Image.Image) and resize_mode == "default" and image.mode in ("RGB", "L")
                and self.resizes_on_device):
            from vaebuild.pixels.lanczos import resize_pil_lanczos

            return resize_pil_lanczos(image, (width, height), self.device)
        return super().resize(image, height, width, resize_mode=resize_mode)
