"""An engine folder as the runtime reads it: the manifest's engines, their profiles, and the profile choice."""

from dataclasses import dataclass
from pathlib import Path

from vaebuild.manifest import read_build_manifest
from vaebuild.model import GRAPHS, TILE_GRAPHS

SPATIAL = slice(3, 5)  # (height, width) of a 5-D input shape


@dataclass(frozen=True)
class EngineProfile:
    """One optimization profile of an engine: 5-D input shapes, as recorded in the manifest."""

    index: int
    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def contains(self, shape) -> bool:
        """Whether every dimension of `shape` lies within min..max."""
        return len(shape) == len(self.min) and all(lo <= s <= hi for lo, s, hi in zip(self.min, shape, self.max))

    def distance(self, shape) -> int:
        """L1 distance between the (height, width) of `shape` and of opt."""
        return sum(abs(s - o) for s, o in zip(shape[SPATIAL], self.opt[SPATIAL]))

    def describe(self) -> str:
        return f"{self.name} {list(self.min)}..{list(self.max)}"


@dataclass(frozen=True)
class EngineEntry:
    """One engine file listed in the manifest."""

    rel_path: str
    path: Path
    graph: str
    input_name: str
    output_name: str
    backend: str
    precision: str
    profiles: tuple[EngineProfile, ...]
    scale: float  # image side / input side: 1 for the encoder, 8 for the decoder
    raw: dict  # the manifest entry itself (backends read their own fields from it)

    @property
    def static_pair(self) -> bool:
        """Whether this is a static pair's engine (`<name>/vae_<graph>.*`, one exact size) rather than a multi-profile
        one (`vae_<graph>_multi_profile.*`); a mixed folder (`multiprofile --static-spec`) holds both."""
        folder, _, name = self.rel_path.rpartition("/")
        return bool(folder) and name.startswith(f"vae_{self.graph}.")

    def image_range(self) -> str:
        """'HxW..HxW' image pixels its profiles span together (smallest min to largest max side)."""
        low = [min(p.min[i] for p in self.profiles) for i in (3, 4)]
        high = [max(p.max[i] for p in self.profiles) for i in (3, 4)]
        return f"{image_size((0, 0, 0, *low), self.scale)}..{image_size((0, 0, 0, *high), self.scale)}"


def choose_profile(profiles, shape):
    """The profile for `shape`: among those containing it, nearest opt (H, W) by L1, ties to the lowest index.

    Returns None when no profile contains `shape`.
    """
    candidates = [p for p in profiles if p.contains(shape)]
    if not candidates:
        return None
    return min(candidates, key=lambda p: (p.distance(shape), p.index))


def read_engine_dir(engine_dir):
    """(manifest, {graph: [EngineEntry]}) of a vaebuild engine folder; UserInputError without a manifest."""
    engine_dir = Path(engine_dir)
    manifest = read_build_manifest(engine_dir)
    entries = {graph: [] for graph in GRAPHS + TILE_GRAPHS}  # tile graphs: `--tile` builds (model.tiling)
    for raw in manifest["engines"]:
        profiles = tuple(
            EngineProfile(i, p["name"], *(tuple(p["input"][level]) for level in ("min", "opt", "max")))
            for i, p in enumerate(raw["profiles"])
        )
        entries[raw["graph"]].append(
            EngineEntry(
                rel_path=raw["path"],
                path=engine_dir / raw["path"],
                graph=raw["graph"],
                input_name=raw["input"],
                output_name=raw["output"],
                backend=raw["backend"],
                precision=raw["precision"],
                profiles=profiles,
                scale=raw["profiles"][0]["image"]["opt"][0] / raw["profiles"][0]["input"]["opt"][3],
                raw=raw,
            )
        )
    return manifest, entries


def image_size(shape, scale):
    """'HxW' of the image a 5-D input `shape` stands for (`scale`: image side / input side)."""
    return f"{round(shape[3] * scale)}x{round(shape[4] * scale)}"
