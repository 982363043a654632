"""`vaebuild verify`: real static and multi-profile TensorRT-RTX builds of the tiny VAE against PyTorch.

The builds are made once per module (fp16 export of a saved VAE folder, so the reference re-loads);
every test that changes a file works on a copy. The TensorRT runtime cannot run on a CPU-only host,
so `trt` rows are `not run` here; one test swaps in a stand-in runner to drive their comparison path.
"""

import json
import shutil
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import typer
from onnx import numpy_helper
from typer.testing import CliRunner

from vaebuild.cli.verify import verify as verify_command
from vaebuild.errors import MismatchError, UserInputError
from vaebuild.fileio import sha256_file
from conftest import requires_rtx
from vaebuild.verify import (
    DEFAULT_TOLERANCES,
    FAIL,
    NOT_RUN,
    PASS,
    SKIPPED,
    Row,
    Tolerances,
    VerifyOptions,
    check_engine_file,
    format_table,
    verify_build,
)




pytestmark = requires_rtx

STATIC_SPEC = """\
    kind: static
    max_side: 1920
    profiles:
      - {name: "s", height: 64, width: 96, batch: 1}
"""
MULTI_SPEC = """\
    kind: multiprofile
    max_side: 1920
    profiles:
      - name: "a"
        min: {height: 32, width: 32}
        opt: {height: 64, width: 64}
        max: {height: 96, width: 96}
        batch: {min: 1, opt: 1, max: 1}
      - name: "b"
        min: {height: 32, width: 32}
        opt: {height: 48, width: 64}
        max: {height: 96, width: 96}
        batch: {min: 1, opt: 1, max: 1}
"""
NO_GPU = "no CUDA GPU"
CPU_ONLY = VerifyOptions(device="cpu")


def quiet(*args, **kwargs):
    pass


@pytest.fixture(scope="module")
def builds(tiny_vae_dir, tmp_path_factory):
    """{"onnx", "static", "multiprofile"}: an fp16 export of `tiny_vae_dir` and both builds of it."""
    from vaebuild.builder.engines import build_engines
    from vaebuild.backends.base import BuildOptions
    from vaebuild.export.onnx import ExportOptions, export_onnx
    from vaebuild.model.source import ModelSource, load_vae
    from vaebuild.builder.specs import load_spec

    root = tmp_path_factory.mktemp("verify")
    source = ModelSource(model=str(tiny_vae_dir))
    export_onnx(load_vae(source), source.describe(), root / "onnx", ExportOptions(precision="fp16"), log=quiet)
    for kind, text in (("static", STATIC_SPEC), ("multiprofile", MULTI_SPEC)):
        spec_path = root / f"{kind}.yaml"
        spec_path.write_text(textwrap.dedent(text))
        options = BuildOptions(backend="tensorrt_rtx")
        build_engines(kind, load_spec(spec_path), root / "onnx", root / kind, options, log=quiet)
    return {name: root / name for name in ("onnx", "static", "multiprofile")}


@pytest.fixture
def static_copy(builds, tmp_path):
    """A private copy of the static build and its export; the manifest points at the copied export."""
    onnx_dir = Path(shutil.copytree(builds["onnx"], tmp_path / "onnx"))
    folder = Path(shutil.copytree(builds["static"], tmp_path / "static"))
    edit_manifest(folder, lambda m: m.update(onnx_dir=str(onnx_dir)))
    return folder


@pytest.fixture
def cli(monkeypatch):
    monkeypatch.delenv("VAEBUILD_DEBUG", raising=False)
    monkeypatch.setenv("COLUMNS", "200")
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.callback()(lambda: None)
    app.command(name="verify")(verify_command)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, ["verify", *map(str, args), "--device", "cpu"])


def edit_manifest(folder, change):
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest, indent=2))
    return manifest


def perturb_decoder_weight(onnx_dir):
    """Add 0.5 to the largest floating initializer of the decoder graph; nothing else changes."""
    path = onnx_dir / "vae_decoder.onnx"
    model = onnx.load(str(path))
    initializer = max(
        (t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16), key=lambda t: np.prod(t.dims)
    )
    values = numpy_helper.to_array(initializer)
    initializer.CopyFrom(numpy_helper.from_array((values + 0.5).astype(values.dtype), initializer.name))
    onnx.save(model, str(path))
    return sha256_file(path)


