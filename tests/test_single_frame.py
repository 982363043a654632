"""The single-frame rewrite is exact: per layer, per upsampler, and for whole encoder/decoder graphs."""

import pytest
import torch
from diffusers import AutoencoderKLQwenImage
from diffusers.models.autoencoders.autoencoder_kl_qwenimage import (
    QwenImageCausalConv3d,
    QwenImageResample,
    QwenImageUpsample,
)

from conftest import assert_graphs_match_diffusers, make_tiny_vae
from vaebuild.model.source import ModelSource, load_vae
from vaebuild.model.single_frame import (
    NearestUpsample2x,
    SingleFrameConv,
    TapPlanesConv,
    TapsConv,
    TransposedUpsampleConv,
    fold_single_frame,
)

# (kernel_size, stride, padding) of every causal-conv shape the rewrite must handle.
CONV_CASES = {
    "k3_p1": (3, 1, 1),
    "k1_p0": (1, 1, 0),
    "k311_p100_time_conv": ((3, 1, 1), 1, (1, 0, 0)),
    "k3_spatial_stride2": (3, (1, 2, 2), 1),
    "k331_p110_asymmetric": ((3, 3, 1), 1, (1, 1, 0)),
    "k135_p012_asymmetric": ((1, 3, 5), 1, (0, 1, 2)),
}

# (batch, image height, image width); the latent is 1/8 of the image side.
GRAPH_SIZES = [(1, 64, 64), (1, 48, 80), (2, 40, 56)]


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_single_frame_conv_equals_causal_conv3d(case):
    kernel, stride, padding = CONV_CASES[case]
    torch.manual_seed(0)
    conv3d = QwenImageCausalConv3d(5, 7, kernel, stride=stride, padding=padding).eval()
    x = torch.randn(2, 5, 1, 11, 13, generator=_generator())
    with torch.no_grad():
        expected = conv3d(x)
        actual = SingleFrameConv(conv3d)(x)
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() < 1e-5


def test_single_frame_conv_rejects_temporal_stride():
    conv3d = QwenImageCausalConv3d(4, 4, (3, 1, 1), stride=(2, 1, 1), padding=(0, 0, 0))
    with pytest.raises(ValueError, match="temporally strided"):
        SingleFrameConv(conv3d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("size", [(8, 12), (7, 9), (1, 5)], ids=["even", "odd", "one_row"])
def test_nearest_upsample_equals_qwen_upsample(size, dtype):
    reference = QwenImageUpsample(scale_factor=(2.0, 2.0), mode="nearest-exact")
    x = torch.randn(3, 4, *size, generator=_generator()).to(dtype)
    expected = reference(x)
    actual = NearestUpsample2x()(x)
    assert actual.dtype == expected.dtype == dtype
    assert actual.shape == (3, 4, 2 * size[0], 2 * size[1])
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("size", [(8, 12), (7, 9), (1, 5), (1, 1)], ids=["even", "odd", "one_row", "one_pixel"])
def test_transposed_upsample_conv_equals_upsample_then_conv(size):
    torch.manual_seed(0)
    # float64 throughout (QwenImageUpsample would round to float32): the rewrite is exact up to summation order.
    resample = torch.nn.Sequential(
        torch.nn.Upsample(scale_factor=2, mode="nearest-exact"), torch.nn.Conv2d(6, 5, 3, padding=1)
    ).double()
    rewritten = TransposedUpsampleConv(resample)
    x = torch.randn(2, 6, *size, generator=_generator(), dtype=torch.float64)
    with torch.no_grad():
        expected = resample(x)
        actual = rewritten(x)
    assert actual.shape == expected.shape == (2, 5, 2 * size[0], 2 * size[1])
    assert (actual - expected).abs().max().item() < 1e-12
    assert rewritten.state_dict().keys() == resample.state_dict().keys() == {"1.weight", "1.bias"}


def test_transposed_upsample_conv_rejects_other_convolutions():
    resample = torch.nn.Sequential(torch.nn.Upsample(scale_factor=2), torch.nn.Conv2d(4, 4, 5, padding=2))
    with pytest.raises(ValueError, match="only 3x3"):
        TransposedUpsampleConv(resample)


def _assert_rewrite_equals_causal_conv3d(rewrite, conv3d):
    """`rewrite(conv3d)` computes conv3d's single-frame output in float64 with the same state-dict names."""
    x = torch.randn(2, conv3d.in_channels, 1, 11, 13, generator=_generator(), dtype=torch.float64)
    rewritten = rewrite(conv3d)
    with torch.no_grad():
        expected = conv3d(x)
        actual = rewritten(x)
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() < 1e-12
    assert rewritten.state_dict().keys() == SingleFrameConv(conv3d).state_dict().keys()


@pytest.mark.parametrize("case", ["k3_p1", "k1_p0", "k331_p110_asymmetric", "k135_p012_asymmetric"])
def test_taps_conv_equals_causal_conv3d(case):
    kernel, stride, padding = CONV_CASES[case]
    torch.manual_seed(0)
    conv3d = QwenImageCausalConv3d(3, 7, kernel, stride=stride, padding=padding).double().eval()
    _assert_rewrite_equals_causal_conv3d(TapsConv, conv3d)


def test_taps_conv_rejects_strided_convolutions():
    conv3d = QwenImageCausalConv3d(3, 4, 3, stride=(1, 2, 2), padding=1)
    with pytest.raises(ValueError, match="only stride 1"):
        TapsConv(conv3d)


@pytest.mark.parametrize("out_channels", [3, 1, 8])
def test_tap_planes_conv_equals_causal_conv3d(out_channels):
    torch.manual_seed(0)
    conv3d = QwenImageCausalConv3d(6, out_channels, 3, padding=1).double().eval()
    _assert_rewrite_equals_causal_conv3d(TapPlanesConv, conv3d)


def test_tap_planes_conv_rejects_other_convolutions():
    with pytest.raises(ValueError, match="only 3x3, stride 1, padding 1"):
        TapPlanesConv(QwenImageCausalConv3d(6, 3, 3, stride=(1, 2, 2), padding=1))


def test_conv_rewrites_choose_the_rgb_rewrites(tiny_vae):
    folded = fold_single_frame(tiny_vae, conv_rewrites=True)
    assert isinstance(folded.encoder.conv_in, TapsConv) and isinstance(folded.decoder.conv_out, TapPlanesConv)
    assert not any(isinstance(m, (TapsConv, TapPlanesConv)) for m in fold_single_frame(tiny_vae).modules())


def test_fold_returns_new_model_without_mutating_input(tiny_vae):
    before = {name: tensor.clone() for name, tensor in tiny_vae.state_dict().items()}
    n_conv3d = sum(isinstance(m, QwenImageCausalConv3d) for m in tiny_vae.modules())
    n_time_conv = sum(isinstance(m, QwenImageResample) and hasattr(m, "time_conv") for m in tiny_vae.modules())
    assert n_conv3d > 0 and n_time_conv > 0

    folded = fold_single_frame(tiny_vae)

    assert folded is not tiny_vae
    after = tiny_vae.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], before[name]) for name in before)
    assert sum(isinstance(m, QwenImageCausalConv3d) for m in tiny_vae.modules()) == n_conv3d
    assert sum(isinstance(m, QwenImageResample) and hasattr(m, "time_conv") for m in tiny_vae.modules()) == n_time_conv
    assert any(isinstance(m, QwenImageUpsample) for m in tiny_vae.modules())

    assert not any(isinstance(m, QwenImageCausalConv3d) for m in folded.modules())
    assert not any(isinstance(m, QwenImageUpsample) for m in folded.modules())
    assert not any(hasattr(m, "time_conv") for m in folded.modules())
    assert not any("time_conv" in name for name in folded.state_dict())
    assert sum(isinstance(m, SingleFrameConv) for m in folded.modules()) == n_conv3d - n_time_conv
    # The folded weights are copies: changing them leaves the input untouched.
    folded.quant_conv.conv.weight.data.add_(1.0)
    assert torch.equal(tiny_vae.quant_conv.weight, before["quant_conv.weight"])


