"""Concurrent callers (issue 28): one `VaeRuntime` / `EngineVae` / `PackageRunner` called from many threads at once.

Before the fix, 8 threads decoding through CPU inductor packages hung for good at 0% CPU: torch's binding of
`AOTIModelPackageLoader.run` keeps the GIL for the whole native run, the loader's container has one model, and
a second caller waited for it on a condition variable (`AOTInductorModelContainer::get_available_model`) holding
the GIL that the first caller needed back to run vaebuild's ops (Python kernels called from the package). Since
such a deadlock holds the GIL, an in-process `join(timeout)` would never return: the real-package workloads run in
a child process with a timeout, and the child dumps every thread's stack (`faulthandler`) before it is ended.

The package folder (two static sizes, 4 CPU packages, ~25 s each) is built once per session
(`cpu_packages`, also used by test_runtime_faults.py). The residency and output-buffer cases use fake runners.
"""

import faulthandler
import json
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_vae

SPEC = """kind: static
max_side: 128
profiles:
  - {name: "wide", height: 32, width: 48, batch: 1}
  - {name: "square", height: 32, width: 32, batch: 1}
"""
SIZES = ((32, 48), (32, 32))
THREADS, CALLS = 8, 20
CHILD_TIMEOUT_S = 240  # the child's own work takes ~10 s; a deadlock never ends
_BUILD_LOCK = threading.Lock()


def cpu_packages(tmp_path_factory):
    """A static folder of CPU inductor packages of `make_tiny_vae()` at SIZES, built once per session."""
    from vaebuild.backends.base import BuildOptions
    from vaebuild.builder.engines import BuildSource, build_engines
    from vaebuild.builder.specs import load_spec

    root = tmp_path_factory.getbasetemp() / "issue28_cpu_packages"
    out = root / "out"
    with _BUILD_LOCK:
        if not (out / "manifest.json").is_file():
            root.mkdir(parents=True, exist_ok=True)
            (root / "spec.yaml").write_text(SPEC)
            source = BuildSource.from_vae(make_tiny_vae(), {"kind": "test"}, "fp32")
            build_engines("static", load_spec(root / "spec.yaml"), source, out,
                          BuildOptions(backend="inductor", device="cpu", jobs=2), log=lambda *a, **k: None)
    return out


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    return cpu_packages(tmp_path_factory)


# ---------------------------------------------------------------------------- real packages, in a child process

CHILD = r"""
import faulthandler, json, sys, threading
import torch
from vaebuild.model.inputs import sample_images, sample_latents
from vaebuild.runtime import EngineVae, VaeRuntime

folder, threads, calls, watchdog = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
faulthandler.dump_traceback_later(watchdog, exit=True)  # a deadlock: every thread's stack on stderr, then exit 1
runtime = VaeRuntime(folder, device="cpu", allow_fallback=False)
config = runtime.manifest["vae_config"]

class Config:  # sample_latents reads these two attributes
    latents_mean, latents_std = config["latents_mean"], config["latents_std"]

jobs = []  # (graph, input, engine that must serve it)
for index, (height, width) in enumerate(json.loads(sys.argv[5])):
    name = "wide" if (height, width) == (32, 48) else "square"
    jobs.append(("encoder", sample_images((1, 3, 1, height, width), seed=index), f"{name}/vae_encoder.pt2"))
    jobs.append(("decoder", sample_latents((1, runtime.z_dim, 1, height // 8, width // 8), Config, seed=index),
                 f"{name}/vae_decoder.pt2"))
run = {"encoder": runtime.encode, "decoder": runtime.decode}
serial = [run[graph](x) for graph, x, _ in jobs]
report = {"mismatches": 0, "wrong_routes": 0, "errors": [], "calls": 0}
lock = threading.Lock()

def work(worker, call):
    for i in range(calls):
        k = (worker * 3 + i) % len(jobs)  # every thread mixes sizes and graphs, in a different order
        graph, x, engine = jobs[k]
        try:
            out = call(graph, x)
            route = runtime.thread_route(graph)
            with lock:
                report["calls"] += 1
                report["mismatches"] += not torch.equal(out, serial[k])
                report["wrong_routes"] += route is None or route.kind != "engine" or route.engine != engine
        except Exception as err:
            with lock:
                report["errors"].append(f"{type(err).__name__}: {err}")

def in_threads(call):
    pool = [threading.Thread(target=work, args=(w, call)) for w in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()

in_threads(lambda graph, x: run[graph](x))
vae = EngineVae(runtime)
in_threads(lambda graph, x: vae.encode(x).latent_dist.parameters if graph == "encoder" else vae.decode(x).sample)
report["resident"] = list(runtime.resident_engines)
report["fallbacks"] = dict(runtime.fallback_counts)
faulthandler.cancel_dump_traceback_later()
print("REPORT " + json.dumps(report))
"""


