"""The inductor backend: AOTInductor packages of the single-frame 2-D graphs (`.pt2` files), run in-process by torch.

`compile` builds them (which of vaebuild's ops a package runs, export + compile), `load` loads and runs them,
`cuda_graph` replays their calls from CUDA graphs. This module holds the backend object the registry hands out.
"""

from vaebuild.backends.base import BuildOptions, EngineInfo, reject_options
from vaebuild.backends.inductor.compile import compile_package, compile_request, kernel_choices
from vaebuild.errors import UserInputError


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

    def kernel_choices(self, record, graph, profiles) -> dict:
        """Which of vaebuild's ops a package of `graph` for these profiles runs (part of its build key)."""
        return kernel_choices(record, graph, profiles)

    def build_request(self, source, graph, engine_path, profiles, options) -> dict:
        """Plain data for `build_from_request`, which may run in a worker process (`--jobs`)."""
        return compile_request(source.record, source.weights_path, graph, engine_path, profiles, options)

    build_from_request = staticmethod(compile_package)

    def build_engine(self, source, graph, engine_path, profiles, options) -> EngineInfo:
        """Compile the package of `graph` in this process."""
        return compile_package(self.build_request(source, graph, engine_path, profiles, options))

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
        from vaebuild.backends.inductor.load import make_runner

        return make_runner(engine_path, entry, weights, device, name, cuda_graphs)
