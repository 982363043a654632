"""Faults at run time (issue 28): broken package and weights files, a package of another torch, out of memory in a call.

Each gives one line (logged once on the `vaebuild.runtime` logger; the reason in `fallback_counts`, or the message
of `EngineUnavailableError` with `allow_fallback=False`), the PyTorch fallback where allowed, and never a crash of
the process. The file faults run in a child process, which must survive: the native loader checks no CRC, and a
package with corrupted code kills the process that loads it (the last test shows it), so the runtime checks each
package's size and sha256 against its manifest entry before loading it.

Out of memory during a call is simulated on the CPU by a runner that raises it from `infer`: transient, so the
call falls back (or raises) and the engine stays loaded and serves the next call. What a CPU cannot show: that GPU
memory returns to its level before the call (the call's buffers are freed as the error unwinds; measure on a GPU),
and an OOM during a CUDA-graph capture.
"""

import gc
import json
import logging
import shutil
import subprocess
import sys
import threading
import weakref
import zipfile
from pathlib import Path

import pytest
import torch

from test_threads import cpu_packages
from vaebuild.model.inputs import sample_images, sample_latents
from vaebuild.runtime import EngineUnavailableError, VaeRuntime

DECODER = "wide/vae_decoder.pt2"  # serves decoder latents of 32x48 images
RUNTIME_LOGGER = "vaebuild.runtime"


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    return cpu_packages(tmp_path_factory)


@pytest.fixture
def folder(packages, tmp_path):
    return Path(shutil.copytree(packages, tmp_path / "copy"))


def latents(vae, height=32, width=48):
    return sample_latents((1, vae.config.z_dim, 1, height // 8, width // 8), vae.config, seed=2)


def images(height=32, width=48):
    return sample_images((1, 3, 1, height, width), seed=1)


# ---------------------------------------------------------------------------- broken files, in a child process


def so_code_range(package):
    """(start, end) byte offsets in the `.pt2` file of the `.text` section of its `wrapper.so` (stored uncompressed)."""
    import struct

    data = Path(package).read_bytes()
    with zipfile.ZipFile(package) as archive:
        (member,) = [info for info in archive.infolist() if info.filename.endswith(".so")]
    assert member.compress_type == zipfile.ZIP_STORED
    name_length, extra_length = struct.unpack("<HH", data[member.header_offset + 26:member.header_offset + 30])
    so = member.header_offset + 30 + name_length + extra_length
    shoff, = struct.unpack("<Q", data[so + 0x28:so + 0x30])
    shentsize, shnum, shstrndx = struct.unpack("<HHH", data[so + 0x3A:so + 0x40])

    def section(index):
        header = so + shoff + index * shentsize
        name, _, _, _, offset, size = struct.unpack("<IIQQQQ", data[header:header + 0x28])
        return name, offset, size

    _, names_offset, _ = section(shstrndx)
    for index in range(shnum):
        name, offset, size = section(index)
        if data[so + names_offset + name:].startswith(b".text\0"):
            return so + offset, so + offset + size
    raise AssertionError(f"no .text section in {package}")


def corrupt_code(package):
    """Overwrite the package's compiled code with int3 (any instruction the loader runs there traps)."""
    start, end = so_code_range(package)
    data = bytearray(Path(package).read_bytes())
    data[start:end] = b"\xcc" * (end - start)
    Path(package).write_bytes(bytes(data))


def truncate(path, fraction=0.5):
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * fraction)])


def other_torch(folder):
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["engines"]:
        if entry["path"] == DECODER:
            entry["torch_version"] = "1.0.0"
    manifest_path.write_text(json.dumps(manifest))


FAULTS = {
    "truncated-package": (lambda folder: truncate(folder / DECODER),
                          [f"{DECODER}: contents differ from the manifest (", "truncated or replaced); rebuild"]),
    "corrupted-package": (lambda folder: corrupt_code(folder / DECODER),
                          [f"{DECODER}: contents differ from the manifest's sha256", "(corrupt or replaced); rebuild"]),
    "truncated-weights": (lambda folder: truncate(folder / "weights.safetensors", 0.7),
                          ["weights.safetensors: contents differ from the manifest (", "rebuild the folder"]),
    "other-torch": (other_torch, [f"{DECODER} was compiled by torch 1.0.0 and this is torch {torch.__version__}"]),
}

