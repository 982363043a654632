"""Loading AOTInductor packages: the direct loader, weights attached at load time, and the Polygraphy-style runner.

The direct loader (`AOTIModelPackageLoader`), not `torch._inductor.aoti_load_package`, whose first call in a
process spends 34-60 s compiling and probing a test program for every CPU vector ISA only to print a warning
(measured on an H100 host; the direct loader takes ~32 ms). That also skips torch's own device check, so
`InductorBackend.unavailable_reason` compares the manifest's torch version, CUDA version and compute capability
with this process before anything is loaded.

Threads: `PackageRunner.infer` serializes the calls of one package behind a Python lock. Without it, 8 threads
calling one package hang for good: torch's binding of `AOTIModelPackageLoader.run` keeps the GIL for the whole
native run, the loader's model container holds one model (`num_runners=1`), and a second caller waits for that
model on a condition variable (`AOTInductorModelContainer::get_available_model` -> `reclaim_finished_models`,
model_container.h) while holding the GIL, which the first caller needs back to run vaebuild's ops, whose kernels
are Python functions called through the proxy executor (`vaebuild/kernels/attention.py`, `conv_norm.py`). Waiting
on a Python lock instead releases the GIL. Different packages may run at once (each has its own container).

Faults: a package whose size or sha256 differ from its manifest entry is refused before the native loader opens
it: the loader checks no CRC, so a package with corrupted code kills the process with SIGSEGV, SIGILL or SIGTRAP
(seen with bytes overwritten in the `.text` of the package's `wrapper.so`; bytes changed where nothing reads them
went unnoticed).
"""

import ctypes
import hashlib
import os
import sys
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from pathlib import Path

from vaebuild.errors import UserInputError


def promote_libstdcxx():
    """Put the libstdc++ torch already loaded into the global symbol scope (once, before loading packages).

    Why: a `wrapper.so` linked by a g++ that embeds libstdc++ (seen on an H100 host image whose
    inductor compiler is /opt/gcc/bin/g++) carries its own copy of the C++ runtime. Python loads torch's
    extension RTLD_LOCAL, so the package's std::regex (in `parse_device_str`) then binds the embedded
    copy's locale state while libtorch uses the shared one, and the first load segfaults. Promoting the
    already-loaded library makes every package bind the one copy. RTLD_NOLOAD: never loads a new one.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libstdc++.so.6", mode=os.RTLD_GLOBAL | os.RTLD_NOLOAD)
    except OSError:  # torch linked the C++ runtime statically: nothing to promote
        pass


class SharedExclusiveLock:
    """Many holders in shared mode or one in exclusive mode (waiting exclusive holders go first).

    A thread that holds it shared may take it shared again (nested); it must not ask for it exclusively.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = None  # the thread holding it exclusively
        self._waiting = 0  # threads waiting to hold it exclusively
        self._depth = threading.local()  # this thread's nesting of shared holds

    @contextmanager
    def shared(self):
        depth = getattr(self._depth, "n", 0)
        if depth or self._exclusive is threading.current_thread():
            self._depth.n = depth + 1
            try:
                yield
            finally:
                self._depth.n = depth
            return
        with self._cond:
            while self._exclusive is not None or self._waiting:
                self._cond.wait()
            self._shared += 1
        self._depth.n = 1
        try:
            yield
        finally:
            self._depth.n = 0
            with self._cond:
                self._shared -= 1
                if not self._shared:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self):
        if getattr(self._depth, "n", 0):
            raise RuntimeError("a thread holding the lock shared asked for it exclusively (it would wait for itself)")
        with self._cond:
            self._waiting += 1
            try:
                while self._exclusive is not None or self._shared:
                    self._cond.wait()
            finally:
                self._waiting -= 1
            self._exclusive = threading.current_thread()
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = None
                self._cond.notify_all()


# CUDA work of packages in this process: loads and calls hold it shared, a CUDA-graph capture (the first call of a
# shape with cuda_graphs) exclusively, because torch captures in the "global" mode, in which another thread's
# cudaMalloc, synchronisation or event query during the capture fails and invalidates the graph.
CUDA_WORK = SharedExclusiveLock()