def rows_of(report, runner=None, status=None):
    return [r for r in report.rows if (runner is None or r.runner == runner) and (status is None or r.status == status)]


# --- passing builds ---------------------------------------------------------------------------------


def test_static_build_passes_and_trt_is_not_run(builds):
    report = verify_build(builds["static"], CPU_ONLY, log=quiet)

    assert [(r.engine, r.levels, r.shape, r.runner) for r in report.rows] == [
        ("s/vae_encoder.trt", "min=opt=max", (1, 3, 1, 64, 96), "onnxrt"),
        ("s/vae_encoder.trt", "min=opt=max", (1, 3, 1, 64, 96), "trt"),
        ("s/vae_decoder.trt", "min=opt=max", (1, 4, 1, 8, 12), "onnxrt"),
        ("s/vae_decoder.trt", "min=opt=max", (1, 4, 1, 8, 12), "trt"),
    ]
    for row in rows_of(report, "onnxrt"):
        assert row.status == PASS, row
        assert 0 < row.max_abs <= row.max_abs_limit
        assert row.mean_abs <= row.max_abs
        assert row.rel > 0
    decoder = rows_of(report, "onnxrt")[1]
    assert decoder.psnr >= DEFAULT_TOLERANCES["fp16"].min_psnr
    assert rows_of(report, "onnxrt")[0].psnr is None  # encoder: no PSNR
    for row in rows_of(report, "trt"):
        assert row.status == NOT_RUN and NO_GPU in row.reason and row.max_abs is None
    assert report.passed
    assert report.counts() == {PASS: 2, FAIL: 0, NOT_RUN: 2, SKIPPED: 0}
    assert all(e["check"] is None for e in report.engines)
    report.raise_on_failures()  # nothing failed: no exception


def test_multiprofile_covers_every_profile_shape_once(builds):
    report = verify_build(builds["multiprofile"], CPU_ONLY, log=quiet)

    trt = [(r.engine, r.profile, r.profile_index, r.levels, r.image) for r in rows_of(report, "trt")]
    encoder = [row[1:] for row in trt if row[0] == "vae_encoder_multi_profile.trt"]
    assert encoder == [
        ("a", 0, "min", (32, 32)), ("a", 0, "opt", (64, 64)), ("a", 0, "max", (96, 96)),
        ("b", 1, "min", (32, 32)), ("b", 1, "opt", (48, 64)), ("b", 1, "max", (96, 96)),
    ]
    assert len(trt) == 12
    # PyTorch vs ONNX Runtime does not depend on the profile: each distinct input is compared once.
    onnxrt = [(r.graph, r.image) for r in rows_of(report, "onnxrt")]
    assert onnxrt == [(g, hw) for g in ("encoder", "decoder") for hw in ((32, 32), (64, 64), (96, 96), (48, 64))]
    assert all(r.status == PASS for r in rows_of(report, "onnxrt"))
    assert rows_of(report, "onnxrt")[4].shape == (1, 4, 1, 4, 4)  # the decoder's input is the 32x32 image's latent
    assert report.passed


def test_max_side_skips_larger_shapes_with_the_reason(builds):
    report = verify_build(builds["multiprofile"], VerifyOptions(device="cpu", max_side=64), log=quiet)

    skipped = rows_of(report, status=SKIPPED)
    assert {r.image for r in skipped} == {(96, 96)}
    assert all(r.reason == "image side 96 > --max-side 64" for r in skipped)
    assert all(r.status == PASS for r in rows_of(report, "onnxrt") if r.image != (96, 96))
    assert report.passed


def test_cpu_default_max_side_is_explained(builds, monkeypatch):
    import vaebuild.verify.plan as plan_module

    monkeypatch.setattr(plan_module, "CPU_MAX_SIDE", 64)
    report = verify_build(builds["multiprofile"], CPU_ONLY, log=quiet)
    assert report.max_side == 64
    reasons = {r.reason for r in rows_of(report, status=SKIPPED)}
    assert reasons == {"image side 96 > --max-side 64 (the CPU default; --max-side 0 runs every shape)"}


# --- failures -----------------------------------------------------------------------------------------


