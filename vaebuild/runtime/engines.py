"""`VaeRuntime`: encode and decode through vaebuild's engines, exact PyTorch 2-D model as fallback.

It serves every folder `vaebuild static` and `vaebuild multiprofile` write, whatever the backend: each engine is
loaded and run through its backend (`vaebuild.backends`), which this module never branches on; `folder` reads the
manifest and chooses profiles, `residency` loads, releases and calls the engines, `fallback` builds the PyTorch
model, `tiling` runs exact tiles. The I/O contract
(LightX2V's), dispatch, residency under a memory budget, shared weights, CUDA graphs, the fallback's reasons and
the thread guarantees are documented in docs/runtime.md; each method's docstring says its part.
"""

import logging
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from vaebuild.errors import UserInputError, VaebuildError
from vaebuild.manifest import MANIFEST_NAME
from vaebuild.model import GRAPHS
from vaebuild.runtime.fallback import FallbackModel
from vaebuild.runtime.folder import SPATIAL, choose_profile, image_size, read_engine_dir
from vaebuild.runtime.residency import EngineResidency, EngineUnavailableError, is_out_of_memory

logger = logging.getLogger("vaebuild.runtime")


class FallbackOutOfMemoryError(VaebuildError):
    """The PyTorch fallback ran out of memory for a size no engine serves (one line, the runtime stays usable)."""


@dataclass(frozen=True)
class Route:
    """How the last call of a graph was served: by an engine (and profile) or by PyTorch (and why)."""

    kind: str  # "engine" | "pytorch" | "tiles" (engine: the tile engines used, reason: why a piece ran in PyTorch)
    engine: str | None = None
    profile: int | None = None
    reason: str | None = None


RESIDENCY = ("all", "lazy")


class _Routes(dict):
    """graph -> Route of the most recent call in any thread; `mine(graph)`: the calling thread's (None: no call yet)."""

    def __init__(self):
        super().__init__()
        self._local = threading.local()

    def __setitem__(self, graph, route):
        super().__setitem__(graph, route)
        if not hasattr(self._local, "routes"):
            self._local.routes = {}
        self._local.routes[graph] = route

    def mine(self, graph):
        return getattr(self._local, "routes", {}).get(graph)