CHILD = r"""
import json, logging, sys
import torch
sys.path.insert(0, sys.argv[2])
from conftest import make_tiny_vae
from vaebuild.model.inputs import sample_images, sample_latents
from vaebuild.runtime import EngineUnavailableError, VaeRuntime

folder = sys.argv[1]
warnings = []
class Collect(logging.Handler):
    def emit(self, record):
        if record.levelno >= logging.WARNING:
            warnings.append(record.getMessage())
logging.getLogger("vaebuild.runtime").addHandler(Collect())
vae = make_tiny_vae()
z = sample_latents((1, 4, 1, 4, 6), vae.config, seed=2)
x = sample_images((1, 3, 1, 32, 48), seed=1)
runtime = VaeRuntime(folder, device="cpu", fallback_vae=vae)
first, second = runtime.decode(z), runtime.decode(z)
decoder_route = runtime.last_route["decoder"]
runtime.encode(x)
reference = VaeRuntime(folder, device="cpu", fallback_vae=vae, unavailable_reason=lambda backend: "off").decode(z)
try:
    VaeRuntime(folder, device="cpu", allow_fallback=False).decode(z)
    strict = None
except EngineUnavailableError as err:
    strict = str(err)
print("REPORT " + json.dumps({
    "warnings": warnings, "decoder_route": decoder_route.kind, "encoder_route": runtime.last_route["encoder"].kind,
    "fallback_counts": dict(runtime.fallback_counts), "strict": strict,
    "equal_to_fallback": bool(torch.equal(first, reference) and torch.equal(second, reference)),
}))
"""


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_broken_or_foreign_package_is_one_line_and_falls_back(folder, fault):
    damage, fragments = FAULTS[fault]
    damage(folder)
    result = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(Path(__file__).parent)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"the process died ({result.returncode}):\n{result.stderr[-4000:]}"
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("REPORT ")]
    report = json.loads(line.removeprefix("REPORT "))
    (warning,) = [w for w in report["warnings"] if w.startswith("decoder:") and DECODER in w]  # once for two calls
    (reason,) = report["fallback_counts"] if fault != "truncated-weights" else [
        r for r in report["fallback_counts"] if DECODER in r]
    assert report["fallback_counts"][reason] == 2 and warning.endswith(reason)
    assert report["decoder_route"] == "pytorch" and report["equal_to_fallback"]
    # The other graph keeps its engine unless the fault is in the weights every package shares.
    assert report["encoder_route"] == ("pytorch" if fault == "truncated-weights" else "engine")
    for text in (reason, report["strict"]):
        assert all(fragment in text for fragment in fragments), text
        assert "\n" not in text


