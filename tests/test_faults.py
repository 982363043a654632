"""Faults: concurrent builds into one folder, file-system errors, Ctrl-C, file modes, pickled weights and
crashing compile workers.

Where it matters the CLI runs as a real process (`python -c "from vaebuild.cli import main; main()"`
with this checkout first on PYTHONPATH); full disks are simulated in-process. Engines are real
TensorRT-RTX builds of the tiny VAE export at small sizes (about a second each on a CPU); the `--jobs`
worker faults use CPU AOTInductor packages (one real compile, ~25 s, in the whole section).
"""

import builtins
import errno
import json
import os
import pathlib
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import vaebuild
from conftest import requires_rtx
from vaebuild.backends.base import BuildOptions
from vaebuild.backends.inductor import InductorBackend
from vaebuild.cli import app
from vaebuild.cli.errors import format_os_error
from vaebuild.errors import FILE_SYSTEM_EXIT_CODE, INTERRUPTED_EXIT_CODE, ModelLoadError
from vaebuild.fileio import sha256_file
from vaebuild.manifest import LOCK_NAME, MANIFEST_NAME, engine_file_problem, manifest_lock, update_manifest
from vaebuild.model.source import ModelSource, load_vae, weights_sha256

# Polygraphy sets a timing cache on every config; TensorRT-RTX deprecates that call (a no-op there).
pytestmark = pytest.mark.filterwarnings("ignore:.*Timing cache operations are no-ops:DeprecationWarning")

SPEC_YAML = """\
kind: static
max_side: 128
profiles:
  - {name: "a", height: 64, width: 64, batch: 1}
  - {name: "b", height: 64, width: 96, batch: 1}
  - {name: "c", height: 96, width: 64, batch: 1}
"""
REPO = Path(vaebuild.__file__).resolve().parents[1]


# --- helpers -------------------------------------------------------------------------------------


def write_spec(folder):
    path = Path(folder) / "spec.yaml"
    path.write_text(SPEC_YAML)
    return path


def engine_paths(names):
    return sorted(f"{name}/vae_{graph}.trt" for name in names for graph in ("encoder", "decoder"))


def static_args(onnx_dir, spec, out, ratios):
    return ["static", "--onnx", str(onnx_dir), "--spec", str(spec), "--ratios", ratios, "--backend", "tensorrt_rtx",
            "--allow-non-fp16", "--out", str(out)]


