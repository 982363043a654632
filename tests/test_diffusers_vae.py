"""`EngineVae` as `pipe.vae` inside diffusers' real Qwen-Image pipelines (tiny random components, CPU).

Each pipeline runs with the stock AutoencoderKLQwenImage and then with `EngineVae.from_folder` over CPU
AOTInductor packages of the same VAE (built once per module: ~25 s per package, two in parallel), with
the same seed: the images must agree within the packages' fp32 tolerance, and the engine path must be
the one that ran. The transformer is a tiny random `QwenImageTransformer2DModel`; prompt embeddings are
passed directly (no tokenizer, no text encoder).
"""

import logging

import diffusers
import pytest
import torch
from conftest import make_tiny_vae

from vaebuild.backends.base import BuildOptions
from vaebuild.builder.engines import BuildSource, build_engines
from vaebuild.errors import UserInputError
from vaebuild.runtime import EngineVae
from vaebuild.builder.specs import load_spec
from vaebuild.verify import DEFAULT_TOLERANCES

pytest.importorskip("transformers", reason="diffusers' Qwen-Image pipelines need transformers")

Z_DIM = 4
COVERED = (64, 96)  # the size the packages are built for (height, width), batch 1
PAIRS = (64, 64)  # a second size, built for batches of 2
UNCOVERED = (80, 80)
STATIC_SPEC = f"""kind: static
max_side: 128
profiles:
  - {{name: "2_3", height: {COVERED[0]}, width: {COVERED[1]}, batch: 1}}
  - {{name: "1_1", height: {PAIRS[0]}, width: {PAIRS[1]}, batch: 2}}
"""
# Pipeline images are in [0, 1], half the VAE's [-1, 1] range: the packages' own fp32 tolerance holds.
ATOL = DEFAULT_TOLERANCES["fp32"].atol
LOGGER = "vaebuild.diffusers"


@pytest.fixture(scope="module")
def stock_vae():
    """A tiny VAE whose latents_mean/std have z_dim entries, as the pipelines' normalization needs."""
    return make_tiny_vae(latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 2.0, 0.8, 1.2])


@pytest.fixture(scope="module")
def engine_dir(stock_vae, tmp_path_factory):
    """CPU AOTInductor packages (encoder and decoder) of `stock_vae` for COVERED, built once per module."""
    root = tmp_path_factory.mktemp("engines")
    (root / "static.yaml").write_text(STATIC_SPEC)
    source = BuildSource.from_vae(stock_vae, {"kind": "test"}, "fp32")
    options = BuildOptions(backend="inductor", device="cpu", jobs=2)
    build_engines("static", load_spec(root / "static.yaml"), source, root / "static", options, log=lambda *a: None)
    return root / "static"


@pytest.fixture(scope="module")
def pipes(stock_vae):
    """(text-to-image, image-to-image) pipelines sharing one tiny transformer and the stock VAE."""
    torch.manual_seed(0)
    transformer = diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * Z_DIM, out_channels=Z_DIM, num_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
    ).eval()
    components = dict(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=stock_vae, text_encoder=None, tokenizer=None,
        transformer=transformer,
    )
    t2i = diffusers.QwenImagePipeline(**components)
    i2i = diffusers.QwenImageImg2ImgPipeline(**components)
    for pipe in (t2i, i2i):
        pipe.set_progress_bar_config(disable=True)
    return t2i, i2i


def generate(pipe, size, batch=1, image=None):
    """The pipeline's images `[B, 3, H, W]` in [0, 1] for fixed prompt embeddings and seed."""
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(batch, 7, 32, generator=generator)
    kwargs = dict(image=image, strength=0.8) if image is not None else {}
    return pipe(
        prompt_embeds=embeds, prompt_embeds_mask=torch.ones(batch, 7, dtype=torch.long), height=size[0],
        width=size[1], num_inference_steps=2, generator=generator, output_type="pt", **kwargs,
    ).images


def with_vae(pipe, vae, run):
    """`run(pipe)` with `pipe.vae = vae`, the previous VAE restored afterwards."""
    stock = pipe.vae
    pipe.vae = vae
    try:
        return run(pipe)
    finally:
        pipe.vae = stock


def route_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_text_to_image_matches_stock_vae(pipes, engine_dir, caplog):
    t2i, _ = pipes
    expected = generate(t2i, COVERED)
    engine_vae = EngineVae.from_folder(engine_dir, fallback=t2i.vae)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        images = with_vae(t2i, engine_vae, lambda p: generate(p, COVERED))
    torch.testing.assert_close(images, expected, atol=ATOL, rtol=0)
    assert route_lines(caplog) == ["decoder 64x96 (HxW): engine 2_3/vae_decoder.pt2, profile 0"]
    assert not engine_vae.runtime.fallback_counts


