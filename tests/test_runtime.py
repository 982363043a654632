"""`vaebuild.runtime.TrtVae`: profile choice, lazy static loading, every fallback reason, and exact fallback outputs.

Engine folders are written by the real `builds.build_engines` (so the manifest is the real format)
with the TensorRT build replaced by a dummy file; engines are "run" by fake runners that record
every load, profile switch, inference and release, and compute the real 2-D PyTorch graph.
The PyTorch fallback paths run for real.
"""

import json
import logging
import re
from pathlib import Path
from unittest import mock

import pytest
import torch

from vaebuild.builder.engines import build_engines
from vaebuild.backends.base import BuildOptions, EngineInfo
from vaebuild.errors import UserInputError
from vaebuild.export import RECORD_NAME
from vaebuild.fileio import sha256_file
from vaebuild.model.graphs import build_graphs
from vaebuild.model.inputs import sample_images, sample_latents
from vaebuild.model.source import weights_sha256
from vaebuild.runtime import EngineProfile, EngineUnavailableError, TrtVae, choose_profile
from vaebuild.builder.specs import load_spec

STATIC_SPEC = """kind: static
max_side: 128
profiles:
  - {name: "wide", height: 32, width: 48, batch: 1}
  - {name: "tall", height: 48, width: 32, batch: 1}
"""
# Overlapping ranges on purpose: 32..64 lies in both; 16..31 only in "small"; 65..128 only in "big".
MULTI_SPEC = """kind: multiprofile
max_side: 128
profiles:
  - name: "small"
    min: {height: 16, width: 16}
    opt: {height: 32, width: 32}
    max: {height: 64, width: 64}
    batch: {min: 1, opt: 1, max: 2}
  - name: "big"
    min: {height: 32, width: 32}
    opt: {height: 96, width: 96}
    max: {height: 128, width: 128}
    batch: {min: 1, opt: 1, max: 1}
"""
TENSOR_NAMES = {"encoder": ("images", "latents"), "decoder": ("latents", "images")}
RUNTIME_LOGGER = "vaebuild.runtime"


# ---------------------------------------------------------------------------- engine folders


def write_fake_export(onnx_dir, vae, precision="fp32", model=None):
    """An export folder `build_engines` accepts: the record plus placeholder ONNX files."""
    onnx_dir = Path(onnx_dir)
    onnx_dir.mkdir(parents=True, exist_ok=True)
    graphs = {}
    for graph, (input_name, output_name) in TENSOR_NAMES.items():
        (onnx_dir / f"vae_{graph}.onnx").write_bytes(f"placeholder {graph}".encode())
        graphs[graph] = {
            "file": f"vae_{graph}.onnx",
            "sha256": f"{graph}-sha",
            "input": {"name": input_name},
            "output": {"name": output_name},
        }
    record = {
        "model": model or {"kind": "test"},
        "weights_sha256": weights_sha256(vae),
        "vae_config": {k: v for k, v in dict(vae.config).items() if not k.startswith("_")},
        "precision": precision,
        "single_frame_fold": True,
        "graphs": graphs,
    }
    (onnx_dir / RECORD_NAME).write_text(json.dumps(record))
    return onnx_dir


def _placeholder_build(backend, source, graph, engine_path, profiles, options):
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(b"placeholder engine")
    names = TENSOR_NAMES["encoder" if "encoder" in engine_path.name else "decoder"]
    return EngineInfo(
        backend=options.backend, backend_version="0-test", engine_path=engine_path, input_names=names[:1],
        output_names=names[1:], profiles=tuple(profiles), size_bytes=18, sha256=sha256_file(engine_path),
        build_seconds=0.0,
    )


def build_fake_engine_dir(tmp_path, vae, kind, spec_text=None, backend="tensorrt_rtx", precision="fp32", model=None):
    """A folder laid out and described exactly as `vaebuild static`/`multiprofile` writes it (dummy engine bytes)."""
    tmp_path = Path(tmp_path)
    spec_path = tmp_path / f"{kind}.yaml"
    spec_path.write_text(spec_text or (STATIC_SPEC if kind == "static" else MULTI_SPEC))
    onnx_dir = write_fake_export(tmp_path / "onnx", vae, precision, model)
    out = tmp_path / kind
    # No TensorRT needed to describe engines.
    with mock.patch("vaebuild.backends.tensorrt.TensorRTBackend.build_engine", _placeholder_build), \
            mock.patch("vaebuild.backends.tensorrt.TensorRTBackend.version", lambda backend: "0-test"):
        build_engines(kind, load_spec(spec_path), onnx_dir, out, BuildOptions(backend=backend), log=lambda *a: None,
                      allow_non_fp16=True)
    return out


