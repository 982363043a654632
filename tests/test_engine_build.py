"""Engine building through Polygraphy: real TensorRT-RTX builds of a tiny 5-D convolution model."""

import importlib
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from vaebuild.backends.trt_import import import_polygraphy_trt
from vaebuild.backends.base import BuildOptions
from vaebuild.backends.tensorrt import build_engine
from vaebuild.errors import BackendMissingError, UserInputError, VaebuildError
from vaebuild.fileio import sha256_file
from conftest import importable as _importable, requires_rtx

REPO_ROOT = Path(__file__).resolve().parents[1]
RTX = BuildOptions(backend="tensorrt_rtx")
STATIC_SHAPE = (1, 4, 1, 16, 16)






def write_tiny_vae_like_onnx(path):
    """fp16 Conv over [B, 4, 1, H, W] -> [B, 3, 1, H, W] with a (1, 3, 3) kernel; B, H, W dynamic."""
    rng = np.random.default_rng(0)
    weight_values = (rng.standard_normal((3, 4, 1, 3, 3)) * 0.1).astype(np.float16)
    weight = numpy_helper.from_array(weight_values, "weight")
    bias = numpy_helper.from_array(np.zeros(3, np.float16), "bias")
    conv = helper.make_node(
        "Conv", ["latents", "weight", "bias"], ["sample"], kernel_shape=[1, 3, 3], pads=[0, 1, 1, 0, 1, 1]
    )
    graph = helper.make_graph(
        [conv],
        "tiny_vae_like",
        [helper.make_tensor_value_info("latents", TensorProto.FLOAT16, ["B", 4, 1, "H", "W"])],
        [helper.make_tensor_value_info("sample", TensorProto.FLOAT16, ["B", 3, 1, "H", "W"])],
        [weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    return write_tiny_vae_like_onnx(tmp_path_factory.mktemp("onnx") / "tiny.onnx")


def static_profile(shape=STATIC_SHAPE):
    return {"latents": (shape, shape, shape)}


def leftover_files(folder):
    return sorted(p.name for p in Path(folder).iterdir())


@requires_rtx
def test_static_profile_engine(tiny_onnx, tmp_path):
    engine_path = tmp_path / "static.trt"
    info = build_engine(tiny_onnx, engine_path, [static_profile()], RTX)

    assert leftover_files(tmp_path) == ["static.trt"]
    assert info.engine_path == engine_path
    assert info.backend == "tensorrt_rtx"
    assert info.backend_version == importlib.import_module("tensorrt_rtx_bindings").__version__
    assert info.input_names == ("latents",)
    assert info.output_names == ("sample",)
    assert info.profiles == (static_profile(),)
    assert info.size_bytes == engine_path.stat().st_size > 0
    assert info.sha256 == sha256_file(engine_path)
    assert info.build_seconds > 0


@requires_rtx
def test_three_profiles_in_one_engine_in_order(tiny_onnx, tmp_path):
    profiles = [
        {"latents": ((1, 4, 1, 8, 8), (1, 4, 1, 16, 16), (1, 4, 1, 64, 64))},
        {"latents": ((1, 4, 1, 8, 8), (1, 4, 1, 32, 48), (1, 4, 1, 64, 64))},
        {"latents": ((1, 4, 1, 8, 8), (2, 4, 1, 48, 32), (2, 4, 1, 64, 64))},
    ]
    info = build_engine(tiny_onnx, tmp_path / "multi.trt", profiles, RTX)

    assert len(info.profiles) == 3
    assert info.profiles == tuple(profiles)


@requires_rtx
def test_builder_options_reach_the_build(tiny_onnx, tmp_path):
    options = BuildOptions(
        backend="tensorrt_rtx",
        builder_optimization_level=0,
        workspace_gib=0.25,
        compute_capabilities=((8, 6), (12, 0)),
    )
    info = build_engine(tiny_onnx, tmp_path / "options.trt", [static_profile()], options)
    assert info.profiles == (static_profile(),)


@requires_rtx
def test_unsupported_compute_capability_is_rejected(tiny_onnx, tmp_path):
    options = BuildOptions(backend="tensorrt_rtx", compute_capabilities=((9, 0),))
    with pytest.raises(UserInputError, match=r"9\.0 is not a TensorRT-RTX .* supported: .*8\.6"):
        build_engine(tiny_onnx, tmp_path / "sm90.trt", [static_profile()], options)
    assert leftover_files(tmp_path) == []


def _raise_interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def _return_unwritable(*args, **kwargs):
    return object()


@requires_rtx
@pytest.mark.parametrize(
    "engine_bytes_step, raised, message",
    [
        (_raise_interrupt, KeyboardInterrupt, None),
        (_return_unwritable, TypeError, "bytes-like object is required"),
    ],
    ids=["interrupted-build", "failed-write"],
)
def test_failed_build_leaves_no_file(tiny_onnx, tmp_path, monkeypatch, engine_bytes_step, raised, message):
    loaders = import_polygraphy_trt("tensorrt_rtx").loaders
    monkeypatch.setattr(loaders, "engine_bytes_from_network", engine_bytes_step)
    with pytest.raises(raised, match=message):
        build_engine(tiny_onnx, tmp_path / "vae_decoder.trt", [static_profile()], RTX)
    assert leftover_files(tmp_path) == []


@requires_rtx
def test_builder_failure_is_a_one_line_error(tiny_onnx, tmp_path, monkeypatch):
    from polygraphy.exception import PolygraphyException

    def fail(*args, **kwargs):
        raise PolygraphyException("Invalid Engine. Please ensure the engine was built correctly\nmore detail")

    monkeypatch.setattr(import_polygraphy_trt("tensorrt_rtx").loaders, "engine_bytes_from_network", fail)
    one_line = r"failed: Invalid Engine\. Please ensure the engine was built correctly$"
    with pytest.raises(VaebuildError, match=one_line):
        build_engine(tiny_onnx, tmp_path / "broken.trt", [static_profile()], RTX)
    assert leftover_files(tmp_path) == []


def test_missing_onnx_file(tmp_path):
    missing = tmp_path / "nope.onnx"
    with pytest.raises(UserInputError, match="ONNX file not found: .*nope.onnx") as excinfo:
        build_engine(missing, tmp_path / "e.trt", [static_profile()], RTX)
    assert excinfo.value.exit_code == 2


@requires_rtx
def test_unparsable_onnx_file(tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not an onnx model")
    with pytest.raises(UserInputError, match="cannot parse ONNX file .*garbage.onnx"):
        build_engine(garbage, tmp_path / "e.trt", [static_profile()], RTX)


@requires_rtx
def test_wrong_input_name(tiny_onnx, tmp_path):
    shape = STATIC_SHAPE
    message = r"profiles\[0\] names input\(s\) \['images'\], but tiny.onnx has input\(s\) \['latents'\]"
    with pytest.raises(UserInputError, match=message):
        build_engine(tiny_onnx, tmp_path / "e.trt", [{"images": (shape, shape, shape)}], RTX)
    assert leftover_files(tmp_path) == []


@requires_rtx
@pytest.mark.parametrize(
    "shape_range, message",
    [
        (((1, 4, 16, 16),) * 3, r"profiles\[0\]\.latents\.min=\(1, 4, 16, 16\) must be 5 positive integers"),
        (((1, 4, 1, 8, 8), (1, 4, 1, 8, 8)), r"must be \(min, opt, max\) shapes"),
        (((1, 8, 1, 8, 8),) * 3, r"profiles\[0\]\.latents\.min\[1\]=8, but tiny.onnx fixes that axis at 4"),
        (((1, 4, 1, 16, 16), (1, 4, 1, 8, 8), (1, 4, 1, 32, 32)), "need min <= opt <= max"),
    ],
    ids=["rank", "two-shapes", "fixed-axis", "order"],
)
def test_invalid_profile_shapes(tiny_onnx, tmp_path, shape_range, message):
    with pytest.raises(UserInputError, match=message):
        build_engine(tiny_onnx, tmp_path / "e.trt", [{"latents": shape_range}], RTX)


def test_no_profiles(tiny_onnx, tmp_path):
    with pytest.raises(UserInputError, match="at least one optimization profile"):
        build_engine(tiny_onnx, tmp_path / "e.trt", [], RTX)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(backend="onnxruntime"), "unknown backend 'onnxruntime'"),
        (dict(backend="tensorrt", builder_optimization_level=6), "from 0 to 5"),
        (dict(backend="tensorrt", builder_optimization_level=True), "from 0 to 5"),
        (dict(backend="tensorrt", workspace_gib=0), "positive number"),
        (dict(backend="tensorrt_rtx", timing_cache=Path("t.cache")), "tensorrt backend only"),
        (dict(backend="tensorrt", compute_capabilities=((8, 6),)), "tensorrt_rtx backend only"),
        (dict(backend="tensorrt_rtx", compute_capabilities=((8, 6, 1),)), r"\(major, minor\) integer pairs"),
        (dict(backend="tensorrt_rtx", compute_capabilities=()), r"\(major, minor\) integer pairs"),
    ],
)
def test_invalid_build_options(kwargs, message):
    with pytest.raises(UserInputError, match=message):
        BuildOptions(**kwargs)


