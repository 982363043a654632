"""Throughput of one `VaeRuntime` called from N threads against one thread (issue 28), meant for a CUDA GPU.

    python benchmarks/checks/threads.py FOLDER [--threads 8] [--calls 20] [--cuda-graphs] [--streams]
                                               [--device cuda] [--graph decoder|encoder|both]

For each engine of FOLDER (an inductor `static` or `multiprofile` build) and its profiles' opt shapes, and for
all of them mixed: after a warm-up (loads, first calls, CUDA-graph captures) the same `--calls` calls per thread
run from 1 thread and from `--threads` threads, started together; wall time from the start to the last
thread's end and a device synchronize. Prints calls/s of each and their ratio. `--streams`: each thread calls
on a CUDA stream of its own (otherwise all use the default stream). Exits 1 when a threaded output differs
from the serial one (torch.equal): the runtime promises the same outputs from many threads.

What to expect: a package's run keeps the GIL (torch's binding), and calls of one engine are serialized, so
threads can gain only by overlapping one call's GPU work with the next call's launches (and across engines).
"""

import argparse
import sys
import threading
import time
from contextlib import nullcontext
from types import SimpleNamespace

import torch

from vaebuild.model.inputs import sample_input
from vaebuild.runtime import VaeRuntime, read_engine_dir


def jobs_of(folder, graphs, device, dtype):
    """[(label, graph, input)] of every engine's profiles' opt shapes."""
    manifest, entries = read_engine_dir(folder)
    config = SimpleNamespace(**manifest["vae_config"])
    jobs = []
    for graph, graph_entries in entries.items():
        if graph not in graphs:
            continue
        for entry in graph_entries:
            for profile in entry.profiles:
                x = sample_input(graph, profile.opt, config, 1).to(device, dtype)
                jobs.append((f"{entry.rel_path} {list(profile.opt)}", graph, x))
    return jobs


def timed(runtime, jobs, threads, calls, streams):
    """(seconds, outputs[thread][call]) of `calls` calls per thread cycling through `jobs`."""
    run = {"encoder": runtime.encode, "decoder": runtime.decode}
    outputs = [[None] * calls for _ in range(threads)]
    start = threading.Barrier(threads + 1)
    on_cuda = runtime.device.type == "cuda"

    def work(worker):
        stream = torch.cuda.Stream(runtime.device) if streams and on_cuda else None
        start.wait()
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            for i in range(calls):
                _, graph, x = jobs[(worker + i) % len(jobs)]
                outputs[worker][i] = run[graph](x)
            if stream is not None:
                stream.synchronize()

    pool = [threading.Thread(target=work, args=(w,)) for w in range(threads)]
    for thread in pool:
        thread.start()
    if on_cuda:
        torch.cuda.synchronize(runtime.device)
    start.wait()
    begin = time.perf_counter()
    for thread in pool:
        thread.join()
    if on_cuda:
        torch.cuda.synchronize(runtime.device)
    return time.perf_counter() - begin, outputs


def measure(runtime, jobs, threads, calls, streams):
    """(calls/s with 1 thread, with `threads`, whether every threaded output equals the serial one)."""
    for _, graph, x in jobs:  # warm-up: loads, first calls, captures
        for _ in range(2):
            (runtime.encode if graph == "encoder" else runtime.decode)(x)
    serial_s, serial = timed(runtime, jobs, 1, calls * threads, streams)
    threaded_s, outs = timed(runtime, jobs, threads, calls, streams)
    expected = {id(x): serial[0][k] for k, (_, _, x) in enumerate(jobs[: calls * threads])}
    same = all(outs[w][i] is not None and torch.equal(outs[w][i], expected[id(jobs[(w + i) % len(jobs)][2])])
               for w in range(threads) for i in range(calls))
    total = calls * threads
    return total / serial_s, total / threaded_s, same


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--calls", type=int, default=20, help="calls per thread (the serial run makes threads x calls)")
    parser.add_argument("--graph", choices=("decoder", "encoder", "both"), default="both")
    parser.add_argument("--cuda-graphs", action="store_true")
    parser.add_argument("--streams", action="store_true", help="one CUDA stream per thread")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    runtime = VaeRuntime(args.folder, device=device, allow_fallback=False, cuda_graphs=args.cuda_graphs)
    graphs = ("decoder", "encoder") if args.graph == "both" else (args.graph,)
    jobs = jobs_of(args.folder, graphs, device, dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{args.threads} threads vs 1: {name}, torch {torch.__version__}, cuda_graphs={args.cuda_graphs}, "
          f"streams={'per thread' if args.streams else 'default'}, {args.calls} calls per thread")
    print("| calls | 1 thread, calls/s | threads, calls/s | ratio | outputs equal |")
    print("|---|---|---|---|---|")
    ok = True
    rows = [([job], job[0]) for job in jobs] + ([(jobs, "all sizes mixed")] if len(jobs) > 1 else [])
    for selected, label in rows:
        one, many, same = measure(runtime, selected, args.threads, args.calls, args.streams)
        ok &= same
        print(f"| {label} | {one:.1f} | {many:.1f} | {many / one:.2f} | {'yes' if same else 'NO'} |")
    print("threaded outputs equal the serial ones" if ok else "DIFFERENT threaded outputs")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