class FakeRunners:
    """`runner_factory` double: records ("create"|"activate"|"profile"|"infer"|"release", engine, ...) events."""

    def __init__(self, vae, root, fail_create=(), fail_activate=(), fail_infer=(), fail_times=None):
        encoder, decoder = build_graphs(vae)
        self.fail_times = fail_times  # None: every time
        self.graphs = {"encoder": encoder, "decoder": decoder}
        self.root = Path(root)
        self.fail_create, self.fail_activate, self.fail_infer = set(fail_create), set(fail_activate), set(fail_infer)
        self.events = []

    def __call__(self, engine_path, backend, profile_index):
        rel = Path(engine_path).relative_to(self.root).as_posix()
        self.events.append(("create", rel, profile_index))
        if rel in self.fail_create and self.fail_times != 0:
            self.fail_times = None if self.fail_times is None else self.fail_times - 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return FakeRunner(self, rel, profile_index)

    def kinds(self, *kinds):
        return [event for event in self.events if event[0] in kinds]


class FakeRunner:
    def __init__(self, owner, rel, profile_index):
        self.owner, self.rel, self.profile = owner, rel, profile_index
        self.graph = "encoder" if "encoder" in rel else "decoder"
        self.is_active = False

    def activate(self):
        self.owner.events.append(("activate", self.rel, self.profile))
        if self.rel in self.owner.fail_activate:
            raise RuntimeError("Runner activation failed: out of device memory")
        self.is_active = True

    def set_profile(self, index):
        self.owner.events.append(("profile", self.rel, index))
        self.profile = index

    def infer(self, feed_dict, copy_outputs_to_host=True):
        assert self.is_active
        (feed,) = feed_dict.values()
        self.owner.events.append(("infer", self.rel, self.profile, tuple(feed.shape), feed.dtype))
        if self.rel in self.owner.fail_infer:
            raise RuntimeError("execute_async_v3() failed")
        input_name, output_name = TENSOR_NAMES[self.graph]
        assert list(feed_dict) == [input_name]
        with torch.no_grad():
            return {output_name: self.owner.graphs[self.graph](feed.float()).to(feed.dtype)}

    def deactivate(self):
        self.owner.events.append(("release", self.rel))
        self.is_active = False


@pytest.fixture(scope="module")
def static_dir(tiny_vae, tmp_path_factory):
    return build_fake_engine_dir(tmp_path_factory.mktemp("engines"), tiny_vae, "static")


@pytest.fixture(scope="module")
def multi_dir(tiny_vae, tmp_path_factory):
    return build_fake_engine_dir(tmp_path_factory.mktemp("engines"), tiny_vae, "multiprofile")


def fake_vae(engine_dir, tiny_vae, runners, **kwargs):
    kwargs.setdefault("unavailable_reason", lambda backend: None)
    manifest_kind = json.loads((Path(engine_dir) / "manifest.json").read_text())["kind"]
    return TrtVae(
        engine_dir, manifest_kind == "multiprofile", tiny_vae, device="cpu", dtype=torch.float32,
        runner_factory=runners, **kwargs,
    )


def images(height, width, batch=1):
    return sample_images((batch, 3, 1, height, width), seed=1)


