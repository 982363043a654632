"""vaebuild.pixels and EngineImageProcessor: bit-identical to diffusers' VaeImageProcessor (CPU)."""

import warnings

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor

from vaebuild.pixels import pil
from vaebuild.pixels.convert import denormalize, images_to_uint8, rgb_to_rgbx, uint8_to_images, unit_to_uint8
from vaebuild.runtime.image_processor import EngineImageProcessor

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def qwen_processor(**config):
    """What the Qwen-Image pipelines build: vae_scale_factor 8 * 2, latent channels 16."""
    return VaeImageProcessor(vae_scale_factor=16, vae_latent_channels=16, **config)


def pair(**config):
    reference = qwen_processor(**config)
    return reference, EngineImageProcessor.from_processor(reference)


def decoded(batch, height, width, dtype, seed=0, channels=3):
    """Decoder-like output with values beyond [-1, 1], exact zeros (the 127.5 tie) and the range ends."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, channels, height, width, generator=generator) * 1.5
    flat = images.view(-1)
    flat[::7] = 0.0
    flat[1::11] = 1.0
    flat[2::13] = -1.0
    return images.to(dtype)


def tie_inputs():
    """fp32 inputs x whose diffusers denormalize y = fl(fl(x*0.5)+0.5) has fl(y*255) exactly k + 0.5."""
    xs = []
    for k in range(255):
        centre = np.float32((k + 0.5) / 255)
        for y in centre + np.arange(-4, 5, dtype=np.float32) * np.spacing(centre):
            if np.float32(y) * np.float32(255) != np.float32(k + 0.5):
                continue
            x = np.float32(2.0 * (float(y) - 0.5))
            if np.float32(np.float32(x * np.float32(0.5)) + np.float32(0.5)) == y:
                xs.append(x)
    return np.array(xs, dtype=np.float32)


def assert_same_pil(expected, got):
    assert isinstance(got, list) and len(got) == len(expected)
    for e, g in zip(expected, got):
        assert isinstance(g, PIL.Image.Image)
        assert (g.mode, g.size) == (e.mode, e.size)
        assert g.tobytes() == e.tobytes()


def strides(tensor):
    """The strides of the dimensions longer than 1 (the layout; a size-1 dimension's stride means nothing)."""
    return [s for s, n in zip(tensor.stride(), tensor.shape) if n > 1]


def assert_same_tensor(expected, got):
    assert got.dtype == expected.dtype and got.device == expected.device
    assert got.shape == expected.shape and strides(got) == strides(expected)
    assert torch.equal(got, expected)


def assert_same_array(expected, got):
    assert isinstance(got, np.ndarray)
    assert got.dtype == expected.dtype and got.shape == expected.shape and got.strides == expected.strides
    assert np.array_equal(got, expected, equal_nan=True)


# postprocess

def assert_same_output(output_type, expected, got):
    """Byte equality of two postprocess results of `output_type`."""
    if output_type == "pil":
        assert_same_pil(expected, got)
    elif output_type == "np":
        assert_same_array(expected, got)
    else:
        assert_same_tensor(expected, got)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("output_type", ["pil", "np", "pt", "latent"])
def test_postprocess_matches_diffusers(dtype, batch, output_type):
    reference, engine = pair()
    images = decoded(batch, 37, 53, dtype, seed=batch)
    expected = reference.postprocess(images.clone(), output_type=output_type)
    got = engine.postprocess(images.clone(), output_type=output_type)
    assert_same_output(output_type, expected, got)


def test_postprocess_default_output_type_and_other_channel_counts():
    reference, engine = pair()
    assert_same_pil(reference.postprocess(decoded(2, 17, 16, torch.float32)),
                    engine.postprocess(decoded(2, 17, 16, torch.float32)))
    for channels in (1, 4):  # "L" and the layered pipeline's RGBA
        images = decoded(2, 19, 23, torch.bfloat16, channels=channels)
        expected = reference.postprocess(images, "pil")
        assert_same_pil(expected, engine.postprocess(images, "pil"))
        assert_same_array(reference.postprocess(images, "np"), engine.postprocess(images, "np"))


@pytest.mark.parametrize("output_type", ["pil", "np"])
def test_rounding_ties_go_to_even(output_type):
    xs = tie_inputs()
    assert len(xs) >= 100  # many ties of both parities
    images = torch.from_numpy(np.concatenate([xs, np.zeros(1, np.float32)])).view(1, 1, 1, -1).repeat(1, 3, 1, 1)
    reference, engine = pair()
    expected = reference.postprocess(images, output_type)
    got = engine.postprocess(images, output_type)
    if output_type == "np":
        assert_same_array(expected, got)
        return
    assert_same_pil(expected, got)
    pixels = np.asarray(got[0])[0, :, 0].astype(np.int64)
    halves = (np.asarray(denormalize(images)[0, 0, 0]) * np.float32(255)).astype(np.float64)
    assert np.all(halves % 1 == 0.5)
    assert np.array_equal(pixels, np.rint(halves)) and np.all(pixels % 2 == 0)
    assert not np.array_equal(pixels, np.floor(halves + 0.5))  # half-up would differ


def test_unit_to_uint8_half_to_even_and_nan():
    values = torch.tensor([0.5, 1.5, 2.5, 253.5, 254.5], dtype=torch.float32) / 255
    assert torch.equal(unit_to_uint8(values.view(1, 1, 1, -1))[0, 0, :, 0],
                       torch.tensor([0, 2, 2, 254, 254], dtype=torch.uint8))
    assert unit_to_uint8(torch.full((1, 3, 1, 1), float("nan"))).flatten().tolist() == [0, 0, 0]


def test_non_finite_values_match():
    images = decoded(1, 8, 9, torch.float32)
    images.view(-1)[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -1e30, float("nan")])
    reference, engine = pair()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy's "invalid value encountered in cast" of NaN
        expected_pil = reference.postprocess(images, "pil")
    assert_same_pil(expected_pil, engine.postprocess(images, "pil"))
    assert_same_array(reference.postprocess(images, "np"), engine.postprocess(images, "np"))