@pytest.mark.skipif(_importable("tensorrt"), reason="full TensorRT is installed here")
def test_missing_tensorrt_names_the_package_and_leaves_polygraphy_alone(tiny_onnx, tmp_path):
    switch_before = os.environ.get("POLYGRAPHY_USE_TENSORRT_RTX")
    with pytest.raises(BackendMissingError, match=r"pip install tensorrt\b") as excinfo:
        build_engine(tiny_onnx, tmp_path / "e.trt", [static_profile()], BuildOptions(backend="tensorrt"))
    assert excinfo.value.exit_code == 3
    assert "\n" not in str(excinfo.value)
    assert os.environ.get("POLYGRAPHY_USE_TENSORRT_RTX") == switch_before
    assert leftover_files(tmp_path) == []


@requires_rtx
def test_rtx_alias_passes_polygraphy_version_check():
    from polygraphy import mod
    from polygraphy.mod.trt_importer import lazy_import_trt, tensorrt_module_and_version_string

    pg = import_polygraphy_trt("tensorrt_rtx")
    assert tensorrt_module_and_version_string() == "tensorrt_rtx>=1.0"
    assert sys.modules["tensorrt_rtx"] is pg.trt
    assert lazy_import_trt().Builder is pg.trt.Builder
    assert mod.version(pg.trt.__version__) >= mod.version("1.0")
    assert pg.create_config.__name__ == "CreateConfigRTX"


@requires_rtx
def test_other_backend_in_same_process_is_refused(monkeypatch):
    import_polygraphy_trt("tensorrt_rtx")
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    with pytest.raises(UserInputError, match="already bound to the tensorrt_rtx backend .* separate process"):
        import_polygraphy_trt("tensorrt")


@requires_rtx
def test_bare_polygraphy_import_does_not_fix_the_backend():
    code = (
        "import polygraphy\n"
        "assert not polygraphy.config.USE_TENSORRT_RTX\n"
        "from vaebuild.backends.trt_import import import_polygraphy_trt\n"
        "pg = import_polygraphy_trt('tensorrt_rtx')\n"
        "from polygraphy.mod.trt_importer import lazy_import_trt\n"
        "assert lazy_import_trt().Builder is pg.trt.Builder\n"
    )
    env = dict(os.environ, POLYGRAPHY_USE_TENSORRT_RTX="0")
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, check=True)


def test_importing_engine_build_loads_no_tensorrt_or_polygraphy():
    code = (
        "import sys, vaebuild.backends.tensorrt\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('polygraphy', 'tensorrt', 'tensorrt_rtx', "
        "'tensorrt_rtx_bindings')]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)
