"""Loading AOTInductor packages: the direct loader, weights attached at load time, and the Polygraphy-style runner.

The direct loader (`AOTIModelPackageLoader`), not `torch._inductor.aoti_load_package`, whose first call in a
process spends 34-60 s compiling and probing a test program for every CPU vector ISA only to print a warning
(measured on an H100 host; the direct loader takes ~32 ms). That also skips torch's own device check, so
`InductorBackend.unavailable_reason` compares the manifest's torch version, CUDA version and compute capability
with this process before anything is loaded.
"""

import ctypes
import os
import sys
import time
from collections import OrderedDict
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
        cuda_graphs=cuda_graphs,
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
    """

    def __init__(self, engine_path, device, dtype, input_name, output_name, shape, weights, name=None,
                 channels_last=False, cuda_graphs=False):
        if cuda_graphs and device.type != "cuda":
            raise UserInputError(f"CUDA graphs need a CUDA device and {engine_path.name} runs on {device}; "
                                 "drop cuda_graphs (--cuda-graphs)")
        self.engine_path, self.device, self.dtype = engine_path, device, dtype
        self.input_name, self.output_name, self.shape = input_name, output_name, shape
        self.weights = weights  # FolderWeights for a weight-free package, else None
        self.channels_last = channels_last  # the package takes 4-D weights channels-last
        self.cuda_graphs = cuda_graphs
        self.name = name or engine_path.name
        self.loader = None
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

        loader = load_package(self.engine_path, self.device, single_threaded=self.cuda_graphs)
        if self.weights is not None:
            attach_weights(loader, self.weights.tensors(self.device, self.channels_last), self.engine_path)
        self.loader = loader
        self.call = lambda x: loader.run([x])[0]  # noqa: E731
        if self.cuda_graphs:
            self.call = GraphedCall(self.call)

    def deactivate(self):
        self.loader = self.call = None

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

    def infer(self, feed_dict, check_inputs=True, copy_outputs_to_host=True):
        """{output name: tensor} for {input name: tensor}; outputs stay on the device unless copied."""
        import torch

        x = torch.as_tensor(feed_dict[self.input_name])
        if check_inputs and (x.dtype != self.dtype or not _shape_fits(tuple(x.shape), self.shape)):
            raise UserInputError(f"{self.name} takes {self.dtype} {self.shape}, got {x.dtype} {list(x.shape)}")
        x = x.to(device=self.device, dtype=self.dtype).contiguous()
        start = time.perf_counter()
        out = self.call(x)
        self.inference_time = time.perf_counter() - start
        return OrderedDict([(self.output_name, out.cpu() if copy_outputs_to_host else out)])

    def last_inference_time(self):
        return self.inference_time


def _shape_fits(shape, expected):
    return len(shape) == len(expected) and all(e < 0 or e == s for s, e in zip(shape, expected))