def test_perturbed_onnx_fails_its_hash_check(static_copy):
    perturb_decoder_weight(Path(json.loads((static_copy / "manifest.json").read_text())["onnx_dir"]))

    report = verify_build(static_copy, CPU_ONLY, log=quiet)

    failed = rows_of(report, status=FAIL)
    assert [(r.engine, r.runner) for r in failed] == [("s/vae_decoder.trt", "onnxrt")]
    assert "vae_decoder.onnx sha256" in failed[0].reason and "this engine was built from" in failed[0].reason
    assert rows_of(report, "onnxrt")[0].status == PASS  # the encoder is untouched
    with pytest.raises(MismatchError, match=r"s/vae_decoder.trt profile s min=opt=max 1x4x1x8x12 onnxrt"):
        report.raise_on_failures()


def test_consistent_but_wrong_export_fails_the_comparison(static_copy, cli, tmp_path):
    """The manifest is updated to the perturbed file's hash: only the numbers can catch it."""
    onnx_dir = Path(json.loads((static_copy / "manifest.json").read_text())["onnx_dir"])
    new_hash = perturb_decoder_weight(onnx_dir)
    edit_manifest(static_copy, lambda m: [e.update(onnx_sha256=new_hash) for e in m["engines"] if e["graph"] == "decoder"])

    report = verify_build(static_copy, CPU_ONLY, log=quiet)
    (row,) = rows_of(report, status=FAIL)
    assert (row.engine, row.runner, row.shape) == ("s/vae_decoder.trt", "onnxrt", (1, 4, 1, 8, 12))
    assert row.max_abs > row.max_abs_limit
    assert row.reason.startswith(f"max abs {row.max_abs:.3g} > {row.max_abs_limit:.3g}")
    assert "PSNR" in row.reason

    result = cli(static_copy, "--report", tmp_path / "report.json")
    assert result.exit_code == 4
    (error,) = result.stderr.splitlines()[-1:]
    assert error.startswith("error: verification failed: s/vae_decoder.trt profile s min=opt=max 1x4x1x8x12 onnxrt: max abs")
    assert "FAIL: max abs" in result.stdout  # the table row
    saved = json.loads((tmp_path / "report.json").read_text())  # written before the failure exit
    assert saved["passed"] is False and saved["summary"][FAIL] == 1


def test_truncated_engine_is_a_clear_failure(static_copy, cli):
    engine = static_copy / "s" / "vae_decoder.trt"
    engine.write_bytes(engine.read_bytes()[:1000])

    report = verify_build(static_copy, CPU_ONLY, log=quiet)
    problem = next(e["check"] for e in report.engines if e["path"] == "s/vae_decoder.trt")
    assert problem.startswith("s/vae_decoder.trt: 1000 bytes but the manifest says")
    assert "truncated or replaced" in problem and "\n" not in problem
    (row,) = rows_of(report, status=FAIL)
    assert row.runner == "trt" and row.reason == f"engine check: {problem}"  # checked although TRT cannot run here

    result = cli(static_copy)
    assert result.exit_code == 4
    assert "s/vae_decoder.trt: 1000 bytes but the manifest says" in result.stderr.splitlines()[-1]


