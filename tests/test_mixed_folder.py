"""Mixed folders (`vaebuild multiprofile --static-spec`): static pairs of exact sizes beside the multi-profile pair,
one manifest (issue 26).

The fast half: folders written by the real `build_engines` with placeholder engine files, run by the fake runners of
`test_runtime` (routing, `multi_profile=`, batch splitting, unavailable pairs, sizes past the largest, the build's
checks). The real half, in `test_mixed_packages.py`: CPU AOTInductor packages of a small VAE, inside diffusers'
QwenImageEditPipeline.
"""

import json
import logging
from unittest import mock

import pytest
import torch
from test_runtime import RUNTIME_LOGGER, FakeRunners, _placeholder_build, images, latents, write_fake_export

from vaebuild.backends.base import BuildOptions
from vaebuild.builder.engines import build_engines
from vaebuild.builder.specs import load_spec
from vaebuild.errors import UserInputError
from vaebuild.model.graphs import build_graphs
from vaebuild.runtime import EngineUnavailableError, VaeRuntime
from vaebuild.runtime.engines import FallbackOutOfMemoryError

MULTI_SPEC = """kind: multiprofile
max_side: 128
profiles:
  - name: "any"
    min: {height: 16, width: 16}
    opt: {height: 64, width: 64}
    max: {height: 128, width: 128}
    batch: {min: 1, opt: 1, max: 2}
"""
STATIC_SPEC = """kind: static
max_side: 128
profiles:
  - {name: "48x32", height: 32, width: 48, batch: 1}
  - {name: "32x48", height: 48, width: 32, batch: 1}
  - {name: "64x64", height: 64, width: 64, batch: 1}
"""
DYNAMIC = {graph: f"vae_{graph}_multi_profile.trt" for graph in ("encoder", "decoder")}


def build_fake_mixed_dir(root, vae, static_names=None, build=_placeholder_build):
    """A mixed folder as `vaebuild multiprofile --static-spec` writes it (placeholder engine bytes)."""
    (root / "multi.yaml").write_text(MULTI_SPEC)
    (root / "static.yaml").write_text(STATIC_SPEC)
    static = load_spec(root / "static.yaml")
    if static_names:
        static = static.select(static_names)
    onnx_dir = write_fake_export(root / "onnx", vae)
    out = root / "mixed"
    with mock.patch("vaebuild.backends.tensorrt.TensorRTBackend.build_engine", build), \
            mock.patch("vaebuild.backends.tensorrt.TensorRTBackend.version", lambda backend: "0-test"):
        manifest = build_engines("multiprofile", load_spec(root / "multi.yaml"), onnx_dir, out,
                                 BuildOptions(backend="tensorrt_rtx"), log=lambda *a: None, allow_non_fp16=True,
                                 static_spec=static)
    return out, manifest


@pytest.fixture(scope="module")
def mixed_dir(tiny_vae, tmp_path_factory):
    return build_fake_mixed_dir(tmp_path_factory.mktemp("mixed"), tiny_vae)[0]


def runtime(folder, vae, runners, multi_profile=None, **kwargs):
    kwargs.setdefault("unavailable_reason", lambda backend: None)
    return VaeRuntime(folder, multi_profile, vae, device="cpu", dtype=torch.float32, runner_factory=runners, **kwargs)


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.name == RUNTIME_LOGGER and r.levelno == logging.WARNING]


# ---------------------------------------------------------------------------- the build


def test_one_manifest_lists_both_kinds(tiny_vae, tmp_path):
    out, manifest = build_fake_mixed_dir(tmp_path, tiny_vae, ["64x64", "48x32"])
    assert manifest["kind"] == "multiprofile"
    assert manifest["static_spec"] == {"path": str(tmp_path / "static.yaml"), "names": ["48x32", "64x64"]}
    assert [e["path"] for e in manifest["engines"]] == [
        DYNAMIC["encoder"], DYNAMIC["decoder"], "48x32/vae_encoder.trt", "48x32/vae_decoder.trt",
        "64x64/vae_encoder.trt", "64x64/vae_decoder.trt"]
    static = manifest["engines"][2]["profiles"]
    assert static == [{"name": "48x32", "image": {"min": [32, 48], "opt": [32, 48], "max": [32, 48]},
                       "batch": [1, 1, 1], "input": {level: [1, 3, 1, 32, 48] for level in ("min", "opt", "max")}}]


def test_a_second_run_skips_every_engine_and_a_new_size_adds_only_its_pair(tiny_vae, tmp_path):
    build_fake_mixed_dir(tmp_path, tiny_vae, ["48x32"])
    built = []

    def counting_build(*args):
        built.append(args[3].relative_to(tmp_path / "mixed").as_posix())
        return _placeholder_build(*args)

    build_fake_mixed_dir(tmp_path, tiny_vae, ["48x32"], build=counting_build)
    assert built == []
    _, manifest = build_fake_mixed_dir(tmp_path, tiny_vae, ["48x32", "32x48"], build=counting_build)
    assert built == ["32x48/vae_encoder.trt", "32x48/vae_decoder.trt"]
    assert len(manifest["engines"]) == 6


