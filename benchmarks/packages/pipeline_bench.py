"""The pipeline's VAE steps end to end, stock diffusers against `vaebuild.use_engines`, on a CUDA GPU.

    python benchmarks/packages/pipeline_bench.py --engines DIR --out OUTDIR [--runs 10]

Steps, each as diffusers 0.42's Qwen-Image pipelines run them (the code of their `__call__`, with the pipeline's
own `vae` and `image_processor`):
- `t2i-decode` (QwenImagePipeline, at each --t2i-sizes): packed latents -> unpack, de-normalize, `vae.decode`,
  `image_processor.postprocess(output_type="pil")` -> a list of PIL images;
- `edit-encode` (QwenImageEditPipeline): a --photo-size RGB PIL photo -> `calculate_dimensions(1024*1024, w/h)`,
  `image_processor.resize` (Pillow's LANCZOS), `preprocess`, `vae.encode` (argmax), normalize -> latents;
- `edit-encode-resized`: the same after the resize (Pillow's, done once beforehand): preprocess, encode, normalize;
- `edit-decode`: latents at that size -> PIL, as `t2i-decode`;
- `postprocess` (at the largest T2I size): `image_processor.postprocess(decoded, "pil")` alone.
The pipelines have a tiny random transformer (unused by these steps) and the full-size Qwen-Image VAE with seeded
random weights (`--random-init`); DIR must hold inductor packages of that VAE for every size (e.g. the spec
`benchmarks/packages/pipeline_sizes.yaml`). Wall clock per call with `torch.cuda.synchronize()` before the start
(the steps end on the host), medians of --runs after --warmup, stock and engines in one process. The images of both
paths are compared (max abs difference in uint8 levels). Writes OUTDIR/pipeline_bench.{json,md}.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from vaebuild.env import device_info, package_versions  # noqa: E402
from vaebuild.fileio import write_json, write_text  # noqa: E402
from vaebuild.model.source import ModelSource, load_vae  # noqa: E402

T2I_SIZES = "1328x1328,1664x928,928x1664,1472x1136,768x1024"  # WxH: the T2I static spec's sizes (4_3 floored to 16)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", required=True, type=Path, help="a vaebuild folder of inductor packages")
    parser.add_argument("--out", required=True, type=Path, help="folder for pipeline_bench.json and .md")
    parser.add_argument("--t2i-sizes", default=T2I_SIZES, help="comma-separated WxH sizes of the t2i-decode rows")
    parser.add_argument("--photo-size", default="4032x3024", help="WxH of the edit pipeline's input photo")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random VAE weights (match the engines')")
    parser.add_argument("--model", help="a VAE or pipeline folder instead of the random weights (as the engines')")
    parser.add_argument("--device", default="cuda", help="cuda (what the figures are for) or cpu (a smoke test)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=10)
    return parser.parse_args()


def make_pipelines(vae, device, dtype):
    """(QwenImagePipeline, QwenImageEditPipeline) in `dtype` sharing `vae` and a one-layer random transformer."""
    from diffusers import (FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline, QwenImagePipeline,
                           QwenImageTransformer2DModel)

    torch.manual_seed(0)
    z = vae.config.z_dim
    transformer = QwenImageTransformer2DModel(in_channels=4 * z, out_channels=z, num_layers=1, attention_head_dim=32,
                                              num_attention_heads=2, joint_attention_dim=64, axes_dims_rope=(8, 12, 12))
    common = dict(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                  transformer=transformer)
    t2i = QwenImagePipeline(**common).to(device, dtype)
    edit = QwenImageEditPipeline(**common, processor=None).to(device, dtype)
    return t2i, edit


def _latent_stats(pipe, latents):
    config = pipe.vae.config
    mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
    inv_std = 1.0 / torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
    return mean, inv_std


def decode_step(pipe, packed, height, width):
    """QwenImagePipeline.__call__'s decode: packed latents -> list of PIL images."""
    latents = pipe._unpack_latents(packed, height, width, pipe.vae_scale_factor).to(pipe.vae.dtype)
    mean, inv_std = _latent_stats(pipe, latents)
    image = pipe.vae.decode(latents / inv_std + mean, return_dict=False)[0][:, :, 0]
    return pipe.image_processor.postprocess(image, output_type="pil")


def encode_step(pipe, photo):
    """QwenImageEditPipeline.__call__'s image encoding: a PIL photo -> normalized latents `[1, z, 1, h, w]`."""
    width, height = edit_size(photo)
    return encode_resized(pipe, pipe.image_processor.resize(photo, height, width))


def edit_size(photo):
    """(width, height) the edit pipelines resize `photo` to."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

    width, height, _ = calculate_dimensions(1024 * 1024, photo.size[0] / photo.size[1])
    return width, height


def encode_resized(pipe, image):
    """The rest of the edit pipelines' encoding, after the resize: preprocess, `vae.encode` (argmax), normalize."""
    width, height = image.size
    image = pipe.image_processor.preprocess(image, height, width).unsqueeze(2)
    image = image.to(device=pipe.vae.device, dtype=pipe.vae.dtype)
    latents = pipe.vae.encode(image).latent_dist.mode()
    mean, inv_std = _latent_stats(pipe, latents)
    return (latents - mean) * inv_std


def _synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, warmup, runs):
    """(median ms, last output) of `fn()` by wall clock, synchronizing the GPU before each start."""
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(runs):
        _synchronize()
        start = time.perf_counter()
        out = fn()
        _synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), out


