"""`vaebuild static` / `vaebuild multiprofile`: real TensorRT-RTX engines built from the tiny VAE export.

Specs are written per test at small sizes (each engine builds in about a second on a CPU); the last two
tests build the shipped specs. The tiny VAE has z_dim=4, so decoder inputs have 4 channels.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from vaebuild.builder.engines import build_engines
from vaebuild.cli import app
from vaebuild.backends.base import BuildOptions
from vaebuild.errors import UserInputError
from vaebuild.export import RECORD_NAME
from vaebuild.fileio import sha256_file
from vaebuild.manifest import LOCK_NAME, MANIFEST_NAME
from vaebuild.builder.specs import load_spec

pytest.importorskip(
    "tensorrt_rtx_bindings", reason="TensorRT-RTX is not installed (pip install tensorrt-rtx-cu13-bindings)"
)

# Polygraphy sets a timing cache on every config; TensorRT-RTX deprecates that call (a no-op there).
pytestmark = pytest.mark.filterwarnings("ignore:.*Timing cache operations are no-ops:DeprecationWarning")

RTX = BuildOptions(backend="tensorrt_rtx")
Z_DIM = 4

STATIC_YAML = """\
kind: static
max_side: 128
profiles:
  - {{name: "16_9", height: {h169}, width: {w169}, batch: 1}}
  - {{name: "1_1", height: 96, width: 96, batch: 1}}
"""
STATIC_SIZES = {"16_9": (64, 112), "1_1": (96, 96)}

MULTI_OPTS = {"square": (64, 64), "wide": (64, 112), "tall": (112, 64)}
MULTI_YAML = "kind: multiprofile\nmax_side: 128\nprofiles:\n" + "".join(
    f'  - name: "{name}"\n'
    "    min: {height: 32, width: 32}\n"
    f"    opt: {{height: {h}, width: {w}}}\n"
    "    max: {height: 128, width: 128}\n"
    "    batch: {min: 1, opt: 1, max: 1}\n"
    for name, (h, w) in MULTI_OPTS.items()
)


# --- helpers -------------------------------------------------------------------------------------


def write_static_spec(folder, h169=64, w169=112):
    path = Path(folder) / "static.yaml"
    path.write_text(STATIC_YAML.format(h169=h169, w169=w169))
    return path


def write_multi_spec(folder):
    path = Path(folder) / "multi.yaml"
    path.write_text(MULTI_YAML)
    return path


def build(kind, spec_path, onnx_dir, out, options=RTX, ratios=None):
    """Run build_engines; return (manifest, {engine path: "built" | "skipped"}, log lines)."""
    spec = load_spec(spec_path)
    if ratios:
        spec = spec.select(ratios)
    lines = []
    manifest = build_engines(kind, spec, onnx_dir, out, options, log=lines.append, allow_non_fp16=True)  # fp32 export
    return manifest, statuses(lines), lines


def statuses(lines):
    """{engine path: "built" | "skipped"} from the per-engine status lines."""
    result = {}
    for line in lines:
        if not line.startswith("["):
            continue
        path, _, status = line.split("] ", 1)[1].partition(": ")
        if status == "up to date, skipped":
            result[path] = "skipped"
        elif status.startswith("built in "):
            result[path] = "built"
    return result


def files_under(folder):
    """Every file below `folder` (hidden ones included) but the manifest's lock file, as sorted relative posix paths."""
    folder = Path(folder)
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != LOCK_NAME)


def engine_files(folder):
    return [f for f in files_under(folder) if not f.startswith("onnx/") and f != MANIFEST_NAME]


def stamps(out, paths):
    return {p: (Path(out) / p).stat().st_mtime_ns for p in paths}


def read_manifest_file(out):
    return json.loads((Path(out) / MANIFEST_NAME).read_text())


def rtx_version():
    from vaebuild.backends.trt_import import import_polygraphy_trt

    return import_polygraphy_trt("tensorrt_rtx").trt.__version__


def static_paths(names=("16_9", "1_1")):
    return [f"{name}/vae_{graph}.trt" for name in names for graph in ("encoder", "decoder")]


MULTI_PATHS = ["vae_encoder_multi_profile.trt", "vae_decoder_multi_profile.trt"]


