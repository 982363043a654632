"""The `vaebuild::attention_d384` op on CPU: its SDPA fallback, torch.export, and the folded VAE using it.

The kernels themselves need a Hopper GPU: benchmarks/kernels/attention_kernel.py and benchmarks/kernels/attention_ws_kernel.py check them there.
"""

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageAttentionBlock

from tests.conftest import assert_graphs_match_diffusers, make_tiny_vae
from vaebuild.kernels.attention import FastAttentionBlock, kernel_usable
from vaebuild.model.single_frame import fold_single_frame


def _qkv_views(tokens, dim, seed):
    qkv = torch.randn(2, 1, tokens, 3 * dim, generator=torch.Generator().manual_seed(seed))
    return qkv.chunk(3, dim=-1)


@pytest.mark.parametrize("tokens", [1, 7, 63, 100])
@pytest.mark.parametrize("dim", [384, 32])
def test_op_equals_sdpa_on_cpu(tokens, dim):
    q, k, v = _qkv_views(tokens, dim, seed=tokens)
    assert not kernel_usable(q, k, v)
    out = torch.ops.vaebuild.attention_d384(q, k, v)
    assert out.shape == q.shape
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=0, atol=0)


def test_block_equals_diffusers_attention_block():
    torch.manual_seed(0)
    block = QwenImageAttentionBlock(384).eval()
    with torch.no_grad():
        block.norm.gamma.uniform_(0.5, 1.5)
    fast = FastAttentionBlock(block)
    assert fast.state_dict().keys() == block.state_dict().keys()
    for height, width in ((1, 1), (3, 5), (7, 9)):
        x = torch.randn(2, 384, 1, height, width)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), block(x), rtol=0, atol=1e-5)


def test_block_hands_the_op_contiguous_inputs():
    """Views of one qkv tensor would each become a buffer of qkv's size inside a package."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.vaebuild.attention_d384.default:
                self.seen.append([(a.is_contiguous(), a.untyped_storage().nbytes() == a.nbytes) for a in args])
            return func(*args, **(kwargs or {}))

    block = FastAttentionBlock(QwenImageAttentionBlock(384).eval())
    with torch.no_grad(), Record():
        block(torch.randn(1, 384, 1, 3, 5))
    assert Record.seen == [[(True, True)] * 3]


class _Attend(torch.nn.Module):
    def forward(self, qkv):
        q, k, v = qkv.chunk(3, dim=-1)
        return torch.ops.vaebuild.attention_d384(q, k, v) + 1.0


def test_op_survives_torch_export():
    qkv = torch.randn(1, 1, 37, 3 * 384)
    program = torch.export.export(_Attend(), (qkv,))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert "vaebuild.attention_d384.default" in targets
    other = torch.randn(1, 1, 37, 3 * 384)
    torch.testing.assert_close(program.module()(other), _Attend()(other), rtol=0, atol=0)


def test_fold_with_fast_attention_equals_diffusers_decode():
    vae = make_tiny_vae(seed=3)
    folded = fold_single_frame(vae, fast_attention=True)
    assert sum(isinstance(m, FastAttentionBlock) for m in folded.modules()) == 2  # encoder and decoder mid-blocks
    assert not any(isinstance(m, QwenImageAttentionBlock) for m in folded.modules())
    assert not any(isinstance(m, FastAttentionBlock) for m in fold_single_frame(vae).modules())
    assert_graphs_match_diffusers(vae, [(1, 40, 56)], fast_attention=True)


def test_package_calls_the_op_by_name(tmp_path):
    """An AOTInductor package keeps the op as a call by name (torch's proxy executor) and runs it when loaded."""
    import zipfile

    from vaebuild.backends.inductor.load import load_package

    qkv = torch.randn(1, 1, 37, 3 * 384)
    program = torch.export.export(_Attend(), (qkv,))
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "attend.pt2"))
    with zipfile.ZipFile(path) as archive:
        extern_calls = [archive.read(n).decode() for n in archive.namelist() if n.endswith(".wrapper.json")]
    assert any("vaebuild::attention_d384" in text for text in extern_calls)
    other = torch.randn(1, 1, 37, 3 * 384)
    out = load_package(path, "cpu").run([other])[0]
    torch.testing.assert_close(out, _Attend()(other), rtol=0, atol=0)


def test_tma_allocator_is_set_in_every_calling_thread():
    """Triton's allocator is a context variable: a kernel launched from another thread needs it set there too."""
    pytest.importorskip("triton")
    import threading

    from triton.runtime import _allocation

    from vaebuild.kernels import tma

    tma.set_tma_allocator()
    seen = {}

    def worker():
        seen["before"] = _allocation._allocator.get()
        tma.set_tma_allocator()
        seen["after"] = _allocation._allocator.get()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen["before"] is not tma._scratch  # a new thread starts without it
    assert seen["after"] is tma._scratch


@pytest.mark.parametrize("tokens, splits", [(27_556, 3), (57_600, 7), (129_600, 1), (518_400, 1)])
def test_key_splits_stop_at_four_waves(tokens, splits):
    """1328x1328 keeps its split (the shipped timing); 3840x2160 and 7680x4320 take none (no fp32 partials).
    Needs Triton (the module holds the combine kernel): skipped where it is missing, as on CI."""
    attention_splits = pytest.importorskip("vaebuild.kernels.attention_splits", exc_type=ImportError)
    q_blocks, key_blocks = -(-tokens // 128), -(-tokens // 32)  # the Gluon kernel's BLOCK_M and BLOCK_N
    assert attention_splits.choose_splits(q_blocks, key_blocks, sm_count=132) == splits