def latents(vae, height, width, batch=1):
    return sample_latents((batch, vae.config.z_dim, 1, height // 8, width // 8), vae.config, seed=2)


def fallback_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == RUNTIME_LOGGER and r.levelno == logging.WARNING]


# ---------------------------------------------------------------------------- profile choice


def _profile(index, name, lo, opt, hi, batch=(1, 1, 1)):
    return EngineProfile(index, name, (batch[0], 3, 1, *lo), (batch[1], 3, 1, *opt), (batch[2], 3, 1, *hi))


PROFILES = (
    _profile(0, "a", (16, 16), (32, 32), (64, 64), batch=(1, 1, 2)),
    _profile(1, "b", (32, 32), (96, 96), (128, 128)),
    _profile(2, "c", (32, 32), (64, 32), (128, 128)),  # opt 64x32: ties with "a" for 48x32
    _profile(3, "d", (200, 200), (40, 40), (256, 256)),  # nearest opt to small shapes, but contains none of them
)


@pytest.mark.parametrize(
    "shape, expected",
    [
        ((1, 3, 1, 24, 24), "a"),  # only "a" contains it
        ((1, 3, 1, 40, 40), "a"),  # a/b/c contain it; "d" has the nearest opt (0) but does not contain it
        ((1, 3, 1, 100, 100), "b"),  # too big for "a"; b nearer than c
        ((1, 3, 1, 56, 32), "c"),  # a: 24, c: 8
        ((1, 3, 1, 48, 32), "a"),  # a: 16 + 0, c: 16 + 0 -> tie, lowest index wins
        ((2, 3, 1, 40, 40), "a"),  # batch 2 only fits "a"
    ],
)
def test_choose_profile_contains_then_nearest_opt_then_lowest_index(shape, expected):
    assert choose_profile(PROFILES, shape).name == expected


@pytest.mark.parametrize("shape", [(1, 3, 1, 8, 8), (1, 3, 1, 300, 300), (3, 3, 1, 40, 40), (1, 4, 1, 40, 40)])
def test_choose_profile_never_picks_a_profile_that_does_not_contain_the_shape(shape):
    assert choose_profile(PROFILES, shape) is None


def test_multiprofile_switches_profiles_on_one_runner(multi_dir, tiny_vae):
    runners = FakeRunners(tiny_vae, multi_dir)
    vae = fake_vae(multi_dir, tiny_vae, runners)
    vae.encode(images(32, 32))
    vae.encode(images(96, 96))
    vae.encode(images(64, 64))  # both contain it, equal L1 distance (64): lowest index
    vae.encode(images(24, 24, batch=2))  # batch 2 only in "small"
    encoder = "vae_encoder_multi_profile.trt"
    assert runners.kinds("create") == [("create", encoder, 0)]
    assert [e[2] for e in runners.kinds("infer")] == [0, 1, 0, 0]
    assert runners.kinds("profile") == [("profile", encoder, 1), ("profile", encoder, 0)]
    assert vae.last_route["encoder"].kind == "engine" and vae.last_route["encoder"].profile == 0
    assert set(vae.load_seconds) == {encoder}


def test_multiprofile_uncovered_shape_falls_back_with_one_warning(multi_dir, tiny_vae, caplog):
    runners = FakeRunners(tiny_vae, multi_dir)
    vae = fake_vae(multi_dir, tiny_vae, runners)
    z = latents(tiny_vae, 8, 8)  # latents 1x1: below every profile's min (2x2)
    with caplog.at_level(logging.WARNING, logger=RUNTIME_LOGGER):
        out = vae.decode(z)
        vae.decode(z)
    expected = build_graphs(tiny_vae)[1](z)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    (message,) = fallback_warnings(caplog)
    assert "no profile of vae_decoder_multi_profile.trt contains input [1, 4, 1, 1, 1]" in message
    assert sum(vae.fallback_counts.values()) == 2
    assert runners.events == []  # nothing was loaded for a shape no profile covers


# ---------------------------------------------------------------------------- static mode


def test_static_pair_loads_lazily_and_is_reused(static_dir, tiny_vae):
    runners = FakeRunners(tiny_vae, static_dir)
    vae = fake_vae(static_dir, tiny_vae, runners)
    assert vae.resident == "lazy"  # the default for TensorRT folders
    assert runners.events == []  # nothing loads at construction

    vae.decode(latents(tiny_vae, 32, 48))
    vae.decode(latents(tiny_vae, 32, 48))
    vae.encode(images(32, 48))
    assert runners.kinds("create", "release") == [
        ("create", "wide/vae_decoder.trt", 0),
        ("create", "wide/vae_encoder.trt", 0),
    ]
    assert len(runners.kinds("infer")) == 3
    assert vae.resident_engines == ("wide/vae_decoder.trt", "wide/vae_encoder.trt")

    vae.decode(latents(tiny_vae, 48, 32))  # no budget: the other size's pair stays loaded
    assert runners.kinds("create", "release")[2:] == [("create", "tall/vae_decoder.trt", 0)]
    assert vae.resident_engines == ("wide/vae_decoder.trt", "wide/vae_encoder.trt", "tall/vae_decoder.trt")
    assert set(vae.load_seconds) == {"wide/vae_decoder.trt", "wide/vae_encoder.trt", "tall/vae_decoder.trt"}
    assert all(seconds >= 0 for seconds in vae.load_seconds.values())
    assert vae.resident_bytes == 3 * 18  # the fake engines' file sizes

    vae.release()
    assert vae.resident_engines == ()
    assert {e[1] for e in runners.kinds("release")} == set(vae.load_seconds)


def test_memory_budget_releases_the_least_recently_used(static_dir, tiny_vae):
    runners = FakeRunners(tiny_vae, static_dir)
    vae = fake_vae(static_dir, tiny_vae, runners, memory_budget=2 * 18)  # room for two fake engines
    vae.decode(latents(tiny_vae, 32, 48))
    vae.encode(images(32, 48))
    vae.decode(latents(tiny_vae, 32, 48))  # the wide decoder is now the most recently used
    vae.encode(images(48, 32))
    assert runners.kinds("create", "release")[2:] == [
        ("release", "wide/vae_encoder.trt"),
        ("create", "tall/vae_encoder.trt", 0),
    ]
    assert vae.resident_engines == ("wide/vae_decoder.trt", "tall/vae_encoder.trt")
    assert vae.resident_bytes <= 2 * 18


def test_resident_all_loads_every_engine_up_front(static_dir, tiny_vae):
    runners = FakeRunners(tiny_vae, static_dir)
    vae = fake_vae(static_dir, tiny_vae, runners, resident="all")
    assert sorted(e[1] for e in runners.kinds("create")) == sorted(vae.engine_paths)
    created = len(runners.events)
    vae.decode(latents(tiny_vae, 48, 32))
    vae.encode(images(32, 48))
    assert runners.kinds("create", "release")[4:] == [] and len(runners.events) == created + 2  # two infers


def test_out_of_memory_at_load_releases_the_others_and_retries(static_dir, tiny_vae):
    runners = FakeRunners(tiny_vae, static_dir, fail_create=["tall/vae_decoder.trt"], fail_times=1)
    vae = fake_vae(static_dir, tiny_vae, runners)
    vae.decode(latents(tiny_vae, 32, 48))
    vae.decode(latents(tiny_vae, 48, 32))
    assert vae.last_route["decoder"].kind == "engine"
    assert runners.kinds("create", "release")[1:] == [
        ("create", "tall/vae_decoder.trt", 0),  # out of memory
        ("release", "wide/vae_decoder.trt"),
        ("create", "tall/vae_decoder.trt", 0),
    ]


@pytest.mark.parametrize("kwargs, message", [
    (dict(resident="eager"), "resident='eager'"),
    (dict(memory_budget=0), "memory_budget must be a positive"),
    (dict(weights="w.safetensors"), "has no weights file"),
])
def test_bad_residency_options(static_dir, tiny_vae, kwargs, message):
    with pytest.raises(UserInputError, match=message):
        fake_vae(static_dir, tiny_vae, FakeRunners(tiny_vae, static_dir), **kwargs)


def test_static_engine_output_keeps_the_contract(static_dir, tiny_vae):
    runners = FakeRunners(tiny_vae, static_dir)
    vae = fake_vae(static_dir, tiny_vae, runners)
    x = images(32, 48)
    moments = vae.encode(x)
    encoder, decoder = build_graphs(tiny_vae)
    assert moments.shape == (1, 2 * tiny_vae.config.z_dim, 1, 4, 6)
    torch.testing.assert_close(moments, encoder(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(vae.encode_mean(x), moments[:, : tiny_vae.config.z_dim])
    # The runner's buffer is not handed out: a later call does not change an earlier result.
    first = vae.decode(latents(tiny_vae, 32, 48))
    kept = first.clone()
    vae.decode(latents(tiny_vae, 32, 48) * 2)
    assert torch.equal(first, kept)


def test_engine_input_is_cast_to_engine_precision_and_output_back(tmp_path, tiny_vae):
    engine_dir = build_fake_engine_dir(tmp_path, tiny_vae, "static", precision="fp16")
    runners = FakeRunners(tiny_vae, engine_dir)
    vae = fake_vae(engine_dir, tiny_vae, runners)
    out = vae.decode(latents(tiny_vae, 32, 48))
    assert runners.kinds("infer")[0][4] == torch.float16
    assert out.dtype == torch.float32


def test_static_size_without_engine_falls_back_and_keeps_the_resident_pair(static_dir, tiny_vae, caplog):
    runners = FakeRunners(tiny_vae, static_dir)
    vae = fake_vae(static_dir, tiny_vae, runners)
    vae.decode(latents(tiny_vae, 32, 48))
    with caplog.at_level(logging.WARNING, logger=RUNTIME_LOGGER):
        vae.decode(latents(tiny_vae, 64, 64))
        vae.decode(latents(tiny_vae, 64, 64))
    (message,) = fallback_warnings(caplog)
    assert "no static engine" in message and "image size 64x64" in message and "wide 32x48" in message
    assert vae.resident_engines == ("wide/vae_decoder.trt",)
    assert vae.last_route["decoder"].kind == "pytorch"


# ---------------------------------------------------------------------------- fallback reasons


def _two_decodes(vae, tiny_vae, caplog):
    with caplog.at_level(logging.WARNING, logger=RUNTIME_LOGGER):
        z = latents(tiny_vae, 32, 48)
        first = vae.decode(z)
        vae.decode(z)
    torch.testing.assert_close(first, build_graphs(tiny_vae)[1](z), rtol=0, atol=1e-6)
    return fallback_warnings(caplog)


def test_missing_engine_file_falls_back_once(tmp_path, tiny_vae, caplog):
    engine_dir = build_fake_engine_dir(tmp_path, tiny_vae, "static")
    (engine_dir / "wide" / "vae_decoder.trt").unlink()
    runners = FakeRunners(tiny_vae, engine_dir)
    (message,) = _two_decodes(fake_vae(engine_dir, tiny_vae, runners), tiny_vae, caplog)
    assert "engine file missing" in message and "wide/vae_decoder.trt" in message
    assert runners.events == []


def test_backend_not_installed_falls_back_once(tmp_path, tiny_vae, caplog):
    """The real `runtime_unavailable_reason`: full TensorRT is not importable on the test machines."""
    pytest.importorskip("polygraphy")
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError):
        pass
    else:
        pytest.skip("full TensorRT is installed here")
    engine_dir = build_fake_engine_dir(tmp_path, tiny_vae, "static", backend="tensorrt")
    runners = FakeRunners(tiny_vae, engine_dir)
    vae = TrtVae(engine_dir, False, tiny_vae, device="cpu", dtype=torch.float32, runner_factory=runners)
    (message,) = _two_decodes(vae, tiny_vae, caplog)
    assert "tensorrt engines cannot run here" in message and "pip install tensorrt" in message
    assert runners.events == []


def test_no_gpu_falls_back_once(static_dir, tiny_vae, caplog, monkeypatch):
    """The real `runtime_unavailable_reason` with TensorRT-RTX installed and no CUDA GPU visible."""
    pytest.importorskip("tensorrt_rtx_bindings")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    runners = FakeRunners(tiny_vae, static_dir)
    vae = TrtVae(static_dir, False, tiny_vae, device="cpu", dtype=torch.float32, runner_factory=runners)
    (message,) = _two_decodes(vae, tiny_vae, caplog)
    assert message.endswith("tensorrt_rtx engines cannot run here: no CUDA GPU on this machine")
    assert runners.events == []


def test_unsupported_gpu_falls_back_once(static_dir, tiny_vae, caplog, monkeypatch):
    """The real `runtime_unavailable_reason` on a (pretended) H100: TensorRT-RTX refuses compute capability 9.0."""
    pytest.importorskip("tensorrt_rtx_bindings")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    runners = FakeRunners(tiny_vae, static_dir)
    vae = TrtVae(static_dir, False, tiny_vae, device="cpu", dtype=torch.float32, runner_factory=runners)
    (message,) = _two_decodes(vae, tiny_vae, caplog)
    assert "does not support compute capability 9.0 (NVIDIA H100 80GB HBM3)" in message
    assert runners.events == []


@pytest.mark.parametrize("where", ["create", "activate"])
def test_allocation_failure_falls_back_once_and_is_not_retried(static_dir, tiny_vae, caplog, where):
    failing = {"fail_create" if where == "create" else "fail_activate": {"wide/vae_decoder.trt"}}
    runners = FakeRunners(tiny_vae, static_dir, **failing)
    vae = fake_vae(static_dir, tiny_vae, runners)
    (message,) = _two_decodes(vae, tiny_vae, caplog)
    assert "loading wide/vae_decoder.trt failed" in message
    assert ("OutOfMemoryError: CUDA out of memory" if where == "create" else "out of device memory") in message
    assert len(runners.kinds("create")) == 1  # not retried on the second call
    assert vae.resident_engines == ()
    # The encoder of the same size still runs on its engine.
    vae.encode(images(32, 48))
    assert vae.last_route["encoder"].kind == "engine"


def test_inference_failure_releases_the_engine_and_falls_back_once(static_dir, tiny_vae, caplog):
    runners = FakeRunners(tiny_vae, static_dir, fail_infer={"wide/vae_decoder.trt"})
    vae = fake_vae(static_dir, tiny_vae, runners)
    (message,) = _two_decodes(vae, tiny_vae, caplog)
    assert "running wide/vae_decoder.trt failed: RuntimeError: execute_async_v3() failed" in message
    assert runners.kinds("release") == [("release", "wide/vae_decoder.trt")]
    assert len(runners.kinds("infer")) == 1


def test_without_fallback_an_unservable_call_raises(static_dir, tiny_vae):
    vae = fake_vae(static_dir, tiny_vae, FakeRunners(tiny_vae, static_dir), allow_fallback=False)
    with pytest.raises(EngineUnavailableError, match="no static engine"):
        vae.decode(latents(tiny_vae, 64, 64))


# ---------------------------------------------------------------------------- the PyTorch fallback itself


def test_fallback_equals_diffusers_encode_and_decode(static_dir, tiny_vae):
    vae = TrtVae(static_dir, False, tiny_vae, device="cpu", dtype=torch.float32,
                 unavailable_reason=lambda backend: "no engines in this test")
    x = images(40, 56, batch=2)
    z = latents(tiny_vae, 40, 56, batch=2)
    with torch.no_grad():
        posterior = tiny_vae.encode(x).latent_dist
        decoded = tiny_vae.decode(z).sample
    torch.testing.assert_close(vae.encode(x), posterior.parameters, rtol=0, atol=2e-5)
    torch.testing.assert_close(vae.encode_mean(x), posterior.mode(), rtol=0, atol=2e-5)
    torch.testing.assert_close(vae.decode(z), decoded, rtol=0, atol=2e-5)
    assert vae.last_route["decoder"].kind == "pytorch"


def test_fallback_model_loads_lazily_from_the_manifest_source(tmp_path, tiny_vae, tiny_vae_dir, caplog):
    engine_dir = build_fake_engine_dir(
        tmp_path, tiny_vae, "multiprofile", model={"kind": "vae-folder", "model": str(tiny_vae_dir)}
    )
    vae = TrtVae(engine_dir, True, device="cpu", unavailable_reason=lambda backend: "no engines in this test")
    assert not vae._fallback_model.loaded  # nothing loaded before it is needed
    z = latents(tiny_vae, 32, 32)
    with caplog.at_level(logging.WARNING, logger=RUNTIME_LOGGER):
        out = vae.decode(z)
    with torch.no_grad():
        torch.testing.assert_close(out, tiny_vae.decode(z).sample, rtol=0, atol=2e-5)
    assert not any("other weights" in m for m in fallback_warnings(caplog))


def test_fallback_without_a_reloadable_source_asks_for_fallback_vae(multi_dir, tiny_vae):
    vae = TrtVae(multi_dir, True, device="cpu", unavailable_reason=lambda backend: "no engines in this test")
    with pytest.raises(UserInputError, match="pass fallback_vae="):
        vae.decode(latents(tiny_vae, 32, 32))


# ---------------------------------------------------------------------------- configuration


def test_from_config_accepts_lightx2v_shapes(static_dir, multi_dir, tiny_vae):
    flat = TrtVae.from_config({"trt_engine_path": str(multi_dir), "multi_profile": True}, fallback_vae=tiny_vae)
    nested = TrtVae.from_config(
        {"vae_type": "tensorrt", "trt_vae_config": {"trt_engine_path": str(static_dir), "multi_profile": False}}
    )
    assert flat.multi_profile and not nested.multi_profile
    assert nested.engine_dir == static_dir


@pytest.mark.parametrize(
    "config, message",
    [
        ({"multi_profile": True}, "needs trt_engine_path"),
        ({"trt_engine_path": "/no/such/dir"}, "is not a directory"),
    ],
)
def test_from_config_errors(config, message):
    with pytest.raises(UserInputError, match=message):
        TrtVae.from_config(config)


def test_mode_must_match_the_build(static_dir, multi_dir):
    with pytest.raises(UserInputError, match="holds a static build but multi_profile=True"):
        TrtVae(static_dir, True)
    with pytest.raises(UserInputError, match="holds a multiprofile build but multi_profile=False"):
        TrtVae(multi_dir, False)


def test_folder_without_manifest_is_refused(tmp_path):
    (tmp_path / "1_1").mkdir()
    (tmp_path / "1_1" / "vae_decoder.trt").write_bytes(b"engine")
    with pytest.raises(UserInputError, match="has no manifest.json"):
        TrtVae(tmp_path, False)


@pytest.mark.parametrize("shape", [(1, 3, 32, 48), (1, 3, 2, 32, 48), (1, 4, 1, 32, 48)])
def test_wrong_input_shape_is_a_user_error(static_dir, tiny_vae, shape):
    vae = fake_vae(static_dir, tiny_vae, FakeRunners(tiny_vae, static_dir))
    with pytest.raises(UserInputError, match=r"encoder input must be images \[B, 3, 1, H, W\]"):
        vae.encode(torch.zeros(shape))


def test_from_config_takes_the_documented_lightx2v_blocks_unchanged(static_dir, multi_dir):
    readme = (Path(__file__).resolve().parents[1] / "docs" / "backends" / "tensorrt.md").read_text()
    blocks = [json.loads(b) for b in re.findall(r"```json\n(.*?)\n```", readme, re.S) if "trt_vae_config" in b]
    assert [b["trt_vae_config"]["multi_profile"] for b in blocks] == [False, True]
    for block in blocks:
        folder = multi_dir if block["trt_vae_config"]["multi_profile"] else static_dir
        block["trt_vae_config"]["trt_engine_path"] = str(folder)
        vae = TrtVae.from_config(block)
        assert vae.engine_dir == folder and vae.multi_profile == block["trt_vae_config"]["multi_profile"]


def test_images_in_and_out_as_uint8(multi_dir, tiny_vae):
    """decode_images / encode_images: the runtime's decode and encode with diffusers' pixel arithmetic around them."""
    from diffusers.image_processor import VaeImageProcessor

    vae = TrtVae(multi_dir, True, tiny_vae, device="cpu", unavailable_reason=lambda backend: "no engines in this test")
    z = latents(tiny_vae, 32, 48)
    pixels = vae.decode_images(z)
    assert pixels.dtype == torch.uint8 and pixels.shape == (1, 32, 48, 3)
    stock = VaeImageProcessor(vae_scale_factor=16).postprocess(vae.decode(z)[:, :, 0], output_type="pil")
    assert pixels[0].numpy().tobytes() == stock[0].tobytes()
    expected = VaeImageProcessor(vae_scale_factor=16).preprocess(stock[0]).unsqueeze(2)
    torch.testing.assert_close(vae.encode_images(pixels), vae.encode(expected), rtol=0, atol=0)


def test_fallback_out_of_memory_is_one_line_and_the_runtime_stays_usable(static_dir, tiny_vae):
    from vaebuild.runtime.engines import FallbackOutOfMemoryError

    vae = TrtVae(static_dir, False, tiny_vae, device="cpu", unavailable_reason=lambda backend: "no engines in this test")
    working = vae._fallback_model

    def out_of_memory(graph, x):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 31.64 GiB\nmore lines")

    vae._fallback_model = out_of_memory
    with pytest.raises(FallbackOutOfMemoryError) as caught:
        vae.decode(latents(tiny_vae, 40, 56))
    message = str(caught.value)
    assert "\n" not in message and message.startswith("decoder at image size 40x56 (HxW) ran out of memory")
    assert message.endswith("build engines that serve this size, or use tiles (tiling=True)")
    vae._fallback_model = working
    assert vae.decode(latents(tiny_vae, 40, 56)).shape == (1, 3, 1, 40, 56)
