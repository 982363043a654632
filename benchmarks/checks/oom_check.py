"""Out of GPU memory inside a call (issue 28): one line, the runtime stays usable, the memory comes back.

    python benchmarks/checks/oom_check.py --engines DIR [--size 1328x1328] [--headroom-mib 1024]

Loads DIR's decoder for --size (an inductor folder), calls it once, notes `torch.cuda.memory_allocated`, then fills
the GPU (one tensor) until only --headroom-mib is free and calls again: that call must fail with a one-line error
(`allow_fallback=False`). After the filler is freed: memory allocated must be back at its level before the failed
call, and a third call must give the first call's output exactly. Prints each step; exit 1 on any miss.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from vaebuild.errors import one_line  # noqa: E402
from vaebuild.runtime import VaeRuntime  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", required=True, type=Path)
    parser.add_argument("--size", default="1328x1328", help="WxH")
    parser.add_argument("--headroom-mib", type=int, default=256)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    runtime = VaeRuntime(args.engines, allow_fallback=False)
    latents = torch.randn(1, runtime.z_dim, 1, height // 8, width // 8, device="cuda", dtype=torch.bfloat16)
    first = runtime.decode(latents)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.empty_cache()  # else the call reuses the first call's cached blocks and needs nothing new
    free, _ = torch.cuda.mem_get_info()
    filler = torch.empty(max(free - args.headroom_mib * 2**20, 0), dtype=torch.uint8, device="cuda")
    print(f"allocated before: {before / 2**20:.0f} MiB; filler {filler.numel() / 2**30:.1f} GiB, "
          f"{torch.cuda.mem_get_info()[0] / 2**20:.0f} MiB left free")
    misses = []
    try:
        runtime.decode(latents)
        misses.append("the call with the GPU full did not fail")
        print("call with the GPU full: succeeded (raise the filler: --headroom-mib lower)")
    except Exception as err:  # noqa: BLE001 - what it raised is the finding
        message = one_line(err, with_type=True)
        print(f"call with the GPU full: {message}")
        if "\n" in str(err).strip():
            misses.append("the error is more than one line")
    del filler
    torch.cuda.synchronize()
    after = torch.cuda.memory_allocated()
    print(f"allocated after: {after / 2**20:.0f} MiB (before: {before / 2**20:.0f})")
    if after > before:
        misses.append(f"{(after - before) / 2**20:.0f} MiB not given back")
    third = runtime.decode(latents)
    equal = torch.equal(first, third)
    print(f"call after: equal to the first: {equal}")
    if not equal:
        misses.append("the call after differs from the first")
    print("PASS" if not misses else "FAIL: " + "; ".join(misses))
    sys.exit(1 if misses else 0)


if __name__ == "__main__":
    main()
