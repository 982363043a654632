"""`VaeRuntime`: encode and decode through vaebuild's engines, exact PyTorch 2-D model as fallback.

It serves every folder `vaebuild static` and `vaebuild multiprofile` write, whatever the backend: each engine is
loaded and run through its backend (`vaebuild.backends`), which this module never branches on; `folder` reads the
manifest and chooses profiles, `fallback` builds the PyTorch model, `tiling` runs exact tiles. The I/O contract
(LightX2V's), dispatch, residency under a memory budget, shared weights, CUDA graphs, the fallback's reasons and
the thread guarantees are documented in docs/runtime.md; each method's docstring says its part.
"""

import logging
import threading
import time
from collections import Counter, OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from vaebuild.backends import get_backend
from vaebuild.errors import UserInputError, VaebuildError, one_line
from vaebuild.manifest import MANIFEST_NAME
from vaebuild.model import GRAPHS
from vaebuild.runtime.fallback import FallbackModel
from vaebuild.runtime.folder import SPATIAL, choose_profile, image_size, read_engine_dir

logger = logging.getLogger("vaebuild.runtime")


class EngineUnavailableError(VaebuildError):
    """No engine can serve this call (raised instead of falling back when `allow_fallback=False`)."""


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


class _ProfileError(Exception):
    """Selecting an engine's profile failed (the message is the whole reason)."""