def expected_shapes(graph, min_hw, opt_hw, max_hw, batch=1):
    channels, scale = (3, 1) if graph == "encoder" else (Z_DIM, 8)
    return {
        level: [batch, channels, 1, h // scale, w // scale]
        for level, (h, w) in zip(("min", "opt", "max"), (min_hw, opt_hw, max_hw))
    }


def check_entry_matches_files(entry, out, onnx_dir):
    """The manifest entry's hashes and size agree with the engine file and the export record."""
    record = json.loads((Path(onnx_dir) / RECORD_NAME).read_text())
    graph_record = record["graphs"][entry["graph"]]
    path = Path(out) / entry["path"]
    assert entry["backend"] == "tensorrt_rtx"
    assert entry["backend_version"] == rtx_version()
    assert entry["precision"] == record["precision"]
    assert entry["onnx_sha256"] == graph_record["sha256"] == sha256_file(Path(onnx_dir) / graph_record["file"])
    assert entry["weights_sha256"] == record["weights_sha256"]
    assert entry["size_bytes"] == path.stat().st_size > 0
    assert entry["sha256"] == sha256_file(path)
    assert entry["input"] == graph_record["input"]["name"]
    assert entry["output"] == graph_record["output"]["name"]


@pytest.fixture
def onnx_copy(tiny_onnx_dir, tmp_path):
    """A private copy of the tiny export that a test may change."""
    return Path(shutil.copytree(tiny_onnx_dir, tmp_path / "onnx_copy"))


# --- layout and manifest -------------------------------------------------------------------------


def test_static_layout_and_manifest(tiny_onnx_dir, tmp_path):
    out = tmp_path / "out"
    manifest, status, lines = build("static", write_static_spec(tmp_path), tiny_onnx_dir, out)

    assert files_under(out) == sorted(static_paths() + [MANIFEST_NAME])  # no .partial or other leftovers
    assert status == dict.fromkeys(static_paths(), "built")
    assert lines[0] == "[1/4] 16_9/vae_encoder.trt: building 1 profile(s) with tensorrt_rtx ..."
    assert read_manifest_file(out) == manifest
    assert manifest["kind"] == "static"
    assert manifest["spec"]["names"] == ["16_9", "1_1"]
    assert manifest["precision"] == "fp32"
    assert manifest["vae_config"]["z_dim"] == Z_DIM
    assert manifest["build_options"]["backend"] == "tensorrt_rtx"
    assert [e["path"] for e in manifest["engines"]] == static_paths()
    for entry in manifest["engines"]:
        name, graph = entry["path"].split("/")[0], entry["graph"]
        assert entry["path"].endswith(f"vae_{graph}.trt")
        size = STATIC_SIZES[name]
        [profile] = entry["profiles"]
        assert profile["name"] == name
        assert profile["image"] == {"min": list(size), "opt": list(size), "max": list(size)}
        assert profile["batch"] == [1, 1, 1]
        assert profile["input"] == expected_shapes(graph, size, size, size)
        check_entry_matches_files(entry, out, tiny_onnx_dir)


def test_multiprofile_layout_and_profile_order(tiny_onnx_dir, tmp_path):
    out = tmp_path / "out"
    manifest, status, _ = build("multiprofile", write_multi_spec(tmp_path), tiny_onnx_dir, out)

    assert files_under(out) == sorted(MULTI_PATHS + [MANIFEST_NAME])
    assert status == dict.fromkeys(MULTI_PATHS, "built")
    assert [e["path"] for e in manifest["engines"]] == MULTI_PATHS
    for entry in manifest["engines"]:
        assert [p["name"] for p in entry["profiles"]] == list(MULTI_OPTS)
        for profile, opt in zip(entry["profiles"], MULTI_OPTS.values()):
            assert profile["input"] == expected_shapes(entry["graph"], (32, 32), opt, (128, 128))
            assert profile["image"] == {"min": [32, 32], "opt": list(opt), "max": [128, 128]}
        check_entry_matches_files(entry, out, tiny_onnx_dir)


# --- skip if unchanged ---------------------------------------------------------------------------


def test_second_identical_run_skips_everything(tiny_onnx_dir, tmp_path):
    spec, out = write_static_spec(tmp_path), tmp_path / "out"
    first, _, _ = build("static", spec, tiny_onnx_dir, out)
    before = stamps(out, static_paths())

    second, status, lines = build("static", spec, tiny_onnx_dir, out)

    assert status == dict.fromkeys(static_paths(), "skipped")
    assert len(lines) == 4 and all(line.endswith(": up to date, skipped") for line in lines)
    assert stamps(out, static_paths()) == before
    assert second["engines"] == first["engines"]
    assert files_under(out) == sorted(static_paths() + [MANIFEST_NAME])


def test_changed_spec_size_rebuilds_only_that_ratio(tiny_onnx_dir, tmp_path):
    out = tmp_path / "out"
    build("static", write_static_spec(tmp_path), tiny_onnx_dir, out)
    before = stamps(out, static_paths())

    manifest, status, _ = build("static", write_static_spec(tmp_path, h169=72, w169=128), tiny_onnx_dir, out)

    assert status == {
        **dict.fromkeys(static_paths(["16_9"]), "built"),
        **dict.fromkeys(static_paths(["1_1"]), "skipped"),
    }
    after = stamps(out, static_paths())
    assert [p for p in static_paths() if after[p] != before[p]] == static_paths(["16_9"])
    encoder = manifest["engines"][0]
    assert encoder["path"] == "16_9/vae_encoder.trt"
    assert encoder["profiles"][0]["input"]["opt"] == [1, 3, 1, 72, 128]
    for entry in manifest["engines"]:
        check_entry_matches_files(entry, out, tiny_onnx_dir)


def test_changed_builder_option_rebuilds_everything(tiny_onnx_dir, tmp_path):
    spec, out = write_static_spec(tmp_path), tmp_path / "out"
    build("static", spec, tiny_onnx_dir, out, ratios=["1_1"])

    manifest, status, _ = build(
        "static", spec, tiny_onnx_dir, out, BuildOptions(backend="tensorrt_rtx", builder_optimization_level=1),
        ratios=["1_1"],
    )

    assert status == dict.fromkeys(static_paths(["1_1"]), "built")
    assert manifest["build_options"]["builder_optimization_level"] == 1


def test_changed_onnx_rebuilds_only_that_graph(onnx_copy, tmp_path):
    spec, out = write_static_spec(tmp_path), tmp_path / "out"
    build("static", spec, onnx_copy, out)
    before = stamps(out, static_paths())

    # Different decoder weights: nudge one initializer, then record the new graph hash as an export would.
    decoder_path = onnx_copy / "vae_decoder.onnx"
    model = onnx.load(decoder_path)
    tensor = next(t for t in model.graph.initializer if numpy_helper.to_array(t).dtype == np.float32)
    tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) + np.float32(0.01), tensor.name))
    onnx.save(model, decoder_path)
    record = json.loads((onnx_copy / RECORD_NAME).read_text())
    old_hash = record["graphs"]["decoder"]["sha256"]
    record["graphs"]["decoder"]["sha256"] = sha256_file(decoder_path)
    (onnx_copy / RECORD_NAME).write_text(json.dumps(record))
    assert record["graphs"]["decoder"]["sha256"] != old_hash

    manifest, status, _ = build("static", spec, onnx_copy, out)

    decoders = [p for p in static_paths() if p.endswith("decoder.trt")]
    assert status == {p: "built" if p in decoders else "skipped" for p in static_paths()}
    after = stamps(out, static_paths())
    assert [p for p in static_paths() if after[p] != before[p]] == decoders
    for entry in manifest["engines"]:
        check_entry_matches_files(entry, out, onnx_copy)