def vaebuild_process(*args, **popen_kwargs):
    """Start `vaebuild ARGS` as its own process, running this checkout, with unbuffered text output."""
    env = {k: v for k, v in os.environ.items() if k != "VAEBUILD_DEBUG"}
    env.update(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    command = [sys.executable, "-c", "from vaebuild.cli import main; main()", *map(str, args)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **popen_kwargs)


def sigint_as_in_a_shell():
    """In the child before exec: SIGINT unblocked and at its default action, as a shell starts a command.

    A child inherits its parent's signal mask and ignored signals; earlier tests in the same pytest
    process (compile worker pools) can leave SIGINT blocked, and the child would then never see it.
    """
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def sigint_raises():
    """In this process for the test: SIGINT unblocked and raising KeyboardInterrupt, whatever pytest inherited
    (a background job of a script starts with SIGINT ignored)."""
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    blocked = signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
    yield
    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    signal.signal(signal.SIGINT, handler)


def run_vaebuild(*args, timeout=120, **popen_kwargs):
    """Run `vaebuild ARGS` to the end; return (exit code, stdout, stderr)."""
    process = vaebuild_process(*args, **popen_kwargs)
    stdout, stderr = process.communicate(timeout=timeout)
    return process.returncode, stdout, stderr


def one_error_line(stderr, *fragments):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def listed_engines_are_intact(out):
    """The manifest is valid JSON and every engine it lists is complete; return the listed paths."""
    manifest = json.loads((Path(out) / MANIFEST_NAME).read_text())
    for entry in manifest["engines"]:
        assert engine_file_problem(out, entry) is None
    return sorted(entry["path"] for entry in manifest["engines"])


def partial_files(folder):
    return [p for p in Path(folder).rglob("*") if ".partial" in p.name]


def snapshot(folder):
    """{relative path: sha256} of every file below `folder`."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in folder.rglob("*") if p.is_file()}


runner = CliRunner()


def invoke(monkeypatch, *args):
    monkeypatch.delenv("VAEBUILD_DEBUG", raising=False)
    return runner.invoke(app, [str(a) for a in args])


# --- concurrent builds ---------------------------------------------------------------------------


@requires_rtx
def test_concurrent_builds_into_one_folder_list_every_engine(tiny_onnx_dir, tmp_path):
    spec, out = write_spec(tmp_path), tmp_path / "out"
    processes = [vaebuild_process(*static_args(tiny_onnx_dir, spec, out, ratios)) for ratios in ("a,b", "c,b")]
    results = [(p.communicate(timeout=180), p.returncode) for p in processes]

    for (stdout, stderr), code in results:
        assert code == 0, stderr
    assert listed_engines_are_intact(out) == engine_paths("abc")  # `b`, built twice, is listed once
    assert partial_files(out) == []


def write_engine(out, rel_path, data):
    path = Path(out) / rel_path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"path": rel_path, "size_bytes": len(data), "sha256": sha256_file(path)}


def test_update_manifest_merges_one_entry(tmp_path):
    header = {"manifest_version": 1, "kind": "static"}
    first, second = write_engine(tmp_path, "a/e.trt", b"one"), write_engine(tmp_path, "b/e.trt", b"two")
    gone = write_engine(tmp_path, "c/e.trt", b"three")
    update_manifest(tmp_path, header, first)
    update_manifest(tmp_path, header, gone)
    (tmp_path / "c/e.trt").unlink()

    manifest = update_manifest(tmp_path, {**header, "spec": "newer"}, second)

    assert manifest == {**header, "spec": "newer", "engines": [first, second]}  # c's file is gone: dropped
    assert json.loads((tmp_path / MANIFEST_NAME).read_text()) == manifest


def test_update_manifest_keeps_the_entry_that_matches_the_file(tmp_path):
    """Two processes built one engine; the second renamed its file last: its entry is the one listed."""
    header = {"manifest_version": 1, "kind": "static"}
    mine = write_engine(tmp_path, "a/e.trt", b"built by me")
    theirs = write_engine(tmp_path, "a/e.trt", b"built by the other process")

    assert update_manifest(tmp_path, header, mine)["engines"] == []  # the file is not mine: not listed
    assert update_manifest(tmp_path, header, theirs)["engines"] == [theirs]
    assert update_manifest(tmp_path, header, mine)["engines"] == [theirs]  # a late update cannot list a stale entry


def test_manifest_update_waits_for_the_folder_lock(tmp_path):
    entry = write_engine(tmp_path, "a/e.trt", b"engine")
    code = (
        "import json, sys; from vaebuild.manifest import update_manifest; "
        "update_manifest(sys.argv[1], {'manifest_version': 1, 'kind': 'static'}, json.loads(sys.argv[2]))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with manifest_lock(tmp_path):
        other = subprocess.Popen([sys.executable, "-c", code, str(tmp_path), json.dumps(entry)], env=env)
        time.sleep(1.5)
        assert other.poll() is None  # blocked on the lock
        assert not (tmp_path / MANIFEST_NAME).exists()
    assert other.wait(timeout=60) == 0
    assert listed_engines_are_intact(tmp_path) == ["a/e.trt"]
    assert (tmp_path / LOCK_NAME).is_file()


# --- file-system errors --------------------------------------------------------------------------


@requires_rtx
@pytest.mark.parametrize("below", [False, True], ids=["out_is_a_file", "parent_is_a_file"])
def test_out_that_is_a_file_is_one_line(tiny_onnx_dir, tmp_path, below):
    taken = tmp_path / "taken"
    taken.write_text("x")
    out = taken / "engines" if below else taken

    code, _, stderr = run_vaebuild(*static_args(tiny_onnx_dir, write_spec(tmp_path), out, "a"))

    assert code == 2
    blocker = taken if below else "it"
    one_error_line(stderr, f"--out {out}: {blocker} is a file, not a folder; pass a folder path")
    assert taken.read_text() == "x"


@pytest.mark.parametrize(
    "err, fragments",
    [
        (PermissionError(errno.EACCES, "Permission denied", "/d/m.json"), ["/d/m.json: permission denied"]),
        (OSError(errno.EROFS, "Read-only file system", "/ro/x.trt"), ["/ro/x.trt: read-only file system"]),
        (OSError(errno.ENOSPC, "No space left on device", "/d/x.trt"), ["/d/x.trt: no space left on device", "free"]),
        (IsADirectoryError(errno.EISDIR, "Is a directory", "/d"), ["/d: is a folder, not a file"]),
        (FileExistsError(errno.EEXIST, "File exists", "/d"), ["/d: File exists"]),
        (OSError(errno.EIO, "Input/output error", "/d/x"), ["/d/x: Input/output error"]),
        (OSError(errno.ENOSPC, "No space left on device"), ["error: no space left on device"]),
    ],
    ids=["permission", "read_only", "disk_full", "is_a_folder", "exists", "other", "no_path"],
)
def test_os_errors_are_one_line_with_path_and_cause(err, fragments):
    line = format_os_error(err)
    assert line.startswith("error: ") and "\n" not in line
    for fragment in fragments:
        assert fragment in line


def test_a_file_in_the_way_is_named(tmp_path):
    (tmp_path / "file").write_text("x")
    below = NotADirectoryError(errno.ENOTDIR, "Not a directory", str(tmp_path / "file" / "sub"))
    assert format_os_error(below) == (
        f"error: {below.filename}: {tmp_path / 'file'} is a file, not a folder; pass a folder path"
    )
    itself = FileExistsError(errno.EEXIST, "File exists", str(tmp_path / "file"))
    assert format_os_error(itself) == f"error: {itself.filename}: it is a file, not a folder; pass a folder path"


def _half_write_then_disk_full(write, data):
    write(data[: len(data) // 2])
    raise OSError(errno.ENOSPC, "No space left on device")


def disk_full_on_engine_write(monkeypatch, path_part):
    """Binary writes to files whose path contains `path_part` fill the disk half-way through."""
    real_open = builtins.open

    class FullDisk:
        def __init__(self, file):
            self.file = file

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            _half_write_then_disk_full(self.file.write, memoryview(data))  # engine bytes are a buffer

    def fake_open(path, mode="r", *args, **kwargs):
        file = real_open(path, mode, *args, **kwargs)
        return FullDisk(file) if mode == "wb" and path_part in str(path) else file

    monkeypatch.setattr(builtins, "open", fake_open)


def disk_full_on_manifest_write(monkeypatch, after):
    """Manifest writes succeed `after` times, then fill the disk half-way through."""
    real_write_text = pathlib.Path.write_text
    writes = []

    def fake_write_text(self, data, *args, **kwargs):
        if self.name.startswith(f".{MANIFEST_NAME}."):
            writes.append(self)
            if len(writes) > after:
                _half_write_then_disk_full(lambda half: real_write_text(self, half, *args, **kwargs), data)
        return real_write_text(self, data, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", fake_write_text)


@requires_rtx
def test_disk_full_during_an_engine_write_keeps_earlier_engines(tiny_onnx_dir, tmp_path, monkeypatch):
    spec, out = write_spec(tmp_path), tmp_path / "out"
    assert invoke(monkeypatch, *static_args(tiny_onnx_dir, spec, out, "a")).exit_code == 0
    engines_before = {p: h for p, h in snapshot(out).items() if p.endswith(".trt")}
    disk_full_on_engine_write(monkeypatch, f"{os.sep}b{os.sep}.vae_encoder.trt.")

    result = invoke(monkeypatch, *static_args(tiny_onnx_dir, spec, out, "a,b"))

    assert result.exit_code == FILE_SYSTEM_EXIT_CODE, result.output
    one_error_line(result.stderr, f"{out / 'b' / 'vae_encoder.trt'}: no space left on device")
    assert {p: h for p, h in snapshot(out).items() if p.endswith(".trt")} == engines_before
    assert listed_engines_are_intact(out) == engine_paths("a")
    assert partial_files(out) == []


@requires_rtx
def test_disk_full_during_the_manifest_write_keeps_the_manifest(tiny_onnx_dir, tmp_path, monkeypatch):
    spec, out = write_spec(tmp_path), tmp_path / "out"
    assert invoke(monkeypatch, *static_args(tiny_onnx_dir, spec, out, "a")).exit_code == 0
    disk_full_on_manifest_write(monkeypatch, after=2)  # the two `a` engines are skipped; b's encoder is built

    result = invoke(monkeypatch, *static_args(tiny_onnx_dir, spec, out, "a,b"))

    assert result.exit_code == FILE_SYSTEM_EXIT_CODE, result.output
    one_error_line(result.stderr, f"{out / MANIFEST_NAME}: no space left on device")
    assert listed_engines_are_intact(out) == engine_paths("a")  # b's finished encoder is not listed yet
    assert partial_files(out) == []

    monkeypatch.undo()
    assert invoke(monkeypatch, *static_args(tiny_onnx_dir, spec, out, "a,b")).exit_code == 0
    assert listed_engines_are_intact(out) == engine_paths("ab")


# --- interrupts ----------------------------------------------------------------------------------


@requires_rtx
def test_sigint_during_a_build_exits_130_and_lists_only_finished_engines(tiny_onnx_dir, tmp_path):
    # Twelve sizes (24 engines), so the signal lands long before the last engine (tiny ones build fast).
    sizes = [(64 + 16 * (i // 4), 64 + 16 * (i % 4)) for i in range(12)]
    spec = tmp_path / "spec.yaml"
    spec.write_text("kind: static\nmax_side: 128\nprofiles:\n" + "".join(
        f'  - {{name: "s{i}", height: {h}, width: {w}, batch: 1}}\n' for i, (h, w) in enumerate(sizes)))
    out = tmp_path / "out"
    process = vaebuild_process(*static_args(tiny_onnx_dir, spec, out, ",".join(f"s{i}" for i in range(12))),
                               preexec_fn=sigint_as_in_a_shell)
    for line in process.stdout:
        if line.startswith("[2/24]"):  # the first engine is built and listed
            break
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)

    assert process.returncode == INTERRUPTED_EXIT_CODE, stderr
    one_error_line(stderr, "interrupted")
    assert 1 <= len(listed_engines_are_intact(out)) < 24
    assert partial_files(out) == []


@requires_rtx
def test_sigint_inside_a_tensorrt_callback_cancels_the_build(tiny_onnx_dir, tmp_path, monkeypatch, sigint_raises):
    """The signal lands while TensorRT is calling Polygraphy's logger, the case TensorRT used to swallow."""
    from vaebuild.backends.tensorrt import build_engine
    from vaebuild.backends.trt_import import import_polygraphy_trt

    import_polygraphy_trt("tensorrt_rtx")  # binds Polygraphy before its TensorRT modules are imported
    from polygraphy.backend.trt.util import get_trt_logger

    logger_type = type(get_trt_logger())
    real_log, sent = logger_type.log, []

    def log_then_ctrl_c(self, severity, msg):
        if not sent:
            sent.append(msg)
            os.kill(os.getpid(), signal.SIGINT)  # handled at the next bytecode: inside this callback
        return real_log(self, severity, msg)

    monkeypatch.setattr(logger_type, "log", log_then_ctrl_c)
    terminated = []  # Polygraphy's logger turns a KeyboardInterrupt it catches into SIGTERM
    previous_sigterm = signal.signal(signal.SIGTERM, lambda *args: terminated.append(args))
    engine = tmp_path / "vae_decoder.trt"
    profile = {"latents": ((1, 4, 1, 8, 8), (1, 4, 1, 12, 12), (1, 4, 1, 16, 16))}
    try:
        with pytest.raises(KeyboardInterrupt) as caught:
            build_engine(tiny_onnx_dir / "vae_decoder.onnx", engine, [profile], BuildOptions(backend="tensorrt_rtx"))
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)

    assert sent and not terminated
    assert "failed" in str(caught.value.__context__)  # TensorRT stopped: the cancelled build's error, replaced
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_during_export_is_one_line(tiny_vae_dir, tmp_path, monkeypatch):
    import vaebuild.export.onnx

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(vaebuild.export.onnx, "export_onnx", interrupted)
    result = invoke(monkeypatch, "export", "--model", tiny_vae_dir, "--out", tmp_path / "onnx")

    assert result.exit_code == INTERRUPTED_EXIT_CODE
    one_error_line(result.stderr, "interrupted")