def test_the_native_loader_itself_dies_on_a_corrupted_package(folder):
    """Why the runtime checks a package's sha256 first: torch's loader opens the same file and the process is killed."""
    corrupt_code(folder / DECODER)
    code = ("import sys; from vaebuild.backends.inductor.load import load_package; "
            "load_package(sys.argv[1], 'cpu'); print('loaded')")
    result = subprocess.run([sys.executable, "-c", code, str(folder / DECODER)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode < 0, f"expected a signal, got {result.returncode}: {result.stdout} {result.stderr[-2000:]}"


# ---------------------------------------------------------------------------- out of memory during a call


class FlakyRunners:
    """`runner_factory` of the folder's real package runners; the decoder's calls raise `failures` in order, first
    (None: that call runs)."""

    def __init__(self, folder, failures=()):
        from vaebuild.weights_file import FolderWeights

        self.folder = Path(folder)
        self.manifest = json.loads((self.folder / "manifest.json").read_text())
        self.weights = FolderWeights(self.folder, self.manifest["weights_file"])
        self.failures = list(failures)
        self.events = []

    def __call__(self, engine_path, backend, profile_index):
        from vaebuild.backends.inductor.load import make_runner

        rel = Path(engine_path).relative_to(self.folder).as_posix()
        entry = next(e for e in self.manifest["engines"] if e["path"] == rel)
        return FlakyRunner(self, rel, make_runner(engine_path, entry, self.weights, "cpu"))


class FlakyRunner:
    def __init__(self, owner, rel, runner):
        self.owner, self.rel, self.runner = owner, rel, runner

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def activate(self):
        self.owner.events.append(("activate", self.rel))
        self.runner.activate()

    def deactivate(self):
        self.owner.events.append(("release", self.rel))
        self.runner.deactivate()

    def infer(self, feed_dict, **kwargs):
        error = self.owner.failures.pop(0) if self.rel == DECODER and self.owner.failures else None
        if error is not None:
            raise type(error)(*error.args)  # a fresh one each time, as a real failure (its traceback holds this call)
        return self.runner.infer(feed_dict, **kwargs)


OUT_OF_MEMORY = [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 139.8 GiB"),
    RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 2.1 GiB free)"),
]


@pytest.fixture(scope="module")
def engine_output(packages, tiny_vae):
    """The decoder package's output for `latents(tiny_vae)`, from a runtime that never failed."""
    return VaeRuntime(packages, device="cpu", allow_fallback=False).decode(latents(tiny_vae))


def released_within(runtime, seconds=30):
    """Whether `runtime.release()` returns within `seconds` (it waits for calls still using an engine)."""
    done = threading.Event()
    threading.Thread(target=lambda: (runtime.release(), done.set()), daemon=True).start()
    return done.wait(seconds)


@pytest.mark.parametrize("error", OUT_OF_MEMORY, ids=["OutOfMemoryError", "RuntimeError"])
def test_out_of_memory_in_a_call_falls_back_once_and_the_engine_serves_the_next(packages, tiny_vae, engine_output,
                                                                                caplog, error):
    runners = FlakyRunners(packages, [error, None, error])
    runtime = VaeRuntime(packages, device="cpu", fallback_vae=tiny_vae, runner_factory=runners)
    z = latents(tiny_vae)
    probe = z.clone()
    probe_ref = weakref.ref(probe)
    with caplog.at_level(logging.WARNING, logger=RUNTIME_LOGGER):
        runtime.decode(probe)
        assert runtime.last_route["decoder"].kind == "pytorch"
        assert torch.equal(runtime.decode(z), engine_output)  # the next call: the engine, loaded all along
        assert runtime.last_route["decoder"].kind == "engine"
        runtime.decode(z)  # out of memory again: the same reason, no second warning
        assert torch.equal(runtime.decode(z), engine_output)
    warnings = [r.getMessage() for r in caplog.records if r.name == RUNTIME_LOGGER and r.levelno >= logging.WARNING]
    (reason,) = runtime.fallback_counts
    assert reason == f"running {DECODER} ran out of memory ({type(error).__name__}); it stays loaded for the next call"
    assert runtime.fallback_counts[reason] == 2 and len(warnings) == 1 and warnings[0].endswith(reason)
    assert ("release", DECODER) not in runners.events and DECODER in runtime.resident_engines
    del probe
    gc.collect()
    assert probe_ref() is None  # nothing of the failed call holds its input
    assert released_within(runtime)  # no call is left marked as using an engine
    assert sorted(e for e in runners.events if e[0] == "release") == sorted(
        ("release", e[1]) for e in runners.events if e[0] == "activate")


def test_out_of_memory_without_fallback_raises_one_line_and_the_next_call_is_served(packages, tiny_vae, engine_output):
    runners = FlakyRunners(packages, OUT_OF_MEMORY[:1])
    runtime = VaeRuntime(packages, device="cpu", allow_fallback=False, runner_factory=runners)
    with pytest.raises(EngineUnavailableError) as raised:
        runtime.decode(latents(tiny_vae))
    assert str(raised.value) == f"running {DECODER} ran out of memory (OutOfMemoryError); it stays loaded for the next call"
    assert torch.equal(runtime.decode(latents(tiny_vae)), engine_output)


def test_a_package_error_after_the_allocator_ran_out_of_memory_is_out_of_memory(packages, tiny_vae, engine_output,
                                                                                 monkeypatch):
    """AOTInductor's run raises only "run_func_(...) API call failed" when an allocation inside the package fails
    (seen on an H100); the CUDA allocator's out-of-memory count rising during the call is what says so."""
    import vaebuild.runtime.residency as residency

    ooms = iter([0, 1, 1])  # at construction, after the failed call, after the next failure (no new OOM)
    monkeypatch.setattr(residency, "cuda_oom_count", lambda device: next(ooms))
    aoti_error = RuntimeError("run_func_( container_handle_, input_handles.data(), ...) API call failed at model.cpp")
    runners = FlakyRunners(packages, [aoti_error, None, aoti_error])
    runtime = VaeRuntime(packages, device="cpu", allow_fallback=False, runner_factory=runners)
    with pytest.raises(EngineUnavailableError) as raised:
        runtime.decode(latents(tiny_vae))
    assert str(raised.value) == f"running {DECODER} ran out of memory (RuntimeError); it stays loaded for the next call"
    assert torch.equal(runtime.decode(latents(tiny_vae)), engine_output)
    with pytest.raises(EngineUnavailableError, match=f"running {DECODER} failed: RuntimeError: run_func_"):
        runtime.decode(latents(tiny_vae))  # the same error with no out-of-memory behind it: a fault


def test_any_other_error_in_a_call_fails_the_engine_for_good(packages, tiny_vae, caplog):
    """Not transient (e.g. a CUDA fault poisons the context): released once, never retried; the fallback serves."""
    runners = FlakyRunners(packages, [RuntimeError("CUDA error: an illegal memory access was encountered\nmore")])
    runtime = VaeRuntime(packages, device="cpu", fallback_vae=tiny_vae, runner_factory=runners)
    with caplog.at_level(logging.WARNING, logger=RUNTIME_LOGGER):
        runtime.decode(latents(tiny_vae))
        runtime.decode(latents(tiny_vae))
    (reason,) = runtime.fallback_counts
    assert reason.startswith(f"running {DECODER} failed: RuntimeError: CUDA error: an illegal memory access")
    assert "\n" not in reason and runtime.fallback_counts[reason] == 2
    assert runners.events.count(("release", DECODER)) == 1 and DECODER not in runtime.resident_engines