@pytest.mark.parametrize("damage", ["flip-byte", "truncate", "delete"])
def test_damaged_engine_is_rebuilt(tiny_onnx_dir, tmp_path, damage):
    spec, out = write_static_spec(tmp_path), tmp_path / "out"
    first, _, _ = build("static", spec, tiny_onnx_dir, out, ratios=["1_1"])
    target = out / "1_1/vae_decoder.trt"
    data = bytearray(target.read_bytes())
    if damage == "flip-byte":
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(bytes(data[:-1]))
    else:
        target.unlink()

    manifest, status, _ = build("static", spec, tiny_onnx_dir, out, ratios=["1_1"])

    assert status == {"1_1/vae_encoder.trt": "skipped", "1_1/vae_decoder.trt": "built"}
    assert manifest["engines"][0] == first["engines"][0]
    check_entry_matches_files(manifest["engines"][1], out, tiny_onnx_dir)


def test_new_backend_version_rebuilds(tiny_onnx_dir, tmp_path, monkeypatch):
    """Engines are tied to the builder's version: an upgraded TensorRT-RTX must not skip old engines."""
    from vaebuild.backends.trt_import import import_polygraphy_trt

    spec, out = write_static_spec(tmp_path), tmp_path / "out"
    build("static", spec, tiny_onnx_dir, out, ratios=["1_1"])
    trt = import_polygraphy_trt("tensorrt_rtx").trt
    newer = ".".join(str(int(part) + 1) if i == 1 else part for i, part in enumerate(trt.__version__.split(".")))
    monkeypatch.setattr(trt, "__version__", newer)

    manifest, status, _ = build("static", spec, tiny_onnx_dir, out, ratios=["1_1"])

    assert status == dict.fromkeys(static_paths(["1_1"]), "built")
    assert {e["backend_version"] for e in manifest["engines"]} == {newer}