# --- file modes ----------------------------------------------------------------------------------


@requires_rtx
def test_engines_and_manifest_follow_the_umask(tiny_onnx_dir, tmp_path):
    out = tmp_path / "out"
    code, _, stderr = run_vaebuild(
        *static_args(tiny_onnx_dir, write_spec(tmp_path), out, "a"), preexec_fn=lambda: os.umask(0o022)
    )
    assert code == 0, stderr

    modes = {p.relative_to(out).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
    assert set(modes) == {".", "a", *engine_paths("a"), MANIFEST_NAME, LOCK_NAME}
    assert modes == {path: 0o755 if (out / path).is_dir() else 0o644 for path in modes}


def test_export_files_follow_the_umask(tiny_onnx_dir):
    """The session's export ran in this process, whose umask vaebuild read once."""
    from vaebuild.fileio import process_umask

    for path in ("vae_encoder.onnx", "vae_decoder.onnx", "export_record.json"):
        assert stat.S_IMODE((tiny_onnx_dir / path).stat().st_mode) == 0o666 & ~process_umask(), path


# --- pickled weights -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pickled_vae_dir(tiny_vae, tmp_path_factory):
    """`tiny_vae` saved as a pickled diffusion_pytorch_model.bin (no safetensors)."""
    path = tmp_path_factory.mktemp("pickled_vae")
    tiny_vae.save_pretrained(path, safe_serialization=False)
    return path


def test_pickled_folder_needs_allow_pickle(pickled_vae_dir, tiny_vae, tmp_path, monkeypatch):
    assert [p.suffix for p in pickled_vae_dir.glob("*.bin")] == [".bin"]
    with pytest.raises(ModelLoadError, match=f"{pickled_vae_dir} has no safetensors weights.*--allow-pickle"):
        load_vae(ModelSource(model=str(pickled_vae_dir)))
    loaded = load_vae(ModelSource(model=str(pickled_vae_dir), allow_pickle=True))
    assert weights_sha256(loaded) == weights_sha256(tiny_vae)

    out = tmp_path / "onnx"
    result = invoke(monkeypatch, "export", "--model", pickled_vae_dir, "--out", out)

    assert result.exit_code == 2
    one_error_line(result.stderr, str(pickled_vae_dir), "--allow-pickle")
    assert not out.exists()


# --- crashing compile workers (--jobs) -----------------------------------------------------------

# Test-only: read by `compile_with_faults` in the worker processes (which inherit the environment).
FAULTS_ENV = "VAEBUILD_TEST_WORKER_FAULTS"
ILLEGAL_ACCESS = "CUDA error: an illegal memory access was encountered"


def compile_with_faults(request):
    """`build_from_request` for these tests, put on the backend class; the spawned worker imports it from here.

    FAULTS_ENV holds {"attempts": folder, "faults": {engine file name: [fault of attempt 1, of attempt 2, ...]}};
    a fault is "raise" (a CUDA-like error), "user_error", "exit" or "kill" (the process dies half-way through
    writing its package), "hang", or "compile" (the real compile, also for attempts past the list).
    """
    from vaebuild.backends.inductor.compile import compile_package
    from vaebuild.errors import UserInputError

    if signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, []):
        raise RuntimeError("a worker must start with SIGINT blocked (Ctrl-C is the parent's to handle)")
    plan = json.loads(os.environ[FAULTS_ENV])
    engine = Path(request["engine_path"])
    attempts = Path(plan["attempts"])
    attempt = len(list(attempts.glob(f"{engine.name}.*"))) + 1
    (attempts / f"{engine.name}.{attempt}").write_text(str(os.getpid()))
    faults = plan["faults"].get(engine.name, [])
    fault = faults[attempt - 1] if attempt <= len(faults) else "compile"
    if fault == "raise":
        raise RuntimeError(ILLEGAL_ACCESS)
    if fault == "user_error":
        raise UserInputError("a problem a retry cannot fix")
    if fault in ("exit", "kill", "hang"):
        engine.parent.mkdir(parents=True, exist_ok=True)  # a half-written package, named as compile_package does
        fd, _ = tempfile.mkstemp(prefix=f".{engine.name}.", suffix=f".{os.getpid()}.pt2", dir=engine.parent)
        os.write(fd, b"half a package")
        if fault == "exit":
            os._exit(1)
        if fault == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(600)
    return compile_package(request)


