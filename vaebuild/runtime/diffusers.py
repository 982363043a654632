"""`EngineVae`: vaebuild's engines as a drop-in `pipe.vae` for diffusers' Qwen-Image pipelines.

    pipe.vae = vaebuild.runtime.EngineVae.from_folder("engines/", fallback=pipe.vae)

It offers what the Qwen-Image pipelines use of `AutoencoderKLQwenImage`: `config` (z_dim, latents_mean,
latents_std, ...), `temperal_downsample`, `dtype`, `device`, `encode(images)` (an output whose
`latent_dist` is diffusers' `DiagonalGaussianDistribution` of the encoder engine's 2z-channel moments)
and `decode(latents)` (images clamped to [-1, 1], `.sample` or a tuple). Calls go through
`vaebuild.runtime.VaeRuntime`: the engine or profile that contains the shape, else the exact single-frame PyTorch
model built from `fallback` (never a resize). Which path served each graph at each image size is logged
once, in one line on the `vaebuild.diffusers` logger (again only if that path changes).

Batches larger than the engine for their size accepts (its profile's batch max) are split into chunks it takes
and concatenated; `enable_slicing()` forces chunks of one. `Pipeline.from_pipe(pipe)` keeps an EngineVae.
`enable_tiling()` runs every size through exact tiles (`vaebuild.runtime.tiling`: equal to the untiled result);
`disable_tiling()` goes back to tiles only where no whole-image engine serves the size and the folder has tile
engines. Saving is refused with a one-line error: the engines' folder is not part of a pipeline folder.

Threads: an EngineVae may be called from many threads at once, as its `VaeRuntime` may; each call's path is the
calling thread's (`VaeRuntime.thread_route`).
"""

import json
import logging
import threading

import torch
from diffusers import ConfigMixin, OnnxRuntimeModel
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput

from vaebuild.errors import UserInputError

logger = logging.getLogger("vaebuild.diffusers")


