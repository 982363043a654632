"""Profile specs: the image sizes engines are built for, loaded from YAML and validated.

A spec lists named profiles. `kind: static` entries give one fixed size each (one engine pair per
entry); `kind: multiprofile` entries give min/opt/max ranges (one engine pair holding every entry as
an optimization profile; profile index = position in the file). Sizes are image pixels
(height, width); decoder inputs are the same divided by 8. Every problem raises `SpecError` with a
one-line message naming the file and the YAML key path.
"""

import os
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml

from vaebuild.errors import SpecError

IMAGE_CHANNELS = 3
LATENT_CHANNELS = 16  # z_dim of the Qwen-Image VAE
VAE_SCALE = 8  # image side / latent side
PIPELINE_MULTIPLE = 16  # Qwen-Image pipelines floor image sides to multiples of 16
MAX_SIDE_LIMIT = 4096  # the largest image side a spec may ask for (inductor packages are built and run up to it)

KINDS = ("static", "multiprofile")
ROUNDINGS = ("reject", "floor16")
SPEC_SUFFIX = ".yaml"
DEFAULT_SPECS = {"static": "t2i_static", "multiprofile": "i2i_multiprofile"}

Shape = tuple[int, int, int, int, int]

_TOP_KEYS = ("kind", "max_side", "rounding", "profiles")
_TOP_REQUIRED = ("kind", "max_side", "profiles")
_STATIC_KEYS = ("name", "height", "width", "batch")
_MULTI_KEYS = ("name", "min", "opt", "max", "batch")
_LEVELS = ("min", "opt", "max")
_SIZE_KEYS = ("height", "width")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class RoundingWarning(UserWarning):
    """A spec side was rounded (under `rounding: floor16`) to the size Qwen-Image pipelines use."""


@dataclass(frozen=True)
class ImageSize:
    """An image size in pixels."""

    height: int
    width: int

    def latent(self) -> tuple[int, int]:
        """Latent (height, width): the sides divided by 8 (exact for sides of a loaded spec)."""
        return self.height // VAE_SCALE, self.width // VAE_SCALE


@dataclass(frozen=True)
class Profile:
    """One named optimization profile; a static entry has min == opt == max."""

    name: str
    min: ImageSize
    opt: ImageSize
    max: ImageSize
    batch: tuple[int, int, int]  # (min, opt, max)

    def encoder_shapes(self, image_channels: int = IMAGE_CHANNELS) -> tuple[Shape, Shape, Shape]:
        """(min, opt, max) encoder input shapes `(B, image_channels, 1, H, W)`."""
        sizes = (self.min, self.opt, self.max)
        return tuple((b, image_channels, 1, s.height, s.width) for b, s in zip(self.batch, sizes))

    def decoder_shapes(self, latent_channels: int = LATENT_CHANNELS) -> tuple[Shape, Shape, Shape]:
        """(min, opt, max) decoder input shapes `(B, latent_channels, 1, H/8, W/8)`."""
        sizes = (self.min, self.opt, self.max)
        return tuple((b, latent_channels, 1, *s.latent()) for b, s in zip(self.batch, sizes))

    def contains(self, batch: int, height: int, width: int) -> bool:
        """Whether an image batch of this size (pixels) lies within min..max; divisibility is not checked."""
        return (
            self.batch[0] <= batch <= self.batch[2]
            and self.min.height <= height <= self.max.height
            and self.min.width <= width <= self.max.width
        )


@dataclass(frozen=True)
class ProfileSpec:
    """A validated spec file: its kind, limits and profiles in file order."""

    path: Path
    kind: Literal["static", "multiprofile"]
    max_side: int
    rounding: Literal["reject", "floor16"]
    profiles: tuple[Profile, ...]

    @property
    def names(self) -> tuple[str, ...]:
        """Profile names in file order."""
        return tuple(p.name for p in self.profiles)

    def select(self, names: Iterable[str]) -> "ProfileSpec":
        """The spec restricted to `names`, kept in file order (a multiprofile index is its position)."""
        wanted = list(names)
        known = ", ".join(self.names)
        if not wanted:
            raise SpecError(f"no ratio selected from {self.path}; known: {known}")
        for name in wanted:
            if name not in self.names:
                raise SpecError(f"unknown ratio {name!r} in {self.path}; known: {known}")
        return replace(self, profiles=tuple(p for p in self.profiles if p.name in wanted))