@pytest.fixture
def worker_faults(tmp_path, monkeypatch):
    """Set the faults of the compile workers: `worker_faults({"vae_decoder.pt2": ["kill"]})`; returns the attempts'
    folder, where each attempt leaves a file `NAME.N` holding its worker's pid."""
    attempts = tmp_path / "attempts"
    attempts.mkdir()
    monkeypatch.setattr(InductorBackend, "build_from_request", staticmethod(compile_with_faults))

    def set_faults(faults):
        monkeypatch.setenv(FAULTS_ENV, json.dumps({"attempts": str(attempts), "faults": faults}))
        return attempts

    return set_faults


def inductor_args(tiny_vae_dir, tmp_path, out):
    spec = tmp_path / "spec.yaml"
    spec.write_text('kind: static\nmax_side: 128\nprofiles:\n  - {name: "a", height: 32, width: 48, batch: 1}\n')
    return ["static", "--model", tiny_vae_dir, "--spec", spec, "--backend", "inductor", "--device", "cpu",
            "--precision", "fp32", "--jobs", 2, "--out", out, "--json", tmp_path / "summary.json"]


def attempts_of(attempts):
    return sorted(p.name for p in attempts.iterdir())


def test_a_crashed_worker_fails_only_its_package_after_one_retry(tiny_vae_dir, tmp_path, monkeypatch, worker_faults):
    """The encoder's first worker raises (a CUDA fault) and its retry builds it; the decoder's worker dies twice
    (os._exit, then SIGKILL) half-way through writing: the decoder fails, the encoder is listed."""
    out = tmp_path / "out"
    attempts = worker_faults({"vae_encoder.pt2": ["raise"], "vae_decoder.pt2": ["exit", "kill"]})

    result = invoke(monkeypatch, *inductor_args(tiny_vae_dir, tmp_path, out))

    assert result.exit_code == 2, result.output
    one_error_line(result.stderr, "1 of 2 package(s) failed to compile: a/vae_decoder.pt2", "re-run")
    assert f"a/vae_encoder.pt2: compile failed (RuntimeError: {ILLEGAL_ACCESS}); retrying in a fresh process" in result.stdout
    assert "a/vae_decoder.pt2: compile failed (the worker process exited with code 1 before reporting a result)" in result.stdout
    assert "a/vae_decoder.pt2: failed: the worker process was killed by SIGKILL" in result.stdout
    assert attempts_of(attempts) == ["vae_decoder.pt2.1", "vae_decoder.pt2.2", "vae_encoder.pt2.1", "vae_encoder.pt2.2"]
    assert len({p.read_text() for p in attempts.iterdir()}) == 4  # every attempt in a fresh process
    assert listed_engines_are_intact(out) == ["a/vae_encoder.pt2"]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == sorted([
        LOCK_NAME, MANIFEST_NAME, "a/vae_encoder.pt2", "weights.safetensors"])  # nothing the dead workers wrote
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [item["path"] for item in summary["built"]] == ["a/vae_encoder.pt2"]
    assert summary["failed"] == [{"path": "a/vae_decoder.pt2", "error": "the worker process was killed by SIGKILL"}]
    assert not summary["ok"] and "a/vae_decoder.pt2" in summary["error"]

    worker_faults({})  # fixed: a re-run compiles only the failed package
    result = invoke(monkeypatch, *inductor_args(tiny_vae_dir, tmp_path, out))
    assert result.exit_code == 0, result.output
    assert "a/vae_encoder.pt2: up to date, skipped" in result.stdout
    assert listed_engines_are_intact(out) == ["a/vae_decoder.pt2", "a/vae_encoder.pt2"]