def run_child(code, *args, timeout=CHILD_TIMEOUT_S):
    """(returncode, stdout, stderr) of `python -c code args`; a child still running after `timeout` is killed."""
    command = [sys.executable, "-c", code, *map(str, args)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"the child was still running after {timeout} s (deadlock?); its stderr:\n{err.stderr}")
    return result.returncode, result.stdout, result.stderr


def test_eight_threads_of_mixed_calls_equal_the_serial_outputs(packages):
    code, stdout, stderr = run_child(CHILD, packages, THREADS, CALLS, CHILD_TIMEOUT_S - 30, json.dumps(SIZES))
    assert code == 0, f"child exited {code} (a watchdog dump means a deadlock):\n{stderr[-6000:]}"
    (line,) = [line for line in stdout.splitlines() if line.startswith("REPORT ")]
    report = json.loads(line.removeprefix("REPORT "))
    assert report["errors"] == []
    assert report["calls"] == 2 * THREADS * CALLS  # VaeRuntime, then EngineVae
    assert report["mismatches"] == 0 and report["wrong_routes"] == 0
    assert report["fallbacks"] == {} and len(report["resident"]) == 4


def test_one_package_runner_from_many_threads(packages):
    """The runner itself serializes its package's calls (the deadlock's fix at the depth of its cause)."""
    code = r"""
import faulthandler, json, sys, threading
import torch
from vaebuild.backends.inductor.load import make_runner
from vaebuild.weights_file import FolderWeights
folder = sys.argv[1]
faulthandler.dump_traceback_later(float(sys.argv[2]), exit=True)
manifest = json.load(open(f"{folder}/manifest.json"))
entry = next(e for e in manifest["engines"] if e["path"] == "wide/vae_decoder.pt2")
runner = make_runner(f"{folder}/{entry['path']}", entry, FolderWeights(folder, manifest["weights_file"]), "cpu")
runner.activate()
x = torch.randn(1, 4, 1, 4, 6, generator=torch.Generator().manual_seed(0))
expected = runner.infer({"latents": x})["images"]
bad = []
def work():
    for _ in range(20):
        bad.append(not torch.equal(runner.infer({"latents": x})["images"], expected))
pool = [threading.Thread(target=work) for _ in range(8)]
[t.start() for t in pool]
[t.join() for t in pool]
print("BAD", sum(bad), len(bad))
"""
    returncode, stdout, stderr = run_child(code, packages, 120, timeout=180)
    assert returncode == 0, stderr[-6000:]
    assert "BAD 0 160" in stdout


# ---------------------------------------------------------------------------- fake runners: residency, buffers


class SharedBufferRunners:
    """`runner_factory` double: each runner computes the real 2-D graph but returns one output buffer it overwrites on
    every call (as a CUDA graph's static output is), sleeps in the middle of a call, and records overlaps."""

    def __init__(self, vae, root, delay=0.002):
        from vaebuild.model.graphs import build_graphs

        encoder, decoder = build_graphs(vae)
        self.graphs = {"encoder": encoder, "decoder": decoder}
        self.root, self.delay = Path(root), delay
        self.lock = threading.Lock()
        self.events = Counter()
        self.problems = []

    def __call__(self, engine_path, backend, profile_index):
        return SharedBufferRunner(self, Path(engine_path).relative_to(self.root).as_posix(), profile_index)