@pytest.mark.parametrize("do_denormalize", [[True, True, True], [True, False, True], [False, False, False]])
@pytest.mark.parametrize("output_type", ["pil", "np", "pt"])
def test_do_denormalize_given(do_denormalize, output_type):
    images = decoded(3, 11, 13, torch.bfloat16).clamp(-1, 1)  # undenormalized pixels stay castable for "pil"
    reference, engine = pair()
    expected = reference.postprocess(images, output_type, do_denormalize=do_denormalize)
    got = engine.postprocess(images, output_type, do_denormalize=do_denormalize)
    assert_same_output(output_type, expected, got)


def test_do_normalize_false_config_and_unknown_output_type():
    reference, engine = pair(do_normalize=False)
    images = decoded(2, 9, 10, torch.float32).clamp(0, 1)
    assert_same_pil(reference.postprocess(images, "pil"), engine.postprocess(images, "pil"))
    assert_same_array(reference.postprocess(images, "np"), engine.postprocess(images, "np"))
    reference, engine = pair()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_same_array(reference.postprocess(images, "numpy"), engine.postprocess(images, "numpy"))
    with pytest.raises(ValueError):
        engine.postprocess(np.zeros((1, 3, 4, 4), np.float32))


def test_images_to_uint8_is_diffusers_pil_arithmetic():
    for dtype in DTYPES:
        images = decoded(2, 5, 6, dtype)
        expected = (VaeImageProcessor.pt_to_numpy(VaeImageProcessor.denormalize(images)) * 255).round().astype("uint8")
        got = images_to_uint8(images)
        assert got.dtype == torch.uint8 and got.is_contiguous()
        assert np.array_equal(got.numpy(), expected)
        assert torch.equal(denormalize(images), VaeImageProcessor.denormalize(images))


# preprocess

def photo(width, height, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2, "CMYK": 4}
    rgb = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    image = PIL.Image.fromarray(rgb)
    if mode == "P":
        return image.convert("P")
    if mode in ("RGB", "L"):
        return image.convert(mode)
    data = rng.integers(0, 256, size=(height, width, channels[mode]), dtype=np.uint8)
    return PIL.Image.fromarray(data, mode=mode) if mode != "CMYK" else PIL.Image.frombytes(
        "CMYK", (width, height), data.tobytes())


def assert_same_preprocess(reference, engine, image, *args, **kwargs):
    expected = reference.preprocess(image, *args, **kwargs)
    got = engine.preprocess(image, *args, **kwargs)
    assert_same_tensor(expected, got)
    return got


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "CMYK"])
@pytest.mark.parametrize("size", [None, (64, 80), (40, 30)])
def test_preprocess_pil_matches_diffusers(mode, size):
    reference, engine = pair()
    image = photo(53, 37, mode)
    kwargs = {} if size is None else {"height": size[0], "width": size[1]}
    got = assert_same_preprocess(reference, engine, image, **kwargs)
    assert got.dtype == torch.float32 and got.min() >= -1 and got.max() <= 1