# build_graphs keyword arguments: diffusers' modules, the 2-D rewrite (ONNX export), the 2-D rewrite with
# the PyTorch-only convolution rewrites (inductor packages).
GRAPH_VARIANTS = {
    "unfolded": {"fold": False},
    "folded": {"fold": True},
    "folded_conv_rewrites": {"fold": True, "conv_rewrites": True},
}


@pytest.mark.parametrize("variant", list(GRAPH_VARIANTS))
def test_tiny_graphs_equal_diffusers_encode_decode(tiny_vae, variant):
    assert_graphs_match_diffusers(tiny_vae, GRAPH_SIZES, **GRAPH_VARIANTS[variant])


@pytest.fixture(scope="module")
def other_vae_dir(tmp_path_factory):
    """A second, differently shaped config (two res blocks, other temporal pattern), saved and reloaded."""
    vae = make_tiny_vae(
        seed=3,
        base_dim=8,
        z_dim=8,
        dim_mult=[1, 2, 3, 2],
        num_res_blocks=2,
        temperal_downsample=[True, False, True],
    )
    path = tmp_path_factory.mktemp("other_vae")
    vae.save_pretrained(path)
    return path


@pytest.mark.parametrize("variant", list(GRAPH_VARIANTS))
def test_saved_config_graphs_equal_diffusers_encode_decode(other_vae_dir, variant):
    vae = load_vae(ModelSource(model=str(other_vae_dir)))
    assert isinstance(vae, AutoencoderKLQwenImage)
    assert vae.config.z_dim == 8 and list(vae.config.temperal_downsample) == [True, False, True]
    assert_graphs_match_diffusers(vae, GRAPH_SIZES, **GRAPH_VARIANTS[variant])


def test_default_architecture_graphs_equal_diffusers_encode_decode():
    """The full Qwen-Image VAE (126.9M parameters, random weights) at one small size (~5 s on 2 cores)."""
    vae = load_vae(ModelSource(random_init=True))
    assert sum(p.numel() for p in vae.parameters()) == pytest.approx(126.9e6, rel=1e-3)
    assert_graphs_match_diffusers(vae, [(1, 32, 48)], **GRAPH_VARIANTS["folded"])
    assert_graphs_match_diffusers(vae, [(1, 32, 48)], **GRAPH_VARIANTS["folded_conv_rewrites"])