def test_image_to_image_matches_stock_vae(pipes, engine_dir):
    _, i2i = pipes
    image = torch.rand(1, 3, *COVERED, generator=torch.Generator().manual_seed(1))
    expected = generate(i2i, COVERED, image=image)
    engine_vae = EngineVae.from_folder(engine_dir, fallback=i2i.vae)
    images = with_vae(i2i, engine_vae, lambda p: generate(p, COVERED, image=image))
    torch.testing.assert_close(images, expected, atol=ATOL, rtol=0)
    assert {graph: route.kind for graph, route in engine_vae.runtime.last_route.items()} == {
        "encoder": "engine", "decoder": "engine"
    }


def test_uncovered_size_takes_the_fallback_with_one_line(pipes, engine_dir, caplog):
    t2i, _ = pipes
    expected = generate(t2i, UNCOVERED)
    engine_vae = EngineVae.from_folder(engine_dir, fallback=t2i.vae)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        for _ in range(2):  # the second call at the same size logs nothing new
            images = with_vae(t2i, engine_vae, lambda p: generate(p, UNCOVERED))
    torch.testing.assert_close(images, expected, atol=ATOL, rtol=0)
    (line,) = route_lines(caplog)
    assert line.startswith("decoder 80x80 (HxW): PyTorch 2-D model (no static engine")


def test_batch_is_split_for_batch_one_engines(pipes, engine_dir):
    t2i, _ = pipes
    expected = generate(t2i, COVERED, batch=2)
    engine_vae = EngineVae.from_folder(engine_dir, fallback=t2i.vae)
    calls = []
    decode = engine_vae.runtime.decode
    engine_vae.runtime.decode = lambda latents: calls.append(len(latents)) or decode(latents)
    images = with_vae(t2i, engine_vae, lambda p: generate(p, COVERED, batch=2))
    torch.testing.assert_close(images, expected, atol=ATOL, rtol=0)
    assert calls == [1, 1] and engine_vae.runtime.last_route["decoder"].kind == "engine"


