"""`vaebuild.use_engines(pipe, folder)`: a diffusers Qwen-Image pipeline's whole VAE step on vaebuild's engines.

    pipe = vaebuild.use_engines(QwenImagePipeline.from_pretrained(...).to("cuda"), "engines/")

`pipe.vae` becomes an `EngineVae` over the folder (the pipeline's own VAE as its fallback) and
`pipe.image_processor` an `EngineImageProcessor`: the same diffusers processor, converting pixels on the engines'
device with diffusers' exact arithmetic, so only uint8 images cross to the host. The nine Qwen-Image pipelines of
diffusers (text-to-image, Img2Img, Inpaint, Edit, EditPlus, EditInpaint, ControlNet, ControlNetInpaint, Layered)
are served; their other processors:

- the inpainting pipelines' `mask_processor` (grayscale, binarized masks) becomes an `EngineMaskProcessor`:
  diffusers' own mask arithmetic on the CPU, the mask then moved to the engines' device, where the pipelines
  multiply it with the device processor's images (`image * (mask < 0.5)`); said in one log line;
- the layered pipeline's RGBA images (a VAE of 4 input channels) convert on the device like RGB ones, but Pillow
  resizes them on the CPU (Pillow resizes RGBA premultiplied, which the device resize does not reproduce);
  said in one log line.

`Pipeline.from_pipe(pipe)` of a use_engines pipeline keeps the EngineVae and gives the new pipeline the device
processors too: the first `use_engines` call wraps diffusers' `from_pipe` (`DiffusionPipeline` and the
`AutoPipelineFor*` classes) so that it applies `use_engines` to a new pipeline whose source had the device
processor and whose `vae` is an EngineVae; other `from_pipe` calls are unchanged.
"""

import functools
import logging
from pathlib import Path

from vaebuild.errors import UserInputError
from vaebuild.runtime.diffusers import EngineVae
from vaebuild.runtime.image_processor import EngineImageProcessor

logger = logging.getLogger("vaebuild.diffusers")

MASK_PROCESSORS = ("mask_processor",)  # pipeline attributes holding the inpainting pipelines' mask processor


def use_engines(pipe, folder=None, **runtime_kwargs):
    """Serve `pipe`'s VAE and pixel conversion from the engines in `folder`; returns `pipe`.

    folder: a `vaebuild static` or `vaebuild multiprofile` output folder; may be left out when `pipe.vae` already
        is an EngineVae (e.g. after `from_pipe`).
    runtime_kwargs: passed on to `EngineVae.from_folder` / `VaeRuntime` (e.g. `cuda_graphs=True`, `memory_budget=`).
    """
    vae = getattr(pipe, "vae", None)
    if vae is None:
        raise UserInputError(f"{type(pipe).__name__} has no vae; use_engines serves a Qwen-Image pipeline's VAE")
    if isinstance(vae, EngineVae):
        if folder is not None and Path(folder).resolve() != vae.runtime.engine_dir.resolve():
            raise UserInputError(
                f"pipe.vae already serves the engines in {vae.runtime.engine_dir}; set pipe.vae back to the stock "
                f"VAE (pipe.vae.runtime's fallback) before use_engines with {folder}"
            )
        if runtime_kwargs:
            raise UserInputError("pipe.vae is already an EngineVae: runtime options apply only with a new folder")
    elif folder is None:
        raise UserInputError("use_engines needs the engine folder: use_engines(pipe, 'engines/')")
    else:
        vae = EngineVae.from_folder(folder, fallback=vae, **runtime_kwargs)
        pipe.vae = vae
    _carry_engines_through_from_pipe()
    name = type(pipe).__name__
    processor = getattr(pipe, "image_processor", None)
    if processor is not None and not isinstance(processor, EngineImageProcessor):
        pipe.image_processor = EngineImageProcessor.from_processor(processor, device=vae.device)
    if processor is not None and vae.config.get("input_channels", 3) == 4:
        logger.info("%s.image_processor: RGBA images are resized by Pillow on the CPU (premultiplied, which the device "
                    "resize does not reproduce), their pixels converted on %s", name, vae.device)
    for attribute in MASK_PROCESSORS:
        masks = getattr(pipe, attribute, None)
        if masks is None:
            continue
        if not isinstance(masks, EngineMaskProcessor):
            setattr(pipe, attribute, EngineMaskProcessor.from_processor(masks, device=vae.device))
        logger.info("%s.%s stays diffusers' own (grayscale masks are converted on the CPU), its masks moved to %s",
                    name, attribute, vae.device)
    return pipe


class EngineMaskProcessor(EngineImageProcessor):
    """An inpainting pipeline's `mask_processor` beside an `EngineImageProcessor`: diffusers' own preprocess of masks
    (on the CPU: grayscale, resize, binarize), the result then moved to `device`, so that the pipelines'
    `image * (mask < 0.5)` finds both tensors on the device processor's device. The values are diffusers' own."""

    def preprocess(self, image, height=None, width=None, resize_mode="default", crops_coords=None):
        masks = super().preprocess(image, height, width, resize_mode=resize_mode, crops_coords=crops_coords)
        return masks if self.device is None else masks.to(self.device)


_FROM_PIPE_CLASSES = ("DiffusionPipeline", "AutoPipelineForText2Image", "AutoPipelineForImage2Image",
                      "AutoPipelineForInpainting")


def _carry_engines_through_from_pipe():
    """Wrap (once) diffusers' `from_pipe` classmethods: a pipeline made from one with the device processor whose `vae`
    is still an EngineVae gets `use_engines` too. Every other call returns diffusers' result unchanged."""
    import diffusers

    for class_name in _FROM_PIPE_CLASSES:
        owner = getattr(diffusers, class_name, None)
        original = None if owner is None else owner.__dict__.get("from_pipe")
        if not isinstance(original, classmethod) or getattr(original.__func__, "_vaebuild_wrapped", False):
            continue
        owner.from_pipe = classmethod(_from_pipe_keeping_engines(original.__func__))


def _from_pipe_keeping_engines(from_pipe):
    @functools.wraps(from_pipe)
    def wrapped(cls, pipeline, **kwargs):
        new = from_pipe(cls, pipeline, **kwargs)
        if _serves_engines(pipeline) and _has_engine_vae(new):
            use_engines(new)
        return new

    wrapped._vaebuild_wrapped = True
    return wrapped


def _serves_engines(pipe):
    return isinstance(getattr(pipe, "image_processor", None), EngineImageProcessor) and _has_engine_vae(pipe)


def _has_engine_vae(pipe):
    return isinstance(getattr(pipe, "vae", None), EngineVae)
