"""`vaebuild bench`: sizes, a real CPU run of the tiny model, engine rows, the tables, and the CLI."""

import json
import statistics

import pytest
import typer
from typer.testing import CliRunner

from test_runtime import FakeRunners, build_fake_engine_dir
from vaebuild.bench import BenchOptions, BenchSize, default_sizes, parse_sizes, render_markdown, run_bench
from vaebuild.cli.bench import bench
from vaebuild.errors import UserInputError

ROW_KEYS = {
    "size", "name", "height", "width", "graph", "row", "kind", "status", "reason", "median_ms", "p90_ms", "min_ms",
    "times_ms", "speedup_vs_3d", "flop", "tflop", "peak_mem_mib", "load_seconds",
}
TOP_KEYS = {
    "benchmark", "vaebuild_version", "timestamp_utc", "command", "device", "versions", "precision", "batch", "warmup",
    "runs", "timer", "cudnn_benchmark", "model", "engines", "sizes", "rows", "total_seconds",
}
SIZE = BenchSize("wide", 32, 48)  # the fake static build has engines for exactly this size


def cpu_options(**overrides):
    return BenchOptions(**{"sizes": (SIZE,), "device": "cpu", "warmup": 0, "runs": 2, **overrides})


def test_default_sizes_are_the_t2i_and_i2i_specs():
    sizes = default_sizes()
    assert len(sizes) == 14
    assert [s.label for s in sizes[:5]] == ["1664x928", "928x1664", "1328x1328", "1472x1136", "768x1024"]
    assert sizes[5].label == "512x512" and sizes[-1].label == "1616x1088"
    assert all(s.height % 16 == 0 and s.width % 16 == 0 for s in sizes)


def test_parse_sizes_reads_width_x_height():
    assert parse_sizes("1328x1328, 1664x928") == (
        BenchSize("1328x1328", 1328, 1328), BenchSize("1664x928", 928, 1664),
    )


@pytest.mark.parametrize("text", ["1328", "1328x", "axb", "1330x1328", "8x8", ","])
def test_parse_sizes_rejects_bad_entries(text):
    with pytest.raises(UserInputError, match="--sizes"):
        parse_sizes(text)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"runs": 0}, "--runs 0"), ({"warmup": -1}, "--warmup -1"), ({"device": "tpu"}, "--device"),
     ({"precision": "int8"}, "unknown precision"), ({"sizes": ()}, "no sizes"),
     ({"cuda_graphs": True}, "--cuda-graphs times engine folders")],
)
def test_bad_options_are_user_errors(kwargs, message):
    with pytest.raises(UserInputError, match=message):
        cpu_options(**kwargs)


def test_cpu_defaults():
    device, precision, warmup, runs = BenchOptions(sizes=(SIZE,), device="cpu").resolve()
    assert (device.type, precision, warmup, runs) == ("cpu", "fp32", 1, 3)


@pytest.fixture(scope="module")
def engine_dir(tiny_vae, tmp_path_factory):
    return build_fake_engine_dir(tmp_path_factory.mktemp("bench_engines"), tiny_vae, "static")


@pytest.fixture(scope="module")
def cpu_result(tiny_vae, engine_dir):
    """One real CPU run: 3-D and 2-D rows measured, engine rows refused by the real runtime check (no GPU)."""
    return run_bench(tiny_vae, {"kind": "test"}, cpu_options(engines=engine_dir), log=lambda *a: None)


def test_cpu_run_has_every_row_and_key(cpu_result):
    assert set(cpu_result) == TOP_KEYS
    assert cpu_result["device"]["type"] == "cpu" and cpu_result["timer"] == "perf_counter (CPU)"
    assert cpu_result["precision"] == "fp32" and cpu_result["runs"] == 2
    rows = cpu_result["rows"]
    assert [(r["graph"], r["kind"]) for r in rows] == [
        ("decoder", "pytorch-3d"), ("decoder", "pytorch-2d"), ("decoder", "engine"),
        ("encoder", "pytorch-3d"), ("encoder", "pytorch-2d"), ("encoder", "engine"),
    ]
    for row in rows:
        assert set(row) >= ROW_KEYS
        assert row["size"] == "48x32"
    json.dumps(cpu_result)  # JSON-ready as is


def test_speedup_comes_from_the_same_run(cpu_result):
    rows = {(r["graph"], r["kind"]): r for r in cpu_result["rows"]}
    for graph in ("encoder", "decoder"):
        base, fast = rows[(graph, "pytorch-3d")], rows[(graph, "pytorch-2d")]
        assert len(base["times_ms"]) == 2 and base["median_ms"] == pytest.approx(statistics.median(base["times_ms"]),
                                                                                  abs=1e-3)
        assert fast["speedup_vs_3d"] == pytest.approx(base["median_ms"] / fast["median_ms"], rel=1e-2)
        assert base["flop"] > fast["flop"] > 0  # the 2-D fold does less work


