"""`use_engines` in the five Qwen-Image pipelines that tests/test_diffusers_vae.py does not run (CPU).

EditPlus, EditInpaint, ControlNet, ControlNetInpaint and Layered, with tiny random components (as in
test_diffusers_vae.py: prompt embeddings passed directly, no text encoder) and CPU AOTInductor packages: one folder
for the RGB VAE and one for the layered pipeline's RGBA VAE (4 input channels). For each pipeline:

- the pipeline made by `from_pipe` from a `use_engines` pipeline keeps the EngineVae and the device processors;
- its PIL images are byte-identical to the same pipeline's with the EngineVae and diffusers' own processors;
- its tensor images equal the stock pipeline's (stock VAE, stock processors) within the packages' fp32 tolerance;
- the engines served every encode and decode.

The edit and layered pipelines work at a size derived from ~1024x1024 (640x640 for layered) whatever the output size;
`small_working_sizes` lowers that area to 64x96 in their modules, so that their VAE runs at the packages' size.
"""

import functools
import logging

import diffusers
import pytest
import torch
from conftest import make_tiny_vae
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.qwenimage import (pipeline_qwenimage_edit_inpaint, pipeline_qwenimage_edit_plus,
                                           pipeline_qwenimage_layered)
from PIL import Image
from test_diffusers_vae import ATOL, LOGGER, Z_DIM, route_lines, stock_vae  # noqa: F401 (stock_vae: a fixture)

import vaebuild
from vaebuild.backends.base import BuildOptions
from vaebuild.builder.engines import BuildSource, build_engines
from vaebuild.builder.specs import load_spec
from vaebuild.runtime import EngineVae
from vaebuild.runtime.image_processor import EngineImageProcessor
from vaebuild.runtime.pipelines import EngineMaskProcessor

SIZE = (64, 96)  # (height, width): the output size, and the working size of the edit and layered pipelines
SPEC = f"""kind: static
max_side: 128
profiles:
  - {{name: "2_3", height: {SIZE[0]}, width: {SIZE[1]}, batch: 1}}
"""
LAYERED_Z = 8  # the RGBA VAE's z_dim: not 4, which the layered pipeline would take its 4-channel images for latents

EditPlus = diffusers.QwenImageEditPlusPipeline
EditInpaint = diffusers.QwenImageEditInpaintPipeline
ControlNet = diffusers.QwenImageControlNetPipeline
ControlNetInpaint = diffusers.QwenImageControlNetInpaintPipeline
Layered = diffusers.QwenImageLayeredPipeline
RGB_PIPELINES = (diffusers.QwenImagePipeline, diffusers.QwenImageImg2ImgPipeline, diffusers.QwenImageInpaintPipeline,
                 diffusers.QwenImageEditPipeline, EditPlus, EditInpaint, ControlNet, ControlNetInpaint)


def _at_small_area(calculate_dimensions, target_area, ratio):
    return calculate_dimensions(SIZE[0] * SIZE[1], ratio)


@pytest.fixture(scope="module", autouse=True)
def small_working_sizes():
    """The edit and layered pipelines' `calculate_dimensions` with a 64x96 area instead of 1024x1024 (640x640)."""
    with pytest.MonkeyPatch.context() as patch:
        for module in (pipeline_qwenimage_edit_plus, pipeline_qwenimage_edit_inpaint, pipeline_qwenimage_layered):
            small = functools.partial(_at_small_area, module.calculate_dimensions)
            patch.setattr(module, "calculate_dimensions", small)
        yield


@pytest.fixture(scope="module")
def layered_vae():
    """A tiny RGBA VAE, as the layered pipeline's (4 input and output channels)."""
    return make_tiny_vae(seed=3, input_channels=4, z_dim=LAYERED_Z, latents_mean=[0.1, -0.2, 0.3, 0.0] * 2,
                         latents_std=[1.5, 2.0, 0.8, 1.2] * 2)


