"""AOTInductor packages: the single-frame 2-D graphs compiled ahead of time into `.pt2` files.

Build: `torch.export` of the graph module at the profile's opt shape (height and width symbolic
within the profiles' min..max when they differ; the encoder's sides as multiples of 8), then
`torch._inductor.aoti_compile_and_package`. Static packages run the mid-block attention through
`vaebuild::attention_d384` (the kernels of `vaebuild.attention` on Hopper, SDPA elsewhere) and, from 1024x768
image pixels on (`builds.FUSED_NORM_MIN_PIXELS`), the 96-channel residual blocks' conv1 -> norm2 -> SiLU through
`vaebuild::conv3x3_rms_silu` (and the encoder's block before a downsampler `conv3x3_add`; `vaebuild.conv_norm`: a Gluon
kernel on Hopper, diffusers' computation elsewhere): custom ops that the package calls by name at run time; every package computes
the upsamplers as transposed convolutions and the convolutions from and to RGB over their taps
(`single_frame`'s `conv_rewrites`), with its convolution weights channels-last (entry field
`weight_layout`: a weight-free package is given them in that layout), and CUDA packages tune their Triton kernels' launch settings by timing them while
compiling (inductor's coordinate descent: -1.9 ms on the 1328x1328 decoder on an H100, compile time about
1.8x). By default packages are compiled weight-free
(`aot_inductor.package_constants_in_so=False`): the folder's `weights.safetensors` holds one copy
that every package of the folder shares at load time (`weights_file.FolderWeights`).

Load: the direct loader (`AOTIModelPackageLoader`), not `torch._inductor.aoti_load_package`, whose
first call in a process spends 34-60 s compiling and probing a test program for every CPU vector
ISA only to print a warning (measured on an H100 host; the direct loader takes ~32 ms). That also
skips torch's own device check, so `unavailable_reason` compares the manifest's torch version, CUDA
version and compute capability with this process before anything is loaded.
"""

import ctypes
import os
import sys
import time
from collections import OrderedDict
from pathlib import Path

from vaebuild.backends.base import BuildOptions, EngineInfo, reject_options
from vaebuild.errors import UserInputError
from vaebuild.fileio import atomic_output, sha256_file

WEIGHT_LAYOUT = "channels_last"  # of the 4-D constants packages are compiled with (manifest entry "weight_layout")


class InductorBackend:
    """AOTInductor packages of the 2-D graphs, run in-process by torch."""

    name = "inductor"
    builds_from = "pytorch"
    file_suffix = ".pt2"
    runner_name = "inductor"
    runs_on_caller_stream = True
    # A package from another torch or GPU is judged by `unavailable_reason` ("not run"), not failed.
    version_mismatch_fails = False

    def check_options(self, options: BuildOptions) -> None:
        """Only device, embed_weights and jobs apply to packages."""
        reject_options(options, ("device", "embed_weights", "jobs"), self.name)

    def version(self) -> str:
        """The torch version: packages load only in the torch that compiled them."""
        import torch

        return torch.__version__

    def build_target(self, options: BuildOptions) -> dict:
        """What a package is compiled for (device, CUDA version, GPU); raises when this host cannot compile it."""
        import torch

        device = options.device or "cuda"
        if device == "cpu":
            return {"device": "cpu", "torch_version": torch.__version__}
        if not torch.cuda.is_available():
            raise UserInputError(
                "inductor packages for CUDA must be compiled on a CUDA GPU and none is visible here; "
                "build on the GPU that will run them, or pass --device cpu for CPU packages"
            )
        major, minor = torch.cuda.get_device_capability()
        return {
            "device": "cuda",
            "torch_version": torch.__version__,
            "cuda_version": torch.version.cuda,
            "gpu_name": torch.cuda.get_device_name(),
            "compute_capability": f"{major}.{minor}",
        }

    def build_engine(self, source, graph, engine_path, profiles, options) -> EngineInfo:
        """Compile the package of `graph` (in a worker process when the build runs several jobs)."""
        return compile_package(source.compile_request(graph, engine_path, profiles, options))

    def unavailable_reason(self, entry, device) -> str | None:
        """None if the package of `entry` can run on `device` in this process, else why not (one line)."""
        import torch

        device = torch.device(device)
        rel = entry["path"]
        if entry.get("torch_version") != torch.__version__:
            return (f"{rel} was compiled by torch {entry.get('torch_version')} and this is torch {torch.__version__}; "
                    "rebuild it with this torch")
        if entry.get("device") == "cpu":
            if device.type != "cpu":
                return f"{rel} is a CPU package and the runtime device is {device}; use device='cpu' or build with --device cuda"
            return None
        if device.type != "cuda" or not torch.cuda.is_available():
            return f"{rel} is a CUDA package and there is no CUDA device here (runtime device {device})"
        major, minor = torch.cuda.get_device_capability(device)
        if entry.get("compute_capability") != f"{major}.{minor}":
            return (f"{rel} was compiled for compute capability {entry.get('compute_capability')} "
                    f"({entry.get('gpu_name')}) and this GPU is {major}.{minor} ({torch.cuda.get_device_name(device)}); "
                    "rebuild it on this GPU")
        if entry.get("cuda_version") != torch.version.cuda:
            return (f"{rel} was compiled with CUDA {entry.get('cuda_version')} and this torch uses CUDA "
                    f"{torch.version.cuda}; rebuild it")
        return None

    def load_runner(self, engine_path, entry, profile_index=0, weights=None, name=None, device=None, cuda_graphs=False):
        """A Polygraphy runner for the package (any shape within its profiles; `weights`: FolderWeights;
        `cuda_graphs`: replay each input shape's calls from a CUDA graph)."""
        return make_runner(engine_path, entry, weights, device, name, cuda_graphs)


