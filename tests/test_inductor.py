"""The AOTInductor backend end to end on CPU packages of a small VAE: build, manifest, shared weights,
skip-if-unchanged, runtime choice and residency, refusals, `verify` and `bench` rows.

CPU packages compile in ~25 s each here, so the folders are built once per module (the static one
through two worker processes, the `--jobs` path) and copied where a test edits them.
"""

import json
import logging
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from vaebuild.backends.base import BuildOptions
from vaebuild.builder.engines import build_engines, model_for_build
from vaebuild.errors import UserInputError
from vaebuild.model.graphs import build_graphs
from vaebuild.model.inputs import sample_images, sample_latents
from vaebuild.model.source import ModelSource
from vaebuild.runtime import VaeRuntime
from vaebuild.builder.specs import load_spec
from vaebuild.verify import NOT_RUN, PASS, VerifyOptions, verify_build

STATIC_SPEC = """kind: static
max_side: 128
profiles:
  - {name: "wide", height: 32, width: 48, batch: 1}
"""
MULTI_SPEC = """kind: multiprofile
max_side: 128
profiles:
  - name: "small"
    min: {height: 16, width: 16}
    opt: {height: 32, width: 32}
    max: {height: 64, width: 64}
    batch: {min: 1, opt: 1, max: 2}
"""
CPU = BuildOptions(backend="inductor", device="cpu")


def quiet(*args, **kwargs):
    pass


def spec(tmp_path, text):
    path = Path(tmp_path) / "spec.yaml"
    path.write_text(text)
    return load_spec(path)


@pytest.fixture(scope="module")
def source(tiny_vae_dir):
    return model_for_build(ModelSource(model=str(tiny_vae_dir)), "fp32", log=quiet)


@pytest.fixture(scope="module")
def static_dir(source, tmp_path_factory):
    root = tmp_path_factory.mktemp("inductor_static")
    out = root / "out"
    build_engines("static", spec(root, STATIC_SPEC), source, out, BuildOptions(**{**vars(CPU), "jobs": 2}), log=quiet)
    return out


@pytest.fixture(scope="module")
def multi_dir(source, tmp_path_factory):
    root = tmp_path_factory.mktemp("inductor_multi")
    out = root / "out"
    build_engines("multiprofile", spec(root, MULTI_SPEC), source, out, CPU, log=quiet)
    return out


@pytest.fixture
def static_copy(static_dir, tmp_path):
    return Path(shutil.copytree(static_dir, tmp_path / "copy"))


def manifest_of(folder):
    return json.loads((Path(folder) / "manifest.json").read_text())


def rewrite_manifest(folder, edit):
    manifest = manifest_of(folder)
    edit(manifest)
    (Path(folder) / "manifest.json").write_text(json.dumps(manifest))


def images(height, width, batch=1):
    return sample_images((batch, 3, 1, height, width), seed=1)