def check_package(path, sha256=None, size_bytes=None):
    """Raise UserInputError (one line) unless the file at `path` has the size and sha256 its manifest entry records.

    Run before the native loader opens a package: it checks no CRC, and corrupted code can kill the process.
    """
    path = Path(path)
    size = path.stat().st_size
    if size_bytes is not None and size != size_bytes:
        raise UserInputError(f"{path}: contents differ from the manifest ({size} bytes, it records {size_bytes}: "
                             "truncated or replaced); rebuild the folder")
    if sha256 is not None:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(8 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != sha256:
            raise UserInputError(f"{path}: contents differ from the manifest's sha256 {sha256[:12]}... "
                                 "(corrupt or replaced); rebuild the folder")


def load_package(path, device, single_threaded=False):
    """The loader of the AOTInductor package at `path` (no ISA probe, no device check, no torch._inductor).

    torch's `AOTICompiledModel` wrapper is not used: importing `torch._inductor` for it costs 2-4 s in
    a fresh process, and these packages take one tensor and return one (`loader.run([x])[0]`).
    `single_threaded=True` drops the model container's run bookkeeping (a CUDA event it queries before each
    run), which CUDA-graph capture forbids; such a loader must not be run from two threads at once.
    """
    import torch

    from vaebuild.kernels import register_ops

    register_ops()  # packages call vaebuild's ops by name
    promote_libstdcxx()
    device = torch.device(device)
    index = -1
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
    return torch._C._aoti.AOTIModelPackageLoader(str(path), "model", single_threaded, 1, index)


FOLDED_CONSTANT_PREFIX = "_FOLDED_CONST_"  # torch._inductor.compile_fx names run-time folded constants so


def attach_weights(loader, tensors, where):
    """Point a weight-free package's constants at `tensors` (no copy); one-line error for a missing name.

    Constants that inductor derives from the weights (named `_FOLDED_CONST_*`, e.g. the transposed
    upsamplers' 4x4 kernels) are not given: the package computes them from ours on its first run.
    """
    names = [name for name in loader.get_constant_fqns() if not name.startswith(FOLDED_CONSTANT_PREFIX)]
    missing = [name for name in names if name not in tensors]
    if missing:
        raise UserInputError(
            f"the weights for {where} have no tensor {missing[0]!r} ({len(missing)} of {len(names)} missing); "
            "rebuild the folder or pass weights of this architecture"
        )
    # (constants, use_inactive, check_full_update, user_managed): the package keeps pointers to our tensors.
    loader.load_constants({name: tensors[name] for name in names}, False, True, True)


def make_runner(engine_path, entry, weights, device, name=None, cuda_graphs=False):
    """A `PackageRunner` for one package of `entry` (not yet activated)."""
    import torch

    from vaebuild.model.precision import get_precision

    ranges = [p["input"] for p in entry["profiles"]]
    # -1 marks an axis that varies within the profiles (Polygraphy accepts any size there).
    shape = [ranges[0]["min"][a] if all(r["min"][a] == r["max"][a] == ranges[0]["min"][a] for r in ranges) else -1
             for a in range(len(ranges[0]["min"]))]
    return PackageRunner(
        Path(engine_path), torch.device(device or entry.get("device", "cpu")), get_precision(entry["precision"]).dtype,
        entry["input"], entry["output"], shape, weights if entry.get("weights") == "folder" else None, name,
        channels_last=entry.get("weight_layout") == "channels_last",  # absent: packages built before the field
        cuda_graphs=cuda_graphs, sha256=entry.get("sha256"), size_bytes=entry.get("size_bytes"),
    )


class PackageRunner:
    """Runs one AOTInductor package on torch tensors, with Polygraphy's runner interface (activate / infer /
    set_profile / deactivate / get_input_metadata / last_inference_time, a context manager), so
    Polygraphy's `Comparator` runs it as it runs a `TrtRunner`.

    Not a `polygraphy.backend.base.BaseRunner` subclass: importing Polygraphy would add tens of
    milliseconds to the first package load of a process, and the runtime never needs it.

    `cuda_graphs=True` (CUDA only) loads the package single-threaded and replays its calls from one CUDA
    graph per input shape (`vaebuild.backends.inductor.cuda_graph.GraphedCall`): the first call of a shape captures, later
    ones only copy the input in; outputs are the graph's buffers, overwritten by the next call.

    Threads: `infer` runs one call at a time (a lock: see the module doc); callers that read the outputs after
    `infer` returns, as `VaeRuntime` does, serialize their own calls too (a graph's outputs are overwritten by the
    next call) and hold `call_guard(x)` around each. `sha256` / `size_bytes` (the manifest entry's) are checked at
    `activate`, before the native loader opens the file.
    """

    def __init__(self, engine_path, device, dtype, input_name, output_name, shape, weights, name=None,
                 channels_last=False, cuda_graphs=False, sha256=None, size_bytes=None):
        if cuda_graphs and device.type != "cuda":
            raise UserInputError(f"CUDA graphs need a CUDA device and {engine_path.name} runs on {device}; "
                                 "drop cuda_graphs (--cuda-graphs)")
        self.engine_path, self.device, self.dtype = engine_path, device, dtype
        self.input_name, self.output_name, self.shape = input_name, output_name, shape
        self.weights = weights  # FolderWeights for a weight-free package, else None
        self.channels_last = channels_last  # the package takes 4-D weights channels-last
        self.cuda_graphs = cuda_graphs
        self.sha256, self.size_bytes = sha256, size_bytes
        self.name = name or engine_path.name
        self._lock = threading.Lock()  # one call of the package at a time
        self.loader = None
        self._constants = None  # the weights a weight-free package points to
        self.call = None  # loader.run on one input, or its GraphedCall
        self.inference_time = None

    @property
    def is_active(self):
        return self.loader is not None

    def activate(self):
        """Load the package (and point a weight-free one at the folder's shared weights)."""
        if not self.engine_path.is_file():
            raise UserInputError(f"package file not found: {self.engine_path}")
        from vaebuild.backends.inductor.cuda_graph import GraphedCall

        check_package(self.engine_path, self.sha256, self.size_bytes)
        with CUDA_WORK.shared() if self.device.type == "cuda" else nullcontext():
            loader = load_package(self.engine_path, self.device, single_threaded=self.cuda_graphs)
            constants = None
            if self.weights is not None:
                constants = self.weights.tensors(self.device, self.channels_last)
                attach_weights(loader, constants, self.engine_path)
        # The package keeps raw pointers to the weights (user-managed constants): hold them while it is active.
        self._constants = constants
        self.loader = loader
        self.call = lambda x: loader.run([x])[0]  # noqa: E731
        if self.cuda_graphs:
            self.call = GraphedCall(self.call)

    def deactivate(self):
        self.loader = self.call = self._constants = None

    def __enter__(self):
        self.activate()
        return self

    def __exit__(self, *exc_info):
        self.deactivate()

    def get_input_metadata(self, use_numpy_dtypes=False):
        """Polygraphy `TensorMetadata` of the one input (for `Comparator`)."""
        from polygraphy.common import TensorMetadata
        from polygraphy.datatype import DataType

        return TensorMetadata().add(self.input_name, DataType.from_dtype(self.dtype), self.shape)

    def set_profile(self, index):
        """Every profile of a package is served by the same code: nothing to switch."""

    def will_capture(self, x):
        """Whether a call on `x` captures a CUDA graph (the first call of its shape and dtype with cuda_graphs)."""
        from vaebuild.backends.inductor.cuda_graph import GraphedCall

        call = self.call
        if not isinstance(call, GraphedCall):
            return False
        shape = tuple(x.shape)
        return not any(key[0] == shape and key[1] == self.dtype for key in list(call._graphs))

    def call_guard(self, x):
        """What to hold around a call on `x` and the reading of its outputs, for threads: on CUDA, `CUDA_WORK` shared,
        or exclusive when the call captures a graph; on a CPU nothing."""
        if self.device.type != "cuda":
            return nullcontext()
        return CUDA_WORK.exclusive() if self.will_capture(x) else CUDA_WORK.shared()

    def infer(self, feed_dict, check_inputs=True, copy_outputs_to_host=True):
        """{output name: tensor} for {input name: tensor}; outputs stay on the device unless copied."""
        import torch

        x = torch.as_tensor(feed_dict[self.input_name])
        if check_inputs and (x.dtype != self.dtype or not _shape_fits(tuple(x.shape), self.shape)):
            raise UserInputError(f"{self.name} takes {self.dtype} {self.shape}, got {x.dtype} {list(x.shape)}")
        x = x.to(device=self.device, dtype=self.dtype).contiguous()
        with self._lock:  # see the module doc: never two threads in one package's run
            call = self.call
            if call is None:
                raise UserInputError(f"{self.name} is not active (released); activate it again")
            start = time.perf_counter()
            out = call(x)
            self.inference_time = time.perf_counter() - start
            return OrderedDict([(self.output_name, out.cpu() if copy_outputs_to_host else out)])

    def last_inference_time(self):
        return self.inference_time


def _shape_fits(shape, expected):
    return len(shape) == len(expected) and all(e < 0 or e == s for s, e in zip(shape, expected))
