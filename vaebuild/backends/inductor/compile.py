"""Building AOTInductor packages: which ops a package runs, and its export + compile (in a worker process).

Every package runs the mid-block attention through `vaebuild::attention_d384` (SDPA's kernels for head dim 384 are
several times slower: at 3840x2160 they made the exact tiles' head package 3.6x the whole-image package's time).
Static packages from 1024x768 image pixels on (`FUSED_NORM_MIN_PIXELS`) also run the 96-channel residual blocks'
conv1 -> norm2 -> SiLU through `vaebuild::conv3x3_rms_silu` (and the encoder's block before a downsampler through
`conv3x3_add`); dynamic-shape packages keep inductor's own convolution kernels. Every package computes the
upsamplers as transposed convolutions and the convolutions from and to RGB over their taps, with its convolution weights channels-last (`WEIGHT_LAYOUT`), and CUDA packages tune their Triton kernels'
launch settings while compiling (coordinate descent). By default packages are weight-free
(`aot_inductor.package_constants_in_so=False`): the folder's `weights.safetensors` holds the one copy they share.
"""

import os
import time
from pathlib import Path

from vaebuild.backends.base import EngineInfo
from vaebuild.errors import UserInputError
from vaebuild.fileio import atomic_output, sha256_file

WEIGHT_LAYOUT = "channels_last"  # of the 4-D constants packages are compiled with (manifest entry "weight_layout")


def compile_request(record, weights_path, graph, engine_path, profiles, options):
    """Everything a worker process needs to compile `graph` of a build's `record` (plain data: it is pickled)."""
    graph_record = record["graphs"][graph]
    return {
        "graph": graph,
        "vae_config": record["vae_config"],
        "weights_path": str(weights_path),
        "precision": record["precision"],
        "device": options.device or "cuda",
        "engine_path": str(engine_path),
        "profiles": [{k: [list(s) for s in v] for k, v in p.items()} for p in profiles],
        "input_name": graph_record["input"]["name"],
        "output_name": graph_record["output"]["name"],
        "spatial_multiple": graph_record["spatial_multiple"],
        "embed_weights": options.embed_weights,
        **kernel_choices(record, graph, profiles),
    }


def kernel_choices(record, graph, profiles):
    """Which of vaebuild's ops a package of `graph` for these profiles runs (part of its build key):
    `fast_kernels` (`vaebuild::attention_d384`: every package) and `fused_norms` (`uses_fused_norms`)."""
    return {"fast_kernels": True, "fused_norms": uses_fused_norms(record, graph, profiles)}


def uses_fused_norms(record, graph, profiles):
    """Whether a package of `graph` for these profiles runs `vaebuild::conv3x3_rms_silu`: static shapes of at least
    FUSED_NORM_MIN_PIXELS image pixels (the op inside dynamic-shape packages has not been run on a GPU)."""
    scale = 1 if graph == "encoder" else record["graphs"]["encoder"]["spatial_multiple"]
    static = all(tuple(r[0]) == tuple(r[2]) for p in profiles for r in p.values())
    return static and all(r[1][3] * r[1][4] * scale**2 >= FUSED_NORM_MIN_PIXELS for p in profiles for r in p.values())


# Image pixels from which a package runs the fused conv + norm op. Below, the op's host-side cost per call (a Python
# kernel launch through the package's proxy executor) outweighs the GPU time it saves: on the H100, 512x512 and
# 848x480 plain calls were 0.1-0.4 ms slower with it (equal when replayed from CUDA graphs), 768x1024 even, larger
# sizes 0.3-1.0 ms faster (docs/design/speed_notes.md, step 19).
FUSED_NORM_MIN_PIXELS = 1024 * 768


def compile_package(request) -> EngineInfo:
    """Export and compile one graph into an AOTInductor package; `request` comes from `compile_request`.

    Runs in a fresh worker process when a build uses several jobs, so it rebuilds the graph module
    from the architecture and the folder's weights file.
    """
    import torch

    from vaebuild.model.graphs import build_graph_modules_from_weights

    start = time.perf_counter()
    device = torch.device(request["device"])
    # Convolution rewrites (any shape): the upsamplers at 4/9 of their multiply-adds, the convolutions from and
    # to RGB over their taps.
    from vaebuild.model.tiling import TILE_MODULES, TILE_PARENT

    graph = request["graph"]
    graphs = build_graph_modules_from_weights(
        request["vae_config"], request["weights_path"], request["precision"], device,
        fast_attention=request["fast_kernels"], conv_rewrites=True, fused_norms=request["fused_norms"],
    )
    # A tile package (`--tile`) is one split graph over the whole graph's modules (their tensor names).
    module = TILE_MODULES[graph](graphs[TILE_PARENT[graph]]).eval() if graph in TILE_MODULES else graphs[graph]
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
        # The pid in the temporary name: a build whose worker was killed removes what it left (`builder.engines`).
        with atomic_output(engine_path, suffix=f".{os.getpid()}.pt2") as tmp:
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
