"""Exact tiled decode and encode (`vaebuild.model.tiling`): the loops, and the runtime's tile routing.

`tiled_decode(latents, head, tail, tile, halo)` and `tiled_encode(images, down, rest, tile, halo)` take callables
on 5-D tensors (PyTorch modules, or a package's infer): the global part runs once per image over the whole latent,
the local part on each window, cropped and assembled. Images of a batch are tiled one after the other (a window's
memory stays one image's). The result equals the untiled graph (up to float summation order), not a blend.

`TileRouter` is what `VaeRuntime(folder, tiling=...)` uses:
    tiling=False: never tile.
    tiling=True: always tile (tile engines where the folder has them and the window fits their range, else the
        PyTorch 2-D split graphs built from the runtime's fallback model).
    tiling="auto" (the default): when the folder has tile engines for that graph (`vaebuild static|multiprofile
        --tile HxW`), tile the sizes no whole-image engine serves, and run a whole-image call again through tiles
        when it runs out of GPU memory (the whole-image engine stays loaded and is tried first next time: whether a
        run fits is found by running it, as manifests record no activation memory to estimate it from; pass
        tiling=True for sizes you know do not fit, to skip that attempt). `memory_budget` bounds the resident
        engines only.
The tile size is the folder's (`manifest["tiles"]["tile"]`, image pixels) or, without tile engines,
`DEFAULT_TILE` (or what `EngineVae.enable_tiling(tile_sample_min_height=..., tile_sample_min_width=...)` set); the
halo is always computed from the manifest's architecture (`vaebuild.model.tiling.halos`).
"""

import torch

from vaebuild.errors import UserInputError
from vaebuild.model.tiling import TILE_GRAPHS, decoder_tiles, encoder_tiles, halos

DEFAULT_TILE = (512, 512)  # image pixels, when the folder has no tile engines
TILING_MODES = (True, False, "auto")


def tiled_decode(latents, head, tail, tile, halo, scale=8):
    """Images `[B, 3, 1, scale*h, scale*w]` of latents `[B, z, 1, h, w]`: `head` once per image, `tail` per window.

    tile: core (h, w) or side in latent pixels; halo: latent pixels (`decoder_tail_halo`).
    """
    h, w = latents.shape[-2:]
    tiles = decoder_tiles((h, w), tile, halo, scale)
    out = None
    for b in range(latents.shape[0]):
        features = head(latents[b:b + 1])
        for t in tiles:
            y = tail(features[..., t.window[0], t.window[1]].contiguous())
            if out is None:
                out = y.new_empty((latents.shape[0], y.shape[1], 1, h * scale, w * scale))
            out[b:b + 1, :, :, t.output[0], t.output[1]] = y[..., t.crop[0], t.crop[1]]
    return out