class VaeRuntime(EngineResidency):
    """Qwen-Image VAE served by vaebuild engines of any backend (static or multi-profile), PyTorch 2-D as fallback."""

    def __init__(
        self,
        engine_dir,
        multi_profile=None,
        fallback_vae=None,
        *,
        device=None,
        dtype=None,
        resident=None,
        memory_budget=None,
        weights=None,
        runner_factory=None,
        unavailable_reason=None,
        allow_fallback=True,
        cuda_graphs=False,
        tiling="auto",
    ):
        """
        engine_dir: a folder written by `vaebuild static` or `vaebuild multiprofile`.
        multi_profile: which of the two it must be (None: whatever its manifest says). A mixed folder (`multiprofile
            --static-spec`: multi-profile engines plus static pairs) is a multi-profile one: None or True serves each
            shape from a static pair of its exact size, else from the multi-profile engine; False serves only its
            static pairs (the multi-profile engines are never loaded).
        fallback_vae: an AutoencoderKLQwenImage for the PyTorch fallback (default: load the manifest's model
            source on first need).
        device: where engines and the fallback run (default: cuda if available, else cpu).
        dtype: fallback model dtype (default: bfloat16 on cuda, float32 on cpu).
        resident: "all" (load every engine now) or "lazy" (on first use); default "all" for AOTInductor
            folders, "lazy" otherwise.
        memory_budget: bytes the loaded engines may hold together (LRU release beyond it); None: no limit.
        weights: another safetensors file for weight-free packages (same architecture), instead of the folder's.
        runner_factory: `(engine_path, backend, profile_index) -> runner` (default: the backend's load_runner).
        unavailable_reason: `backend -> str | None` (default: the backend's check of each engine against this
            process: package installed, GPU, compute capability, torch version).
        allow_fallback: False raises EngineUnavailableError instead of running PyTorch (benchmarks use this).
        cuda_graphs: replay AOTInductor packages from CUDA graphs, one captured per input shape on its first
            call (fewer launch gaps; each captured shape keeps its intermediate tensors allocated). CUDA only.
        tiling: exact tiles (`vaebuild.runtime.tiling`): True always, False never, "auto" for sizes no whole-image
            engine serves, and for whole-image calls that run out of GPU memory, when the folder holds tile engines
            (`--tile`).
        """
        import torch

        self.engine_dir = Path(engine_dir)
        self.manifest, self._entries = read_engine_dir(self.engine_dir)
        kind = self.manifest["kind"]
        # A mixed folder: a multiprofile build that also holds static pairs (`vaebuild multiprofile --static-spec`).
        self.mixed = kind == "multiprofile" and any(e.static_pair for g in GRAPHS for e in self._entries[g])
        if multi_profile is None:
            multi_profile = kind == "multiprofile"
        self.multi_profile = bool(multi_profile)
        expected_kind = "multiprofile" if self.multi_profile else "static"
        if kind != expected_kind and not self.mixed:
            raise UserInputError(
                f"{self.engine_dir} holds a {kind} build but multi_profile={self.multi_profile}; "
                f"set multi_profile={kind == 'multiprofile'}"
            )
        if self.mixed and not self.multi_profile:  # its static pairs only, as a static folder
            for graph in GRAPHS:
                self._entries[graph] = [e for e in self._entries[graph] if e.static_pair]
        all_entries = [e for entries in self._entries.values() for e in entries]
        if resident is None:
            packages = all_entries and all(e.backend == "inductor" for e in all_entries)
            resident = "all" if packages else "lazy"
        if resident not in RESIDENCY:
            raise UserInputError(f"resident={resident!r}: use one of {', '.join(RESIDENCY)}")
        if memory_budget is not None and not (isinstance(memory_budget, int) and memory_budget > 0):
            raise UserInputError(f"memory_budget must be a positive number of bytes or None, got {memory_budget!r}")
        config = self.manifest["vae_config"]
        self.z_dim = config["z_dim"]
        self._channels = {"encoder": config.get("input_channels", 3), "decoder": self.z_dim}
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.resident = resident
        self.memory_budget = memory_budget
        self.allow_fallback = allow_fallback
        if cuda_graphs:
            other = sorted({e.backend for e in all_entries} - {"inductor"})
            if self.device.type != "cuda" or other:
                raise UserInputError(
                    f"cuda_graphs needs AOTInductor packages on a CUDA device; {self.engine_dir} holds "
                    f"{', '.join(other) or 'inductor'} engines and the device is {self.device}: drop cuda_graphs"
                )
        self.cuda_graphs = cuda_graphs
        self._runner_factory = runner_factory or self._backend_runner
        self._injected_reason = unavailable_reason
        self._by_path = {e.rel_path: e for e in all_entries}
        self.weights = None
        if self.manifest.get("weights_file"):
            from vaebuild.weights_file import FolderWeights

            self.weights = FolderWeights(self.engine_dir, self.manifest["weights_file"], override=weights)
        elif weights is not None:
            raise UserInputError(f"{self.engine_dir} has no weights file (its engines carry their weights); drop weights=")
        self._fallback_model = FallbackModel(self.engine_dir, self.manifest, fallback_vae, self.device, self.dtype)
        self._init_residency()
        self._warned = set()
        self.fallback_counts = Counter()  # reason -> number of calls served by PyTorch for it
        self.last_route = _Routes()  # graph -> Route of its most recent call (any thread); .mine(graph): this thread's
        from vaebuild.runtime.tiling import TileRouter

        self.tiles = TileRouter(self, tiling)  # exact tiles (vaebuild.runtime.tiling): tiling=True, False or "auto"
        if resident == "all":
            self.load_all()

    @classmethod
    def from_config(cls, config, fallback_vae=None, **kwargs):
        """Build from LightX2V's `{"trt_engine_path": DIR, "multi_profile": bool}` (or `{"trt_vae_config": {...}}`)."""
        trt_config = config.get("trt_vae_config", config)
        if not trt_config.get("trt_engine_path"):
            raise UserInputError("the TensorRT VAE config needs trt_engine_path: the folder of a vaebuild build")
        return cls(trt_config["trt_engine_path"], trt_config.get("multi_profile", False), fallback_vae, **kwargs)

    # ------------------------------------------------------------------ public API

    def encode(self, images):
        """Moments `[B, 2z, 1, H/8, W/8]` of images `[B, 3, 1, H, W]` in [-1, 1] (engine output; mean = first z)."""
        return self._run("encoder", images)

    def encode_mean(self, images):
        """The posterior mean `[B, z, 1, H/8, W/8]`: the first z channels of `encode` (what LightX2V uses)."""
        return self.encode(images)[:, : self.z_dim]

    def decode(self, latents):
        """Images `[B, 3, 1, 8h, 8w]` in [-1, 1] of de-normalized latents `[B, z, 1, h, w]`."""
        return self._run("decoder", latents)

    def decode_images(self, latents):
        """uint8 RGB images `[B, 8h, 8w, 3]` on the runtime's device of de-normalized latents `[B, z, 1, h, w]`.

        The decoder's output converted as diffusers' `VaeImageProcessor.postprocess` does (bit-identical), on the device.
        """
        from vaebuild.pixels.convert import images_to_uint8

        return images_to_uint8(self.decode(latents)[:, :, 0])

    def encode_images(self, pixels):
        """Moments `[B, 2z, 1, H/8, W/8]` (as `encode`) of uint8 RGB images `[B, H, W, 3]` on any device.

        The pixels go to the device as uint8 and are normalised there as diffusers' `preprocess` does (bit-identical).
        """
        from vaebuild.pixels.convert import uint8_to_images

        return self.encode(uint8_to_images(pixels.to(self.device)).unsqueeze(2))

    def max_batch(self, graph, shape):
        """The largest batch the engine that serves one input of `shape` (any batch) accepts; None if no engine does."""
        entry, profile, _ = self._plan(graph, (1, *tuple(shape)[1:]))
        return None if entry is None else profile.max[0]

    @property
    def engine_paths(self):
        """Relative paths of every engine the manifest lists."""
        return tuple(self._by_path)

    def thread_route(self, graph):
        """The `Route` of the calling thread's most recent call of `graph` (None before its first); `last_route`
        holds the most recent call's of any thread."""
        return self.last_route.mine(graph)

    def prepare(self, graph, shape):
        """Load the engine that serves inputs of `shape` and return its `Route`; EngineUnavailableError says why none."""
        entry, profile, runner, reason = self._serving(graph, tuple(shape))
        if runner is None:
            raise EngineUnavailableError(reason)
        return Route("engine", entry.rel_path, profile.index)

    # ------------------------------------------------------------------ dispatch

    def _run(self, graph, x):
        import torch

        self._check_input(graph, x)
        with torch.no_grad():
            if self.tiles.wanted(graph, x):
                return self.tiles.run(graph, x)
            entry, profile, runner, reason = self._serving(graph, tuple(x.shape))
            if runner is not None:
                try:
                    out = self._infer(runner, entry, x, profile)
                except Exception as err:  # foreign runtime: CUDA OOM, TensorRT errors, ...
                    # Not retried on another engine: after a CUDA fault that one would fail too (and never be retried).
                    reason, out_of_memory = self._run_failed(entry, err)
                    if out_of_memory and self.tiles.wanted_after_out_of_memory(graph):
                        logger.info("%s; running it through tiles", reason)
                        return self.tiles.run(graph, x)
                else:
                    self.last_route[graph] = Route("engine", entry.rel_path, profile.index)
                    return out
            return self._fallback(graph, x, reason)

    def _check_input(self, graph, x):
        shape = tuple(x.shape)
        channels = self._channels[graph]
        if len(shape) != 5 or shape[1] != channels or shape[2] != 1:
            what = "images" if graph == "encoder" else "latents"
            raise UserInputError(
                f"{graph} input must be {what} [B, {channels}, 1, H, W] (one frame), got {list(shape)}"
            )

    def _plan(self, graph, shape):
        """(entry, profile, None) of the fastest engine that serves `shape`, or (None, None, reason)."""
        candidates, reason = self._candidates(graph, shape)
        return (*candidates[0], None) if candidates else (None, None, reason)

    def _candidates(self, graph, shape):
        """([(entry, profile)] of the engines that serve `shape`, fastest first, and why none does when it is empty.

        Static folder: the pair built for the exact (height, width). Multi-profile folder: its multi-profile engine,
        with `choose_profile`'s profile. Mixed folder: a static pair whose shape is exactly `shape`, then the
        multi-profile engine."""
        entries = self._entries[graph]
        if not entries:
            return [], f"{self.engine_dir / MANIFEST_NAME} lists no {graph} engine"
        if not self.multi_profile:
            return self._static_candidates(graph, entries, shape)
        pairs = [e for e in entries if e.static_pair] if self.mixed else []
        dynamic = [e for e in entries if not e.static_pair] if self.mixed else entries[:1]
        found = [(e, e.profiles[0]) for e in pairs if e.profiles[0].contains(shape)]  # static: min == max
        reasons = []
        for entry in dynamic[:1]:
            profile = choose_profile(entry.profiles, shape)
            if profile is not None:
                found.append((entry, profile))
            else:
                ranges = "; ".join(p.describe() for p in entry.profiles)
                reasons.append(f"no profile of {entry.rel_path} contains input {list(shape)} (profiles: {ranges})")
        if found:
            return found, None
        scale = entries[0].scale
        if pairs:
            built = ", ".join(image_size(e.profiles[0].opt, scale) for e in pairs)
            reasons.append(f"no static pair of input {list(shape)} (static pairs, HxW: {built})")
        reason = "; ".join(reasons)
        largest = [max(p.max[i] for e in entries for p in e.profiles) for i in (3, 4)]
        if shape[3] > largest[0] or shape[4] > largest[1]:
            reason = (f"image size {image_size(shape, scale)} (HxW) is past the largest {self.engine_dir} serves "
                      f"({image_size((0, 0, 0, *largest), scale)}): {reason}")
        return [], reason

    def _static_candidates(self, graph, entries, shape):
        """`_candidates` of a static folder (or a mixed folder's static pairs, with `multi_profile=False`)."""
        for entry in entries:
            profile = entry.profiles[0]
            if profile.opt[SPATIAL] == shape[SPATIAL]:
                if not profile.contains(shape):
                    return [], f"static engine {entry.rel_path} takes input {list(profile.opt)}, got {list(shape)}"
                return [(entry, profile)], None
        scale = entries[0].scale
        built = ", ".join(f"{e.profiles[0].name} {image_size(e.profiles[0].opt, scale)}" for e in entries)
        return [], (
            f"no static engine in {self.engine_dir} for image size {image_size(shape, scale)} "
            f"(HxW; {graph} input {list(shape)}; built: {built})"
        )

    def _serving(self, graph, shape):
        """(entry, profile, active runner, None) of the fastest engine that serves `shape` and can run here (a faster
        one that cannot is skipped, its reason logged once), else (None, None, None, reason)."""
        candidates, reason = self._candidates(graph, shape)
        for index, (entry, profile) in enumerate(candidates):
            runner, reason = self._runner_for(entry, profile)
            if runner is not None:
                return entry, profile, runner, None
            if index + 1 < len(candidates):
                self._warn_once(f"{graph}: {reason}; {candidates[index + 1][0].rel_path} serves instead")
        return None, None, None, reason

    def _warn_once(self, message):
        with self._lock:
            if message in self._warned:
                return
            self._warned.add(message)
        logger.warning("%s", message)

    # ------------------------------------------------------------------ PyTorch fallback

    def _fallback(self, graph, x, reason):
        if not self.allow_fallback:
            raise EngineUnavailableError(reason)
        with self._lock:
            self.fallback_counts[reason] += 1
            if reason not in self._warned:
                self._warned.add(reason)
                logger.warning("%s: using the PyTorch 2-D model instead of an engine: %s", graph, reason)
        self.last_route[graph] = Route("pytorch", reason=reason)
        try:
            with self._cuda_work():
                return self._fallback_model(graph, x.to(device=self.device, dtype=self.dtype)).to(dtype=x.dtype)
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            size = image_size(tuple(x.shape), 1 if graph == "encoder" else 8)
        raise FallbackOutOfMemoryError(
            f"{graph} at image size {size} (HxW) ran out of memory in the PyTorch fallback ({reason}); "
            "build engines that serve this size, or use tiles (tiling=True)"
        )
