"""Exact tiles (`vaebuild.model.tiling`, `vaebuild.runtime.tiling`, `--tile`): equal to the untiled stock VAE.

A small non-default VAE (base_dim 8, dim_mult [1, 2, 1, 2], one residual block per level: halos 9 latent pixels for
the decoder tail and 40 image pixels for the encoder down path). CPU packages are built once per module.
"""

import logging

import pytest
import torch
from conftest import make_tiny_vae

from vaebuild.errors import UserInputError
from vaebuild.model.graphs import build_graphs
from vaebuild.model.tiling import (
    architecture,
    axis_tiles,
    build_tile_graphs,
    decoder_tiles,
    encoder_tiles,
    halos,
)
from vaebuild.runtime.tiling import tiled_decode, tiled_encode

CONFIG = dict(base_dim=8, dim_mult=[1, 2, 1, 2], num_res_blocks=1, latents_mean=[0.1, -0.2, 0.3, 0.0],
              latents_std=[1.5, 2.0, 0.8, 1.2])
TILE = (48, 64)  # image pixels: cores of 6x8 latent pixels
# (image height, width): not multiples of the tile, and one smaller than a tile
SIZES = ((104, 152), (40, 56), (64, 200))


@pytest.fixture(scope="module")
def vae():
    return make_tiny_vae(**CONFIG)


def stock_decode(vae, z):
    with torch.no_grad():
        return vae.decode(z).sample.clamp(-1, 1)


def stock_moments(vae, x):
    with torch.no_grad():
        return vae.encode(x).latent_dist.parameters