@pytest.fixture(scope="module")
def engine_dirs(stock_vae, layered_vae, tmp_path_factory):
    """{"rgb": folder, "rgba": folder}: CPU packages (encoder and decoder) at SIZE of each VAE."""
    root = tmp_path_factory.mktemp("pipeline_engines")
    (root / "static.yaml").write_text(SPEC)
    options = BuildOptions(backend="inductor", device="cpu", jobs=2)
    folders = {}
    for name, vae in (("rgb", stock_vae), ("rgba", layered_vae)):
        source = BuildSource.from_vae(vae, {"kind": "test"}, "fp32")
        build_engines("static", load_spec(root / "static.yaml"), source, root / name, options, log=lambda *a: None)
        folders[name] = root / name
    return folders


def tiny_transformer(z_dim, **config):
    torch.manual_seed(0)
    return diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * z_dim, out_channels=z_dim, num_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6), **config,
    ).eval()


def tiny_controlnet(extra_condition_channels=0):
    """A tiny QwenImageControlNetModel whose zero-initialized projections are made random, so the control counts."""
    torch.manual_seed(1)
    controlnet = diffusers.QwenImageControlNetModel(
        patch_size=2, in_channels=4 * Z_DIM, out_channels=Z_DIM, num_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
        extra_condition_channels=extra_condition_channels,
    ).eval()
    with torch.no_grad():
        for layer in (*controlnet.controlnet_blocks, controlnet.controlnet_x_embedder):
            layer.weight.normal_(0, 0.05)
            layer.bias.normal_(0, 0.05)
    return controlnet


class TextEncoderDtype:
    """The layered pipeline reads `text_encoder.dtype` (the dtype of its images) even with prompt embeddings."""

    dtype = torch.float32


@pytest.fixture(scope="module")
def components(stock_vae, layered_vae):
    """Each pipeline class's components (the stock VAEs); `shared` is the text-to-image pipeline's."""
    shared = dict(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=stock_vae, text_encoder=None,
                  tokenizer=None, transformer=tiny_transformer(Z_DIM))
    return {
        "shared": shared,
        EditPlus: dict(shared, processor=None),  # no VL processor: prompt embeddings are given
        EditInpaint: dict(shared, processor=None),
        ControlNet: dict(shared, controlnet=tiny_controlnet()),
        # its control latents are z channels plus the mask's one, packed 2x2: 4 more than the transformer's input
        ControlNetInpaint: dict(shared, controlnet=tiny_controlnet(extra_condition_channels=4)),
        Layered: dict(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=layered_vae,
                      text_encoder=TextEncoderDtype(), tokenizer=None, processor=None,
                      transformer=tiny_transformer(LAYERED_Z, use_additional_t_cond=True, use_layer3d_rope=True)),
    }


def pixels(height, width, channels, seed, mode=None):
    generator = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (height, width, channels), generator=generator, dtype=torch.uint8).numpy()
    return Image.fromarray(data if channels > 1 else data[..., 0], mode=mode)


PHOTO = pixels(70, 100, 3, seed=2)  # at the 64x96 area: 96x64 (WxH), the packages' size
PHOTO_2 = pixels(50, 60, 3, seed=3)  # EditPlus's second image: also 96x64
RGBA = pixels(40, 60, 4, seed=4, mode="RGBA")  # the layered pipeline's input: 96x64 too
MASK = Image.fromarray(((torch.arange(96)[None, :] > 40) * 255).to(torch.uint8).expand(64, 96).numpy())

RUNS = {
    EditPlus: dict(image=[PHOTO, PHOTO_2]),
    EditInpaint: dict(image=PHOTO, mask_image=MASK, strength=0.8),
    ControlNet: dict(control_image=PHOTO),
    ControlNetInpaint: dict(control_image=PHOTO, control_mask=MASK),
    # a caption: without a prompt the layered pipeline writes one with its VL model
    Layered: dict(image=RGBA, prompt="layers", layers=2),
}
# VAE encodes and decoded images per run (EditPlus: its two images; EditInpaint: the image and the masked image)
ENCODES = {EditPlus: 2, EditInpaint: 2, ControlNet: 1, ControlNetInpaint: 1, Layered: 1}
DECODES = {EditPlus: 1, EditInpaint: 1, ControlNet: 1, ControlNetInpaint: 1, Layered: 2}  # layered: one per layer


