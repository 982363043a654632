"""A wheel install (no editable install, no source tree) ships every profile spec and runs `vaebuild --version`.

The wheel is built from a copy of the sources and installed with `--no-deps` into a fresh virtual
environment. Its dependencies (torch, typer, ...) come from this test's environment through a `.pth`
line added after the install: a plain path entry, so this environment's own vaebuild (often an
editable install, whose import hook lives in a `.pth` file of its own) is never imported there.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import vaebuild

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "vaebuild")
SPECS = ROOT / "vaebuild" / "builder" / "profiles"


def run(*args, **kwargs):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, timeout=300, **kwargs)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_wheel_ships_every_spec_and_runs(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
        "-w", tmp_path / "dist", src)
    (wheel,) = (tmp_path / "dist").glob("vaebuild-*.whl")
    shipped_yaml = sorted(p.name for p in SPECS.glob("*.yaml"))
    in_wheel = sorted(Path(n).name for n in zipfile.ZipFile(wheel).namelist() if n.startswith("vaebuild/builder/profiles/"))
    assert in_wheel == shipped_yaml

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel)
    site = Path(run(python, "-I", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").strip())
    (site / "zz_test_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")

    check = (
        "import sys, vaebuild, warnings; from vaebuild.builder.specs import find_spec, load_spec, shipped_specs; "
        f"assert vaebuild.__file__.startswith({str(env_dir)!r}), vaebuild.__file__; "
        "warnings.simplefilter('ignore'); "
        "specs = shipped_specs(); [load_spec(find_spec(name)) for name in specs]; print(' '.join(specs))"
    )
    names = run(python, "-I", "-c", check, cwd=tmp_path).split()
    assert sorted(f"{name}.yaml" for name in names) == shipped_yaml
    assert run(env_dir / "bin" / "vaebuild", "--version", cwd=tmp_path) == f"vaebuild {vaebuild.__version__}\n"