@pytest.mark.parametrize("fields, message", [
    (dict(kind="static", spec="qwen_image_edit", static_spec="qwen_image_edit"),
     "--static-spec adds exact-size pairs to a multiprofile folder"),
    (dict(kind="multiprofile", static_spec="i2i_multiprofile"), "is a multiprofile spec; pass a static spec"),
    (dict(kind="multiprofile", static_ratios=("1024x1024",)), "--static-ratios selects entries of --static-spec"),
    (dict(kind="multiprofile", static_spec="qwen_image_edit", static_ratios=("1000x1000",)),
     "unknown ratio '1000x1000'"),
])
def test_static_spec_is_checked_before_anything_is_built(tmp_path, fields, message):
    from vaebuild.builder.run import BuildRequest, run_build

    with pytest.raises(UserInputError, match=message):
        run_build(BuildRequest(out=tmp_path / "out", **fields), log=lambda *a: None)
    assert not (tmp_path / "out").exists()


def test_the_h200_subset_of_the_edit_spec():
    """The five sizes of the planned H200 build are entries of the shipped edit spec, by these names."""
    from vaebuild.builder.run import BuildRequest, _static_spec

    names = ("1024x1024", "1184x896", "896x1184", "1248x832", "1376x768")
    spec = _static_spec(BuildRequest(kind="multiprofile", out=None, static_spec="qwen_image_edit", static_ratios=names))
    assert {(p.name, p.opt.width, p.opt.height) for p in spec.profiles} == {
        (n, *map(int, n.split("x"))) for n in names}


# ---------------------------------------------------------------------------- the engine choice


def test_an_exact_static_size_is_served_by_its_pair_every_other_by_the_multi_profile_engine(mixed_dir, tiny_vae):
    runners = FakeRunners(tiny_vae, mixed_dir)
    vae = runtime(mixed_dir, tiny_vae, runners)
    assert vae.mixed and vae.multi_profile
    encoder, decoder = build_graphs(tiny_vae)
    for height, width, served in [(32, 48, "48x32/vae_encoder.trt"), (48, 32, "32x48/vae_encoder.trt"),
                                  (48, 48, DYNAMIC["encoder"]), (128, 16, DYNAMIC["encoder"])]:
        x = images(height, width)
        torch.testing.assert_close(vae.encode(x), encoder(x), rtol=0, atol=1e-6)
        assert vae.thread_route("encoder").engine == served and vae.last_route["encoder"].kind == "engine"
        z = latents(tiny_vae, height, width)
        torch.testing.assert_close(vae.decode(z), decoder(z), rtol=0, atol=1e-6)
        assert vae.thread_route("decoder").engine == served.replace("encoder", "decoder")
    assert not vae.fallback_counts
    assert vae.prepare("encoder", (1, 3, 1, 64, 64)).engine == "64x64/vae_encoder.trt"
    assert vae.prepare("encoder", (2, 3, 1, 64, 64)).engine == DYNAMIC["encoder"]  # batch 2: only the dynamic one


def test_batch_splitting_follows_the_engine_of_each_size(mixed_dir, tiny_vae):
    from vaebuild.runtime import EngineVae

    runners = FakeRunners(tiny_vae, mixed_dir)
    vae = runtime(mixed_dir, tiny_vae, runners)
    assert vae.max_batch("encoder", (4, 3, 1, 32, 48)) == 1  # the static pair's batch
    assert vae.max_batch("encoder", (4, 3, 1, 40, 40)) == 2  # the multi-profile profile's batch max
    engine_vae = EngineVae(vae)
    engine_vae.encode(images(32, 48, batch=3))
    engine_vae.encode(images(40, 40, batch=3))
    served = [(e[1], e[3][0]) for e in runners.kinds("infer")]
    assert served == [("48x32/vae_encoder.trt", 1)] * 3 + [(DYNAMIC["encoder"], 2), (DYNAMIC["encoder"], 1)]


def test_multi_profile_false_serves_only_the_static_pairs(mixed_dir, tiny_vae):
    runners = FakeRunners(tiny_vae, mixed_dir)
    vae = runtime(mixed_dir, tiny_vae, runners, multi_profile=False, resident="all")
    assert all("multi_profile" not in path for path in vae.engine_paths) and len(vae.engine_paths) == 6
    assert all("multi_profile" not in e[1] for e in runners.kinds("create"))
    vae.encode(images(32, 48))
    assert vae.thread_route("encoder").engine == "48x32/vae_encoder.trt"
    vae.encode(images(40, 40))
    assert vae.thread_route("encoder").kind == "pytorch" and "no static engine" in vae.thread_route("encoder").reason
    assert runtime(mixed_dir, tiny_vae, runners, multi_profile=True).mixed  # True: both kinds, as None


