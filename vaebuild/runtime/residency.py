"""Engines in memory for `VaeRuntime`: loads within the memory budget, least-recently-used release, failure
records, and one call of an engine at a time from any thread (docs/runtime.md: Residency, Run-time failures, Threads).

`EngineResidency` is a base class of `VaeRuntime`: `_init_residency` sets up its state, and its methods also use what
the runtime sets before that (`engine_dir`, `device`, `weights`, `memory_budget`, `cuda_graphs`, `_by_path`,
`_runner_factory`, `_injected_reason`).
"""

import logging
import threading
import time
from collections import Counter, OrderedDict
from contextlib import nullcontext
from pathlib import Path

from vaebuild.backends import get_backend
from vaebuild.errors import UserInputError, VaebuildError, one_line
from vaebuild.manifest import MANIFEST_NAME

logger = logging.getLogger("vaebuild.runtime")


class EngineUnavailableError(VaebuildError):
    """No engine can serve this call (raised instead of falling back when `allow_fallback=False`)."""


class _ProfileError(Exception):
    """Selecting an engine's profile failed (the message is the whole reason)."""


class EngineResidency:
    """Which engines are in memory, and the calls of them (see the module doc)."""

    def _init_residency(self):
        self._reasons = {}  # rel_path -> why it cannot run here (None: it can)
        self._runners = OrderedDict()  # rel_path -> active runner, least recently used first
        self._runner_profile = {}  # rel_path -> active profile index
        self._failed = {}  # rel_path -> reason; never retried
        self._ooms_seen = cuda_oom_count(self.device)  # the allocator's out-of-memory count when last looked at
        self.load_seconds = {}  # rel_path -> seconds of its most recent load
        self.engine_bytes = {}  # rel_path -> memory its most recent load took
        self._lock = threading.RLock()  # residency and failures, and the runtime's counters and warnings
        self._idle = threading.Condition(self._lock)  # notified when a call stops using its engine
        self._in_use = Counter()  # rel_path -> calls now using its runner (it is released only at 0)
        self._engine_locks = {rel: threading.Lock() for rel in self._by_path}  # one call of an engine at a time
        self._engine_events = {}  # rel_path -> CUDA event recorded after its last call's outputs were copied

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

    def _run_failed(self, entry, err):
        """(why a call of `entry` that raised `err` is not served by it, whether it ran out of memory). Out of memory
        is transient (the call's own buffers: they are freed as the error unwinds): the engine stays loaded and
        serves the next call. Any other error marks the engine failed (never retried) and releases it."""
        if isinstance(err, EngineUnavailableError):  # released by another thread, and loading it again failed
            return str(err), False
        with self._lock:
            ooms, self._ooms_seen = self._ooms_seen, cuda_oom_count(self.device)
        if is_out_of_memory(err) or self._ooms_seen > ooms:
            logger.info("running %s ran out of memory (it stays loaded): %s", entry.rel_path, one_line(err))
            return (f"running {entry.rel_path} ran out of memory ({type(err).__name__}); "
                    "it stays loaded for the next call"), True
        reason = str(err) if isinstance(err, _ProfileError) else (
            f"running {entry.rel_path} failed: {one_line(err, with_type=True)}")
        with self._lock:
            self._failed[entry.rel_path] = reason
            self._release(entry.rel_path)
        return reason, False

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
            if not (is_out_of_memory(err) and self._runners):
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


def is_out_of_memory(err):
    text = str(err).lower()
    return "out of memory" in text or "outofmemory" in type(err).__name__.lower()


def cuda_oom_count(device):
    """How often torch's CUDA caching allocator on `device` has run out of memory in this process (0 off CUDA).
    An AOTInductor package whose run fails on an allocation raises a RuntimeError naming only the failed API call (the
    out-of-memory message goes to stderr), so a rise of this count is what tells that failure from a fault."""
    if device.type != "cuda":
        return 0
    import torch

    return torch.cuda.memory_stats(device).get("num_ooms", 0)