def test_a_user_error_in_a_worker_is_not_retried(tiny_vae_dir, tmp_path, monkeypatch, worker_faults):
    out = tmp_path / "out"
    attempts = worker_faults({"vae_encoder.pt2": ["user_error"], "vae_decoder.pt2": ["kill", "raise"]})

    result = invoke(monkeypatch, *inductor_args(tiny_vae_dir, tmp_path, out))

    assert result.exit_code == 2, result.output
    one_error_line(result.stderr, "2 of 2 package(s) failed to compile: a/vae_encoder.pt2, a/vae_decoder.pt2")
    assert "a/vae_encoder.pt2: failed: a problem a retry cannot fix" in result.stdout
    assert f"a/vae_decoder.pt2: failed: RuntimeError: {ILLEGAL_ACCESS}" in result.stdout
    assert attempts_of(attempts) == ["vae_decoder.pt2.1", "vae_decoder.pt2.2", "vae_encoder.pt2.1"]
    assert [p.name for p in out.rglob("*") if p.is_file() and p.suffix == ".pt2"] == []


def test_ctrl_c_during_worker_compiles_ends_the_workers(tiny_vae_dir, tmp_path, monkeypatch, worker_faults,
                                                        sigint_raises):
    out = tmp_path / "out"
    attempts = worker_faults({"vae_encoder.pt2": ["hang"], "vae_decoder.pt2": ["hang"]})
    main_thread = threading.main_thread().ident

    def ctrl_c_once_both_compile():
        deadline = time.monotonic() + 120
        while len(list(attempts.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # the workers have written their partial files
        signal.pthread_kill(main_thread, signal.SIGINT)

    sender = threading.Thread(target=ctrl_c_once_both_compile)
    sender.start()
    try:
        result = invoke(monkeypatch, *inductor_args(tiny_vae_dir, tmp_path, out))
    finally:
        sender.join()

    assert result.exit_code == INTERRUPTED_EXIT_CODE, result.output
    one_error_line(result.stderr, "interrupted")
    for pid in (int(p.read_text()) for p in attempts.iterdir()):
        with pytest.raises(ProcessLookupError):  # ended and reaped
            os.kill(pid, 0)
    assert [p.name for p in out.rglob("*") if p.is_file() and p.suffix == ".pt2"] == []
