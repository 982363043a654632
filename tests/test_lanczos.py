"""vaebuild.pixels.lanczos: byte-for-byte equality with Pillow's `Image.resize(size, Image.LANCZOS)`."""

import numpy as np
import pytest
import torch
from PIL import Image

from vaebuild.pixels import lanczos
from vaebuild.pixels.lanczos import resize_lanczos, resize_pil_lanczos

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pillow(array, size):
    return np.asarray(Image.fromarray(array).resize(size, Image.LANCZOS))


def ours(array, size, device="cpu"):
    pixels = torch.from_numpy(array if array.ndim == 3 else array[:, :, None]).to(device)
    out = resize_lanczos(pixels, size)
    assert out.dtype == torch.uint8 and out.device == pixels.device
    assert tuple(out.shape) == (size[1], size[0], pixels.shape[2])
    out = out.cpu().numpy()
    return out if array.ndim == 3 else out[:, :, 0]


def assert_exact(array, size, device="cpu"):
    expected = pillow(array, size)
    got = ours(array, size, device)
    assert got.shape == expected.shape
    assert np.array_equal(got, expected), (
        f"{array.shape} -> {size}: {(got != expected).sum()} bytes differ, "
        f"by at most {np.abs(got.astype(int) - expected.astype(int)).max()}"
    )


def random_image(rng, width, height, channels=3):
    shape = (height, width, channels) if channels == 3 else (height, width)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def photo_like(rng, width, height):
    """Smooth gradients, a few hard-edged shapes and mild noise, like a photo."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    image = np.stack(
        [
            128 + 100 * np.sin(x / 37.0) * np.cos(y / 23.0),
            255 * x / width,
            255 * (1 - y / height),
        ],
        axis=2,
    )
    image[(x - width / 3) ** 2 + (y - height / 2) ** 2 < (height / 5) ** 2] = (250, 20, 10)
    image[int(height * 0.7) :, int(width * 0.6) : int(width * 0.8)] = (0, 0, 255)
    image += rng.normal(0, 6, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def checkerboard(width, height, cell, channels=3):
    y, x = np.mgrid[0:height, 0:width]
    board = (((x // cell + y // cell) % 2) * 255).astype(np.uint8)
    return np.repeat(board[:, :, None], 3, axis=2) if channels == 3 else board


@pytest.mark.parametrize("device", DEVICES)
def test_photo_downscale_4032x3024_to_1184x896(device):
    # The pipelines' case: a 12 MP photo to a 1 MP latent size. Vertical shrink (2128) < 2 * horizontal (2848):
    # horizontal pass first, on the rows the vertical pass reads.
    assert_exact(random_image(np.random.default_rng(0), 4032, 3024), (1184, 896), device)


@pytest.mark.parametrize("device", DEVICES)
def test_photo_like_downscale(device):
    rng = np.random.default_rng(1)
    image = photo_like(rng, 1009, 757)
    assert_exact(image, (296, 224), device)
    assert_exact(image[:, :, 1].copy(), (296, 224), device)


@pytest.mark.parametrize(
    "in_size, out_size",
    [
        ((37, 53), (100, 71)),  # upscales
        ((5, 4), (64, 48)),
        ((101, 77), (33, 51)),  # odd sizes, one axis up, the other down
        ((7, 5), (13, 3)),
        ((333, 251), (332, 250)),  # by one pixel
        ((200, 100), (200, 37)),  # width unchanged: only the vertical pass
        ((200, 100), (61, 100)),  # height unchanged: only the horizontal pass
        ((40, 300), (40, 301)),
        ((300, 900), (280, 100)),  # height shrinks > 2x the width's shrink: vertical pass first
        ((500, 3), (7, 300)),  # extreme ratios
        ((3, 500), (300, 7)),
        ((1000, 2), (1, 1)),  # 1-pixel outputs and inputs
        ((50, 40), (1, 1)),
        ((50, 40), (1, 40)),
        ((50, 40), (50, 1)),
        ((1, 1), (5, 7)),
        ((1, 10), (3, 3)),
        ((10, 1), (4, 9)),
    ],
)
@pytest.mark.parametrize("channels", [3, 1])
def test_sizes(in_size, out_size, channels):
    rng = np.random.default_rng(in_size[0] * 7919 + out_size[1])
    assert_exact(random_image(rng, *in_size, channels), out_size)
    assert_exact(checkerboard(*in_size, cell=1, channels=channels), out_size)


@pytest.mark.parametrize(
    "in_size, out_size, cell",
    [((16, 16), (53, 47), 1), ((24, 18), (100, 75), 3), ((96, 64), (31, 23), 12), ((301, 199), (97, 64), 16)],
)
@pytest.mark.parametrize("channels", [3, 1])
def test_checkerboards_hit_the_clip(in_size, out_size, cell, channels):
    image = checkerboard(*in_size, cell=cell, channels=channels)
    assert_exact(image, out_size)
    # Lanczos' negative lobes take these past 0 and 255 in the first pass: its clip8 is exercised.
    pixels = torch.from_numpy(image if channels == 3 else image[:, :, None])
    vertical = in_size[1] - out_size[1] > 2 * (in_size[0] - out_size[0]) and in_size[1] > out_size[1]
    dim, n, m = (0, in_size[1], out_size[1]) if vertical else (1, in_size[0], out_size[0])
    index, coeff = lanczos._device_taps(n, m, pixels.device)
    raw = lanczos._accumulate(pixels, index, coeff, dim) >> lanczos.PRECISION_BITS
    assert raw.min() < 0 and raw.max() > 255


def test_random_sweep():
    rng = np.random.default_rng(2025)
    for case in range(40):
        in_w, in_h, out_w, out_h = (int(v) for v in rng.integers(1, 260, 4))
        channels = 3 if case % 2 == 0 else 1
        if case % 4 == 3:
            image = checkerboard(in_w, in_h, cell=int(rng.integers(1, 6)), channels=channels)
        else:
            image = random_image(rng, in_w, in_h, channels)
        assert_exact(image, (out_w, out_h))


def test_same_size_is_a_copy():
    image = random_image(np.random.default_rng(3), 31, 17)
    pixels = torch.from_numpy(image)
    out = resize_lanczos(pixels, (31, 17))
    assert np.array_equal(out.numpy(), image) and out.data_ptr() != pixels.data_ptr()


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_resize_pil_lanczos(mode):
    image = Image.fromarray(photo_like(np.random.default_rng(4), 203, 151)).convert(mode)
    for size in [(64, 48), (203, 40), (400, 300)]:
        out = resize_pil_lanczos(image, size, "cpu")
        expected = image.resize(size, Image.LANCZOS)
        assert out.mode == mode and out.size == size
        assert np.array_equal(np.asarray(out), np.asarray(expected))


def test_rejects_other_modes_and_tensors():
    with pytest.raises(ValueError, match="'RGBA'"):
        resize_pil_lanczos(Image.new("RGBA", (8, 8)), (4, 4), "cpu")
    with pytest.raises(ValueError, match="'P'"):
        resize_pil_lanczos(Image.new("P", (8, 8)), (4, 4), "cpu")
    with pytest.raises(ValueError, match="C 3"):
        resize_lanczos(torch.zeros(8, 8, 4, dtype=torch.uint8), (4, 4))
    with pytest.raises(ValueError, match="uint8"):
        resize_lanczos(torch.zeros(8, 8, 3), (4, 4))
    with pytest.raises(ValueError, match="> 0"):
        resize_lanczos(torch.zeros(8, 8, 3, dtype=torch.uint8), (0, 4))
