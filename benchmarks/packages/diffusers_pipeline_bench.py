"""Time the decode step of diffusers' QwenImagePipeline: the stock VAE against `EngineVae` over engine packages.

    python benchmarks/packages/diffusers_pipeline_bench.py --engines DIR --out OUTDIR [--size 1328x1328 --runs 20]

The pipeline has a tiny random transformer and the full-size Qwen-Image VAE with seeded random weights
(`vaebuild.model.source`, as `--random-init`); nothing is downloaded (needs torch, diffusers and
transformers). Each VAE serves one real pipeline run at the size (`pipe.vae` is swapped); the latents
the pipeline passed to `vae.decode` are recorded, then `vae.decode(latents, return_dict=False)` on them
is timed with CUDA events (median, p90 and min of --runs after --warmup). EngineVae runs with
`allow_fallback=False`, so a size its engines do not cover fails instead of timing PyTorch.
Writes OUTDIR/diffusers_pipeline_bench.json and .md and prints the table.

DIR must hold packages of the same random VAE covering the size, e.g.
`vaebuild static --random-init --seed 0 --backend inductor --device cuda --ratios 1_1 --out DIR`.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from vaebuild.bench import summarize, time_calls  # noqa: E402
from vaebuild.env import device_info, package_versions  # noqa: E402
from vaebuild.fileio import write_json  # noqa: E402
from vaebuild.model.source import ModelSource, load_vae  # noqa: E402
from vaebuild.runtime import EngineVae  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PROMPT_DIM = 64


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", required=True, type=Path, help="a vaebuild engine folder (e.g. inductor packages)")
    parser.add_argument("--out", required=True, type=Path, help="folder for the JSON and Markdown results")
    parser.add_argument("--size", default="1328x1328", help="image HEIGHTxWIDTH (multiples of 16)")
    parser.add_argument("--dtype", default="bf16", choices=DTYPES, help="pipeline and stock VAE dtype")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random VAE weights (match the engines')")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=20)
    return parser.parse_args()


def make_pipeline(vae, dtype, device):
    """QwenImagePipeline with a one-layer random transformer, no text encoder and no tokenizer."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel

    z_dim = vae.config.z_dim
    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(
        in_channels=4 * z_dim, out_channels=z_dim, num_layers=1, attention_head_dim=32, num_attention_heads=2,
        joint_attention_dim=PROMPT_DIM, axes_dims_rope=(8, 12, 12),
    )
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
        transformer=transformer,
    ).to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_decode_input(pipe, height, width):
    """Run the pipeline once; return the latents it passed to `pipe.vae.decode` (and its output image)."""
    device, dtype = pipe.vae.device, pipe.transformer.dtype
    seen = []
    decode = pipe.vae.decode
    pipe.vae.decode = lambda latents, **kwargs: seen.append(latents) or decode(latents, **kwargs)
    try:
        generator = torch.Generator(device).manual_seed(0)
        embeds = torch.randn(1, 16, PROMPT_DIM, generator=generator, device=device, dtype=dtype)
        images = pipe(
            prompt_embeds=embeds, prompt_embeds_mask=torch.ones(1, 16, dtype=torch.long, device=device),
            height=height, width=width, num_inference_steps=2, generator=generator, output_type="pt",
        ).images
    finally:
        del pipe.vae.decode  # the instance attribute set above; the method is back
    return seen[0], images


def measure(name, pipe, height, width, device, args):
    latents, images = pipeline_decode_input(pipe, height, width)
    times = time_calls(lambda: pipe.vae.decode(latents, return_dict=False)[0], device, args.warmup, args.runs)
    row = {"vae": name, "latents": list(latents.shape), **summarize(times)}
    print(f"{name}: decode median {row['median_ms']:.2f} ms (p90 {row['p90_ms']:.2f}, min {row['min_ms']:.2f})")
    return row, latents, images


def render_markdown(result):
    lines = [
        f"# QwenImagePipeline decode step, {result['size']}, {result['dtype']}, {result['device']['name']}",
        "",
        f"`vae.decode(latents, return_dict=False)` per image, median of {result['runs']} runs after "
        f"{result['warmup']} warm-up (CUDA events). Engines: `{result['engines']}` ({result['engine_kind']}).",
        "",
        "| VAE | median ms | p90 ms | min ms | speedup | served by |",
        "|---|---:|---:|---:|---:|---|",
    ]
    stock = result["rows"][0]["median_ms"]
    for row in result["rows"]:
        lines.append(
            f"| {row['vae']} | {row['median_ms']:.2f} | {row['p90_ms']:.2f} | {row['min_ms']:.2f} | "
            f"{stock / row['median_ms']:.2f}x | {row['route']} |"
        )
    lines += ["", f"Pipeline images, EngineVae vs stock: max abs diff {result['max_abs_diff']:.4g} (in [0, 1]).", ""]
    return "\n".join(lines)


def main():
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU (CUDA events); none is visible")
    device, dtype = torch.device("cuda"), DTYPES[args.dtype]
    height, width = (int(side) for side in args.size.lower().split("x"))
    stock_vae = load_vae(ModelSource(random_init=True, seed=args.seed))
    pipe = make_pipeline(stock_vae, dtype, device)

    stock_row, latents, stock_images = measure("diffusers AutoencoderKLQwenImage", pipe, height, width, device, args)
    stock_row["route"] = "PyTorch (diffusers, 3-D)"
    engine_vae = EngineVae.from_folder(args.engines, fallback=pipe.vae, allow_fallback=False)
    pipe.vae = engine_vae
    engine_row, engine_latents, engine_images = measure("vaebuild EngineVae", pipe, height, width, device, args)
    route = engine_vae.runtime.last_route["decoder"]
    engine_row["route"] = f"{route.kind} {route.engine} (profile {route.profile})"

    result = {
        "size": f"{height}x{width}",
        "dtype": args.dtype,
        "engines": str(args.engines),
        "engine_kind": engine_vae.runtime.manifest["kind"],
        "engine_backends": sorted({e["backend"] for e in engine_vae.runtime.manifest["engines"]}),
        "warmup": args.warmup,
        "runs": args.runs,
        "device": device_info(device),
        "versions": package_versions(),
        "model": {"kind": "random-init", "seed": args.seed},
        "rows": [stock_row, engine_row],
        "same_decoder_input": torch.equal(latents, engine_latents),
        "max_abs_diff": (engine_images.float() - stock_images.float()).abs().max().item(),
    }
    markdown = render_markdown(result)
    write_json(args.out / "diffusers_pipeline_bench.json", result)
    (args.out / "diffusers_pipeline_bench.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
