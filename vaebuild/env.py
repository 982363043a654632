"""What this process runs on: package versions and the device, as records and reports write them."""

import platform

# The packages that shape an export, a build, a verification or a measurement.
PACKAGES = ("torch", "diffusers", "onnx", "onnxscript", "onnxruntime", "polygraphy", "tensorrt",
            "tensorrt_rtx_cu13_bindings")


def package_versions():
    """{"python", "torch_cuda", and each of PACKAGES: its installed version or None}."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    versions = {"python": platform.python_version(), "torch_cuda": torch.version.cuda}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def device_name(device):
    """'NVIDIA H200 (CUDA)' or 'CPU (x86_64, 2 threads)' for a torch device."""
    import torch

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA)"
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def device_info(device):
    """The device's name and, on CUDA, compute capability, memory and multiprocessors (else CPU threads)."""
    import torch

    info = {"type": device.type, "name": device_name(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
        )
    else:
        info["threads"] = torch.get_num_threads()
    return info
