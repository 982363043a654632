"""Where the edit pipelines' input conversion spends its time on a GPU: a PIL photo -> resized -> device tensor.

    python benchmarks/checks/edit_input_profile.py [--photo-size 4032x3024] [--size 1184x896] [--out OUT]

Times (wall clock with synchronization, median of 10 after 2) each stage of `EngineImageProcessor`'s resize and
preprocess of an RGB photo: PIL -> numpy (`np.asarray` against `vaebuild.pixels.pil.read_storage`'s row copies of Pillow's RGBX storage),
the upload (pageable RGB against pinned RGB and RGBX), the Pillow-exact LANCZOS resize on the device, the way back to PIL
(`.cpu()` + `Image.fromarray` against `to_pil_images`), and the whole `resize_pil_lanczos`. Prints a table; with
--out also writes OUT/edit_input_profile.json and .md.
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

from vaebuild.fileio import write_json, write_text  # noqa: E402
from vaebuild.pixels.lanczos import resize_lanczos, resize_pil_lanczos  # noqa: E402
from vaebuild.pixels.pil import THREADS, read_storage, to_pil_images, upload_pixels  # noqa: E402


def timed(fn, runs=10, warmup=2):
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(runs):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photo-size", default="4032x3024")
    parser.add_argument("--size", default="1184x896")
    parser.add_argument("--out", type=Path, help="folder for edit_input_profile.json and .md")
    args = parser.parse_args()
    pw, ph = (int(v) for v in args.photo_size.split("x"))
    w, h = (int(v) for v in args.size.split("x"))
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (ph, pw, 3), dtype=np.uint8))
    rows = []
    ms, array = timed(lambda: np.asarray(photo))
    rows.append(("np.asarray(PIL RGB photo)", ms))
    ms, _ = timed(lambda: read_storage(photo))
    rows.append((f"read_storage(photo): RGBX rows, {THREADS} threads", ms))
    pinned = torch.empty((ph, pw, 4), dtype=torch.uint8, pin_memory=True)
    ms, _ = timed(lambda: read_storage(photo, pinned.numpy()))
    rows.append(("read_storage(photo) into a pinned buffer", ms))
    ms, dev = timed(lambda: torch.from_numpy(array.copy()).to("cuda"))
    rows.append(("upload uint8 RGB, pageable (with a copy)", ms))
    pinned_rgb = torch.from_numpy(array.copy()).pin_memory()
    ms, _ = timed(lambda: pinned_rgb.to("cuda", non_blocking=True))
    rows.append(("upload uint8 RGB, pinned", ms))
    ms, _ = timed(lambda: pinned.to("cuda", non_blocking=True)[..., :3].contiguous())
    rows.append(("upload uint8 RGBX, pinned, pad byte dropped on the device", ms))
    ms, uploaded = timed(lambda: upload_pixels([photo], "cuda"))
    rows.append(("upload_pixels([photo]): read + pinned upload", ms))
    ms, small = timed(lambda: resize_lanczos(dev, (w, h)))
    rows.append(("resize_lanczos on the device", ms))
    ms, _ = timed(lambda: Image.fromarray(small.cpu().numpy()))
    rows.append(("resized to PIL: .cpu() + Image.fromarray", ms))
    ms, _ = timed(lambda: to_pil_images(small[None]))
    rows.append(("resized to PIL: to_pil_images", ms))
    ms, resized = timed(lambda: resize_pil_lanczos(photo, (w, h), "cuda"))
    rows.append(("resize_pil_lanczos(photo): all of the above", ms))
    ms, expected = timed(lambda: photo.resize((w, h), Image.LANCZOS), runs=3, warmup=1)
    rows.append(("Pillow's resize (CPU), for reference", ms))
    assert torch.equal(uploaded[0], dev) and resized.tobytes() == expected.tobytes()
    lines = [f"# Edit input stages, {args.photo_size} photo -> {args.size}, {torch.cuda.get_device_name()}", "",
             f"`python benchmarks/checks/edit_input_profile.py` (torch {torch.__version__}; wall clock with "
             "synchronization, median of 10 after 2; the Pillow reference median of 3). Random RGB photo.", "",
             "| stage | median ms |", "|---|---:|", *(f"| {name} | {ms:.2f} |" for name, ms in rows)]
    print("\n".join(lines))
    if args.out:
        record = {"benchmark": "vaebuild edit input profile", "device": torch.cuda.get_device_name(),
                  "torch": torch.__version__, "photo_size": args.photo_size, "size": args.size, "threads": THREADS,
                  "rows": [{"stage": name, "median_ms": round(ms, 3)} for name, ms in rows]}
        write_json(args.out / "edit_input_profile.json", record)
        write_text(args.out / "edit_input_profile.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