def test_each_size_is_split_by_its_own_engines_batch(pipes, engine_dir, caplog):
    t2i, _ = pipes
    engine_vae = EngineVae.from_folder(engine_dir, fallback=t2i.vae)
    calls = []
    decode = engine_vae.runtime.decode
    engine_vae.runtime.decode = lambda latents: calls.append((len(latents), latents.shape[-1])) or decode(latents)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        for size in (PAIRS, COVERED):
            expected = generate(t2i, size, batch=2)
            images = with_vae(t2i, engine_vae, lambda p: generate(p, size, batch=2))
            torch.testing.assert_close(images, expected, atol=ATOL, rtol=0)
    assert calls == [(2, PAIRS[1] // 8), (1, COVERED[1] // 8), (1, COVERED[1] // 8)]
    assert not engine_vae.runtime.fallback_counts  # every chunk from its engine
    assert route_lines(caplog) == ["decoder 64x64 (HxW): engine 1_1/vae_decoder.pt2, profile 0",
                                   "decoder 64x96 (HxW): engine 2_3/vae_decoder.pt2, profile 0"]


def test_a_split_batch_logs_every_path_its_chunks_took(pipes, engine_dir, caplog):
    t2i, _ = pipes
    engine_vae = EngineVae.from_folder(engine_dir, fallback=t2i.vae)
    runtime = engine_vae.runtime
    served = []
    decode = runtime.decode

    def first_chunk_unserved(latents):  # the first chunk as if its engine had failed, the second from the engine
        if not served:
            served.append("pytorch")
            return runtime._fallback("decoder", latents, "a test's failed engine")
        served.append("engine")
        return decode(latents)

    runtime.decode = first_chunk_unserved
    z = torch.randn(2, Z_DIM, 1, COVERED[0] // 8, COVERED[1] // 8)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        engine_vae.decode(z)
    assert served == ["pytorch", "engine"]
    assert route_lines(caplog) == ["decoder 64x96 (HxW): PyTorch 2-D model (a test's failed engine)",
                                   "decoder 64x96 (HxW): engine 2_3/vae_decoder.pt2, profile 0"]


def test_from_pipe_keeps_the_engine_vae(pipes, engine_dir):
    t2i, _ = pipes
    engine_vae = EngineVae.from_folder(engine_dir, fallback=t2i.vae)

    def switch(pipe):
        i2i = diffusers.QwenImageImg2ImgPipeline.from_pipe(pipe)
        assert i2i.vae is engine_vae
        assert diffusers.QwenImageInpaintPipeline.from_pipe(i2i).vae is engine_vae

    with_vae(t2i, engine_vae, switch)


def test_saving_and_device_moves_are_refused(pipes, engine_dir, tmp_path):
    t2i, _ = pipes
    engine_vae = EngineVae.from_folder(engine_dir, fallback=t2i.vae)

    def move_and_save(pipe):
        assert pipe.to("cpu").vae is engine_vae  # its own device: accepted
        with pytest.raises(UserInputError, match="EngineVae cannot be saved") as caught:
            pipe.save_pretrained(tmp_path / "saved")
        assert "\n" not in str(caught.value) and not (tmp_path / "saved").exists()

    with_vae(t2i, engine_vae, move_and_save)
    with pytest.raises(UserInputError, match="cannot move to meta"):
        engine_vae.to("meta")
    assert engine_vae.to("cpu", torch.bfloat16) is engine_vae and engine_vae.dtype == torch.bfloat16


def test_fallback_of_another_architecture_is_refused(engine_dir):
    with pytest.raises(UserInputError, match="differs.*base_dim"):
        EngineVae.from_folder(engine_dir, fallback=make_tiny_vae(base_dim=8, latents_mean=[0.0] * 4,
                                                                 latents_std=[1.0] * 4))


def run_pil(pipe, size, **kwargs):
    """The pipeline's PIL images for fixed prompt embeddings and seed."""
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, 7, 32, generator=generator)
    return pipe(prompt_embeds=embeds, prompt_embeds_mask=torch.ones(1, 7, dtype=torch.long), height=size[0],
                width=size[1], num_inference_steps=2, generator=generator, output_type="pil", **kwargs).images


def test_use_engines_gives_the_images_of_the_stock_processor_in_four_pipelines(pipes, engine_dir):
    """use_engines (device processor) against EngineVae with diffusers' own processor: byte-identical PIL images."""
    from PIL import Image

    import vaebuild
    from vaebuild.runtime.image_processor import EngineImageProcessor

    t2i, _ = pipes
    photo = Image.fromarray(torch.randint(0, 256, (70, 100, 3), generator=torch.Generator().manual_seed(2),
                                          dtype=torch.uint8).numpy())
    mask = Image.fromarray(((torch.arange(96)[None, :] > 40) * 255).to(torch.uint8).expand(64, 96).numpy())
    runs = {
        diffusers.QwenImagePipeline: {},
        diffusers.QwenImageImg2ImgPipeline: dict(image=photo, strength=0.8),
        diffusers.QwenImageInpaintPipeline: dict(image=photo, mask_image=mask, strength=0.8),
        diffusers.QwenImageEditPipeline: dict(image=photo),
    }
    for pipeline_class, kwargs in runs.items():
        extra = {"processor": None} if pipeline_class is diffusers.QwenImageEditPipeline else {}  # its VL processor
        pipe = pipeline_class.from_pipe(t2i, **extra)
        pipe.vae = EngineVae.from_folder(engine_dir, fallback=t2i.vae)
        expected = run_pil(pipe, COVERED, **kwargs)
        assert vaebuild.use_engines(pipe) is pipe  # pipe.vae is an EngineVae already: no folder needed
        assert isinstance(pipe.image_processor, EngineImageProcessor)
        images = run_pil(pipe, COVERED, **kwargs)
        assert [i.tobytes() for i in images] == [i.tobytes() for i in expected], pipeline_class.__name__
        assert pipe.vae.runtime.last_route["decoder"].kind == "engine"  # 64x96 has its engines (the edit
        # pipeline encodes at its own size, which the folder does not cover: the fallback serves it)


def test_use_engines_swaps_vae_and_processor_and_survives_from_pipe(pipes, engine_dir, caplog):
    import vaebuild
    from vaebuild.runtime.image_processor import EngineImageProcessor

    t2i, _ = pipes
    pipe = diffusers.QwenImageInpaintPipeline.from_pipe(t2i)
    stock_config = dict(pipe.image_processor.config)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert vaebuild.use_engines(pipe, engine_dir) is pipe
    assert isinstance(pipe.vae, EngineVae) and pipe.vae.runtime.engine_dir == engine_dir
    assert isinstance(pipe.image_processor, EngineImageProcessor)
    assert {k: v for k, v in pipe.image_processor.config.items() if not k.startswith("_")} == {
        k: v for k, v in stock_config.items() if not k.startswith("_")}
    assert "QwenImageInpaintPipeline.mask_processor stays diffusers' own" in " ".join(route_lines(caplog))
    again = vaebuild.use_engines(diffusers.QwenImageImg2ImgPipeline.from_pipe(pipe))
    assert again.vae is pipe.vae and isinstance(again.image_processor, EngineImageProcessor)
    with pytest.raises(UserInputError, match="needs the engine folder"):
        vaebuild.use_engines(diffusers.QwenImagePipeline.from_pipe(t2i))
    with pytest.raises(UserInputError, match="already serves the engines"):
        vaebuild.use_engines(pipe, engine_dir.parent)