def latents(vae, height, width, batch=1):
    return sample_latents((batch, vae.config.z_dim, 1, height // 8, width // 8), vae.config, seed=2)


# ---------------------------------------------------------------------------- building


def test_static_build_writes_weight_free_packages_and_one_weights_file(static_dir):
    manifest = manifest_of(static_dir)
    assert sorted(e["path"] for e in manifest["engines"]) == ["wide/vae_decoder.pt2", "wide/vae_encoder.pt2"]
    weights = manifest["weights_file"]
    assert weights["path"] == "weights.safetensors" and (static_dir / weights["path"]).is_file()
    assert weights["dtypes"] == ["float32"] and weights["tensors"] > 50
    for entry in manifest["engines"]:
        assert entry["backend"] == "inductor" and entry["device"] == "cpu" and entry["weights"] == "folder"
        assert entry["torch_version"] == torch.__version__ == entry["backend_version"]
        assert "onnx_sha256" not in entry
        # A weight-free package holds code only: far smaller than the weights it uses.
        assert entry["size_bytes"] < weights["size_bytes"] * 4
    assert manifest["onnx_dir"] is None


def test_rebuild_with_nothing_changed_skips_every_package(static_dir, source, tmp_path):
    lines = []
    build_engines("static", spec(tmp_path, STATIC_SPEC), source, static_dir, CPU, log=lines.append)
    assert [line for line in lines if "skipped" in line] == [
        "[1/2] wide/vae_encoder.pt2: up to date, skipped",
        "[2/2] wide/vae_decoder.pt2: up to date, skipped",
    ]


def test_options_that_do_not_apply_are_refused():
    with pytest.raises(UserInputError, match="--opt-level does not apply to the inductor backend"):
        BuildOptions(backend="inductor", builder_optimization_level=3)
    with pytest.raises(UserInputError, match="--embed-weights does not apply to the tensorrt_rtx backend"):
        BuildOptions(backend="tensorrt_rtx", embed_weights=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible")
def test_cuda_build_without_a_gpu_is_one_line(source, tmp_path):
    with pytest.raises(UserInputError, match="none is visible here.*--device cpu"):
        build_engines("static", spec(tmp_path, STATIC_SPEC), source, tmp_path / "out",
                      BuildOptions(backend="inductor", device="cuda"), log=quiet)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- running


def test_runtime_serves_the_static_size_from_packages(static_dir, tiny_vae, caplog):
    encoder, decoder = build_graphs(tiny_vae)
    vae = VaeRuntime(static_dir, device="cpu", fallback_vae=tiny_vae)
    assert vae.resident == "all" and set(vae.resident_engines) == set(vae.engine_paths)
    x, z = images(32, 48), latents(tiny_vae, 32, 48)
    torch.testing.assert_close(vae.encode(x), encoder(x), rtol=0, atol=1e-4)
    torch.testing.assert_close(vae.decode(z), decoder(z), rtol=0, atol=1e-4)
    assert vae.last_route["decoder"].engine == "wide/vae_decoder.pt2"
    with caplog.at_level(logging.WARNING, logger="vaebuild.runtime"):
        vae.decode(latents(tiny_vae, 48, 32))
    assert vae.last_route["decoder"].kind == "pytorch" and "no static engine" in caplog.text


def test_one_dynamic_package_serves_every_shape_of_its_profiles(multi_dir, tiny_vae):
    encoder, decoder = build_graphs(tiny_vae)
    vae = VaeRuntime(multi_dir, device="cpu", fallback_vae=tiny_vae)
    for batch, height, width in ((1, 32, 32), (2, 64, 16), (1, 16, 40)):
        x, z = images(height, width, batch), latents(tiny_vae, height, width, batch)
        torch.testing.assert_close(vae.encode(x), encoder(x), rtol=0, atol=1e-4)
        torch.testing.assert_close(vae.decode(z), decoder(z), rtol=0, atol=1e-4)
        assert vae.last_route["encoder"].kind == vae.last_route["decoder"].kind == "engine"
    vae.decode(latents(tiny_vae, 128, 64))  # outside the profile: PyTorch
    assert vae.last_route["decoder"].kind == "pytorch"


def test_shared_weights_equal_embedded_weights(static_dir, source, tiny_vae, tmp_path):
    """A weight-free package given the folder's tensors computes what a self-contained package computes."""
    out = tmp_path / "embedded"
    build_engines("static", spec(tmp_path, STATIC_SPEC).select(["wide"]), source, out,
                  BuildOptions(backend="inductor", device="cpu", embed_weights=True), log=quiet)
    entry = next(e for e in manifest_of(out)["engines"] if e["graph"] == "decoder")
    assert entry["weights"] == "embedded"
    assert entry["size_bytes"] > manifest_of(static_dir)["weights_file"]["size_bytes"] / 2
    z = latents(tiny_vae, 32, 48)
    shared = VaeRuntime(static_dir, device="cpu").decode(z)
    embedded = VaeRuntime(out, device="cpu").decode(z)
    assert torch.equal(shared, embedded)


@pytest.mark.parametrize("stored", ["channels_last", "contiguous (older files)"])
def test_weights_are_read_in_either_layout_in_one_allocation(static_dir, tiny_vae, tmp_path, stored):
    """The weights file stores 4-D tensors channels-last (views at load); a file of an older vaebuild stores
    them contiguous. Either is read in either layout, with the modules' shapes and values."""
    from safetensors.torch import save_file

    from vaebuild.weights_file import graph_tensors, load_into, read_to_device

    expected = graph_tensors(build_graphs(tiny_vae))
    path = static_dir / "weights.safetensors"
    if stored != "channels_last":
        path = tmp_path / "old.safetensors"
        save_file({name: t.contiguous() for name, t in expected.items()}, str(path))
    assert sum(t.dim() == 4 for t in expected.values()) > 20 and any(t.dim() != 4 for t in expected.values())
    for channels_last in (False, True):
        tensors = read_to_device(path, "cpu", channels_last=channels_last)
        assert tensors.keys() == expected.keys()
        assert len({t.untyped_storage().data_ptr() for t in tensors.values()}) == 1
        for name, tensor in tensors.items():
            assert torch.equal(tensor, expected[name]), name
            if tensor.dim() == 4 and tensor.shape[1] > 1 and tensor.shape[2] * tensor.shape[3] > 1:
                assert tensor.is_contiguous(memory_format=torch.channels_last) == channels_last
                assert tensor.is_contiguous() == (not channels_last)
    encoder, decoder = build_graphs(tiny_vae)
    for module in (encoder, decoder):
        for parameter in module.parameters():
            parameter.data.zero_()
    load_into([encoder, decoder], path)
    assert all(torch.equal(t, expected[name]) for name, t in graph_tensors([encoder, decoder]).items())


def test_packages_record_channels_last_weights_and_get_them(static_copy, tiny_vae):
    """Packages are compiled with channels-last convolution weights (entry `weight_layout`) and are given the
    shared weights in that layout; given them contiguous, as a package without the field would be, they compute
    something else: the field is what keeps old and new packages right."""
    assert {e["weight_layout"] for e in manifest_of(static_copy)["engines"]} == {"channels_last"}
    z = latents(tiny_vae, 32, 48)
    expected = VaeRuntime(static_copy, device="cpu").decode(z)
    rewrite_manifest(static_copy, lambda m: [e.pop("weight_layout") for e in m["engines"]])
    wrong_layout = VaeRuntime(static_copy, device="cpu").decode(z)
    assert (wrong_layout - expected).abs().max() > 1e-2


@pytest.mark.parametrize(
    "edit, reason",
    [
        (lambda e: e.update(torch_version="1.0.0"), "was compiled by torch 1.0.0"),
        (lambda e: e.update(device="cuda", compute_capability="8.6", cuda_version="12.8"), "is a CUDA package"),
    ],
)
def test_package_for_another_torch_or_gpu_falls_back_and_is_not_run(static_copy, tiny_vae, caplog, edit, reason):
    rewrite_manifest(static_copy, lambda m: [edit(e) for e in m["engines"]])
    vae = VaeRuntime(static_copy, device="cpu", fallback_vae=tiny_vae)
    assert vae.resident_engines == ()
    with caplog.at_level(logging.WARNING, logger="vaebuild.runtime"):
        vae.decode(latents(tiny_vae, 32, 48))
        vae.decode(latents(tiny_vae, 32, 48))
    (message,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert reason in message and "\n" not in message
    report = verify_build(static_copy, VerifyOptions(device="cpu"), log=quiet)
    assert {r.status for r in report.rows} == {NOT_RUN} and reason in report.rows[0].reason
    assert report.passed


def test_other_compute_capability_is_refused(static_copy, monkeypatch):
    from vaebuild.backends.inductor import InductorBackend

    entry = {**manifest_of(static_copy)["engines"][0], "device": "cuda", "compute_capability": "8.6",
             "gpu_name": "NVIDIA A10", "cuda_version": torch.version.cuda}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    reason = InductorBackend().unavailable_reason(entry, "cuda")
    assert "compiled for compute capability 8.6 (NVIDIA A10) and this GPU is 9.0" in reason


def test_tampered_or_renamed_weights_are_refused_with_one_line(static_copy, tiny_vae, caplog):
    from safetensors.torch import load_file, save_file

    path = static_copy / "weights.safetensors"
    tensors = load_file(str(path))
    name = next(iter(tensors))
    save_file({**tensors, name: tensors[name] + 1}, str(path))
    vae = VaeRuntime(static_copy, device="cpu", fallback_vae=tiny_vae, resident="lazy")
    with caplog.at_level(logging.WARNING, logger="vaebuild.runtime"):
        vae.decode(latents(tiny_vae, 32, 48))
    assert vae.last_route["decoder"].kind == "pytorch"
    assert "differ from the manifest" in caplog.text and "rebuild the folder" in caplog.text

    renamed = {("renamed." + k if k == name else k): v for k, v in tensors.items()}
    other = static_copy / "finetune.safetensors"
    save_file(renamed, str(other))
    with pytest.raises(UserInputError, match=f"has no tensor '{name}'"):
        VaeRuntime(static_copy, device="cpu", weights=other, resident="lazy").weights.tensors("cpu")


def test_a_weights_file_too_short_is_refused_with_one_line(tmp_path):
    from vaebuild.weights_file import read_to_device

    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"abc")
    with pytest.raises(UserInputError, match="is 3 bytes, too short for a safetensors file; rebuild the folder"):
        read_to_device(path, "cpu")


def test_cuda_packages_are_coordinate_descent_tuned_and_cpu_packages_not():
    from vaebuild.backends.inductor.compile import package_configs

    assert package_configs(False, "cuda") == {
        "coordinate_descent_tuning": True,
        "aot_inductor.package_constants_in_so": False,
        "aot_inductor.use_runtime_constant_folding": True,
    }
    assert package_configs(True, "cpu") == {"aot_inductor.package_constants_in_so": True}


def test_other_weights_of_the_same_architecture_can_be_used(static_dir, tiny_vae, tmp_path):
    from conftest import make_tiny_vae

    from vaebuild.weights_file import write_weights_file

    finetune = make_tiny_vae(seed=7)
    path = tmp_path / "finetune.safetensors"
    write_weights_file(path, build_graphs(finetune))
    z = latents(tiny_vae, 32, 48)
    out = VaeRuntime(static_dir, device="cpu", weights=path).decode(z)
    torch.testing.assert_close(out, build_graphs(finetune)[1](z), rtol=0, atol=1e-4)


def test_loading_never_probes_cpu_vector_isas(static_dir, monkeypatch):
    """torch's `aoti_load_package` compiles a test program per CPU ISA (34-60 s on the H100 host)."""
    import torch._inductor.cpu_vec_isa as cpu_vec_isa

    def probe(*args, **kwargs):
        raise AssertionError("the ISA probe ran")

    monkeypatch.setattr(cpu_vec_isa, "pick_vec_isa", probe)
    vae = VaeRuntime(static_dir, device="cpu")
    assert set(vae.resident_engines) == set(vae.engine_paths)


# ---------------------------------------------------------------------------- verify and bench


def test_verify_passes_the_packages_against_diffusers(static_dir, multi_dir):
    for folder in (static_dir, multi_dir):
        report = verify_build(folder, VerifyOptions(device="cpu"), log=quiet)
        assert report.passed and {r.runner for r in report.rows} == {"inductor"}
        assert {r.status for r in report.rows} == {PASS}
        assert all(r.max_abs < 1e-3 for r in report.rows)
    assert len(verify_build(multi_dir, VerifyOptions(device="cpu"), log=quiet).rows) == 6  # 2 graphs x min/opt/max


def test_cuda_graphs_need_packages_on_a_cuda_device(static_dir):
    with pytest.raises(UserInputError, match="cuda_graphs needs AOTInductor packages on a CUDA device.*device is cpu"):
        VaeRuntime(static_dir, device="cpu", cuda_graphs=True)
    from vaebuild.backends.tensorrt import TensorRTBackend

    with pytest.raises(UserInputError, match="not TensorRT engines"):
        TensorRTBackend("tensorrt").load_runner(Path("x.trt"), {}, cuda_graphs=True)


def test_graphed_call_captures_once_per_shape_and_copies_each_input_in(monkeypatch):
    """The replay bookkeeping, with a stand-in for the CUDA capture (no GPU here; the GPU check is
    benchmarks/checks/cuda_graph_check.py): a replay recomputes the static output from the static input."""
    from vaebuild.backends.inductor.cuda_graph import GraphedCall

    class FakeGraph:
        def __init__(self, run, static_x, static_out):
            self.run, self.static_x, self.static_out = run, static_x, static_out

        def replay(self):
            self.static_out.copy_(self.run(self.static_x))

    def fake_capture(self, x):
        static_x = x.clone()
        captures.append(tuple(x.shape))
        static_out = self.run(static_x)
        return FakeGraph(self.run, static_x, static_out), static_x, static_out

    captures = []
    monkeypatch.setattr(GraphedCall, "_capture", fake_capture)
    call = GraphedCall(lambda x: x * 2 + 1)
    a, b, c = torch.randn(2, 3), torch.randn(2, 3), torch.randn(4, 3)
    assert torch.equal(call(a), a * 2 + 1)
    assert torch.equal(call(b), b * 2 + 1)  # same shape: replayed on the new input, not the captured one
    assert torch.equal(call(c), c * 2 + 1)
    assert captures == [(2, 3), (4, 3)]
    assert torch.equal(call(a), a * 2 + 1) and len(captures) == 2  # a shape seen before: replayed, not captured


def test_graphed_call_refuses_cpu_tensors():
    from vaebuild.backends.inductor.cuda_graph import GraphedCall

    with pytest.raises(ValueError, match="CUDA graphs need CUDA tensors"):
        GraphedCall(lambda x: x)(torch.zeros(2))


def test_bench_rows_and_load_costs_for_a_package_folder(static_dir, tiny_vae):
    from vaebuild.bench import BenchOptions, BenchSize, render_markdown, run_bench

    options = BenchOptions(sizes=(BenchSize("wide", 32, 48),), device="cpu", warmup=0, runs=2,
                           engines=static_dir, flops=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run_bench(tiny_vae, {"kind": "test"}, options, log=quiet)
    rows = [r for r in result["rows"] if r["kind"] == "engine"]
    assert [r["status"] for r in rows] == ["ok", "ok"]
    for row in rows:
        assert row["load_ms"] > 0 and row["first_call_ms"] > 0 and row["median_ms"] > 0
    assert result["engines"][0]["disk_mb"] > 0
    assert "Loading and memory, out:" in render_markdown(result)


def test_bench_cuda_graphs_column_says_why_it_did_not_run_here(static_dir, tiny_vae):
    from vaebuild.bench import BenchOptions, BenchSize, render_markdown, run_bench

    options = BenchOptions(sizes=(BenchSize("wide", 32, 48),), device="cpu", warmup=0, runs=1,
                           engines=static_dir, flops=False, cuda_graphs=True, fresh_process_loads=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run_bench(tiny_vae, {"kind": "test"}, options, log=quiet)
    assert [e["cuda_graphs"] for e in result["engines"]] == [False, True]
    rows = [r for r in result["rows"] if r["kind"] == "engine"]
    assert [(r["folder"], r["status"]) for r in rows] == [(0, "ok"), (1, "not run")] * 2
    assert "CUDA graphs" in rows[1]["row"] and "needs AOTInductor packages on a CUDA device" in rows[1]["reason"]
    text = render_markdown(result)
    assert "ms 3-D / 2-D / E1 / E2" in text and "replayed from CUDA graphs" in text