# ---------------------------------------------------------------------------------------- building


def compile_package(request) -> EngineInfo:
    """Export and compile one graph into an AOTInductor package; `request` comes from `BuildSource.compile_request`.

    Runs in a fresh worker process when a build uses several jobs, so it rebuilds the graph module
    from the architecture and the folder's weights file.
    """
    import torch

    from vaebuild.graphs import build_graph_modules_from_weights

    start = time.perf_counter()
    device = torch.device(request["device"])
    # Convolution rewrites (any shape): the upsamplers at 4/9 of their multiply-adds, the convolutions from and
    # to RGB over their taps.
    module = build_graph_modules_from_weights(
        request["vae_config"], request["weights_path"], request["precision"], device,
        fast_attention=request["fast_kernels"], conv_rewrites=True, fused_norms=request["fused_norms"],
    )[request["graph"]]
    # Convolution weights channels-last, the layout cuDNN's NHWC kernels take: else the package converts
    # each one on every call (and cuDNN copies the transposed convolutions' weights), 0.5 ms per decode.
    module = module.to(memory_format=torch.channels_last)
    dtype = next(module.parameters()).dtype
    example, dynamic_shapes = export_shapes(request["input_name"], request["profiles"], request["spatial_multiple"])
    with torch.no_grad():
        exported = torch.export.export(
            module, (torch.randn(example, device=device, dtype=dtype),), dynamic_shapes=dynamic_shapes, strict=False
        )
        engine_path = Path(request["engine_path"])
        with atomic_output(engine_path, suffix=".pt2") as tmp:
            torch._inductor.aoti_compile_and_package(
                exported,
                package_path=str(tmp),
                inductor_configs=package_configs(request["embed_weights"], device.type),
            )
    profiles = tuple({request["input_name"]: tuple(tuple(s) for s in p[request["input_name"]])}
                     for p in request["profiles"])
    return EngineInfo(
        backend="inductor",
        backend_version=torch.__version__,
        engine_path=engine_path,
        input_names=(request["input_name"],),
        output_names=(request["output_name"],),
        profiles=profiles,
        size_bytes=engine_path.stat().st_size,
        sha256=sha256_file(engine_path),
        build_seconds=time.perf_counter() - start,
        manifest_fields={"weights": "embedded" if request["embed_weights"] else "folder", "weight_layout": WEIGHT_LAYOUT},
    )


def package_configs(embed_weights, device_type):
    """Inductor settings of a package: weight-free unless `embed_weights`; CUDA packages coordinate-descent tuned.

    Weight-free packages also fold their constants at run time: with compile-time folding a package
    keeps tensors derived from the weights it was compiled with (seen on CPU: prepacked convolution
    weights), so another checkpoint given at load time would be mixed with stale copies of the first.
    """
    configs = {"coordinate_descent_tuning": True} if device_type == "cuda" else {}
    if embed_weights:
        return {**configs, "aot_inductor.package_constants_in_so": True}
    return {**configs, "aot_inductor.package_constants_in_so": False, "aot_inductor.use_runtime_constant_folding": True}


def export_shapes(input_name, profiles, spatial_multiple):
    """(example input shape, torch.export dynamic_shapes) covering every profile's min..max.

    Axes whose range is one value stay static. Height and width are `spatial_multiple * Dim` (the
    encoder takes multiples of 8). The example is the first profile's opt shape, moved off the sizes
    0 and 1 on dynamic axes (torch.export would specialize on them).
    """
    from torch.export import Dim

    ranges = [p[input_name] for p in profiles]
    low = [min(r[0][axis] for r in ranges) for axis in range(5)]
    high = [max(r[2][axis] for r in ranges) for axis in range(5)]
    example = list(ranges[0][1])
    axes = {}
    for axis, label in ((0, "batch"), (3, "height"), (4, "width")):
        if low[axis] == high[axis]:
            continue
        multiple = spatial_multiple if axis in (3, 4) else 1
        if low[axis] % multiple or high[axis] % multiple:
            raise UserInputError(f"{input_name} {label} range {low[axis]}..{high[axis]} must be multiples of {multiple}")
        dim = Dim(f"{label}_{multiple}", min=low[axis] // multiple, max=high[axis] // multiple)
        axes[axis] = dim * multiple if multiple > 1 else dim
        example[axis] = max(example[axis], 2 * multiple)
    return tuple(example), (axes or None,)


# ---------------------------------------------------------------------------------------- loading


def promote_libstdcxx():
    """Put the libstdc++ torch already loaded into the global symbol scope (once, before loading packages).

    Why: a `wrapper.so` linked by a g++ that embeds libstdc++ (seen on the lent H100 image, whose
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

    import vaebuild.attention  # noqa: F401 - registers `vaebuild::attention_d384`, which packages call by name
    import vaebuild.conv_norm  # noqa: F401 - and `vaebuild::conv3x3_rms_silu`, `vaebuild::conv3x3_add`

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

    from vaebuild.precision import get_precision

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
    graph per input shape (`vaebuild.cuda_graph.GraphedCall`): the first call of a shape captures, later
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
        from vaebuild.cuda_graph import GraphedCall

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