class SharedBufferRunner:
    def __init__(self, owner, rel, profile):
        self.owner, self.rel, self.profile = owner, rel, profile
        self.graph = "encoder" if "encoder" in rel else "decoder"
        self.is_active = False
        self.busy = False
        self.buffer = None

    def _note(self, event):
        with self.owner.lock:
            self.owner.events[event] += 1

    def activate(self):
        self._note("activate")
        self.is_active = True

    def deactivate(self):
        self._note("release")
        if self.busy:
            self.owner.problems.append(f"{self.rel} released during a call")
        self.is_active = False
        self.buffer = None

    def set_profile(self, index):
        if self.busy:
            self.owner.problems.append(f"{self.rel}: profile switched during a call")
        self.profile = index

    def infer(self, feed_dict, copy_outputs_to_host=True):
        if self.busy:
            self.owner.problems.append(f"{self.rel}: two calls at once")
        if not self.is_active:
            self.owner.problems.append(f"{self.rel}: called while released")
        self.busy = True
        try:
            self._note("infer")
            (feed,) = feed_dict.values()
            with torch.no_grad():
                out = self.owner.graphs[self.graph](feed)
            if self.buffer is None or self.buffer.shape != out.shape:
                self.buffer = torch.empty_like(out)
            self.buffer.copy_(out)
            time.sleep(self.owner.delay)  # let other threads in: a caller that copies late would read their output
            name = "latents" if self.graph == "encoder" else "images"
            return {name: self.buffer}
        finally:
            self.busy = False


def fake_folder(tmp_path, tiny_vae, kind="static"):
    from test_runtime import build_fake_engine_dir

    return build_fake_engine_dir(tmp_path, tiny_vae, kind)


def run_threads(target, count=THREADS, timeout=120):
    """Run `target(index)` in `count` threads; fail (with every stack printed) if any is still running after `timeout`.

    These workloads wait only on Python locks (which release the GIL), so the join's timeout works in-process."""
    errors = []

    def guarded(index):
        try:
            target(index)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(f"{type(err).__name__}: {err}")

    pool = [threading.Thread(target=guarded, args=(i,), daemon=True) for i in range(count)]
    faulthandler.dump_traceback_later(timeout + 5, exit=False)
    try:
        for thread in pool:
            thread.start()
        deadline = time.monotonic() + timeout
        for thread in pool:
            thread.join(max(0.0, deadline - time.monotonic()))
    finally:
        faulthandler.cancel_dump_traceback_later()
    stuck = [thread.name for thread in pool if thread.is_alive()]
    if stuck:
        faulthandler.dump_traceback(all_threads=True)
        pytest.fail(f"{len(stuck)} thread(s) still running after {timeout} s: deadlock")
    assert errors == []


