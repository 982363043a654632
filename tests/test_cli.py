"""The `vaebuild` command line: help, a real export, one-line errors with documented exit codes, fast start."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vaebuild.cli import app
from vaebuild.cli.errors import format_error
from vaebuild.errors import BackendMissingError, MismatchError, UserInputError

ONNX_FILES = ["export_record.json", "vae_decoder.onnx", "vae_encoder.onnx"]


@pytest.fixture
def runner(monkeypatch):
    monkeypatch.delenv("VAEBUILD_DEBUG", raising=False)
    monkeypatch.setenv("COLUMNS", "120")
    return CliRunner()


def _assert_one_error_line(result, *fragments):
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0]


def _registered_command_names():
    return [command.name or command.callback.__name__ for command in app.registered_commands]


def test_help_lists_every_command(runner):
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    names = _registered_command_names()
    assert "export" in names
    for name in names:
        assert name in result.stdout


def test_no_arguments_shows_help(runner):
    result = runner.invoke(app, [])
    assert "export" in result.output
    assert "Usage" in result.output


def test_export_help_lists_options(runner):
    result = runner.invoke(app, ["export", "--help"])
    assert result.exit_code == 0
    for option in ("--out", "--model", "--random-init", "--config", "--precision", "--opset", "--no-fold", "--device"):
        assert option in result.stdout


def test_export_writes_files_and_prints_parity(runner, tiny_vae_dir, tmp_path):
    out = tmp_path / "onnx"
    result = runner.invoke(
        app, ["export", "--model", str(tiny_vae_dir), "--out", str(out), "--precision", "fp32", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ONNX_FILES
    parity_lines = [line for line in result.stdout.splitlines() if "parity vs PyTorch" in line]
    assert len(parity_lines) == 2
    assert parity_lines[0].startswith("[encoder]") and parity_lines[1].startswith("[decoder]")
    assert all(line.endswith("OK") for line in parity_lines)
    record = json.loads((out / "export_record.json").read_text())
    assert record["model"] == {"kind": "vae-folder", "model": str(tiny_vae_dir)}
    assert record["precision"] == "fp32"
    assert result.stderr == ""


def test_export_without_model_is_a_user_error(runner, tmp_path):
    out = tmp_path / "onnx"
    result = runner.invoke(app, ["export", "--out", str(out)])
    assert result.exit_code == 2
    _assert_one_error_line(result, "--model", "--random-init")
    assert not out.exists()


def test_export_with_model_and_random_init_is_a_user_error(runner, tiny_vae_dir, tmp_path):
    out = tmp_path / "onnx"
    result = runner.invoke(app, ["export", "--model", str(tiny_vae_dir), "--random-init", "--out", str(out)])
    assert result.exit_code == 2
    _assert_one_error_line(result)
    assert not out.exists()


def test_export_missing_model_path(runner, tmp_path):
    out = tmp_path / "onnx"
    result = runner.invoke(app, ["export", "--model", "/nonexistent/qwen_vae", "--out", str(out)])
    assert result.exit_code == 2
    _assert_one_error_line(result, "/nonexistent/qwen_vae", "does not exist")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--precision", "fp8"], "unknown precision 'fp8'"),
        (["--precision", "bf16", "--opset", "18"], "--opset 18 is too old for bf16"),
        (["--device", "tpu"], "unknown --device 'tpu'"),
    ],
    ids=["bad_precision", "bf16_old_opset", "bad_device"],
)
def test_export_bad_options(runner, tiny_vae_dir, tmp_path, args, fragment):
    out = tmp_path / "onnx"
    result = runner.invoke(app, ["export", "--model", str(tiny_vae_dir), "--out", str(out), *args])
    assert result.exit_code == 2, result.output
    assert not out.exists()
    _assert_one_error_line(result, fragment)


@pytest.mark.parametrize(
    "error, exit_code",
    [(MismatchError("decoder at [1, 4, 1, 8, 12]: max rel 0.5 > 1e-4"), 4), (BackendMissingError("no polygraphy"), 3)],
    ids=["mismatch", "backend_missing"],
)
def test_export_error_exit_codes(runner, tiny_vae_dir, tmp_path, monkeypatch, error, exit_code):
    import vaebuild.export.onnx

    def failing_export(*args, **kwargs):
        raise error

    monkeypatch.setattr(vaebuild.export.onnx, "export_onnx", failing_export)
    result = runner.invoke(app, ["export", "--model", str(tiny_vae_dir), "--out", str(tmp_path / "onnx")])
    assert result.exit_code == exit_code
    _assert_one_error_line(result, str(error))


def test_debug_variable_brings_traceback_back(runner, tmp_path, monkeypatch):
    monkeypatch.setenv("VAEBUILD_DEBUG", "1")
    result = runner.invoke(app, ["export", "--out", str(tmp_path / "onnx")])
    assert isinstance(result.exception, UserInputError)


def test_version(runner):
    import vaebuild

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout == f"vaebuild {vaebuild.__version__}\n"


@pytest.mark.parametrize("command", [[], ["verify"]])
def test_exit_codes_render_as_a_list(runner, monkeypatch, command):
    monkeypatch.setenv("COLUMNS", "100")
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0
    lines = [line.strip() for line in result.stdout.splitlines()]
    assert "Exit codes:" in lines
    items = [line for line in lines if line.startswith("• ")]
    assert [item[2:4] for item in items] == ["0:", "2:", "3:", "4:", "5:", "13"] if not command else ["0:", "2:", "4:"]


def test_format_error_is_one_line():
    assert format_error(MismatchError("decoder differs")) == "error: decoder differs"
    assert MismatchError("x").exit_code == 4 and UserInputError("x").exit_code == 2


def _clean_env():
    return {k: v for k, v in os.environ.items() if k != "VAEBUILD_DEBUG"}


def test_importing_the_cli_does_not_import_torch():
    code = (
        "import sys, vaebuild.cli; "
        "heavy = [m for m in ('torch', 'diffusers', 'onnx', 'onnxruntime') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=_clean_env(), timeout=60)


def test_console_script_help_is_fast():
    script = Path(sys.executable).parent / "vaebuild"
    assert script.exists(), f"console script not installed at {script}"
    subprocess.run([str(script), "--help"], capture_output=True, env=_clean_env(), timeout=60)  # warm the file cache
    start = time.perf_counter()
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, env=_clean_env(), timeout=60)
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    assert "export" in result.stdout
    assert seconds < 3.0, f"vaebuild --help took {seconds:.1f} s"