def test_preprocess_lists_positional_sizes_crops_and_modes():
    reference, engine = pair()
    images = [photo(53, 37, "RGB", seed=i) for i in range(3)]
    assert_same_preprocess(reference, engine, images)
    assert_same_preprocess(reference, engine, images, 48, 32)  # the edit pipelines' positional call
    assert_same_preprocess(reference, engine, images[:1], crops_coords=(3, 4, 50, 36))
    for resize_mode in ("fill", "crop"):
        assert_same_preprocess(reference, engine, images, 64, 48, resize_mode=resize_mode)
    resized = reference.resize(images[0], 32, 48)  # the edit pipelines resize before preprocess
    assert_same_preprocess(reference, engine, resized, 32, 48)


@pytest.mark.parametrize("config", [{"do_convert_rgb": True}, {"do_normalize": False}, {"do_resize": False},
                                    {"reducing_gap": 2}, {"resample": "bilinear"}])
def test_preprocess_other_plain_configs(config):
    reference, engine = pair(**config)
    for mode in ("RGB", "RGBA", "L"):
        assert_same_preprocess(reference, engine, [photo(53, 37, mode), photo(53, 37, mode, seed=1)])


def test_preprocess_falls_back_to_diffusers():
    reference, engine = pair()
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    assert_same_preprocess(reference, engine, pixels)  # diffusers: no /255 for arrays, kept as is
    assert_same_preprocess(reference, engine, [pixels, pixels], 32, 48)
    assert_same_preprocess(reference, engine, pixels[None].astype(np.float32) / 255)
    tensor = torch.rand(2, 3, 37, 53)
    assert_same_preprocess(reference, engine, tensor)
    latents = torch.randn(1, 16, 8, 8)
    assert_same_preprocess(reference, engine, latents)
    for mode in ("I;16", "I", "F", "1"):
        image = photo(53, 37, "L").convert(mode) if mode != "I;16" else PIL.Image.fromarray(
            rng.integers(0, 256, size=(37, 53), dtype=np.uint16))
        assert_same_preprocess(reference, engine, image)
    mask_config = {"do_normalize": False, "do_binarize": True, "do_convert_grayscale": True}
    reference, engine = pair(**mask_config)  # the inpaint pipelines' mask_processor
    assert_same_preprocess(reference, engine, photo(53, 37, "RGB"), height=32, width=48)
    with pytest.raises(ValueError):
        engine.preprocess("not an image")


def test_preprocess_to_a_device_attribute():
    reference = qwen_processor()
    engine = EngineImageProcessor.from_processor(reference, device="cpu")
    assert engine.device == torch.device("cpu")
    assert_same_preprocess(reference, engine, photo(53, 37))


def test_uint8_to_images_is_diffusers_preprocess_arithmetic():
    values = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=3)
    expected = VaeImageProcessor.normalize(VaeImageProcessor.numpy_to_pt(VaeImageProcessor.pil_to_numpy(
        PIL.Image.fromarray(values[0]))))
    got = uint8_to_images(torch.from_numpy(values))
    assert_same_tensor(expected, got)
    assert_same_tensor(expected, uint8_to_images(torch.from_numpy(values[0])))
    assert_same_tensor(expected.to(torch.bfloat16), uint8_to_images(torch.from_numpy(values), torch.bfloat16))
    unit = VaeImageProcessor.numpy_to_pt(VaeImageProcessor.pil_to_numpy(PIL.Image.fromarray(values[0])))
    assert_same_tensor(unit, uint8_to_images(torch.from_numpy(values), normalize=False))
    with pytest.raises(TypeError):
        uint8_to_images(torch.zeros(1, 2, 2, 3))


# the processor as a diffusers component

