"""Tile engines in a folder (`vaebuild static|multiprofile ... --tile HxW`): the four split graphs as packages.

Inductor only for now (TensorRT backends refuse `--tile`). The tile is the core in image pixels, each side a multiple
of 8 (the latent scale: cores are whole latent pixels, and the encoder's windows start on its stride-2 grid). Every
tile package is dynamic-shape (choice: one package serves the edge windows, which are smaller, and images smaller
than one window; static windows shifted inward would need a second path for those):

    tiles/vae_decoder_head.pt2   latents  2..TILE_MAX_SIDE/8 latent pixels per side (the whole latent, once per image)
    tiles/vae_decoder_tail.pt2   features 2..tile/8 + 2*halo latent pixels (one window)
    tiles/vae_encoder_down.pt2   images   16..tile + 2*halo image pixels, multiples of 8 (one window)
    tiles/vae_encoder_rest.pt2   features 2..TILE_MAX_SIDE/8 latent pixels (the whole latent, once per image)

batch 1 (the runtime tiles the images of a batch one after the other). TILE_MAX_SIDE is 8192 image pixels (8K
images in bounded memory), or the spec's `max_side` or largest profile side where that is larger. The manifest records `tiles: {tile: [h, w], halo: {decoder, encoder}}`
(halos from the architecture, `vaebuild.model.tiling.halos`).
"""

from dataclasses import dataclass

from vaebuild.builder.specs import ImageSize
from vaebuild.errors import UserInputError
from vaebuild.model import TILE_GRAPHS
from vaebuild.model.tiling import TILE_IO, halos

TILE_DIR = "tiles"
MIN_LATENT = 2  # smallest latent side a tile package takes (torch.export specializes sizes 0 and 1)
TILE_MAX_SIDE = 8192  # the largest image side the whole-latent tile packages (decoder head, encoder rest) take


def parse_tile(text):
    """(height, width) image pixels of `--tile HxW` (or `--tile N`); one-line UserInputError otherwise."""
    if text is None:
        return None
    parts = str(text).lower().split("x")
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise UserInputError(f"--tile {text!r} must look like 512x512 (the tile's core, height x width in image pixels)")
    tile = tuple(int(p) for p in parts)
    if any(side < 16 or side % 8 for side in tile):
        raise UserInputError(f"--tile {text}: each side must be a multiple of 8 image pixels (one latent pixel), at least 16")
    return tile


@dataclass(frozen=True)
class TileProfile:
    """One tile package's only profile, shaped like a spec `Profile` for the manifest writer."""

    name: str
    min: ImageSize
    opt: ImageSize
    max: ImageSize
    batch: tuple[int, int, int]
    input_shapes: tuple  # (min, opt, max) 5-D input shapes


def _profile(graph, channels, low, opt, high, image_per_input):
    def size(side):
        return ImageSize(side * image_per_input, side * image_per_input)

    shapes = tuple((1, channels, 1, side, side) for side in (low, opt, high))
    return TileProfile(graph, size(low), size(opt), size(high), (1, 1, 1), shapes)


def tile_plan(spec, record, tile, suffix):
    """(relative path, graph, [TileProfile]) of the four tile packages for `tile` (image pixels)."""
    config = record["vae_config"]
    found = halos(config)
    ratio = found.ratio
    features = config["base_dim"] * config["dim_mult"][-1]
    max_side = max([TILE_MAX_SIDE, spec.max_side] + [max(p.max.height, p.max.width) for p in spec.profiles])
    latent_max = max(max_side // ratio, MIN_LATENT)
    tail_max = max(tile) // ratio + 2 * found.decoder
    down_max = max(tile) + 2 * found.encoder
    image_channels = config.get("input_channels", 3)
    profiles = {
        "decoder_head": _profile("decoder_head", config["z_dim"], MIN_LATENT, min(latent_max, 64), latent_max, ratio),
        "decoder_tail": _profile("decoder_tail", features, MIN_LATENT, tail_max, tail_max, ratio),
        "encoder_down": _profile("encoder_down", image_channels, MIN_LATENT * ratio, down_max, down_max, 1),
        "encoder_rest": _profile("encoder_rest", features, MIN_LATENT, min(latent_max, 64), latent_max, ratio),
    }
    return [(f"{TILE_DIR}/vae_{graph}{suffix}", graph, [profiles[graph]]) for graph in TILE_GRAPHS]


def add_tile_graphs(record):
    """The build record with the tile graphs' I/O names (what the manifest writer and compiler read)."""
    graphs = dict(record["graphs"])
    for graph in TILE_GRAPHS:
        inp, out = TILE_IO[graph]
        graphs[graph] = {"input": {"name": inp}, "output": {"name": out},
                         "spatial_multiple": 8 if graph == "encoder_down" else 1}
    return {**record, "graphs": graphs}


def tiles_header(record, tile):
    """The manifest's `tiles` record."""
    found = halos(record["vae_config"])
    return {"tile": list(tile), "halo": {"decoder": found.decoder, "encoder": found.encoder},
            "halo_units": {"decoder": "latent pixels", "encoder": "image pixels"}, "graphs": list(TILE_GRAPHS)}
