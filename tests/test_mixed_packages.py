"""A mixed folder of real CPU AOTInductor packages (issue 26), built once per module through the CLI:

    vaebuild multiprofile --spec DYNAMIC --static-spec qwen_image_edit --static-ratios 1024x1024 --backend inductor

(one multi-profile pair over 64..1920 pixels a side, plus the 1024x1024 pair of the shipped edit spec;
four packages, two compiled at a time). The exact size is served by its static pair, every other size in range by
the multi-profile pair, equal to the stock VAE within fp32 noise, also inside diffusers' QwenImageEditPipeline.
"""

import json
import math

import pytest
import torch
from conftest import make_tiny_vae
from typer.testing import CliRunner

from vaebuild.builder.edit_sizes import calculate_dimensions, edit_sizes
from vaebuild.cli import app
from vaebuild.runtime import VaeRuntime
from vaebuild.verify import DEFAULT_TOLERANCES

DYNAMIC_SPEC = """kind: multiprofile
max_side: 1920
profiles:
  - name: "edit"
    min: {height: 64, width: 64}
    opt: {height: 1024, width: 1024}
    max: {height: 1920, width: 1920}
    batch: {min: 1, opt: 1, max: 1}
"""
ATOL = DEFAULT_TOLERANCES["fp32"].atol
DYNAMIC = {graph: f"vae_{graph}_multi_profile.pt2" for graph in ("encoder", "decoder")}
STATIC = {graph: f"1024x1024/vae_{graph}.pt2" for graph in ("encoder", "decoder")}


@pytest.fixture(scope="module")
def stock_vae():
    """A tiny VAE whose latents_mean/std have z_dim entries, as the pipelines' normalization needs."""
    return make_tiny_vae(latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 2.0, 0.8, 1.2])


def build_args(root):
    return ["multiprofile", "--model", root / "vae", "--spec", root / "dynamic.yaml", "--static-spec",
            "qwen_image_edit", "--static-ratios", "1024x1024", "--backend", "inductor", "--device", "cpu",
            "--precision", "fp32", "--jobs", "2", "--out", root / "i2i", "--json", root / "summary.json"]


@pytest.fixture(scope="module")
def built(stock_vae, tmp_path_factory):
    """(folder, CLI output of the build) of the mixed folder, built once per module."""
    root = tmp_path_factory.mktemp("mixed_packages")
    stock_vae.save_pretrained(root / "vae")
    (root / "dynamic.yaml").write_text(DYNAMIC_SPEC)
    result = CliRunner().invoke(app, [str(a) for a in build_args(root)])
    assert result.exit_code == 0, result.output
    return root, result.output


@pytest.fixture(scope="module")
def folder(built):
    return built[0] / "i2i"


@pytest.fixture(scope="module")
def runtime(folder, stock_vae):
    return VaeRuntime(folder, fallback_vae=stock_vae, device="cpu")


def test_the_build_lists_both_kinds_and_a_rerun_skips_them(built, folder):
    root, output = built
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["kind"] == "multiprofile" and manifest["static_spec"]["names"] == ["1024x1024"]
    assert sorted(e["path"] for e in manifest["engines"]) == sorted([*DYNAMIC.values(), *STATIC.values()])
    assert "compiling 4 package(s) in 2 worker processes" in output
    assert sorted(p.name for p in folder.glob("*.safetensors")) == ["weights.safetensors"]  # one weights file
    again = CliRunner().invoke(app, [str(a) for a in build_args(root)])
    assert again.exit_code == 0, again.output
    assert again.output.count("up to date, skipped") == 4
    assert json.loads((root / "summary.json").read_text())["details"]["static_spec"].endswith("qwen_image_edit.yaml")


def test_the_exact_size_from_its_pair_another_from_the_multi_profile_pair(runtime, stock_vae):
    assert runtime.mixed and len(runtime.resident_engines) == 4
    generator = torch.Generator().manual_seed(0)
    # (The static encoder at 1024x1024 runs inside the edit pipeline below, at ratio 1.)
    for (height, width), served in [((1024, 1024), STATIC), ((64, 96), DYNAMIC), ((96, 64), DYNAMIC)]:
        if served is DYNAMIC:
            images = torch.rand(1, 3, 1, height, width, generator=generator) * 2 - 1
            with torch.no_grad():
                posterior = stock_vae.encode(images).latent_dist
            moments = runtime.encode(images)
            assert runtime.thread_route("encoder").engine == served["encoder"]
            torch.testing.assert_close(moments[:, :4], posterior.mean, atol=ATOL, rtol=0)
        latents = 1.5 * torch.randn(1, 4, 1, height // 8, width // 8, generator=generator)
        with torch.no_grad():
            expected = stock_vae.decode(latents).sample.clamp(-1, 1)
        torch.testing.assert_close(runtime.decode(latents), expected, atol=ATOL, rtol=0)
        assert runtime.thread_route("decoder").engine == served["decoder"]
    assert not runtime.fallback_counts


def test_every_edit_pipeline_size_is_served_by_an_engine(runtime):
    sizes = edit_sizes()
    assert len(sizes) == 75 and max(max(s) for s in sizes) <= 1920
    for width, height in sizes:
        for graph, shape in (("encoder", (1, 3, 1, height, width)), ("decoder", (1, 4, 1, height // 8, width // 8))):
            route = runtime.prepare(graph, shape)  # raises EngineUnavailableError if none serves it
            assert route.engine == (STATIC if (width, height) == (1024, 1024) else DYNAMIC)[graph]


@pytest.mark.parametrize("ratio", [1.0, 4 / 3])
def test_edit_pipeline_inputs_are_served_by_engines(folder, stock_vae, ratio):
    """QwenImageEditPipeline encodes its input at calculate_dimensions(1024*1024, ratio): 1024x1024 (the static pair),
    and 1184x896 (the multi-profile pair); it decodes at the small size asked for (the multi-profile pair)."""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("transformers", reason="diffusers' Qwen-Image pipelines need transformers")
    from PIL import Image

    from vaebuild.runtime import EngineVae

    torch.manual_seed(0)
    transformer = diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * 4, out_channels=4, num_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
    ).eval()
    pipe = diffusers.QwenImageEditPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=stock_vae,
                                           text_encoder=None, tokenizer=None, processor=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    height = 60
    photo_size = (round(height * ratio), height)  # PIL: (width, height)
    photo = Image.fromarray(torch.randint(0, 256, (photo_size[1], photo_size[0], 3),
                                          generator=torch.Generator().manual_seed(2), dtype=torch.uint8).numpy())
    width, input_height = calculate_dimensions(1024 * 1024, photo_size[0] / photo_size[1])

    def run():
        generator = torch.Generator().manual_seed(0)
        embeds = torch.randn(1, 7, 32, generator=generator)
        return pipe(image=photo, prompt_embeds=embeds, prompt_embeds_mask=torch.ones(1, 7, dtype=torch.long),
                    height=64, width=96, num_inference_steps=2, generator=generator, output_type="pt").images

    expected = run()
    engine_vae = EngineVae.from_folder(folder, fallback=stock_vae)
    pipe.vae = engine_vae
    images = run()
    torch.testing.assert_close(images, expected, atol=ATOL, rtol=0)
    served = STATIC if (width, input_height) == (1024, 1024) else DYNAMIC
    assert engine_vae.runtime.last_route["encoder"].engine == served["encoder"]
    assert engine_vae.runtime.last_route["decoder"].engine == DYNAMIC["decoder"]
    assert not engine_vae.runtime.fallback_counts
    assert math.isclose(width / input_height, ratio, rel_tol=0.1)
