"""The `vaebuild::conv3x3_rms_silu` op on CPU: its fallback equals diffusers' residual block, torch.export and
AOTInductor keep it, and the folded VAE using it equals diffusers' encode/decode.

The Gluon kernel itself needs a Hopper GPU: benchmarks/kernels/conv_gluon_kernel.py checks it there.
"""

import zipfile

import torch
from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageResidualBlock

from tests.conftest import assert_graphs_match_diffusers, make_tiny_vae
from vaebuild.kernels.conv_norm import FusedNormResidualBlock, PaddedInputDownsample, kernel_usable, reference
from vaebuild.model.single_frame import SingleFrameConv, fold_single_frame


def _folded_block(seed, channels=96):
    torch.manual_seed(seed)
    block = QwenImageResidualBlock(channels, channels).eval()
    with torch.no_grad():
        block.norm1.gamma.uniform_(0.5, 1.5)
        block.norm2.gamma.uniform_(0.5, 1.5)
    folded = QwenImageResidualBlock(channels, channels).eval()
    folded.load_state_dict(block.state_dict())
    folded.conv1, folded.conv2 = SingleFrameConv(block.conv1), SingleFrameConv(block.conv2)
    return block, folded


def test_fused_block_equals_diffusers_residual_block():
    block, folded = _folded_block(seed=0)
    fused = FusedNormResidualBlock(folded)
    assert fused.state_dict().keys() == folded.state_dict().keys()
    for batch, height, width in ((1, 1, 1), (2, 5, 7), (1, 12, 9)):
        x = torch.randn(batch, 96, 1, height, width)
        assert not kernel_usable(x.squeeze(2), fused.conv1.conv.weight)
        with torch.no_grad():
            torch.testing.assert_close(fused(x), block(x), rtol=0, atol=2e-5)


def test_op_output_is_channels_last_and_equals_reference():
    _, folded = _folded_block(seed=1)
    conv = folded.conv1.conv
    x = torch.randn(2, 96, 6, 10)
    with torch.no_grad():
        out = torch.ops.vaebuild.conv3x3_rms_silu(x, conv.weight, conv.bias, folded.norm2.gamma)
        expected = reference(x, conv.weight, conv.bias, folded.norm2.gamma)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert out.shape == (2, 96, 6, 10)


def test_conv3x3_add_pads_after_the_image_and_equals_conv_plus_residual():
    _, folded = _folded_block(seed=5)
    conv = folded.conv2.conv
    x, residual = torch.randn(2, 96, 5, 7), torch.randn(2, 96, 5, 7)
    with torch.no_grad():
        out = torch.ops.vaebuild.conv3x3_add(x, conv.weight, conv.bias, residual, 1)
        expected = torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=1) + residual
    assert out.shape == (2, 96, 6, 8) and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out[:, :, :5, :7], expected, rtol=0, atol=0)
    assert not out[:, :, 5].any() and not out[:, :, :, 7].any()


class _ConvNorm(torch.nn.Module):
    def __init__(self, folded):
        super().__init__()
        self.conv = folded.conv1.conv
        self.gamma = folded.norm2.gamma

    def forward(self, x):
        y = torch.ops.vaebuild.conv3x3_rms_silu(x, self.conv.weight, self.conv.bias, self.gamma) * 2.0
        return torch.ops.vaebuild.conv3x3_add(y, self.conv.weight, self.conv.bias, x, 1)


def test_op_survives_export_and_packages_call_it_by_name(tmp_path):
    from vaebuild.backends.inductor.load import load_package

    _, folded = _folded_block(seed=2)
    module = _ConvNorm(folded).eval()
    x = torch.randn(1, 96, 8, 12)
    with torch.no_grad():
        program = torch.export.export(module, (x,))
        targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
        assert {"vaebuild.conv3x3_rms_silu.default", "vaebuild.conv3x3_add.default"} <= targets
        path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "conv_norm.pt2"))
        with zipfile.ZipFile(path) as archive:
            extern_calls = [archive.read(n).decode() for n in archive.namelist() if n.endswith(".wrapper.json")]
        assert any("vaebuild::conv3x3_rms_silu" in text and "vaebuild::conv3x3_add" in text for text in extern_calls)
        other = torch.randn(1, 96, 8, 12)
        out = load_package(path, "cpu").run([other])[0]
        torch.testing.assert_close(out, module(other), rtol=0, atol=0)


def test_fold_with_fused_norms_equals_diffusers():
    vae = make_tiny_vae(seed=4, base_dim=96, dim_mult=[1, 1, 2, 2])
    folded = fold_single_frame(vae, fused_norms=True)
    fused = [m for m in folded.modules() if isinstance(m, FusedNormResidualBlock)]
    blocks = [m for m in vae.modules() if isinstance(m, QwenImageResidualBlock) and m.in_dim == m.out_dim == 96]
    assert len(fused) == len(blocks) > 0  # only the 96-channel blocks (the 192-channel ones stay as they were)
    assert not any(isinstance(m, FusedNormResidualBlock) for m in fold_single_frame(vae).modules())
    # each 96-channel level's last block (levels 0 and 1 here) writes its output padded for the downsampler after it
    layers = list(folded.encoder.down_blocks)
    padded = [i for i, m in enumerate(layers) if isinstance(m, PaddedInputDownsample)]
    assert len(padded) == 2 and all(layers[i - 1].pad_end == 1 for i in padded)
    assert sum(isinstance(m, FusedNormResidualBlock) and m.pad_end for m in folded.modules()) == 2
    assert folded.state_dict().keys() == fold_single_frame(vae).state_dict().keys()
    assert_graphs_match_diffusers(vae, [(1, 24, 40)], fast_attention=True, conv_rewrites=True, fused_norms=True)


def test_packages_use_the_op_from_1024x768_static_shapes_on():
    from vaebuild.backends.inductor.compile import FUSED_NORM_MIN_PIXELS, uses_fused_norms

    record = {"graphs": {"encoder": {"spatial_multiple": 8}, "decoder": {"spatial_multiple": 1}}}

    def static(graph, height, width):
        shape = (1, 3, 1, height, width) if graph == "encoder" else (1, 16, 1, height // 8, width // 8)
        return [{"x": (shape, shape, shape)}]

    assert FUSED_NORM_MIN_PIXELS == 1024 * 768
    for graph in ("encoder", "decoder"):
        assert uses_fused_norms(record, graph, static(graph, 1328, 1328))
        assert uses_fused_norms(record, graph, static(graph, 768, 1024))
        assert not uses_fused_norms(record, graph, static(graph, 512, 512))
        assert not uses_fused_norms(record, graph, static(graph, 480, 848))
    dynamic = [{"x": ((1, 3, 1, 512, 512), (1, 3, 1, 1328, 1328), (1, 3, 1, 1920, 1920))}]
    assert not uses_fused_norms(record, "encoder", dynamic)  # dynamic shapes: inductor's own kernels
