"""Repeated compiles and first runs of one package (issue 28: the intermittent illegal memory access).

    python benchmarks/checks/compile_repeat.py --engines DIR --engine 1_1/vae_decoder.pt2 --count 20 --parallel 10
                                              --out OUT

Recompiles the package `--engine` of the inductor folder DIR `--count` times, `--parallel` at a time, each in a
fresh process and a fresh inductor cache (so every attempt compiles and autotunes from nothing, as a build on a new
machine does) with the settings the folder's build used (its weights file, kernel choices, profiles), then loads
each new package in a one-engine copy of the folder and runs it once (the first run), checking the output is
finite. Every attempt's outcome (ok, or the first line of its error and the process's exit) goes to
OUT/compile_repeat.json, with the device; exit 1 when any attempt failed. A failed attempt keeps its inductor cache
(OUT/packages/cache_NN: the generated kernels and wrapper, for compute-sanitizer); a passed one's is removed.
"""

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import time
import traceback
from types import SimpleNamespace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "packages"))

from dynamic_ops import compile_request_for  # noqa: E402

from vaebuild.fileio import write_json  # noqa: E402
from vaebuild.manifest import MANIFEST_NAME  # noqa: E402
from vaebuild.weights_file import WEIGHTS_NAME  # noqa: E402


def attempt(args):
    """Compile and first-run one copy; returns {attempt, ok, seconds, error}."""
    folder, rel_path, out, index = args
    cache = out / f"cache_{index:02d}"
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)  # read when inductor first needs it, after this
    start = time.perf_counter()
    try:
        import torch

        from vaebuild.backends.inductor.compile import compile_package, kernel_choices
        from vaebuild.model.inputs import sample_input
        from vaebuild.runtime import VaeRuntime

        manifest = json.loads((folder / MANIFEST_NAME).read_text())
        entry = next(e for e in manifest["engines"] if e["path"] == rel_path)
        copy = out / f"attempt_{index:02d}"
        copy.mkdir(parents=True, exist_ok=True)
        request = compile_request_for(manifest, folder, entry, copy / rel_path, "cuda")
        # the build's own kernel choices (they are part of its build key, not stored on their own)
        request.update(kernel_choices({"graphs": {"encoder": {"spatial_multiple": 8}}}, entry["graph"],
                                      request["profiles"]))
        info = compile_package(request)
        compiled_s = time.perf_counter() - start
        (copy / WEIGHTS_NAME).unlink(missing_ok=True)
        (copy / WEIGHTS_NAME).symlink_to(folder / WEIGHTS_NAME)
        write_json(copy / MANIFEST_NAME, {**manifest, "engines": [
            {**entry, "sha256": info.sha256, "size_bytes": info.size_bytes}]})
        runtime = VaeRuntime(copy, allow_fallback=False)
        profile = entry["profiles"][0]["input"]["opt"]
        x = sample_input(entry["graph"], profile, SimpleNamespace(**manifest["vae_config"])).to("cuda", torch.bfloat16)
        y = runtime.encode(x) if entry["graph"] == "encoder" else runtime.decode(x)
        torch.cuda.synchronize()
        ok = bool(torch.isfinite(y).all())
        if ok:
            shutil.rmtree(cache, ignore_errors=True)
        return {"attempt": index, "ok": ok, "compile_s": round(compiled_s, 1),
                "seconds": round(time.perf_counter() - start, 1), "error": None if ok else "non-finite output"}
    except BaseException as err:  # noqa: BLE001 - the attempt's outcome is the record
        lines = traceback.format_exception_only(err)
        return {"attempt": index, "ok": False, "seconds": round(time.perf_counter() - start, 1),
                "error": lines[-1].strip()[:500], "traceback": traceback.format_exc()[-4000:]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", required=True, type=Path)
    parser.add_argument("--engine", default="1_1/vae_decoder.pt2", help="the manifest path of the package")
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--parallel", type=int, default=10)
    parser.add_argument("--first", type=int, default=0, help="number of the first attempt (to append runs)")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    import torch

    from vaebuild.env import device_info, package_versions

    folder = args.engines.resolve()
    work = [(folder, args.engine, args.out.resolve() / "packages", args.first + i) for i in range(args.count)]
    record_path = args.out / "compile_repeat.json"
    previous = json.loads(record_path.read_text())["attempts"] if record_path.exists() else []
    results = []
    # maxtasksperchild=1: every attempt in a fresh process, as a build's worker
    with multiprocessing.get_context("spawn").Pool(args.parallel, maxtasksperchild=1) as pool:
        for result in pool.imap_unordered(attempt, work):
            results.append(result)
            print(f"attempt {result['attempt']}: {'ok' if result['ok'] else 'FAILED: ' + result['error']} "
                  f"({result['seconds']} s)", flush=True)
            # the record after every attempt: a run cut short keeps what finished
            attempts = sorted(previous + results, key=lambda r: r["attempt"])
            write_json(record_path, {"check": "vaebuild compile repeat", "engine": args.engine,
                                     "device": device_info(torch.device("cuda")), "versions": package_versions(),
                                     "parallel": args.parallel, "attempts": attempts,
                                     "failed": sum(not r["ok"] for r in attempts)})
    print(f"{sum(r['ok'] for r in attempts)} of {len(attempts)} attempts ok")
    sys.exit(1 if any(not r["ok"] for r in results) else 0)


if __name__ == "__main__":
    main()
