"""Which engines of a folder serve an image size: for `vaebuild verify --sizes` and the tiled rows.

Whole-image engines: the runtime's own choice (`VaeRuntime` with `tiling=False` plans the engine and profile for a
shape; nothing is loaded or run here). Tile engines (`--tile`): a size is theirs when the graph's global piece (the
decoder head, the encoder rest: run once over the whole latent) takes its latent; the windows of the local piece
always fit by construction (`vaebuild.builder.tiles`).
"""

from pathlib import Path

from vaebuild.errors import UserInputError
from vaebuild.model import GRAPHS, TILE_GRAPHS

GLOBAL_PIECE = {"decoder": "decoder_head", "encoder": "encoder_rest"}


class FolderSizes:
    """The sizes the engines of one folder serve. Image sizes are (height, width) pixels."""

    def __init__(self, folder):
        from vaebuild.runtime import VaeRuntime
        from vaebuild.runtime.folder import read_engine_dir

        self.folder = Path(folder)
        _, self.entries = read_engine_dir(self.folder)
        # A planner: lazy, on the CPU, never called (its `_plan` is the choice `decode`/`encode` would make).
        self._runtime = VaeRuntime(self.folder, device="cpu", resident="lazy", tiling=False, allow_fallback=False)

    def input_shape(self, graph, image):
        """The batch-1 input shape of `graph` for an image of `image`."""
        entry = self.entries[graph][0]
        opt = entry.profiles[0].opt
        return (1, *opt[1:3], round(image[0] / entry.scale), round(image[1] / entry.scale))

    def serving(self, graph, image):
        """(manifest path, profile index) of the whole-image engine that serves `image`, or None."""
        entry, profile, _ = self._runtime._plan(graph, self.input_shape(graph, image))
        return None if entry is None else (entry.rel_path, profile.index)

    @staticmethod
    def pieces(graph):
        """The tile graphs of `graph`, in the order they run."""
        from vaebuild.model.tiling import TILE_PARENT

        return tuple(name for name in TILE_GRAPHS if TILE_PARENT[name] == graph)

    def tiled_graphs(self):
        """The graphs whose tile engines the folder holds (both pieces)."""
        return [g for g in GRAPHS if self.entries[g] and all(self.entries[p] for p in self.pieces(g))]

    def tiles_serve(self, graph, image):
        """Whether the folder's tile engines of `graph` serve `image`."""
        if graph not in self.tiled_graphs():
            return False
        entry = self.entries[GLOBAL_PIECE[graph]][0]
        profile = entry.profiles[0]
        return profile.contains((1, profile.min[1], 1, round(image[0] / entry.scale), round(image[1] / entry.scale)))

    def profile_images(self, graph):
        """The distinct images of every min/opt/max of the whole-image engines of `graph`, in manifest order."""
        images = []
        for entry in self.entries[graph]:
            for raw in entry.raw["profiles"]:
                for level in ("min", "opt", "max"):
                    image = tuple(raw["image"][level])
                    if image not in images:
                        images.append(image)
        return images

    def tiled_sizes(self, graph, extra=()):
        """[(image, whole-image engine path or None)] of the tiled rows of `graph`: the whole-image engines' images,
        then `extra` (objects with height and width: `--sizes`), where the tile engines serve them."""
        images = self.profile_images(graph)
        images += [(s.height, s.width) for s in extra if (s.height, s.width) not in images]
        found = []
        for image in images:
            if self.tiles_serve(graph, image):
                whole = self.serving(graph, image)
                found.append((image, whole and whole[0]))
        return found

    def extra_rows(self, extra):
        """{whole-image engine path: [(profile index, image, input shape)]} of `extra` (`--sizes`); UserInputError
        naming the first size that no engine of a graph serves (whole-image or tiles) and the ranges served."""
        rows = {}
        for size in extra:
            image = (size.height, size.width)
            for graph in GRAPHS:
                if not self.entries[graph]:
                    continue
                whole = self.serving(graph, image)
                if whole is not None:
                    rows.setdefault(whole[0], []).append((whole[1], image, self.input_shape(graph, image)))
                elif not self.tiles_serve(graph, image):
                    raise UserInputError(
                        f"--sizes {size.width}x{size.height}: no {graph} engine in {self.folder} serves this size; "
                        f"it serves (WxH) {self.served_ranges(graph)}"
                    )
        return rows

    def served_ranges(self, graph):
        """'path WxH..WxH, ...' of the engines of `graph` (whole-image, then tiles), image pixels."""
        parts = [f"{e.rel_path} {_range(e)}" for e in self.entries[graph]]
        if graph in self.tiled_graphs():
            parts.append(f"tiles {_range(self.entries[GLOBAL_PIECE[graph]][0])}")
        return ", ".join(parts)


def _range(entry):
    """'WxH..WxH' (or 'WxH' for one size) an engine's profiles span together, image pixels."""
    low = [round(min(p.min[i] for p in entry.profiles) * entry.scale) for i in (4, 3)]
    high = [round(max(p.max[i] for p in entry.profiles) * entry.scale) for i in (4, 3)]
    text = [f"{w}x{h}" for w, h in (low, high)]
    return text[0] if text[0] == text[1] else f"{text[0]}..{text[1]}"