def test_from_config_and_engine_vae_take_a_mixed_folder(mixed_dir, tiny_vae):
    from vaebuild.runtime import EngineVae

    kwargs = dict(device="cpu", runner_factory=FakeRunners(tiny_vae, mixed_dir), unavailable_reason=lambda b: None)
    assert VaeRuntime.from_config({"trt_engine_path": str(mixed_dir), "multi_profile": True}, tiny_vae, **kwargs).mixed
    assert EngineVae.from_folder(mixed_dir, fallback=tiny_vae, **kwargs).runtime.multi_profile


def test_a_pair_that_cannot_run_leaves_its_size_to_the_multi_profile_engine(mixed_dir, tiny_vae, tmp_path, caplog):
    runners = FakeRunners(tiny_vae, mixed_dir, fail_activate={"48x32/vae_encoder.trt"})
    vae = runtime(mixed_dir, tiny_vae, runners)
    with caplog.at_level(logging.WARNING, logger=RUNTIME_LOGGER):
        for _ in range(2):
            vae.encode(images(32, 48))
    assert vae.thread_route("encoder").engine == DYNAMIC["encoder"] and not vae.fallback_counts
    (line,) = warnings_of(caplog)
    assert line.startswith("encoder: loading 48x32/vae_encoder.trt failed: RuntimeError")
    assert line.endswith(f"; {DYNAMIC['encoder']} serves instead")


def test_an_engine_that_fails_while_running_takes_the_fallback_not_the_other_engine(mixed_dir, tiny_vae):
    runners = FakeRunners(tiny_vae, mixed_dir, fail_infer={"48x32/vae_encoder.trt"})
    vae = runtime(mixed_dir, tiny_vae, runners)
    vae.encode(images(32, 48))
    assert vae.thread_route("encoder").kind == "pytorch"
    assert vae.thread_route("encoder").reason.startswith("running 48x32/vae_encoder.trt failed")
    assert not any(e[1] == DYNAMIC["encoder"] for e in runners.kinds("infer"))
    vae.encode(images(32, 48))  # the failed pair is never retried: the multi-profile engine serves from now on
    assert vae.thread_route("encoder").engine == DYNAMIC["encoder"]


# ---------------------------------------------------------------------------- past the largest size


def test_a_size_past_the_largest_is_one_clear_line_then_the_fallback(mixed_dir, tiny_vae, caplog):
    runners = FakeRunners(tiny_vae, mixed_dir)
    vae = runtime(mixed_dir, tiny_vae, runners)
    x = images(144, 64)
    with caplog.at_level(logging.WARNING, logger=RUNTIME_LOGGER):
        out = vae.encode(x)
        vae.encode(x)
    torch.testing.assert_close(out, build_graphs(tiny_vae)[0](x), rtol=0, atol=1e-6)
    (line,) = warnings_of(caplog)
    assert "\n" not in line
    assert line.startswith(f"encoder: using the PyTorch 2-D model instead of an engine: image size 144x64 (HxW) is "
                           f"past the largest {mixed_dir} serves (128x128): no profile of {DYNAMIC['encoder']} "
                           "contains input [1, 3, 1, 144, 64]")
    assert line.endswith("; no static pair of input [1, 3, 1, 144, 64] (static pairs, HxW: 32x48, 48x32, 64x64)")
    assert sum(vae.fallback_counts.values()) == 2


def test_past_the_largest_without_fallback_raises_the_same_line(mixed_dir, tiny_vae):
    vae = runtime(mixed_dir, tiny_vae, FakeRunners(tiny_vae, mixed_dir), allow_fallback=False)
    with pytest.raises(EngineUnavailableError, match=r"^image size 8x1040 \(HxW\) is past the largest .* \(128x128\)"):
        vae.decode(latents(tiny_vae, 8, 1040))


def test_past_the_largest_when_the_fallback_runs_out_of_memory_is_one_line(mixed_dir, tiny_vae):
    vae = runtime(mixed_dir, tiny_vae, FakeRunners(tiny_vae, mixed_dir))

    def out_of_memory(graph, x):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 31.64 GiB\nmore lines")

    vae._fallback_model = out_of_memory
    with pytest.raises(FallbackOutOfMemoryError) as caught:
        vae.decode(latents(tiny_vae, 256, 256))
    message = str(caught.value)
    assert "\n" not in message and message.startswith("decoder at image size 256x256 (HxW) ran out of memory")
    assert "is past the largest" in message and "(128x128)" in message


def test_a_multiprofile_folder_names_the_largest_size_too(tiny_vae, tmp_path):
    from test_runtime import build_fake_engine_dir

    folder = build_fake_engine_dir(tmp_path, tiny_vae, "multiprofile")
    vae = runtime(folder, tiny_vae, FakeRunners(tiny_vae, folder), allow_fallback=False)
    with pytest.raises(EngineUnavailableError) as caught:
        vae.encode(images(136, 64))
    assert str(caught.value).startswith(f"image size 136x64 (HxW) is past the largest {folder} serves (128x128): "
                                        "no profile of vae_encoder_multi_profile.trt contains input [1, 3, 1, 136, 64]")
    assert not vae.mixed and json.loads((folder / "manifest.json").read_text()).get("static_spec") is None