def mixed_jobs(tiny_vae):
    from vaebuild.model.inputs import sample_images, sample_latents

    jobs = []
    for index, (height, width) in enumerate(((32, 48), (48, 32))):  # the fake static folder's two sizes
        jobs.append(("encoder", sample_images((1, 3, 1, height, width), seed=index)))
        jobs.append(("decoder", sample_latents((1, 4, 1, height // 8, width // 8), tiny_vae.config, seed=index)))
    return jobs


@pytest.mark.parametrize("budget", [None, 18, 2 * 18], ids=["no-budget", "one-engine", "two-engines"])
def test_threads_with_lru_release_and_reused_output_buffers_equal_serial(tmp_path, tiny_vae, budget):
    """A memory budget that holds fewer engines than the threads use: engines are released and loaded again all the
    time, never during a call; outputs that the runner overwrites on its next call are still each caller's own."""
    from vaebuild.runtime import VaeRuntime

    folder = fake_folder(tmp_path, tiny_vae)
    runners = SharedBufferRunners(tiny_vae, folder)
    runtime = VaeRuntime(folder, device="cpu", fallback_vae=tiny_vae, runner_factory=runners, allow_fallback=False,
                         unavailable_reason=lambda backend: None, memory_budget=budget)
    jobs = mixed_jobs(tiny_vae)
    run = {"encoder": runtime.encode, "decoder": runtime.decode}
    serial = [run[graph](x) for graph, x in jobs]
    results = []

    def work(worker):
        for i in range(CALLS):
            k = (worker + i) % len(jobs)
            graph, x = jobs[k]
            out = run[graph](x)
            results.append((torch.equal(out, serial[k]), runtime.thread_route(graph).kind))

    run_threads(work)
    assert runners.problems == []
    assert len(results) == THREADS * CALLS and all(equal and kind == "engine" for equal, kind in results)
    assert runtime.fallback_counts == Counter()
    if budget is not None:
        assert runtime.resident_bytes <= budget
        assert runners.events["release"] > 0  # the budget made threads release each other's engines
    runtime.release()
    assert runtime.resident_engines == () and runners.events["release"] == runners.events["activate"]


def test_threads_switching_profiles_of_one_engine(tmp_path, tiny_vae):
    """Multi-profile: one runner, two profiles; a profile is switched only between calls, never during one."""
    from vaebuild.model.inputs import sample_images
    from vaebuild.runtime import VaeRuntime

    folder = fake_folder(tmp_path, tiny_vae, "multiprofile")
    runners = SharedBufferRunners(tiny_vae, folder)
    runtime = VaeRuntime(folder, device="cpu", fallback_vae=tiny_vae, runner_factory=runners, allow_fallback=False,
                         unavailable_reason=lambda backend: None)
    inputs = [sample_images((1, 3, 1, 32, 32), seed=0), sample_images((1, 3, 1, 96, 96), seed=1)]  # profiles 0, 1
    serial = [runtime.encode(x) for x in inputs]
    results = []

    def work(worker):
        for i in range(CALLS):
            k = (worker + i) % 2
            out = runtime.encode(inputs[k])
            results.append((torch.equal(out, serial[k]), runtime.thread_route("encoder").profile == k))

    run_threads(work)
    assert runners.problems == [] and len(results) == THREADS * CALLS and all(a and b for a, b in results)


def test_fallback_model_is_built_once_for_many_threads(tmp_path, tiny_vae, monkeypatch):
    from vaebuild.model import graphs
    from vaebuild.runtime import VaeRuntime
    from vaebuild.model.inputs import sample_latents

    folder = fake_folder(tmp_path, tiny_vae)
    runners = SharedBufferRunners(tiny_vae, folder)  # (never used: no engine can run here)
    builds = []
    real = graphs.build_graphs

    def counting(*args, **kwargs):
        builds.append(1)
        time.sleep(0.05)  # a slow build: every thread arrives while it runs
        return real(*args, **kwargs)

    monkeypatch.setattr(graphs, "build_graphs", counting)
    runtime = VaeRuntime(folder, device="cpu", fallback_vae=tiny_vae, runner_factory=runners,
                         unavailable_reason=lambda backend: "not here")
    z = sample_latents((1, 4, 1, 4, 6), tiny_vae.config, seed=0)
    outs = []
    run_threads(lambda worker: outs.append(runtime.decode(z)))
    assert len(builds) == 1 and all(torch.equal(out, outs[0]) for out in outs)
    (reason,) = runtime.fallback_counts
    assert runtime.fallback_counts[reason] == THREADS and "not here" in reason


def test_shared_exclusive_lock():
    from vaebuild.backends.inductor.load import SharedExclusiveLock

    lock = SharedExclusiveLock()
    inside = Counter()
    overlaps = []
    guard = threading.Lock()

    def enter(kind):
        with guard:
            inside[kind] += 1
            if inside["exclusive"] > 1 or (inside["exclusive"] and inside["shared"]):
                overlaps.append(dict(inside))

    def leave(kind):
        with guard:
            inside[kind] -= 1

    def work(worker):
        for i in range(50):
            kind = "exclusive" if (worker + i) % 5 == 0 else "shared"
            with getattr(lock, kind)():
                enter(kind)
                if kind == "shared":
                    with lock.shared():  # nested shared holds do not wait, even with an exclusive one waiting
                        pass
                time.sleep(0.0005)
                leave(kind)

    run_threads(work, timeout=60)
    assert overlaps == []
    with lock.shared():
        with pytest.raises(RuntimeError, match="would wait for itself"):
            with lock.exclusive():
                pass