def sample(size, z_dim=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(1, 3, 1, *size, generator=g) * 2 - 1).to(dtype)
    z = (1.5 * torch.randn(1, z_dim, 1, size[0] // 8, size[1] // 8, generator=g)).to(dtype)
    return x, z


# ---------------------------------------------------------------------- halos and placement


def test_halos_come_from_the_architecture():
    shipped = halos(architecture({}))  # AutoencoderKLQwenImage() defaults: the real architecture
    assert (shipped.decoder, shipped.encoder, shipped.ratio) == (13, 72, 8)
    assert halos(CONFIG) == halos(architecture(CONFIG))
    assert (halos(CONFIG).decoder, halos(CONFIG).encoder) == (9, 40)
    two_blocks = halos(dict(CONFIG, num_res_blocks=2))
    assert (two_blocks.decoder, two_blocks.encoder) == (13, 72)


def test_axis_tiles_cover_once_and_clip():
    tiles = axis_tiles(20, 6, 3)
    assert tiles == [(0, 8, 0, 5), (2, 13, 5, 10), (7, 18, 10, 15), (12, 20, 15, 20)]
    assert axis_tiles(4, 6, 3) == [(0, 4, 0, 4)]


def test_axis_tiles_are_the_fewest_cores_of_equal_length_on_the_unit_grid():
    # 2160 image pixels (270 latent pixels) in cores of at most 1024: three of 720, not 1024, 1024 and a thin 112
    assert [c1 - c0 for _, _, c0, c1 in axis_tiles(270, 128, 13)] == [90, 90, 90]
    assert [(c0, c1) for _, _, c0, c1 in axis_tiles(2160, 1024, 72, unit=8)] == [(0, 720), (720, 1440), (1440, 2160)]
    cores = [c1 - c0 for _, _, c0, c1 in axis_tiles(1000, 128, 0, unit=8)]
    assert len(cores) == 8 and set(cores) == {120, 128} and sum(cores) == 1000
    with pytest.raises(ValueError, match="multiples of unit"):
        axis_tiles(1004, 128, 0, unit=8)


def test_tiles_place_crops_on_the_output_grid():
    tiles = decoder_tiles((5, 13), (4, 6), 2)
    assert len(tiles) == 2 * 3
    covered = torch.zeros(40, 104, dtype=torch.int32)
    for t in tiles:
        window_h = t.window[0].stop - t.window[0].start
        crop = torch.zeros(window_h * 8, (t.window[1].stop - t.window[1].start) * 8)[t.crop]
        assert crop.shape == covered[t.output].shape
        covered[t.output] += 1
    assert bool((covered == 1).all())
    enc = encoder_tiles((40, 104), 32, 16)
    assert enc[0].window == (slice(0, 40), slice(0, 48)) and enc[0].crop == (slice(0, 3), slice(0, 4))
    with pytest.raises(ValueError, match="multiple of 8"):
        encoder_tiles((40, 100), 32, 16)


# ---------------------------------------------------------------------- the split graphs and the PyTorch tiles


def test_split_graphs_equal_the_whole_graphs(vae):
    graphs = build_tile_graphs(vae)
    encoder, decoder = build_graphs(vae)
    x, z = sample((40, 72))
    with torch.no_grad():
        assert torch.equal(graphs["decoder_tail"](graphs["decoder_head"](z)), decoder(z))
        assert torch.equal(graphs["encoder_rest"](graphs["encoder_down"](x)), encoder(x))


@pytest.mark.parametrize("size", SIZES)
def test_pytorch_tiles_equal_the_stock_vae(vae, size):
    graphs = build_tile_graphs(vae)
    found = halos(vae)
    x, z = sample(size)
    with torch.no_grad():
        decoded = tiled_decode(z, graphs["decoder_head"], graphs["decoder_tail"], (TILE[0] // 8, TILE[1] // 8),
                               found.decoder)
        moments = tiled_encode(x, graphs["encoder_down"], graphs["encoder_rest"], TILE, found.encoder)
    assert (decoded - stock_decode(vae, z)).abs().max() <= 1e-5
    assert (moments - stock_moments(vae, x)).abs().max() <= 1e-5


def edge_heavy_vae():
    """The test VAE in float64 with 3x3 kernels that keep only their corner taps (doubled): the far end of the
    receptive field then carries enough weight that one missing halo pixel shows."""
    vae = make_tiny_vae(**CONFIG).double()
    with torch.no_grad():
        for param in vae.parameters():
            if param.dim() == 5 and param.shape[-1] == 3:
                param[..., 1, :] = 0
                param[..., :, 1] = 0
                param.mul_(2)
        vae.decoder.conv_out.weight.mul_(2)
    return vae


def test_a_halo_one_latent_pixel_short_breaks_equality():
    vae = edge_heavy_vae()
    graphs = build_tile_graphs(vae)
    found = halos(vae)
    x, z = sample((104, 168), dtype=torch.float64)
    decoded, moments = stock_decode(vae, z), stock_moments(vae, x)
    errors = {}
    with torch.no_grad():
        for halo in (found.decoder, found.decoder - 1):
            y = tiled_decode(z, graphs["decoder_head"], graphs["decoder_tail"], 4, halo)
            errors["decoder", halo] = (y - decoded).abs().max().item()
        for halo in (found.encoder, found.encoder - 8):  # the encoder's halo steps by one latent pixel
            y = tiled_encode(x, graphs["encoder_down"], graphs["encoder_rest"], 32, halo)
            errors["encoder", halo] = (y - moments).abs().max().item()
    assert errors["decoder", found.decoder] < 1e-12 and errors["encoder", found.encoder] < 1e-12, errors
    assert errors["decoder", found.decoder - 1] > 1e-4 and errors["encoder", found.encoder - 8] > 1e-4, errors


# ---------------------------------------------------------------------- packages built with --tile


SPEC = """kind: static
max_side: 256
profiles:
  - {name: "1_1", height: 64, width: 64, batch: 1}
"""


@pytest.fixture(scope="module")
def tile_dir(vae, tmp_path_factory):
    """CPU packages of `vae`: the 64x64 pair and the four tile packages (TILE), built once per module."""
    from vaebuild.backends.base import BuildOptions
    from vaebuild.builder.engines import BuildSource, build_engines
    from vaebuild.builder.specs import load_spec

    root = tmp_path_factory.mktemp("tiles")
    (root / "spec.yaml").write_text(SPEC)
    source = BuildSource.from_vae(vae, {"kind": "test"}, "fp32")
    options = BuildOptions(backend="inductor", device="cpu", jobs=2)
    build_engines("static", load_spec(root / "spec.yaml"), source, root / "out", options, log=lambda *a: None,
                  tile=TILE)
    return root / "out"


def test_the_manifest_records_tile_and_halo(tile_dir):
    from vaebuild.manifest import read_build_manifest

    manifest = read_build_manifest(tile_dir)
    assert manifest["tiles"]["tile"] == list(TILE)
    assert manifest["tiles"]["halo"] == {"decoder": 9, "encoder": 40}
    graphs = sorted(e["graph"] for e in manifest["engines"])
    assert graphs == sorted(["encoder", "decoder", "decoder_head", "decoder_tail", "encoder_down", "encoder_rest"])


@pytest.mark.parametrize("size", SIZES + ((64, 64),))
def test_package_tiles_equal_the_stock_vae(vae, tile_dir, size):
    from vaebuild.runtime import VaeRuntime

    runtime = VaeRuntime(tile_dir, fallback_vae=vae, device="cpu", allow_fallback=False)
    x, z = sample(size)
    decoded, moments = runtime.decode(z), runtime.encode(x)
    for graph in ("decoder", "encoder"):
        route = runtime.last_route[graph]
        if size == (64, 64):  # the whole-image engines serve it under tiling="auto"
            assert route.kind == "engine"
        else:
            assert route.kind == "tiles" and route.reason is None and route.engine.count("tiles/") == 2
    assert (decoded - stock_decode(vae, z)).abs().max() <= 1e-5
    assert (moments - stock_moments(vae, x)).abs().max() <= 1e-5
    forced = VaeRuntime(tile_dir, fallback_vae=vae, device="cpu", allow_fallback=False, tiling=True)
    assert (forced.decode(z) - stock_decode(vae, z)).abs().max() <= 1e-5
    assert forced.last_route["decoder"].kind == "tiles"
    never = VaeRuntime(tile_dir, fallback_vae=vae, device="cpu", tiling=False)
    never.decode(z)
    assert never.last_route["decoder"].kind == ("engine" if size == (64, 64) else "pytorch")


def test_tiling_values_are_checked(vae, tile_dir):
    from vaebuild.runtime import VaeRuntime

    with pytest.raises(UserInputError, match="tiling="):
        VaeRuntime(tile_dir, fallback_vae=vae, device="cpu", tiling="yes")


def test_tile_option_is_checked_and_inductor_only(tmp_path):
    from vaebuild.builder.run import BuilderSettings, BuildRequest, run_build
    from vaebuild.builder.tiles import parse_tile

    assert parse_tile("512x384") == (512, 384) and parse_tile("256") == (256, 256)
    for bad in ("500x512", "abc", "8x8"):
        with pytest.raises(UserInputError, match="--tile") as caught:
            parse_tile(bad)
        assert "\n" not in str(caught.value)
    request = BuildRequest(kind="static", out=tmp_path / "out", tile=(512, 512), builder=BuilderSettings(backend="tensorrt"))
    with pytest.raises(UserInputError, match="inductor backend only") as caught:
        run_build(request, log=lambda *a: None)
    assert "\n" not in str(caught.value)


# ---------------------------------------------------------------------- diffusers


def test_enable_tiling_in_the_pipeline_gives_the_untiled_images(vae, tile_dir, caplog):
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("transformers", reason="diffusers' Qwen-Image pipelines need transformers")
    from vaebuild.runtime import EngineVae

    torch.manual_seed(0)
    transformer = diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
    ).eval()
    pipe = diffusers.QwenImagePipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae,
                                       text_encoder=None, tokenizer=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)

    def generate(size):
        generator = torch.Generator().manual_seed(0)
        embeds = torch.randn(1, 7, 32, generator=generator)
        return pipe(prompt_embeds=embeds, prompt_embeds_mask=torch.ones(1, 7, dtype=torch.long), height=size[0],
                    width=size[1], num_inference_steps=2, generator=generator, output_type="pt").images

    size = (112, 144)
    stock = generate(size)
    engine_vae = EngineVae.from_folder(tile_dir, fallback=vae)
    engine_vae.enable_tiling(tile_sample_min_height=TILE[0], tile_sample_min_width=TILE[1],
                             tile_sample_stride_height=32)  # diffusers' blending stride: ignored
    pipe.vae = engine_vae
    try:
        with caplog.at_level(logging.INFO, logger="vaebuild.diffusers"):
            tiled = generate(size)
            engine_vae.enable_tiling()
            generate((64, 64))  # forced through tiles although a whole-image engine serves it
    finally:
        pipe.vae = vae
    assert (tiled - stock).abs().max() <= 1e-5
    lines = [r.getMessage() for r in caplog.records if r.name == "vaebuild.diffusers"]
    assert any("decoder 112x144 (HxW): exact tiles (tiles/vae_decoder_head.pt2,tiles/vae_decoder_tail.pt2)" in line
               for line in lines), lines
    assert any("decoder 64x64 (HxW): exact tiles" in line for line in lines), lines
    engine_vae.disable_tiling()
    assert engine_vae.runtime.tiles.tiling == "auto" and not engine_vae.use_tiling
    with pytest.raises(UserInputError, match="multiple of 8"):
        engine_vae.enable_tiling(tile_sample_min_height=100)