def shipped_specs() -> dict[str, Path]:
    """The specs shipped in the package (`vaebuild/builder/profiles/*.yaml`): name -> file, sorted by name."""
    folder = Path(resources.files("vaebuild.builder") / "profiles")  # a real folder: vaebuild is never zip-imported
    return {path.name[: -len(SPEC_SUFFIX)]: path for path in sorted(folder.glob(f"*{SPEC_SUFFIX}"))}


def find_spec(name_or_path: str | os.PathLike) -> Path:
    """A spec file: an existing path, or the name of a shipped spec (`t2i_static`)."""
    if Path(name_or_path).is_file():
        return Path(name_or_path)
    shipped = shipped_specs()
    name = str(name_or_path)
    if name in shipped:
        return shipped[name]
    raise SpecError(
        f"{name}: no such spec file or shipped spec; pass a YAML path or one of: {', '.join(shipped)}"
    )


def default_spec_path(kind: str) -> Path:
    """The shipped spec for `kind` ("static": T2I ratios, "multiprofile": I2I profiles)."""
    if kind not in DEFAULT_SPECS:
        raise SpecError(f"unknown spec kind {kind!r}; known: {', '.join(KINDS)}")
    return shipped_specs()[DEFAULT_SPECS[kind]]


def load_spec(path: str | os.PathLike) -> ProfileSpec:
    """Read and validate a spec file; `SpecError` on any problem, `RoundingWarning` per rounded side."""
    path = Path(path)
    try:
        data = yaml.load(path.read_bytes(), Loader=_UniqueKeyLoader)
    except FileNotFoundError as exc:
        raise SpecError(f"{path}: no such spec file; check the path") from exc
    except OSError as exc:
        raise SpecError(f"{path}: cannot read ({exc.strerror}); check the path") from exc
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: {_yaml_error_text(exc)}; fix the YAML") from exc
    return _Checker(str(path)).spec(path, data)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key repeated in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_error_text(exc: yaml.YAMLError) -> str:
    """One line: 'YAML error at line L, column C: problem' when PyYAML gives a position."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if mark is not None and problem:
        return f"YAML error at line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return "YAML error: " + " ".join(str(exc).split())


def _describe(value) -> str:
    """A YAML-flavoured name for a value's type, for error messages."""
    if value is None:
        return "empty"
    names = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}
    return names.get(type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


class _Checker:
    """Validates the parsed YAML of one spec file; each error names the file and the key path."""

    def __init__(self, src: str):
        self.src = src
        self.max_side = 0
        self.rounding = "reject"

    def error(self, text: str) -> SpecError:
        return SpecError(f"{self.src}: {text}")

    def spec(self, path: Path, data) -> ProfileSpec:
        top = self.mapping(data, "the top level", _TOP_KEYS, _TOP_REQUIRED)
        kind = top["kind"]
        if kind not in KINDS:
            raise self.error(f"kind={kind!r} is not one of {', '.join(KINDS)}; set one of them")
        self.rounding = top.get("rounding", "reject")
        if self.rounding not in ROUNDINGS:
            raise self.error(f"rounding={self.rounding!r} is not one of {', '.join(ROUNDINGS)}; set one of them")
        self.max_side = self.integer(top["max_side"], "max_side", VAE_SCALE)
        if self.max_side > MAX_SIDE_LIMIT:
            raise self.error(f"max_side={self.max_side} > {MAX_SIDE_LIMIT}, the largest side vaebuild builds; "
                             f"lower it to {MAX_SIDE_LIMIT} or less (tile larger images)")
        entries = top["profiles"]
        if not isinstance(entries, list):
            raise self.error(f"profiles is {_describe(entries)}; write a list of profile entries")
        if not entries:
            raise self.error("profiles is empty; list at least one profile")
        parse = self.static_entry if kind == "static" else self.multi_entry
        profiles = tuple(parse(raw, f"profiles[{i}]") for i, raw in enumerate(entries))
        first_index = {}
        for i, profile in enumerate(profiles):
            if profile.name in first_index:
                raise self.error(
                    f"profiles[{i}].name={profile.name!r} repeats profiles[{first_index[profile.name]}].name;"
                    " give each profile a unique name"
                )
            first_index[profile.name] = i
        return ProfileSpec(path, kind, self.max_side, self.rounding, profiles)

    def static_entry(self, raw, where: str) -> Profile:
        entry = self.mapping(raw, where, _STATIC_KEYS, _STATIC_KEYS)
        name = self.name(entry["name"], f"{where}.name")
        size = ImageSize(*(self.side(entry[k], f"{where}.{k}", name) for k in _SIZE_KEYS))
        batch = self.integer(entry["batch"], f"{where}.batch", 1)
        return Profile(name, size, size, size, (batch, batch, batch))

    def multi_entry(self, raw, where: str) -> Profile:
        entry = self.mapping(raw, where, _MULTI_KEYS, _MULTI_KEYS)
        name = self.name(entry["name"], f"{where}.name")
        sizes = []
        for level in _LEVELS:
            size = self.mapping(entry[level], f"{where}.{level}", _SIZE_KEYS, _SIZE_KEYS)
            sizes.append(ImageSize(*(self.side(size[k], f"{where}.{level}.{k}", name) for k in _SIZE_KEYS)))
        batch_map = self.mapping(entry["batch"], f"{where}.batch", _LEVELS, _LEVELS)
        batch = tuple(self.integer(batch_map[level], f"{where}.batch.{level}", 1) for level in _LEVELS)
        self.ordered([s.height for s in sizes], [f"{where}.{level}.height" for level in _LEVELS])
        self.ordered([s.width for s in sizes], [f"{where}.{level}.width" for level in _LEVELS])
        self.ordered(batch, [f"{where}.batch.{level}" for level in _LEVELS])
        return Profile(name, *sizes, batch)

    def mapping(self, value, where: str, known: tuple[str, ...], required: tuple[str, ...]) -> dict:
        if not isinstance(value, dict):
            raise self.error(f"{where} is {_describe(value)}; write a mapping with keys {', '.join(known)}")
        for key in value:
            if key not in known:
                raise self.error(f"unknown key {key!r} in {where}; known: {', '.join(known)}")
        for key in required:
            if key not in value:
                raise self.error(f"{where} is missing {key!r}; add it")
        return value

    def name(self, value, key: str) -> str:
        if not isinstance(value, str):
            raise self.error(
                f"{key}={value!r} is not a string; quote it, e.g. name: \"16_9\" (YAML reads 16_9 as the number 169)"
            )
        if not _NAME_RE.fullmatch(value):
            raise self.error(f"{key}={value!r} is not a valid name; use letters, digits, '_', '.' and '-'")
        return value

    def integer(self, value, key: str, low: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(f"{key}={value!r} is not an integer; write a whole number")
        if value < low:
            raise self.error(f"{key}={value} < {low}; use at least {low}")
        return value

    def side(self, value, key: str, name: str) -> int:
        """One image side: checked against the limits, then rounded or rejected per `rounding`."""
        floor16 = self.rounding == "floor16"
        side = self.integer(value, key, PIPELINE_MULTIPLE if floor16 else VAE_SCALE)
        if side > self.max_side:
            raise self.error(f"{key}={side} > max_side {self.max_side}; lower it or raise max_side")
        floored = side // PIPELINE_MULTIPLE * PIPELINE_MULTIPLE
        if floor16 and side != floored:
            warnings.warn(
                f"{self.src}: {key}={side} ({name}) is not a multiple of {PIPELINE_MULTIPLE};"
                f" rounding: floor16 builds {floored}",
                RoundingWarning,
            )
            return floored
        if not floor16 and side % VAE_SCALE:
            raise self.error(
                f"{key}={side} is not a multiple of {VAE_SCALE}; use {floored}"
                " (what Qwen-Image pipelines build) or set rounding: floor16"
            )
        return side

    def ordered(self, values, keys: list[str]) -> None:
        for i in (0, 1):
            if values[i] > values[i + 1]:
                raise self.error(f"{keys[i]}={values[i]} > {keys[i + 1]}={values[i + 1]}; need min <= opt <= max")