def test_engine_checks(builds, tmp_path):
    folder = Path(shutil.copytree(builds["static"], tmp_path / "static"))
    entry = json.loads((folder / "manifest.json").read_text())["engines"][0]
    assert check_engine_file(folder, entry, entry["backend_version"], entry["weights_sha256"]) is None

    assert "built with tensorrt_rtx" in check_engine_file(folder, entry, "99.0")
    assert "but 99.0 is installed" in check_engine_file(folder, entry, "99.0")
    assert "built from other weights" in check_engine_file(folder, entry, None, "0" * 64)
    engine = folder / entry["path"]
    data = bytearray(engine.read_bytes())
    data[len(data) // 2] ^= 0xFF
    engine.write_bytes(bytes(data))
    assert "sha256" in check_engine_file(folder, entry) and "corrupt or replaced" in check_engine_file(folder, entry)
    engine.unlink()
    assert check_engine_file(folder, entry) == f"{entry['path']}: file missing; rebuild it"


def test_other_weights_are_refused(static_copy, tmp_path):
    from conftest import make_tiny_vae

    make_tiny_vae(seed=1).save_pretrained(tmp_path / "other_vae")
    with pytest.raises(UserInputError, match=r"are not the ones these engines were built from"):
        verify_build(static_copy, VerifyOptions(device="cpu", model=str(tmp_path / "other_vae")), log=quiet)


def test_unloadable_model_entry_is_a_user_error(static_copy):
    edit_manifest(static_copy, lambda m: m.update(model={"kind": "test"}))
    with pytest.raises(UserInputError, match=r"cannot be re-loaded for the PyTorch reference; pass --model"):
        verify_build(static_copy, CPU_ONLY, log=quiet)


def test_missing_onnx_folder_is_not_run(static_copy, tmp_path):
    report = verify_build(static_copy, VerifyOptions(device="cpu", onnx_dir=tmp_path / "nowhere"), log=quiet)
    assert {r.status for r in rows_of(report, "onnxrt")} == {NOT_RUN}
    assert "pass --onnx DIR" in rows_of(report, "onnxrt")[0].reason
    with pytest.raises(MismatchError):
        verify_build(static_copy, VerifyOptions(device="cpu", onnx_dir=tmp_path / "nowhere", require=("onnxrt",)),
                     log=quiet).raise_on_failures()


# --- the trt row path, with a stand-in for TrtRunner -----------------------------------------------


def test_trt_rows_run_through_the_comparator(static_copy, monkeypatch):
    """TensorRT cannot run here: an ONNX Runtime runner named "trt" stands in to drive the same code path."""
    import vaebuild.backends.tensorrt as tensorrt_backend
    import vaebuild.verify.compare as compare_module

    requested = []

    def stand_in(engine_path, backend, profile_index=0, name=None):
        requested.append((Path(engine_path).relative_to(static_copy).as_posix(), backend, profile_index))
        graph = "encoder" if "encoder" in Path(engine_path).name else "decoder"
        manifest = json.loads((static_copy / "manifest.json").read_text())
        runner = compare_module._onnxrt_runner(Path(manifest["onnx_dir"]) / f"vae_{graph}.onnx", "fp16")
        runner.name = name
        return runner

    monkeypatch.setattr(tensorrt_backend, "runtime_unavailable_reason", lambda backend: None)
    monkeypatch.setattr(tensorrt_backend, "load_trt_runner", stand_in)
    report = verify_build(static_copy, VerifyOptions(device="cpu", require=("trt",)), log=quiet)

    assert requested == [("s/vae_encoder.trt", "tensorrt_rtx", 0), ("s/vae_decoder.trt", "tensorrt_rtx", 0)]
    trt = rows_of(report, "trt")
    assert [r.status for r in trt] == [PASS, PASS]
    assert [r.max_abs for r in trt] == [r.max_abs for r in rows_of(report, "onnxrt")]


# --- CLI and report -----------------------------------------------------------------------------------


def test_cli_exit_codes_and_report(builds, cli, tmp_path):
    report_path = tmp_path / "report.json"
    result = cli(builds["static"], "--report", report_path)
    assert result.exit_code == 0, result.output
    header = result.stdout.splitlines()[0].split()
    assert header[:4] == ["engine", "profile", "shape", "runner"] and header[-1] == "status"
    assert "not run: no CUDA GPU on this machine" in result.stdout
    assert "4 comparisons: 2 pass, 0 fail, 2 not run" in result.stdout

    report = json.loads(report_path.read_text())
    assert report["report_version"] == 1 and report["kind"] == "static" and report["passed"] is True
    assert report["reference"]["device"] == "cpu" and report["reference"]["dtype"] == "float32"
    assert report["tolerances"] == {"fp16": {"atol": 0.05, "rtol": 0.02, "min_psnr": 40.0}}
    assert len(report["rows"]) == 4 and len(report["engines"]) == 2
    assert set(report["rows"][0]) == {
        "engine", "graph", "profile", "profile_index", "levels", "shape", "image", "runner", "status", "reason",
        "max_abs", "mean_abs", "rel", "psnr", "max_abs_limit", "min_psnr", "seconds",
    }
    assert [r["status"] for r in report["rows"]] == [PASS, NOT_RUN, PASS, NOT_RUN]
    assert report["summary"] == {PASS: 2, FAIL: 0, NOT_RUN: 2, SKIPPED: 0}

    required = cli(builds["static"], "--require", "trt")
    assert required.exit_code == 4
    assert "--require trt, but it cannot run: no CUDA GPU" in required.stderr.splitlines()[-1]


def test_fp16_builds_follow_the_lightx2v_contract(builds):
    for kind in ("static", "multiprofile"):
        assert json.loads((builds[kind] / "manifest.json").read_text())["runtime_contract"] == "lightx2v-trt"


def test_cli_json_summary(builds, cli, tmp_path):
    summary_path = tmp_path / "summary.json"
    result = cli(builds["static"], "--json", summary_path)
    assert result.exit_code == 0, result.output
    summary = json.loads(summary_path.read_text())
    assert summary["command"] == "verify" and summary["ok"] is True and summary["error"] is None
    assert summary["counts"] == {"passed": 2, "failed": 0, "not_run": 2, "skipped": 0}
    assert {item["runner"] for item in summary["passed"]} == {"onnxrt"}
    assert {item["reason"] for item in summary["not_run"]} == {"no CUDA GPU on this machine"}
    assert set(summary["passed"][0]) == {"path", "profile", "levels", "shape", "runner", "reason", "seconds"}

    failed = cli(builds["static"], "--atol", "0", "--rtol", "0", "--json", summary_path)
    assert failed.exit_code == 4
    summary = json.loads(summary_path.read_text())
    assert summary["ok"] is False and summary["error"].startswith("verification failed: s/vae_encoder.trt")
    assert summary["counts"]["failed"] == 2


def test_cli_tolerance_override_fails_strictly(builds, cli):
    result = cli(builds["static"], "--atol", "0", "--rtol", "0")
    assert result.exit_code == 4
    assert "error: verification failed: s/vae_encoder.trt" in result.stderr
    assert "max abs" in result.stderr.splitlines()[-1]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--require", "gpu"], "--require 'gpu': choose from onnxrt, trt"),
        (["--skip", "trt", "--require", "trt"], "--require trt and --skip trt contradict each other"),
        (["--atol", "-1"], "--atol must be a finite number >= 0"),
        (["--max-side", "-5"], "--max-side must be >= 0"),
    ],
)
def test_cli_bad_options(builds, cli, args, message):
    result = cli(builds["static"], *args)
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: {message}")