def tiled_encode(images, down, rest, tile, halo, scale=8):
    """Moments `[B, 2z, 1, H/scale, W/scale]` of images `[B, 3, 1, H, W]`: `down` per window, `rest` once per image.

    tile: core (h, w) or side in image pixels; halo: image pixels (`encoder_down_halo`); all multiples of `scale`.
    """
    height, width = images.shape[-2:]
    tiles = encoder_tiles((height, width), tile, halo, scale)
    outputs = []
    for b in range(images.shape[0]):
        features = None
        for t in tiles:
            y = down(images[b:b + 1, ..., t.window[0], t.window[1]].contiguous())
            if features is None:
                features = y.new_empty((1, y.shape[1], 1, height // scale, width // scale))
            features[..., t.output[0], t.output[1]] = y[..., t.crop[0], t.crop[1]]
        outputs.append(rest(features))
    return torch.cat(outputs) if len(outputs) > 1 else outputs[0]


def check_tiling(tiling):
    if not any(tiling is mode or tiling == mode and type(tiling) is type(mode) for mode in TILING_MODES):
        raise UserInputError(f"tiling={tiling!r}: use True, False or 'auto'")
    return tiling


class TileRouter:
    """Whether and how a `VaeRuntime` call is tiled (see the module doc); it uses the runtime's engines and fallback."""

    def __init__(self, runtime, tiling="auto"):
        self.runtime = runtime
        self.tiling = check_tiling(tiling)
        manifest = runtime.manifest
        self.halos = halos(manifest["vae_config"])
        recorded = manifest.get("tiles")
        if recorded and recorded.get("halo") != {"decoder": self.halos.decoder, "encoder": self.halos.encoder}:
            raise UserInputError(
                f"{runtime.engine_dir} records tile halos {recorded.get('halo')} but its architecture needs "
                f"decoder {self.halos.decoder}, encoder {self.halos.encoder}; rebuild it with --tile"
            )
        self.engine_tile = tuple(recorded["tile"]) if recorded else None
        self.tile = self.engine_tile or DEFAULT_TILE
        self._modules = None

    def set_tile(self, height=None, width=None):
        """Use cores of (height, width) image pixels (None: keep); multiples of the latent scale."""
        height, width = height or self.tile[0], width or self.tile[1]
        for side in (height, width):
            if not isinstance(side, int) or side <= 0 or side % self.halos.ratio:
                raise UserInputError(f"tile side {side!r} must be a positive multiple of {self.halos.ratio} image pixels")
        self.tile = (height, width)

    def has_engines(self, graph):
        """Whether the folder holds both tile engines of `graph` ("decoder" or "encoder")."""
        return all(self.runtime._entries.get(name) for name in self._pieces(graph))

    def wanted(self, graph, x):
        """Whether the call of `graph` on `x` goes through tiles."""
        if self.tiling is False:
            return False
        if self.tiling is True:
            return True
        return self.has_engines(graph) and self.runtime._plan(graph, tuple(x.shape))[0] is None

    def wanted_after_out_of_memory(self, graph):
        """Whether a whole-image call of `graph` that ran out of GPU memory is run again through tiles."""
        return self.tiling == "auto" and self.has_engines(graph)

    def run(self, graph, x):
        """The tiled output of `graph` for `x` (the runtime's I/O contract), recording the runtime's `last_route`."""
        from vaebuild.runtime.engines import Route

        used, reasons = [], []
        first, second = (self._piece(name, used, reasons) for name in self._pieces(graph))
        ratio = self.halos.ratio
        if graph == "decoder":
            tile = (self.tile[0] // ratio, self.tile[1] // ratio)
            out = tiled_decode(x, first, second, tile, self.halos.decoder, ratio)
        else:
            if x.shape[-2] % ratio or x.shape[-1] % ratio:
                raise UserInputError(f"tiled encode needs image sides that are multiples of {ratio}, got {list(x.shape)}")
            out = tiled_encode(x, first, second, self.tile, self.halos.encoder, ratio)
        self.runtime.last_route[graph] = Route(
            "tiles", engine=",".join(sorted(set(used))) or None,
            reason="; ".join(sorted(set(reasons))) or None,
        )
        return out.to(dtype=x.dtype)

    @staticmethod
    def _pieces(graph):
        return ("decoder_head", "decoder_tail") if graph == "decoder" else ("encoder_down", "encoder_rest")

    def _piece(self, name, used, reasons):
        """A callable for one split graph: its engine where the window fits, else the PyTorch module."""
        runtime = self.runtime
        entries = runtime._entries.get(name) or []

        def call(x):
            entry = entries[0] if entries else None
            if entry is not None and entry.profiles[0].contains(tuple(x.shape)):
                runner, reason = runtime._runner_for(entry, entry.profiles[0])
                if runner is not None:
                    try:
                        out = runtime._infer(runner, entry, x)
                    except Exception as err:  # foreign runtime: CUDA OOM, ...
                        reason, _ = runtime._run_failed(entry, err)  # the runtime's rule (out of memory is transient)
                    else:
                        used.append(entry.rel_path)
                        return out
            elif entry is not None:
                reason = f"{entry.rel_path} takes {entry.profiles[0].describe()}, got {list(x.shape)}"
            else:
                reason = f"no {name} engine in {runtime.engine_dir}"
            if not runtime.allow_fallback:
                from vaebuild.runtime.engines import EngineUnavailableError

                raise EngineUnavailableError(reason)
            if entries:
                reasons.append(reason)
            return self.module(name)(x.to(device=runtime.device, dtype=runtime.dtype)).to(dtype=x.dtype)

        return call

    def module(self, name):
        """The PyTorch split graph `name`, sharing the runtime's fallback model (built on first need)."""
        from vaebuild.model.tiling import TILE_MODULES

        if self._modules is None:
            fallback = self.runtime._fallback_model
            graphs = {"decoder": fallback.graph("decoder"), "encoder": fallback.graph("encoder")}
            self._modules = {n: TILE_MODULES[n](graphs[n.split("_")[0]]).eval() for n in TILE_GRAPHS}
        return self._modules[name]