def test_other_ratios_already_built_stay_listed(tiny_onnx_dir, tmp_path):
    spec, out = write_static_spec(tmp_path), tmp_path / "out"
    build("static", spec, tiny_onnx_dir, out, ratios=["16_9"])
    manifest, status, _ = build("static", spec, tiny_onnx_dir, out, ratios=["1_1"])
    assert status == dict.fromkeys(static_paths(["1_1"]), "built")
    assert sorted(e["path"] for e in manifest["engines"]) == sorted(static_paths())


def test_out_folder_of_the_other_kind_is_refused(tiny_onnx_dir, tmp_path):
    out = tmp_path / "out"
    build("static", write_static_spec(tmp_path), tiny_onnx_dir, out, ratios=["1_1"])
    with pytest.raises(UserInputError, match="already holds a static build; pass another --out"):
        build("multiprofile", write_multi_spec(tmp_path), tiny_onnx_dir, out)


def test_corrupt_manifest_is_a_user_error(tiny_onnx_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(UserInputError, match="manifest.json is not valid JSON .*delete it to rebuild everything"):
        build("static", write_static_spec(tmp_path), tiny_onnx_dir, out)


# --- interrupted builds --------------------------------------------------------------------------


def _fail_second_engine_bytes(monkeypatch, seen):
    """Polygraphy's engine-bytes step works once, then is interrupted (Ctrl-C)."""
    from vaebuild.backends.trt_import import import_polygraphy_trt

    loaders = import_polygraphy_trt("tensorrt_rtx").loaders
    real = loaders.engine_bytes_from_network

    def engine_bytes(*args, **kwargs):
        seen.append("call")
        if len(seen) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loaders, "engine_bytes_from_network", engine_bytes)
    return KeyboardInterrupt