class VaeRuntime:
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
            engine serves when the folder holds tile engines (`--tile`).
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
        self._reasons = {}  # rel_path -> why it cannot run here (None: it can)
        self._runners = OrderedDict()  # rel_path -> active runner, least recently used first
        self._runner_profile = {}  # rel_path -> active profile index
        self._failed = {}  # rel_path -> reason; never retried
        self._ooms_seen = _cuda_oom_count(self.device)  # the allocator's out-of-memory count when last looked at
        self._warned = set()
        self.load_seconds = {}  # rel_path -> seconds of its most recent load
        self.engine_bytes = {}  # rel_path -> memory its most recent load took
        self.fallback_counts = Counter()  # reason -> number of calls served by PyTorch for it
        self.last_route = _Routes()  # graph -> Route of its most recent call (any thread); .mine(graph): this thread's
        self._lock = threading.RLock()  # residency, failures, counters, warnings (see the module doc: Threads)
        self._idle = threading.Condition(self._lock)  # notified when a call stops using its engine
        self._in_use = Counter()  # rel_path -> calls now using its runner (it is released only at 0)
        self._engine_locks = {rel: threading.Lock() for rel in self._by_path}  # one call of an engine at a time
        self._engine_events = {}  # rel_path -> CUDA event recorded after its last call's outputs were copied
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

    def load(self, rel_path):
        """Load one engine (its first profile) unless it is in memory; EngineUnavailableError says why it cannot."""
        entry = self._by_path.get(rel_path)
        if entry is None:
            raise UserInputError(f"{self.engine_dir / MANIFEST_NAME} lists no engine {rel_path!r}")
        runner, reason = self._runner_for(entry, entry.profiles[0])
        if runner is None:
            raise EngineUnavailableError(reason)

    def load_all(self):
        """Load every engine of the folder now (each with its first profile); failures fall back later."""
        for entry in self._by_path.values():
            with self._lock:
                if entry.rel_path not in self._runners:
                    self._runner_for(entry, entry.profiles[0])

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

    def release(self):
        """Deactivate every engine in memory (they load again on their next use) and drop the shared weights.

        Calls of other threads that are using an engine finish first."""
        with self._lock:
            for rel_path in list(self._runners):
                self._release(rel_path)
            if self.weights is not None and not self._runners:  # (another thread may have loaded one meanwhile)
                self.weights.release()

    close = release

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.release()

    def __del__(self):
        if getattr(self, "_runners", None):
            try:
                self.release()
            except Exception:  # interpreter shutdown: the runtime may already be gone
                pass

    @property
    def resident_engines(self):
        """Relative paths of the engines now in memory, least recently used first."""
        with self._lock:
            return tuple(self._runners)

    @property
    def resident_bytes(self):
        """Memory the engines now in memory took at their loads (shared weights: with the first that needed them)."""
        with self._lock:
            return sum(self.engine_bytes.get(rel, 0) for rel in self._runners)

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
                    reason = self._run_failed(entry, err)
                else:
                    self.last_route[graph] = Route("engine", entry.rel_path, profile.index)
                    return out
            return self._fallback(graph, x, reason)

    def _run_failed(self, entry, err):
        """Why a call of `entry` that raised `err` is not served by it. Out of memory is transient (the call's own
        buffers: they are freed as the error unwinds): the engine stays loaded and serves the next call. Any other
        error marks the engine failed (never retried) and releases it."""
        if isinstance(err, EngineUnavailableError):  # released by another thread, and loading it again failed
            return str(err)
        with self._lock:
            ooms, self._ooms_seen = self._ooms_seen, _cuda_oom_count(self.device)
        if _is_out_of_memory(err) or self._ooms_seen > ooms:
            logger.info("running %s ran out of memory (it stays loaded): %s", entry.rel_path, one_line(err))
            return (f"running {entry.rel_path} ran out of memory ({type(err).__name__}); "
                    "it stays loaded for the next call")
        reason = str(err) if isinstance(err, _ProfileError) else (
            f"running {entry.rel_path} failed: {one_line(err, with_type=True)}")
        with self._lock:
            self._failed[entry.rel_path] = reason
            self._release(entry.rel_path)
        return reason

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

    def _runner_for(self, entry, profile):
        """(active runner, None) or (None, reason); loads lazily within the memory budget (loaded with `profile`;
        `_infer` switches a resident runner's profile, under the engine's lock)."""
        with self._lock:
            while True:
                if entry.rel_path in self._failed:
                    return None, self._failed[entry.rel_path]
                if not entry.path.is_file():
                    return None, f"engine file missing: {entry.path}"
                reason = self._unavailable(entry)
                if reason:
                    return None, f"{entry.backend} engines cannot run here: {reason}"
                runner = self._runners.get(entry.rel_path)
                if runner is not None:
                    self._runners.move_to_end(entry.rel_path)
                    return runner, None
                if self._make_room(self.engine_bytes.get(entry.rel_path, entry.path.stat().st_size)):
                    return self._load(entry, profile)
                # Making room waited for other threads' calls, which may have loaded or failed this engine: look again.

    def _load(self, entry, profile):
        """Activate one engine (the runtime's lock held, room made)."""
        try:
            runner, seconds, used = self._activate(entry, profile)
        except Exception as err:  # foreign runtime: CUDA OOM, deserialization errors, ...
            if not (_is_out_of_memory(err) and self._runners):
                reason = f"loading {entry.rel_path} failed: {one_line(err, with_type=True)}"
                self._failed[entry.rel_path] = reason
                return None, reason
            logger.info("out of memory loading %s: releasing %d engine(s) and trying again",
                        entry.rel_path, len(self._runners))
            self.release()
            return self._runner_for(entry, profile)
        self._runners[entry.rel_path] = runner
        self._runner_profile[entry.rel_path] = profile.index
        self.load_seconds[entry.rel_path] = seconds
        self.engine_bytes[entry.rel_path] = used
        logger.info("loaded %s (profile %d, %s) in %.3f s, %.1f MB", entry.rel_path, profile.index, profile.name,
                    seconds, used / 1e6)
        return runner, None

    def _activate(self, entry, profile):
        """(active runner, seconds, bytes it took) for one engine; raises what the backend raised."""
        import torch

        on_cuda = self.device.type == "cuda"
        with self._cuda_work():
            if on_cuda:
                torch.cuda.synchronize(self.device)
                free_before = torch.cuda.mem_get_info(self.device)[0]
            start = time.perf_counter()
            runner = self._runner_factory(entry.path, entry.backend, profile.index)
            try:
                runner.activate()
            except BaseException:
                if getattr(runner, "is_active", False):
                    runner.deactivate()
                raise
            if on_cuda:
                torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - start
            if on_cuda:
                used = max(0, free_before - torch.cuda.mem_get_info(self.device)[0])
            else:
                used = entry.path.stat().st_size
        return runner, seconds, used

    def _cuda_work(self):
        """With CUDA graphs: the process's lock of packages' CUDA work, shared (a graph capture holds it exclusively:
        `backends.inductor.load.CUDA_WORK`); otherwise nothing."""
        if not self.cuda_graphs:
            return nullcontext()
        from vaebuild.backends.inductor.load import CUDA_WORK

        return CUDA_WORK.shared()

    def _make_room(self, needed):
        """Release least recently used engines (idle ones first) until `needed` more bytes fit the memory budget.

        False if that waited for calls of other threads (the caller looks at what is loaded again), else True."""
        if self.memory_budget is None:
            return True
        while self._runners and self.resident_bytes + needed > self.memory_budget:
            oldest = next((rel for rel in self._runners if not self._in_use[rel]), None) or next(iter(self._runners))
            logger.info("memory budget %d bytes: releasing %s", self.memory_budget, oldest)
            if self._release(oldest):
                return False
        return True

    def _release(self, rel_path):
        """Deactivate one engine once no call uses it (calls of other threads finish first); True if it waited."""
        with self._lock:
            waited = False
            while self._in_use[rel_path]:
                waited = True
                self._idle.wait()
            runner = self._runners.pop(rel_path, None)
            self._runner_profile.pop(rel_path, None)
            self._engine_events.pop(rel_path, None)
            if runner is not None:
                runner.deactivate()
                logger.info("released %s", rel_path)
            return waited

    def _unavailable(self, entry):
        if entry.rel_path not in self._reasons:
            if self._injected_reason is not None:
                self._reasons[entry.rel_path] = self._injected_reason(entry.backend)
            else:
                self._reasons[entry.rel_path] = get_backend(entry.backend).unavailable_reason(entry.raw, self.device)
        return self._reasons[entry.rel_path]

    def _backend_runner(self, engine_path, backend, profile_index):
        entry = self._by_path[Path(engine_path).relative_to(self.engine_dir).as_posix()]
        return get_backend(backend).load_runner(
            engine_path, entry.raw, profile_index, weights=self.weights, device=self.device, cuda_graphs=self.cuda_graphs
        )

    def _infer(self, runner, entry, x, profile=None):
        """The engine's output for `x` (a copy, in x's dtype), `runner` switched to `profile` (default: the first).

        From many threads: the call holds the engine's lock (one call of an engine at a time, from the profile switch
        to the copy of the outputs) and marks the engine in use, so it is not released under it. A runner released
        by another thread since it was looked up is looked up (loaded) again; EngineUnavailableError if that fails."""
        from vaebuild.model.precision import get_precision

        rel = entry.rel_path
        profile = profile or entry.profiles[0]
        feed = x.to(device=self.device, dtype=get_precision(entry.precision).dtype).contiguous()
        with self._lock:
            if self._runners.get(rel) is not runner:
                runner, reason = self._runner_for(entry, profile)
                if runner is None:
                    raise EngineUnavailableError(reason)
            self._in_use[rel] += 1
            lock = self._engine_locks.setdefault(rel, threading.Lock())
        try:
            with lock:
                return self._call_engine(runner, entry, feed, profile, x.dtype)
        finally:
            with self._lock:
                self._in_use[rel] -= 1
                if not self._in_use[rel]:
                    del self._in_use[rel]
                self._idle.notify_all()

    def _call_engine(self, runner, entry, feed, profile, dtype):
        """One call of the engine on `feed` (on the device, in its precision; the engine's lock held): a copy of its
        output in `dtype`."""
        import torch

        rel = entry.rel_path
        if self._runner_profile.get(rel) != profile.index:
            try:
                runner.set_profile(profile.index)
            except Exception as err:
                raise _ProfileError(
                    f"selecting profile {profile.index} of {rel} failed: {one_line(err, with_type=True)}") from None
            self._runner_profile[rel] = profile.index
        guard = getattr(runner, "call_guard", None)  # AOTInductor packages on CUDA: the process's CUDA graph captures
        with guard(feed) if guard is not None else nullcontext():
            stream = torch.cuda.current_stream(feed.device) if feed.is_cuda else None
            if stream is not None:
                done = self._engine_events.get(rel)
                if done is not None:  # the previous call, maybe on another thread's stream, copied its outputs out
                    stream.wait_event(done)
                if not get_backend(entry.backend).runs_on_caller_stream:
                    # The runner works on its own stream: make the input's producers finish first.
                    stream.synchronize()
            outputs = runner.infer({entry.input_name: feed}, copy_outputs_to_host=False)
            # Runners may reuse their output buffers between calls (a CUDA graph's): always return a copy.
            out = torch.as_tensor(outputs[entry.output_name]).to(dtype=dtype, copy=True)
            if stream is not None:
                self._engine_events.setdefault(rel, torch.cuda.Event()).record(stream)
        return out

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
            if not _is_out_of_memory(err):
                raise
            size = image_size(tuple(x.shape), 1 if graph == "encoder" else 8)
        raise FallbackOutOfMemoryError(
            f"{graph} at image size {size} (HxW) ran out of memory in the PyTorch fallback ({reason}); "
            "build engines that serve this size, or use tiles (tiling=True)"
        )


def _is_out_of_memory(err):
    text = str(err).lower()
    return "out of memory" in text or "outofmemory" in type(err).__name__.lower()


def _cuda_oom_count(device):
    """How often torch's CUDA caching allocator on `device` has run out of memory in this process (0 off CUDA).
    An AOTInductor package whose run fails on an allocation raises a RuntimeError naming only the failed API call (the
    out-of-memory message goes to stderr), so a rise of this count is what tells that failure from a fault."""
    if device.type != "cuda":
        return 0
    import torch

    return torch.cuda.memory_stats(device).get("num_ooms", 0)


