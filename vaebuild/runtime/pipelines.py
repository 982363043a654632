"""`vaebuild.use_engines(pipe, folder)`: a diffusers Qwen-Image pipeline's whole VAE step on vaebuild's engines.

    pipe = vaebuild.use_engines(QwenImagePipeline.from_pretrained(...).to("cuda"), "engines/")

`pipe.vae` becomes an `EngineVae` over the folder (the pipeline's own VAE as its fallback) and
`pipe.image_processor` an `EngineImageProcessor`: the same diffusers processor, converting pixels on the engines'
device with diffusers' exact arithmetic, so only uint8 images cross to the host. Other processors (the inpainting
pipelines' `mask_processor`: grayscale, binarized masks) stay diffusers' own, said in one log line.
`Pipeline.from_pipe(pipe)` keeps the EngineVae; the new pipeline builds a stock processor, so call
`use_engines(new_pipe)` (no folder needed) to give it the device processor too.
"""

import logging
from pathlib import Path

from vaebuild.errors import UserInputError

logger = logging.getLogger("vaebuild.diffusers")

KEPT_PROCESSORS = ("mask_processor",)  # pipeline attributes left to diffusers' own processor


def use_engines(pipe, folder=None, **runtime_kwargs):
    """Serve `pipe`'s VAE and pixel conversion from the engines in `folder`; returns `pipe`.

    folder: a `vaebuild static` or `vaebuild multiprofile` output folder; may be left out when `pipe.vae` already
        is an EngineVae (e.g. after `from_pipe`).
    runtime_kwargs: passed on to `EngineVae.from_folder` / `VaeRuntime` (e.g. `cuda_graphs=True`, `memory_budget=`).
    """
    from vaebuild.runtime.diffusers import EngineVae
    from vaebuild.runtime.image_processor import EngineImageProcessor

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
    processor = getattr(pipe, "image_processor", None)
    if processor is not None and not isinstance(processor, EngineImageProcessor):
        pipe.image_processor = EngineImageProcessor.from_processor(processor, device=vae.device)
    for name in KEPT_PROCESSORS:
        if getattr(pipe, name, None) is not None:
            logger.info("%s.%s stays diffusers' own (grayscale masks are converted on the CPU)",
                        type(pipe).__name__, name)
    return pipe