def test_cli_folder_without_manifest(cli, tmp_path):
    result = cli(tmp_path)
    assert result.exit_code == 2
    assert "has no manifest.json" in result.stderr


# --- pieces -------------------------------------------------------------------------------------------


def test_tolerances():
    assert Tolerances(atol=0.05, rtol=0.02, min_psnr=40).max_abs_limit(peak=1.0) == 0.05
    assert Tolerances(atol=0.05, rtol=0.02, min_psnr=40).max_abs_limit(peak=10.0) == pytest.approx(0.2)
    assert VerifyOptions(atol=0.1).tolerances("bf16") == Tolerances(0.1, DEFAULT_TOLERANCES["bf16"].rtol, 35.0)
    assert VerifyOptions().tolerances("fp32") == DEFAULT_TOLERANCES["fp32"]


def test_psnr_of_images_in_255_levels():
    from vaebuild.verify.compare import _psnr_255

    ref = np.zeros((1, 3, 1, 8, 8), np.float32)
    assert _psnr_255(ref, ref) == float("inf")
    # One level of 255 everywhere: PSNR = 20 log10(255) = 48.13 dB.
    assert _psnr_255(ref + 2 / 255, ref) == pytest.approx(48.13, abs=0.01)


def test_table_and_json_of_special_values():
    from vaebuild.verify import VerifyReport

    row = Row(engine="e.trt", graph="decoder", profile="p", profile_index=0, levels="min=opt=max",
              shape=(1, 4, 1, 8, 8), image=(64, 64), runner="onnxrt", status=PASS, max_abs=0.0, mean_abs=0.0,
              rel=0.0, psnr=float("inf"), max_abs_limit=0.05, min_psnr=40.0)
    report = VerifyReport(folder=Path("x"), kind="static", model={}, weights_sha256="", reference={}, max_side=0,
                          tolerances={}, engines=[], onnx=[], rows=[row])
    table = format_table(report).splitlines()
    assert len(table) == 3 and table[2].split() == ["e.trt", "p", "[0]", "min=opt=max", "1x4x1x8x8", "onnxrt",
                                                    "0", "0", "0", "inf", "pass"]
    assert row.to_dict()["psnr"] == "inf"
    json.dumps(report.to_dict(), allow_nan=False)