def test_engine_processor_is_a_vae_image_processor():
    reference = qwen_processor()
    engine = EngineImageProcessor.from_processor(reference)
    assert isinstance(engine, VaeImageProcessor)
    assert engine.config == reference.config
    assert engine.device is None
    direct = EngineImageProcessor(vae_scale_factor=16, vae_latent_channels=16)
    assert direct.config == reference.config
    assert_same_pil(reference.postprocess(decoded(1, 4, 4, torch.float32)), direct.postprocess(decoded(1, 4, 4, torch.float32)))
    mask = VaeImageProcessor(vae_scale_factor=16, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    assert EngineImageProcessor.from_processor(mask).config == mask.config


# PIL <-> pixels (vaebuild.pixels.pil)

def random_image(mode, width, height, seed=0):
    channels = pil.PIXEL_CHANNELS.get(mode, 1)
    shape = (height, width) if channels == 1 else (height, width, channels)
    pixels = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    return PIL.Image.fromarray(pixels, mode="L" if channels == 1 else None).convert(mode)


def pixels_of(storage, mode):
    """np.asarray's pixels in `read_storage`'s array (RGB: without the pad byte)."""
    return storage[..., :3] if mode == "RGB" else storage


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "RGBX", "L"])
@pytest.mark.parametrize("size", [(1, 1), (7, 5), (1031, 1021), (2053, 517)])  # the last two: parallel strips
def test_read_storage_holds_np_asarray(mode, size):
    image = random_image(mode, *size)
    expected = np.asarray(image)
    assert np.array_equal(pixels_of(pil.read_storage(image), mode), expected)
    out = np.zeros(pil.storage_shape(image), np.uint8)
    assert pil.read_storage(image, out) is out and np.array_equal(pixels_of(out, mode), expected)
    if mode == "RGB":  # Pillow's own RGBX bytes, pad byte included
        assert out.tobytes() == image.tobytes("raw", "RGBX")


def test_read_storage_of_a_mapped_image_and_a_crop():
    rgbx = np.random.default_rng(3).integers(0, 256, (1, 1100, 1000, 4), dtype=np.uint8)
    rgbx[..., 3] = 255
    mapped = pil.rgb_images_from_rgbx(rgbx)[0]  # storage owned by a buffer, as to_pil_images makes them
    assert np.array_equal(pil.read_storage(mapped), rgbx[0])
    cropped = random_image("RGB", 1500, 900).crop((3, 5, 1404, 898))
    assert np.array_equal(pixels_of(pil.read_storage(cropped), "RGB"), np.asarray(cropped))


def test_read_storage_refuses_other_modes_and_bad_out():
    image = random_image("RGB", 9, 4).convert("P")
    with pytest.raises(ValueError, match="C-contiguous uint8 of shape"):
        pil.read_storage(random_image("RGB", 9, 4), np.zeros((4, 9, 3), np.uint8))
    with pytest.raises(ValueError, match="read_storage takes modes"):
        pil.read_storage(image)


def test_rgb_images_from_rgbx_share_the_buffer_and_are_plain_rgb():
    rgb = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8))
    rgbx = rgb_to_rgbx(rgb)
    assert rgbx.shape == (2, 5, 7, 4) and bool((rgbx[..., 3] == 255).all()) and torch.equal(rgbx[..., :3], rgb)
    buffer = rgbx.numpy()
    images = pil.rgb_images_from_rgbx(buffer)
    for image, expected in zip(images, rgb.numpy()):
        reference = PIL.Image.fromarray(expected)
        assert (image.mode, image.size) == ("RGB", (7, 5)) and image.tobytes() == reference.tobytes()
        assert np.array_equal(np.asarray(image), expected)
        assert image.convert("RGBA").tobytes() == reference.convert("RGBA").tobytes()
    images[1].putpixel((0, 0), (1, 2, 3))  # writable, in its own part of the buffer
    assert tuple(buffer[1, 0, 0, :3]) == (1, 2, 3) and np.array_equal(np.asarray(images[0]), rgb.numpy()[0])
    images[0].load()[6, 4] = (4, 5, 6)
    assert images[0].getpixel((6, 4)) == (4, 5, 6)
    with pytest.raises(ValueError, match="C-contiguous uint8"):
        pil.rgb_images_from_rgbx(buffer[..., :3])


def test_upload_pixels_and_to_pil_images_round_trip():
    images = [random_image("RGB", 11, 6, seed) for seed in range(3)]
    pixels = pil.upload_pixels(images)
    assert pixels.shape == (3, 6, 11, 3) and pixels.dtype == torch.uint8 and pixels.is_contiguous()
    assert np.array_equal(pixels.numpy(), np.stack([np.asarray(i) for i in images]))
    assert_same_pil(images, pil.to_pil_images(pixels))
    gray = [random_image("L", 4, 3)]
    assert pil.upload_pixels(gray).shape == (1, 3, 4, 1)
    assert_same_pil(gray, pil.to_pil_images(pil.upload_pixels(gray)))
    with pytest.raises(ValueError, match="one mode of"):
        pil.upload_pixels([images[0], gray[0]])