def _fail_second_engine_write(monkeypatch, seen):
    """The second engine's file write stops half-way (disk full), leaving a partial temp file."""
    import builtins

    import vaebuild.backends.tensorrt as engine_build

    class HalfWriter:
        def __init__(self, path, mode):
            self.file = builtins.open(path, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            data = memoryview(data)  # IHostMemory is a buffer
            self.file.write(data[: len(data) // 2])
            self.file.flush()
            assert Path(self.file.name).stat().st_size > 0
            raise RuntimeError("No space left on device")

    def fake_open(path, mode="r", *args, **kwargs):
        if mode != "wb":
            return builtins.open(path, mode, *args, **kwargs)
        seen.append(str(path))
        if len(seen) == 2:
            return HalfWriter(path, mode)
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(engine_build, "open", fake_open, raising=False)
    return RuntimeError


@pytest.mark.parametrize("fail", [_fail_second_engine_bytes, _fail_second_engine_write], ids=["ctrl-c", "write-error"])
def test_interrupted_build_keeps_finished_engines_and_resumes(tiny_onnx_dir, tmp_path, monkeypatch, fail):
    spec, out = write_static_spec(tmp_path), tmp_path / "out"
    seen = []
    raised = fail(monkeypatch, seen)

    with pytest.raises(raised):
        build("static", spec, tiny_onnx_dir, out, ratios=["1_1"])

    assert len(seen) == 2
    assert files_under(out) == sorted(["1_1/vae_encoder.trt", MANIFEST_NAME])  # no temp or half-written file
    manifest = read_manifest_file(out)
    assert [e["path"] for e in manifest["engines"]] == ["1_1/vae_encoder.trt"]
    check_entry_matches_files(manifest["engines"][0], out, tiny_onnx_dir)
    first_stamp = stamps(out, ["1_1/vae_encoder.trt"])

    monkeypatch.undo()
    manifest, status, _ = build("static", spec, tiny_onnx_dir, out, ratios=["1_1"])

    assert status == {"1_1/vae_encoder.trt": "skipped", "1_1/vae_decoder.trt": "built"}
    assert stamps(out, ["1_1/vae_encoder.trt"]) == first_stamp
    assert files_under(out) == sorted(static_paths(["1_1"]) + [MANIFEST_NAME])
    assert [e["path"] for e in manifest["engines"]] == static_paths(["1_1"])


# --- command line --------------------------------------------------------------------------------

runner = CliRunner()


def invoke(*args, allow_non_fp16=True):
    """Run the CLI; builds get --allow-non-fp16 unless told not to (the tiny test export is fp32)."""
    flag = ["--allow-non-fp16"] if allow_non_fp16 and args[0] in ("static", "multiprofile") else []
    return runner.invoke(app, [str(a) for a in args] + flag)


def error_line(result):
    """The one stderr line of a failed command (no traceback)."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_cli_static_builds_and_reports_each_engine(tiny_onnx_dir, tmp_path):
    out, spec = tmp_path / "out", write_static_spec(tmp_path)
    args = (
        "static", "--onnx", tiny_onnx_dir, "--spec", spec, "--ratios", "1_1", "--backend", "tensorrt_rtx", "--out", out,
    )

    result = invoke(*args)

    assert result.exit_code == 0, result.output
    assert "[1/2] 1_1/vae_encoder.trt: building 1 profile(s) with tensorrt_rtx ..." in result.stdout
    assert "[1/2] 1_1/vae_encoder.trt: built in " in result.stdout
    assert "[2/2] 1_1/vae_decoder.trt: built in " in result.stdout
    assert f"2 engine(s) in {out}; manifest: {out}/manifest.json" in result.stdout
    assert files_under(out) == sorted(static_paths(["1_1"]) + [MANIFEST_NAME])

    again = invoke(*args)

    assert again.exit_code == 0, again.output
    assert "[1/2] 1_1/vae_encoder.trt: up to date, skipped" in again.stdout
    assert "[2/2] 1_1/vae_decoder.trt: up to date, skipped" in again.stdout


def test_cli_multiprofile_ratios_keep_spec_order(tiny_onnx_dir, tmp_path):
    out = tmp_path / "out"
    result = invoke(
        "multiprofile", "--onnx", tiny_onnx_dir, "--spec", write_multi_spec(tmp_path), "--ratios", "tall,square",
        "--backend", "tensorrt_rtx", "--out", out,
    )
    assert result.exit_code == 0, result.output
    assert "[1/2] vae_encoder_multi_profile.trt: building 2 profile(s) with tensorrt_rtx ..." in result.stdout
    assert files_under(out) == sorted(MULTI_PATHS + [MANIFEST_NAME])
    for entry in read_manifest_file(out)["engines"]:
        assert [p["name"] for p in entry["profiles"]] == ["square", "tall"]  # profile index = spec order


def test_cli_unknown_ratio_names_the_known_ones(tiny_onnx_dir, tmp_path):
    result = invoke(
        "static", "--onnx", tiny_onnx_dir, "--spec", write_static_spec(tmp_path), "--ratios", "5_4",
        "--backend", "tensorrt_rtx", "--out", tmp_path / "out",
    )
    assert result.exit_code == 2
    assert "unknown ratio '5_4'" in error_line(result) and error_line(result).endswith("known: 16_9, 1_1")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("source", ["onnx", "model"])
def test_cli_multiprofile_spec_given_to_static(tiny_onnx_dir, tiny_vae_dir, tmp_path, source):
    spec = write_multi_spec(tmp_path)
    source_args = ("--onnx", tiny_onnx_dir) if source == "onnx" else ("--model", tiny_vae_dir, "--precision", "fp32")
    result = invoke("static", *source_args, "--spec", spec, "--backend", "tensorrt_rtx", "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert f"use `vaebuild multiprofile --spec {spec}`" in error_line(result)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model_args", [("--random-init",), ("--model", "some/folder")], ids=["random-init", "model"])
def test_cli_onnx_and_model_options_conflict(tiny_onnx_dir, tmp_path, model_args):
    result = invoke(
        "static", "--onnx", tiny_onnx_dir, *model_args, "--spec", write_static_spec(tmp_path),
        "--backend", "tensorrt_rtx", "--out", tmp_path / "out",
    )
    assert result.exit_code == 2
    assert "pass either --onnx or the model options" in error_line(result)
    assert not (tmp_path / "out").exists()


def test_cli_onnx_folder_without_record(tiny_onnx_dir, tmp_path):
    folder = tmp_path / "bare_onnx"
    folder.mkdir()
    shutil.copy(tiny_onnx_dir / "vae_encoder.onnx", folder)
    shutil.copy(tiny_onnx_dir / "vae_decoder.onnx", folder)
    result = invoke(
        "static", "--onnx", folder, "--spec", write_static_spec(tmp_path), "--backend", "tensorrt_rtx",
        "--out", tmp_path / "out",
    )
    assert result.exit_code == 2
    assert f"{folder} has no export_record.json" in error_line(result)


def test_cli_missing_full_tensorrt_exits_3(tiny_onnx_dir, tmp_path):
    out = tmp_path / "out"
    result = invoke(
        "static", "--onnx", tiny_onnx_dir, "--spec", write_static_spec(tmp_path), "--backend", "tensorrt", "--out", out,
    )
    assert result.exit_code == 3
    assert "pip install tensorrt" in error_line(result)
    assert not out.exists()


def test_cli_missing_backend_fails_before_exporting(tiny_vae_dir, tmp_path):
    """A missing backend is reported at once, not after a (minutes-long, for the real VAE) export."""
    out = tmp_path / "out"
    result = invoke(
        "static", "--model", tiny_vae_dir, "--precision", "fp32", "--spec", write_static_spec(tmp_path),
        "--backend", "tensorrt", "--out", out,
    )
    assert result.exit_code == 3
    assert "pip install tensorrt" in error_line(result)
    assert not out.exists()


def test_cli_timing_cache_is_refused_for_rtx(tiny_onnx_dir, tmp_path):
    result = invoke(
        "static", "--onnx", tiny_onnx_dir, "--spec", write_static_spec(tmp_path), "--backend", "tensorrt_rtx",
        "--timing-cache", tmp_path / "cache.bin", "--out", tmp_path / "out",
    )
    assert result.exit_code == 2
    assert "timing_cache works with the tensorrt backend only" in error_line(result)
    assert not (tmp_path / "cache.bin").exists()


def test_cli_compute_capability_9_0_is_refused(tiny_onnx_dir, tmp_path):
    out = tmp_path / "out"
    result = invoke(
        "static", "--onnx", tiny_onnx_dir, "--spec", write_static_spec(tmp_path), "--ratios", "1_1",
        "--backend", "tensorrt_rtx", "--compute-capability", "9.0", "--out", out,
    )
    assert result.exit_code == 2
    assert "compute capability 9.0 is not a TensorRT-RTX" in error_line(result)
    assert not out.exists()


def test_cli_compute_capability_is_recorded(tiny_onnx_dir, tmp_path):
    out = tmp_path / "out"
    result = invoke(
        "static", "--onnx", tiny_onnx_dir, "--spec", write_static_spec(tmp_path), "--ratios", "1_1",
        "--backend", "tensorrt_rtx", "--compute-capability", "8.6", "--out", out,
    )
    assert result.exit_code == 0, result.output
    assert read_manifest_file(out)["build_options"]["compute_capabilities"] == [[8, 6]]
    assert engine_files(out) == sorted(static_paths(["1_1"]))


def test_cli_model_options_export_then_skip(tiny_vae, tiny_vae_dir, tmp_path):
    from vaebuild.model.source import weights_sha256

    out, spec = tmp_path / "out", write_static_spec(tmp_path)
    args = (
        "static", "--model", tiny_vae_dir, "--precision", "fp32", "--spec", spec, "--ratios", "1_1",
        "--backend", "tensorrt_rtx", "--out", out,
    )

    result = invoke(*args)

    assert result.exit_code == 0, result.output
    assert files_under(out / "onnx") == ["export_record.json", "vae_decoder.onnx", "vae_encoder.onnx"]
    assert engine_files(out) == ["1_1/vae_decoder.trt", "1_1/vae_encoder.trt"]
    manifest = read_manifest_file(out)
    assert manifest["weights_sha256"] == weights_sha256(tiny_vae)
    assert manifest["onnx_dir"] == str((out / "onnx").resolve())
    for entry in manifest["engines"]:
        check_entry_matches_files(entry, out, out / "onnx")

    again = invoke(*args)

    assert again.exit_code == 0, again.output
    assert f"ONNX in {out / 'onnx'} is up to date, export skipped" in again.stdout
    assert "tracing" not in again.stdout
    assert "[1/2] 1_1/vae_encoder.trt: up to date, skipped" in again.stdout
    assert "[2/2] 1_1/vae_decoder.trt: up to date, skipped" in again.stdout


# --- the shipped specs, for the tiny model -------------------------------------------------------


def test_shipped_multiprofile_spec_for_the_tiny_model(tiny_onnx_dir, tmp_path):
    shipped = load_spec(Path(__file__).resolve().parents[1] / "vaebuild" / "builder" / "profiles" / "i2i_multiprofile.yaml")
    out = tmp_path / "out"

    result = invoke("multiprofile", "--onnx", tiny_onnx_dir, "--backend", "tensorrt_rtx", "--out", out)

    assert result.exit_code == 0, result.output
    assert files_under(out) == sorted(MULTI_PATHS + [MANIFEST_NAME])
    for entry in read_manifest_file(out)["engines"]:
        assert len(entry["profiles"]) == 9
        assert [p["name"] for p in entry["profiles"]] == list(shipped.names)
        for built, profile in zip(entry["profiles"], shipped.profiles):
            opt = (profile.opt.height, profile.opt.width)
            assert built["input"] == expected_shapes(entry["graph"], (64, 64), opt, (1920, 1920))
        check_entry_matches_files(entry, out, tiny_onnx_dir)


def test_shipped_static_spec_for_the_tiny_model(tiny_onnx_dir, tmp_path):
    out = tmp_path / "out"

    result = invoke("static", "--onnx", tiny_onnx_dir, "--ratios", "1_1", "--backend", "tensorrt_rtx", "--out", out)

    assert result.exit_code == 0, result.output
    assert "rounding: floor16 builds 1136" in result.stderr  # the shipped 4_3 entry, warned on every load
    assert files_under(out) == sorted(static_paths(["1_1"]) + [MANIFEST_NAME])
    for entry in read_manifest_file(out)["engines"]:
        assert entry["profiles"][0]["input"] == expected_shapes(entry["graph"], *[(1328, 1328)] * 3)
        check_entry_matches_files(entry, out, tiny_onnx_dir)


# --- LightX2V's fp16 contract, CI summaries, shipped spec names ------------------------------------


def test_cli_non_fp16_tensorrt_build_is_refused_unless_allowed(tiny_onnx_dir, tmp_path):
    out = tmp_path / "out"
    args = ("static", "--onnx", tiny_onnx_dir, "--spec", write_static_spec(tmp_path), "--ratios", "1_1",
            "--backend", "tensorrt_rtx", "--out", out)

    refused = invoke(*args, allow_non_fp16=False)

    assert refused.exit_code == 2
    assert error_line(refused) == (
        "error: fp32 TensorRT engines would be read wrongly by LightX2V (its loader feeds and reads fp16);"
        " export with --precision fp16, or pass --allow-non-fp16 for a folder only vaebuild's runtime reads"
    )
    assert not out.exists()

    allowed = invoke(*args)

    assert allowed.exit_code == 0, allowed.output
    assert read_manifest_file(out)["runtime_contract"] == "vaebuild"


def test_cli_non_fp16_export_is_refused_before_exporting(tiny_vae_dir, tmp_path):
    out = tmp_path / "out"
    result = invoke("static", "--model", tiny_vae_dir, "--precision", "bf16", "--spec", write_static_spec(tmp_path),
                    "--backend", "tensorrt_rtx", "--out", out, allow_non_fp16=False)
    assert result.exit_code == 2
    assert "error: bf16 TensorRT engines would be read wrongly by LightX2V" in error_line(result)
    assert not out.exists()


def test_cli_json_summary_lists_built_then_skipped(tiny_onnx_dir, tmp_path):
    out, summary_path = tmp_path / "out", tmp_path / "ci" / "summary.json"
    args = ("static", "--onnx", tiny_onnx_dir, "--spec", write_static_spec(tmp_path), "--ratios", "1_1",
            "--backend", "tensorrt_rtx", "--out", out, "--json", summary_path)

    assert invoke(*args).exit_code == 0
    first = json.loads(summary_path.read_text())
    assert invoke(*args).exit_code == 0
    second = json.loads(summary_path.read_text())

    assert first["command"] == "static" and first["folder"] == str(out) and first["ok"] is True
    assert first["error"] is None and first["seconds"] > 0
    assert first["counts"] == {"built": 2, "skipped": 0, "failed": 0}
    assert [item["path"] for item in first["built"]] == static_paths(["1_1"])
    assert all(item["seconds"] > 0 and item["size_bytes"] > 0 for item in first["built"])
    assert first["details"] == {
        "manifest": str(out / MANIFEST_NAME), "runtime_contract": "vaebuild", "spec": str(tmp_path / "static.yaml"),
        "backend": "tensorrt_rtx",
    }
    assert second["counts"] == {"built": 0, "skipped": 2, "failed": 0}
    assert second["skipped"] == [{"path": path} for path in static_paths(["1_1"])]


def test_cli_json_summary_of_a_failed_build(tiny_onnx_dir, tmp_path, monkeypatch):
    import vaebuild.backends.tensorrt

    def fail(*args):
        raise UserInputError("builder exploded; try again")

    monkeypatch.setattr(vaebuild.backends.tensorrt.TensorRTBackend, "build_engine", fail)
    summary_path = tmp_path / "summary.json"
    result = invoke("static", "--onnx", tiny_onnx_dir, "--spec", write_static_spec(tmp_path), "--ratios", "1_1",
                    "--backend", "tensorrt_rtx", "--out", tmp_path / "out", "--json", summary_path)

    assert result.exit_code == 2
    summary = json.loads(summary_path.read_text())
    assert summary["ok"] is False and summary["error"] == "builder exploded; try again"
    assert summary["failed"] == [{"path": "1_1/vae_encoder.trt", "error": "builder exploded; try again"}]
    assert summary["counts"] == {"built": 0, "skipped": 0, "failed": 1}


def test_cli_spec_by_shipped_name(tiny_onnx_dir, tmp_path):
    out = tmp_path / "out"
    result = invoke("static", "--onnx", tiny_onnx_dir, "--spec", "t2i_static_lightx2v_main", "--ratios", "3_2",
                    "--backend", "tensorrt_rtx", "--out", out)
    assert result.exit_code == 0, result.output
    manifest = read_manifest_file(out)
    assert Path(manifest["spec"]["path"]).name == "t2i_static_lightx2v_main.yaml"
    assert manifest["engines"][0]["profiles"][0]["image"]["opt"] == [1584, 1056]


def test_cli_unknown_spec_name_lists_the_shipped_ones(tiny_onnx_dir, tmp_path):
    result = invoke("static", "--onnx", tiny_onnx_dir, "--spec", "t2i_statc", "--out", tmp_path / "out")
    assert result.exit_code == 2
    line = error_line(result)
    assert line.startswith("error: t2i_statc: no such spec file or shipped spec; pass a YAML path or one of: ")
    assert "i2i_multiprofile" in line and "t2i_static, " in line and "t2i_static_lightx2v_main" in line
