"""Where the decoder's uint8 conversion runs: after the package (eager torch ops; one compiled kernel) or inside it.

    python benchmarks/packages/uint8_output.py --engines DIR --out OUTDIR [--size 1328x1328]

Compiles a package of the decoder graph followed by `vaebuild.pixels.convert.images_to_uint8` (diffusers'
postprocess arithmetic, traced into the graph so inductor can fuse it with the final clamp), from the same random
weights as DIR's packages (`--random-init`, --seed), with the package settings vaebuild uses. Then, at one size,
CUDA-event medians of: DIR's decoder package alone; + `images_to_uint8` as eager torch ops; + the same compiled by
`torch.compile`; the fused package; and the uint8 image's way to PIL: pageable `.cpu()` + `Image.fromarray` (what
diffusers does after its conversion) against `vaebuild.pixels.pil.to_pil_images` (RGBX on the device, pinned host
blocks, PIL images over those bytes), with each one's copy alone. Every uint8 output is compared byte for byte with
the eager conversion of the package's output (PIL images by their bytes). Writes OUTDIR/uint8_output.{json,md}.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from vaebuild.bench import summarize, time_calls  # noqa: E402
from vaebuild.env import device_info, package_versions  # noqa: E402
from vaebuild.fileio import write_json, write_text  # noqa: E402
from vaebuild.pixels.convert import images_to_uint8, rgb_to_rgbx, to_host  # noqa: E402
from vaebuild.pixels.pil import to_pil_images  # noqa: E402


class DecoderToUint8(torch.nn.Module):
    """The decoder graph, then diffusers' conversion to uint8 `[B, H, W, 3]`."""

    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, latents):
        return images_to_uint8(self.decoder(latents)[:, :, 0])


def compile_fused(height, width, seed, path):
    """Compile the fused package at one static size (bf16, CUDA, weights embedded); returns its path."""
    from vaebuild.backends.inductor.compile import package_configs
    from vaebuild.model.graphs import build_graphs
    from vaebuild.model.source import ModelSource, load_vae

    vae = load_vae(ModelSource(random_init=True, seed=seed))
    _, decoder = build_graphs(vae, fast_attention=True, conv_rewrites=True, fused_norms=True)
    module = DecoderToUint8(decoder).to("cuda", torch.bfloat16).to(memory_format=torch.channels_last).eval()
    example = torch.randn(1, vae.config.z_dim, 1, height // 8, width // 8, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        exported = torch.export.export(module, (example,), strict=False)
        torch._inductor.aoti_compile_and_package(exported, package_path=str(path),
                                                 inductor_configs=package_configs(True, "cuda"))
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", required=True, type=Path, help="a vaebuild folder with a decoder package at --size")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--size", default="1328x1328", help="WxH")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--fused", type=Path, help="the fused package (compiled here when missing)")
    parser.add_argument("--compile-only", action="store_true", help="compile --fused and stop (run beside a build)")
    args = parser.parse_args()
    from vaebuild.backends.inductor.load import load_package
    from vaebuild.runtime import VaeRuntime

    width, height = (int(v) for v in args.size.lower().split("x"))
    fused_path = args.fused or args.out / "decoder_uint8.pt2"
    if not fused_path.exists():
        compile_fused(height, width, args.seed, fused_path)
    if args.compile_only:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    runtime = VaeRuntime(args.engines, allow_fallback=False)
    latents = torch.randn(1, runtime.z_dim, 1, height // 8, width // 8, device=device, dtype=torch.bfloat16)
    fused = load_package(fused_path, device)
    compiled = torch.compile(images_to_uint8)
    reference = images_to_uint8(runtime.decode(latents)[:, :, 0])
    variants = {
        "package decode alone": lambda: runtime.decode(latents),
        "package + images_to_uint8 (eager ops)": lambda: images_to_uint8(runtime.decode(latents)[:, :, 0]),
        "package + images_to_uint8 (torch.compile)": lambda: compiled(runtime.decode(latents)[:, :, 0]),
        "fused package (conversion in the graph)": lambda: fused.run([latents])[0],
        "uint8 RGB to host, pageable .cpu()": lambda: reference.cpu(),
        "RGBX to host, pinned (to_host)": lambda: to_host(rgb_to_rgbx(reference)),
        "to PIL: pageable .cpu() + Image.fromarray": lambda: [Image.fromarray(i) for i in reference.cpu().numpy()],
        "to PIL: to_pil_images (pinned RGBX, no copy)": lambda: to_pil_images(reference),
    }
    expected_bytes = [Image.fromarray(i).tobytes() for i in reference.cpu().numpy()]
    rows = []
    for name, call in variants.items():
        out = call()
        equal = None
        if isinstance(out, list):
            equal = [i.tobytes() for i in out] == expected_bytes
        elif out.dtype == torch.uint8:
            equal = bool(torch.equal(out.cpu()[..., :3], reference.cpu()))
        row = {"variant": name, "equal_to_eager": equal, **summarize(time_calls(call, device, 5, args.runs))}
        rows.append(row)
        print(f"{name}: {row['median_ms']:.3f} ms, equal bytes: {equal}")
    result = {"benchmark": "vaebuild uint8 output", "size": args.size, "device": device_info(device),
              "versions": package_versions(), "seed": args.seed, "runs": args.runs, "rows": rows}
    lines = [f"# The decoder's uint8 conversion at {args.size} (WxH), {result['device']['name']}", "",
             f"bf16, batch 1, random weights (seed {args.seed}); CUDA-event medians of {args.runs} calls after 5.",
             "`equal`: uint8 output byte-identical to the eager conversion of the package's output.", "",
             "| variant | median ms | p90 ms | equal |", "|---|---:|---:|---|"]
    lines += [f"| {r['variant']} | {r['median_ms']:.3f} | {r['p90_ms']:.3f} | {r['equal_to_eager']} |" for r in rows]
    write_json(args.out / "uint8_output.json", result)
    write_text(args.out / "uint8_output.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