def pil_difference(a, b):
    """Max abs difference in uint8 levels between two lists of PIL images."""
    return max(int(np.abs(np.asarray(x, np.int16) - np.asarray(y, np.int16)).max()) for x, y in zip(a, b))


def measure(t2i, edit, sizes, photo, args):
    """{step/size: (ms, output)} for the pipelines as they are now configured."""
    results = {}
    device, dtype = t2i.vae.device, t2i.vae.dtype
    generator = torch.Generator(device).manual_seed(0)
    for width, height in sizes:
        packed = torch.randn(1, (height // 16) * (width // 16), 4 * t2i.vae.config.z_dim, device=device, dtype=dtype,
                             generator=generator)
        results[("t2i-decode", width, height)] = timed(lambda: decode_step(t2i, packed, height, width),
                                                       args.warmup, args.runs)
    width, height = sizes[0]
    latents = torch.randn(1, t2i.vae.config.z_dim, 1, height // 8, width // 8, device=device, dtype=dtype,
                          generator=generator)
    decoded = t2i.vae.decode(latents, return_dict=False)[0][:, :, 0]
    results[("postprocess", width, height)] = timed(lambda: t2i.image_processor.postprocess(decoded, output_type="pil"),
                                                    args.warmup, args.runs)
    ms, encoded = timed(lambda: encode_step(edit, photo), args.warmup, args.runs)
    ew, eh = edit_size(photo)
    results[("edit-encode", ew, eh)] = (ms, [encoded])
    resized = photo.resize((ew, eh), Image.LANCZOS)  # Pillow's, the same input for both paths
    ms, encoded = timed(lambda: encode_resized(edit, resized), args.warmup, args.runs)
    results[("edit-encode-resized", ew, eh)] = (ms, [encoded])
    packed = torch.randn(1, (eh // 16) * (ew // 16), 4 * t2i.vae.config.z_dim, device=device, dtype=dtype,
                         generator=generator)
    results[("edit-decode", ew, eh)] = timed(lambda: decode_step(edit, packed, eh, ew), args.warmup, args.runs)
    return results


def render_markdown(result):
    lines = [
        f"# Qwen-Image pipelines' VAE steps: stock diffusers vs `vaebuild.use_engines`, {result['device']['name']}",
        "",
        f"{result['dtype']}, batch 1, VAE: {result['model']}, diffusers "
        f"{result['versions']['diffusers']}, torch {result['versions']['torch']}. Wall clock per call with "
        f"synchronization, median of {result['runs']} after {result['warmup']} warm-up, one process. Input photo "
        f"{result['photo_size']} (WxH). `max diff`: largest difference between the two paths' outputs (uint8 levels "
        "for images, absolute for latents).",
        "",
        "| step | size (WxH) | stock ms | engines ms | speedup | max diff |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(f"| {row['step']} | {row['size']} | {row['stock_ms']:.2f} | {row['engines_ms']:.2f} | "
                     f"{row['stock_ms'] / row['engines_ms']:.2f}x | {row['max_diff']:.4g} |")
    lines += ["", f"Engines: `{result['engines']}`; processor resize on the device: {result['gpu_resize']}.", ""]
    return "\n".join(lines)


def main():
    args = parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU (or --device cpu for a smoke test); none is visible")

    import vaebuild

    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.t2i_sizes.split(",")]
    pw, ph = (int(v) for v in args.photo_size.lower().split("x"))
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (ph, pw, 3), dtype=np.uint8))
    source = ModelSource(model=args.model) if args.model else ModelSource(random_init=True, seed=args.seed)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    vae = load_vae(source).to(args.device, dtype)
    t2i, edit = make_pipelines(vae, torch.device(args.device), dtype)
    with torch.no_grad():  # as the pipelines' __call__ runs
        stock = measure(t2i, edit, sizes, photo, args)
        for pipe in (t2i, edit):
            vaebuild.use_engines(pipe, args.engines, allow_fallback=False)
        engines = measure(t2i, edit, sizes, photo, args)
    rows = []
    for key, (stock_ms, stock_out) in stock.items():
        engines_ms, engines_out = engines[key]
        if key[0].startswith("edit-encode"):
            diff = (stock_out[0].float() - engines_out[0].float()).abs().max().item()
        else:
            diff = pil_difference(stock_out, engines_out)
        rows.append({"step": key[0], "size": f"{key[1]}x{key[2]}", "stock_ms": round(stock_ms, 3),
                     "engines_ms": round(engines_ms, 3), "max_diff": diff})
        print(f"{key[0]} {key[1]}x{key[2]}: stock {stock_ms:.2f} ms, engines {engines_ms:.2f} ms, max diff {diff}")
    result = {
        "benchmark": "vaebuild pipeline bench",
        "device": device_info(torch.device(args.device)),
        "versions": package_versions(),
        "seed": args.seed,
        "dtype": str(dtype).removeprefix("torch."),
        "model": args.model or f"the full-size Qwen-Image VAE with random weights (seed {args.seed})",
        "engines": str(args.engines),
        "photo_size": args.photo_size,
        "gpu_resize": getattr(edit.image_processor, "resizes_on_device", False),
        "warmup": args.warmup,
        "runs": args.runs,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "pipeline_bench.json", result)
    write_text(args.out / "pipeline_bench.md", render_markdown(result))
    print(render_markdown(result))


if __name__ == "__main__":
    main()