class EngineVae(torch.nn.Module, ConfigMixin, OnnxRuntimeModel):
    """A Qwen-Image VAE for diffusers pipelines, served by a vaebuild engine runtime (see the module doc).

    Not a `ModelMixin`: `Pipeline.from_pipe` checks the exact type of ModelMixin components against the new
    pipeline's signature (`AutoencoderKLQwenImage`) and drops any other, but keeps other modules. Its
    `OnnxRuntimeModel` base is diffusers' class for models served by a runtime rather than torch weights: it makes
    `pipe.save_pretrained` call `EngineVae.save_pretrained` (which refuses) instead of silently skipping the VAE.
    """

    config_name = "config.json"

    def __init__(self, runtime):
        """runtime: a `vaebuild.runtime.VaeRuntime` (what `from_folder` builds)."""
        super().__init__()
        self.runtime = runtime
        self.register_to_config(**runtime.manifest["vae_config"])
        self.temperal_downsample = list(self.config.temperal_downsample)
        self.use_slicing = False
        self.use_tiling = False
        self._dtype = runtime.dtype
        self._logged_routes = set()
        self._log_lock = threading.Lock()  # calls may come from many threads (the runtime is thread-safe)

    @classmethod
    def from_folder(cls, folder, fallback=None, *, device=None, dtype=None, **runtime_kwargs):
        """An EngineVae over a `vaebuild static` or `vaebuild multiprofile` output folder.

        fallback: the pipeline's AutoencoderKLQwenImage, used (folded to 2-D) for sizes no engine covers;
            default: the model source recorded in the folder's manifest, loaded on first need.
        device, dtype: where and in which dtype the fallback runs (default: the fallback's own).
        runtime_kwargs: passed on to `VaeRuntime` (e.g. `allow_fallback=False`, `resident="lazy"`).
        """
        from vaebuild.manifest import read_build_manifest
        from vaebuild.runtime.engines import VaeRuntime

        manifest = read_build_manifest(folder)
        if fallback is not None:
            _check_fallback_config(fallback, manifest, folder)
            device = device or fallback.device
            dtype = dtype or fallback.dtype
        multi_profile = manifest["kind"] == "multiprofile"
        return cls(VaeRuntime(folder, multi_profile, fallback, device=device, dtype=dtype, **runtime_kwargs))

    # ------------------------------------------------------------------ what pipelines use

    @property
    def device(self):
        return self.runtime.device

    @property
    def dtype(self):
        """The dtype pipelines cast latents to; engines run in their own precision, the fallback in its dtype."""
        return self._dtype

    def encode(self, x, return_dict=True):
        """`AutoencoderKLOutput(latent_dist)` (or a 1-tuple) of images `[B, 3, 1, H, W]` in [-1, 1]."""
        posterior = DiagonalGaussianDistribution(self._run("encoder", x))
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(self, z, return_dict=True):
        """`DecoderOutput(sample)` (or a 1-tuple) of de-normalized latents `[B, z, 1, h, w]`; images in [-1, 1]."""
        images = self._run("decoder", z)
        return DecoderOutput(sample=images) if return_dict else (images,)

    def to(self, *args, **kwargs):
        """Accept a dtype (the I/O dtype) and the runtime's own device; refuse any other device."""
        device = kwargs.get("device")
        dtype = kwargs.get("dtype")
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            elif arg is not None:
                device = arg
        if device is not None and not _same_device(torch.device(device), self.device):
            raise UserInputError(
                f"EngineVae runs on {self.device} (its engines and fallback live there) and cannot move to {device}; "
                f"build it with from_folder(..., device='{torch.device(device).type}') (model CPU offload is not supported)"
            )
        if dtype is not None:
            self._dtype = dtype
        return self

    def enable_slicing(self):
        """Encode and decode one image at a time."""
        self.use_slicing = True

    def disable_slicing(self):
        """Encode and decode in chunks as large as the engines accept (the default)."""
        self.use_slicing = False

    def enable_tiling(self, tile_sample_min_height=None, tile_sample_min_width=None, tile_sample_stride_height=None,
                      tile_sample_stride_width=None):
        """Encode and decode every size through exact tiles (`VaeRuntime(tiling=True)`): the untiled result, not a blend.

        diffusers' signature: `tile_sample_min_height` / `tile_sample_min_width` (image pixels, multiples of 8) set
        the tile's core size; without them the folder's `--tile` size is used (or 512x512 without tile engines).
        The stride arguments are accepted and ignored: exact tiles overlap by the halo the architecture needs.
        """
        self.runtime.tiles.set_tile(tile_sample_min_height, tile_sample_min_width)
        self.runtime.tiles.tiling = True
        self.use_tiling = True

    def disable_tiling(self):
        """Back to the runtime's default, tiling="auto": tiles only for sizes no whole-image engine serves, when the
        folder holds tile engines (the result is the same either way)."""
        self.runtime.tiles.tiling = "auto"
        self.use_tiling = False

    def save_pretrained(self, save_directory, *args, **kwargs):
        raise UserInputError(
            f"EngineVae cannot be saved into {save_directory} (its engines live in {self.runtime.engine_dir}); "
            "set pipe.vae back to the stock AutoencoderKLQwenImage before save_pretrained, then apply EngineVae.from_folder again"
        )

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        raise UserInputError("EngineVae is not loaded with from_pretrained; use EngineVae.from_folder(engine_folder, fallback=vae)")

    # ------------------------------------------------------------------ dispatch

    def _run(self, graph, x):
        """The runtime's output for `x`, in batch chunks its engine for that size accepts; logs each path once."""
        run = self.runtime.encode if graph == "encoder" else self.runtime.decode
        chunk = 1 if self.use_slicing else self.runtime.max_batch(graph, x.shape) or len(x)
        outputs = []
        for part in x.split(chunk):
            outputs.append(run(part))
            self._log_route(graph, part.shape, self.runtime.thread_route(graph))  # this thread's call
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def _log_route(self, graph, shape, route):
        scale = 1 if graph == "encoder" else 2 ** len(self.temperal_downsample)
        size = f"{shape[-2] * scale}x{shape[-1] * scale}"
        key = (graph, size, route.kind, route.engine)
        with self._log_lock:
            if key in self._logged_routes:
                return
            self._logged_routes.add(key)
        if route.kind == "engine":
            logger.info("%s %s (HxW): engine %s, profile %d", graph, size, route.engine, route.profile)
        elif route.kind == "tiles":
            logger.info("%s %s (HxW): exact tiles (%s%s)", graph, size, route.engine or "PyTorch 2-D split graphs",
                        f"; PyTorch for: {route.reason}" if route.reason else "")
        else:
            logger.info("%s %s (HxW): PyTorch 2-D model (%s)", graph, size, route.reason)


def _same_device(requested, actual):
    """Same device type, and the same index where both name one ("cuda" matches "cuda:0")."""
    return requested.type == actual.type and None in (requested.index, actual.index) or requested == actual


def _check_fallback_config(fallback, manifest, folder):
    """UserInputError when `fallback` is not the architecture the engines in `folder` were built from."""
    built = manifest["vae_config"]
    given = json.loads(json.dumps({k: v for k, v in dict(fallback.config).items() if not k.startswith("_")}))
    differing = sorted(k for k in built.keys() | given.keys() if built.get(k) != given.get(k))
    if differing:
        raise UserInputError(
            f"the fallback VAE's config differs from the one the engines in {folder} were built from "
            f"({', '.join(differing)}); pass the VAE the engines were exported from"
        )