def run(pipe, output_type):
    """The pipeline's images (a flat list of PIL images, or one tensor) for fixed embeddings and seeds."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # ControlNetInpaint samples its control latents from the global generator
    embeds = torch.randn(1, 7, 32, generator=generator)
    size = {} if isinstance(pipe, Layered) else dict(height=SIZE[0], width=SIZE[1])  # layered: its input's size
    images = pipe(prompt_embeds=embeds, prompt_embeds_mask=torch.ones(1, 7, dtype=torch.long), num_inference_steps=2,
                  generator=generator, output_type=output_type, **size, **RUNS[type(pipe)]).images
    if isinstance(pipe, Layered):  # a list (per prompt) of the layers
        images = [layer for layers in images for layer in layers]
        return images if output_type == "pil" else torch.stack(images)
    return images


def source_pipeline(cls, components, engine_dirs):
    """A use_engines pipeline to `from_pipe` from: text-to-image over the RGB folder, or a layered one over the RGBA."""
    if cls is Layered:
        return vaebuild.use_engines(Layered(**components[Layered]), engine_dirs["rgba"])
    return vaebuild.use_engines(diffusers.QwenImagePipeline(**components["shared"]), engine_dirs["rgb"])


def extra_components(cls, components):
    """What `cls.from_pipe(text-to-image)` needs besides the shared components."""
    return {k: v for k, v in components[cls].items() if k not in components["shared"]} if cls is not Layered else {}


@pytest.mark.parametrize("cls", list(RUNS), ids=lambda cls: cls.__name__)
def test_use_engines_after_from_pipe_gives_the_stock_processors_images(cls, components, engine_dirs, caplog):
    folder = engine_dirs["rgba" if cls is Layered else "rgb"]
    stock = cls(**components[cls])
    stock.set_progress_bar_config(disable=True)
    expected_pt = run(stock, "pt")  # stock VAE, stock processors
    stock.vae = EngineVae.from_folder(folder, fallback=components[cls]["vae"])
    expected_pil = run(stock, "pil")  # the EngineVae, diffusers' own processors

    source = source_pipeline(cls, components, engine_dirs)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        pipe = cls.from_pipe(source, **extra_components(cls, components))  # no use_engines call on pipe itself
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae is source.vae
    assert isinstance(pipe.image_processor, EngineImageProcessor) and pipe.image_processor.device == pipe.vae.device
    assert pipe.image_processor.config == cls(**components[cls]).image_processor.config
    lines = " ".join(route_lines(caplog))
    if hasattr(pipe, "mask_processor"):
        assert isinstance(pipe.mask_processor, EngineMaskProcessor)
        assert f"{cls.__name__}.mask_processor stays diffusers' own" in lines
    if cls is Layered:
        assert f"{cls.__name__}.image_processor: RGBA images are resized by Pillow" in lines

    calls = {"encoder": [], "decoder": []}
    runtime = pipe.vae.runtime
    for graph in calls:
        served = getattr(runtime, graph[:-1])  # runtime.encode, runtime.decode
        setattr(runtime, graph[:-1], lambda x, served=served, graph=graph: calls[graph].append(len(x)) or served(x))
    images = run(pipe, "pil")
    assert [(i.mode, i.size) for i in images] == [("RGBA" if cls is Layered else "RGB", SIZE[::-1])] * DECODES[cls]
    assert [i.tobytes() for i in images] == [i.tobytes() for i in expected_pil]
    torch.testing.assert_close(run(pipe, "pt"), expected_pt, atol=ATOL, rtol=0)
    assert calls == {"encoder": [1] * ENCODES[cls] * 2, "decoder": [1] * DECODES[cls] * 2}  # two runs, batch 1
    assert not runtime.fallback_counts  # every encode and decode from the packages


def test_from_pipe_carries_the_engines_through_the_eight_rgb_pipelines(components, engine_dirs, caplog):
    source = source_pipeline(diffusers.QwenImagePipeline, components, engine_dirs)
    engine_vae = source.vae
    pipe = source
    with caplog.at_level(logging.INFO, logger=LOGGER):
        for cls in (*RGB_PIPELINES[1:], *RGB_PIPELINES[::-1]):  # each from the previous one, and back
            extra = extra_components(cls, components) if cls in RUNS else (
                {"processor": None} if cls is diffusers.QwenImageEditPipeline else {})
            pipe = cls.from_pipe(pipe, **extra)
            assert type(pipe) is cls and pipe.vae is engine_vae, cls.__name__
            assert type(pipe.image_processor) is EngineImageProcessor, cls.__name__
            mask = getattr(pipe, "mask_processor", None)
            assert mask is None or type(mask) is EngineMaskProcessor, cls.__name__
    assert type(pipe) is diffusers.QwenImagePipeline
    assert sum("mask_processor stays" in line for line in route_lines(caplog)) == 6  # three inpainting classes, twice
    auto = diffusers.AutoPipelineForImage2Image.from_pipe(source)
    assert type(auto) is diffusers.QwenImageImg2ImgPipeline and auto.vae is engine_vae
    assert type(auto.image_processor) is EngineImageProcessor
    inpaint = diffusers.AutoPipelineForInpainting.from_pipe(source)
    assert type(inpaint) is diffusers.QwenImageInpaintPipeline and type(inpaint.mask_processor) is EngineMaskProcessor


def test_from_pipe_without_the_engines_is_diffusers_own(components, engine_dirs):
    source = source_pipeline(diffusers.QwenImagePipeline, components, engine_dirs)
    stock = diffusers.QwenImagePipeline(**components["shared"])
    for made in (diffusers.QwenImageInpaintPipeline.from_pipe(stock),  # a stock source
                 diffusers.QwenImageInpaintPipeline.from_pipe(source, vae=components["shared"]["vae"])):  # stock VAE
        assert type(made.image_processor) is VaeImageProcessor and type(made.mask_processor) is VaeImageProcessor
    with_vae_only = diffusers.QwenImagePipeline(**components["shared"])
    with_vae_only.vae = source.vae  # an EngineVae with diffusers' processor: from_pipe leaves the processor alone
    assert type(diffusers.QwenImageImg2ImgPipeline.from_pipe(with_vae_only).image_processor) is VaeImageProcessor


def test_the_masks_follow_the_images_to_the_device(components, engine_dirs):
    """The inpainting pipelines multiply the processor's image with the mask processor's mask; with the images on a
    device (CUDA on a GPU machine; here the meta device stands in for it), the masks must be there too."""
    pipe = vaebuild.use_engines(diffusers.QwenImageInpaintPipeline(**components["shared"]), engine_dirs["rgb"])
    stock = diffusers.QwenImageInpaintPipeline(**components["shared"]).mask_processor
    on_cpu = pipe.mask_processor.preprocess(MASK, height=SIZE[0], width=SIZE[1])
    reference = stock.preprocess(MASK, height=SIZE[0], width=SIZE[1])
    assert on_cpu.dtype == reference.dtype and torch.equal(on_cpu, reference)  # diffusers' own values
    pipe.image_processor.device = pipe.mask_processor.device = torch.device("meta")
    image = pipe.image_processor.preprocess(PHOTO, height=SIZE[0], width=SIZE[1])
    mask = pipe.mask_processor.preprocess(MASK, height=SIZE[0], width=SIZE[1])
    assert (image * (mask < 0.5)).device.type == "meta"  # QwenImageInpaintPipeline's masked_image
    with pytest.raises(RuntimeError):
        image * (reference < 0.5)  # diffusers' mask processor beside the device processor: the failure this avoids
