"""Two checks of `vaebuild::attention_d384` with the warp-specialized kernel on a Hopper GPU.

    python3 benchmarks/checks/attention_ws_checks.py

1. CUDA graphs: the op replayed through `vaebuild.backends.inductor.cuda_graph.GraphedCall` equals its plain calls (two
   inputs each at 27,556, 16,384 and 1,000 tokens).
2. Data: the kernel's time (do_bench median) on the mid-block q/k/v of the 2-D eager encoder and decoder
   (the Qwen-Image VAE architecture, random weights of seed 0, bf16, 1328x1328) against randn q/k/v, with and
   without lazy rescale, next to the scores' spread.
Prints one line per measurement (the record: benchmarks/results/h100/h100_ws_attention_graphs_data.log). Needs diffusers.
"""

import sys
from dataclasses import replace
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "packages"))  # for benchmarks/packages/graph_profile.py

from graph_profile import graph_input, make_vae  # noqa: E402
from vaebuild.backends.inductor.cuda_graph import GraphedCall  # noqa: E402
from vaebuild.kernels import attention_fwd_gluon as attention_gluon  # noqa: E402
from vaebuild.kernels.attention import FastAttentionBlock  # noqa: E402
from vaebuild.model.graphs import build_graphs  # noqa: E402


def attend(qkv):
    return torch.ops.vaebuild.attention_d384(*qkv.chunk(3, dim=-1))


def graph_replays():
    for tokens in (27556, 16384, 1000):
        graphed = GraphedCall(attend)
        diffs = []
        for _ in range(2):
            qkv = torch.randn(1, 1, tokens, 1152, device="cuda", dtype=torch.bfloat16)
            diffs.append((graphed(qkv).clone() - attend(qkv)).abs().max().item())
        print(f"graph replay vs plain, {tokens} tokens: max abs {diffs[0]} and {diffs[1]}", flush=True)


def mid_block_qkv(graph, x):
    """The [1, 1, N, 1152] q/k/v tensor the graph's attention block computes for input x."""
    block = next(m for m in graph.modules() if isinstance(m, FastAttentionBlock))
    seen = {}
    handle = block.register_forward_pre_hook(lambda module, args: seen.update(x=args[0]))
    with torch.no_grad():
        graph(x)
        handle.remove()
        b, c, t, h, w = seen["x"].shape
        flat = seen["x"].permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        return block.to_qkv(block.norm(flat)).reshape(b * t, 1, c * 3, -1).permute(0, 1, 3, 2).contiguous()


def data_dependence():
    encoder, decoder = (g.to("cuda", torch.bfloat16) for g in build_graphs(make_vae(), fast_attention=True, fused_norms=True))
    inputs = {
        "encoder": mid_block_qkv(encoder, graph_input("encoder", 1328, 1328, "cuda", torch.bfloat16)),
        "decoder": mid_block_qkv(decoder, graph_input("decoder", 1328, 1328, "cuda", torch.bfloat16)),
        "randn": torch.randn(1, 1, 166 * 166, 1152, device="cuda", dtype=torch.bfloat16),
    }
    configs = {"default": attention_gluon.DEFAULT_GLUON_CONFIG,
               "no lazy": replace(attention_gluon.DEFAULT_GLUON_CONFIG, lazy_rescale=False)}
    for name, qkv in inputs.items():
        q, k, v = qkv.chunk(3, dim=-1)
        scores = (q[0, 0, :2048].float() @ k[0, 0].float().T) / 384**0.5
        row = [name, f"|q| {q.float().norm(dim=-1).mean().item():.1f}",
               f"score std {scores.std().item():.2f} row-max mean {scores.max(dim=-1).values.mean().item():.1f}"]
        for label, config in configs.items():
            ms = triton.testing.do_bench(lambda: attention_gluon.attention_forward(q, k, v, config), warmup=25, rep=200,
                                         return_mode="median")
            row.append(f"{label} {ms:.3f} ms")
        print(" | ".join(row), flush=True)


if __name__ == "__main__":
    graph_replays()
    data_dependence()