def test_engine_rows_say_why_they_did_not_run(cpu_result):
    engine_rows = [r for r in cpu_result["rows"] if r["kind"] == "engine"]
    assert {r["status"] for r in engine_rows} == {"not run"}
    assert all("no CUDA GPU on this machine" in r["reason"] or "not importable" in r["reason"] for r in engine_rows)
    assert cpu_result["engines"][0]["kind"] == "static" and cpu_result["engines"][0]["weights_match"] is True


def test_markdown_has_the_seed_guide_columns_and_marks_cpu(cpu_result):
    text = render_markdown(cpu_result)
    assert "**CPU run**" in text
    header = "| size WxH | decoder TFLOP 3-D / 2-D | decoder ms 3-D / 2-D / engine | decoder speedup 2-D / engine |"
    assert header in text
    assert "| 48x32 |" in text
    assert "Not run (shown as -):" in text and "### All rows" in text
    assert "### All rows" not in render_markdown(cpu_result, details=False)


def test_engine_rows_run_through_the_runtime(tiny_vae, engine_dir):
    runners = FakeRunners(tiny_vae, engine_dir)
    result = run_bench(
        tiny_vae, {"kind": "test"}, cpu_options(engines=engine_dir, flops=False), log=lambda *a: None,
        runner_factory=runners, unavailable_reason=lambda backend: None,
    )
    engine_rows = {r["graph"]: r for r in result["rows"] if r["kind"] == "engine"}
    assert {r["status"] for r in engine_rows.values()} == {"ok"}
    assert engine_rows["decoder"]["engine"] == "wide/vae_decoder.trt"
    assert engine_rows["decoder"]["load_seconds"] is not None and engine_rows["decoder"]["speedup_vs_3d"] > 0
    assert len(engine_rows["encoder"]["times_ms"]) == 2
    # The first call loads the engine; after it, 2 timed calls (warm-up 0): 3 inferences per graph.
    assert len([e for e in runners.events if e[0] == "infer" and "decoder" in e[1]]) == 3
    assert runners.events[-1][0] == "release"  # engines are released at the end


def test_engine_folder_without_manifest_is_a_row_reason(tiny_vae, tmp_path):
    result = run_bench(tiny_vae, {"kind": "test"}, cpu_options(engines=tmp_path, flops=False), log=lambda *a: None)
    engine_rows = [r for r in result["rows"] if r["kind"] == "engine"]
    assert engine_rows and all("has no manifest.json" in r["reason"] for r in engine_rows)


def _cli():
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(bench)
    return app


def test_cli_writes_json_and_markdown(tiny_vae_dir, tmp_path):
    json_path, md_path = tmp_path / "results" / "cpu.json", tmp_path / "results" / "cpu.md"
    result = CliRunner().invoke(
        _cli(),
        ["--model", str(tiny_vae_dir), "--sizes", "48x32", "--device", "cpu", "--runs", "1", "--warmup", "0",
         "--no-flops", "--json", str(json_path), "--markdown", str(md_path)],
    )
    assert result.exit_code == 0, result.output
    assert "| 48x32 |" in result.stdout
    data = json.loads(json_path.read_text())
    assert data["model"]["kind"] == "vae-folder" and len(data["rows"]) == 4
    assert data["rows"][0]["tflop"] is None
    assert "### All rows" in md_path.read_text()


def test_cli_bad_size_is_one_line_exit_2():
    result = CliRunner().invoke(_cli(), ["--random-init", "--sizes", "30x30"])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error: --sizes entry '30x30'")


@pytest.mark.parametrize("flag, expected", [([], True), (["--no-load-probe"], False)])
def test_cli_load_probe_flag_reaches_the_options(tiny_vae_dir, monkeypatch, flag, expected):
    import vaebuild.bench

    seen = {}

    def fake_run_bench(vae, model, options, **kwargs):
        seen["fresh_process_loads"] = options.fresh_process_loads
        raise SystemExit(0)

    monkeypatch.setattr(vaebuild.bench, "run_bench", fake_run_bench)
    result = CliRunner().invoke(_cli(), ["--model", str(tiny_vae_dir), "--sizes", "48x32", "--device", "cpu", *flag])
    assert result.exit_code == 0, result.output
    assert seen == {"fresh_process_loads": expected}
