"""`vaebuild verify` and `vaebuild bench` on a folder built with `--tile`, `verify --sizes`, and
benchmarks/packages/tiles_bench.py on the CPU.

One CPU inductor folder (built once per module, a few minutes): a multi-profile pair (32x32..128x128) plus the four
tile packages of test_tiling's small non-default VAE and tile, from a saved VAE folder (so verify re-loads the
reference from the manifest).
"""

import importlib.util
import json
import re
from pathlib import Path

import pytest
import typer
from conftest import make_tiny_vae
from test_tiling import CONFIG, TILE
from typer.testing import CliRunner

from vaebuild.bench import BenchOptions, BenchSize, parse_sizes, render_markdown, run_bench
from vaebuild.errors import UserInputError
from vaebuild.runtime.engines import EngineUnavailableError
from vaebuild.verify import FAIL, PASS, VerifyOptions, format_table, verify_build

SPEC = """kind: multiprofile
max_side: 256
profiles:
  - name: "small"
    min: {height: 32, width: 32}
    opt: {height: 64, width: 64}
    max: {height: 128, width: 128}
    batch: {min: 1, opt: 1, max: 1}
"""
DECODER_TILES = "tiles/vae_decoder_head.pt2,tiles/vae_decoder_tail.pt2"
ENCODER_TILES = "tiles/vae_encoder_down.pt2,tiles/vae_encoder_rest.pt2"
ROOT = Path(__file__).resolve().parents[1]
METHOD = {"decoder": "decode", "encoder": "encode"}


def quiet(*args, **kwargs):
    pass


@pytest.fixture(scope="module")
def vae():
    return make_tiny_vae(**CONFIG)


@pytest.fixture(scope="module")
def folder(vae, tmp_path_factory):
    from vaebuild.backends.base import BuildOptions
    from vaebuild.builder.engines import build_engines, model_for_build
    from vaebuild.builder.specs import load_spec
    from vaebuild.model.source import ModelSource

    root = tmp_path_factory.mktemp("verify_tiles")
    vae.save_pretrained(root / "vae")
    (root / "spec.yaml").write_text(SPEC)
    source = model_for_build(ModelSource(model=str(root / "vae")), "fp32", log=quiet)
    build_engines("multiprofile", load_spec(root / "spec.yaml"), source, root / "out",
                  BuildOptions(backend="inductor", device="cpu", jobs=2), log=quiet, tile=TILE)
    return root / "out"


def rows_of(report, runner=None, graph=None):
    return [r for r in report.rows if (runner is None or r.runner == runner) and (graph is None or r.graph == graph)]


# ---------------------------------------------------------------------- verify


def test_tiled_rows_pass_against_pytorch_and_the_untiled_engine(folder):
    report = verify_build(folder, VerifyOptions(device="cpu"), log=quiet)

    whole = rows_of(report, "inductor")
    assert {r.engine for r in whole} == {"vae_encoder_multi_profile.pt2", "vae_decoder_multi_profile.pt2"}
    assert not any(r.engine.startswith("tiles/") for r in whole)  # tile engines get no rows of their own
    images = [(32, 32), (64, 64), (128, 128)]
    for graph, engine in (("decoder", DECODER_TILES), ("encoder", ENCODER_TILES)):
        tiled = rows_of(report, "inductor tiled", graph)
        untiled = rows_of(report, "inductor tiled vs untiled", graph)
        assert [r.image for r in tiled] == [r.image for r in untiled] == images
        assert {(r.engine, r.profile, r.levels) for r in tiled + untiled} == {(engine, "tile 48x64", "size")}
        assert all(r.status == PASS and r.max_abs <= 1e-5 for r in tiled + untiled), tiled + untiled
    assert report.passed and len(report.rows) == 6 + 12
    assert sum(e["path"].startswith("tiles/") and e["check"] is None for e in report.engines) == 4
    assert "inductor tiled vs untiled" in format_table(report)


def test_sizes_add_rows_on_the_serving_profile_and_tiled_rows(folder):
    sizes = parse_sizes("96x48,136x32")  # WxH; 136x32 is past the multi-profile engine's 128x128
    report = verify_build(folder, VerifyOptions(device="cpu", sizes=sizes), log=quiet)

    extra = [(r.graph, r.image, r.profile, r.levels) for r in rows_of(report, "inductor") if r.levels == "size"]
    assert extra == [("encoder", (48, 96), "small", "size"), ("decoder", (48, 96), "small", "size")]
    assert rows_of(report, "inductor", "decoder")[-1].shape == (1, 4, 1, 6, 12)
    for graph in ("decoder", "encoder"):
        assert [r.image for r in rows_of(report, "inductor tiled", graph)][-2:] == [(48, 96), (32, 136)]
        assert [r.image for r in rows_of(report, "inductor tiled vs untiled", graph)][-1] == (48, 96)
    assert report.passed, [r for r in report.rows if r.status != PASS]


def test_a_size_no_engine_serves_is_one_line_naming_the_ranges(folder):
    # 8200 a side: past the whole-latent tile packages' 8192 (TILE_MAX_SIDE)
    with pytest.raises(UserInputError) as caught:
        verify_build(folder, VerifyOptions(device="cpu", sizes=parse_sizes("8200x256")), log=quiet)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("--sizes 8200x256: no encoder engine in")
    assert "vae_encoder_multi_profile.pt2 32x32..128x128, tiles 16x16..8192x8192" in message


def test_broken_tiles_fail_their_rows(folder, monkeypatch):
    """A halo too small (the runtime's placement, monkeypatched) changes the tiled output: those rows fail."""
    import vaebuild.runtime.tiling as runtime_tiling

    decoder_tiles, encoder_tiles = runtime_tiling.decoder_tiles, runtime_tiling.encoder_tiles
    monkeypatch.setattr(runtime_tiling, "decoder_tiles", lambda hw, tile, halo, scale=8: decoder_tiles(hw, tile, 1, scale))
    monkeypatch.setattr(runtime_tiling, "encoder_tiles", lambda hw, tile, halo, scale=8: encoder_tiles(hw, tile, 8, scale))
    report = verify_build(folder, VerifyOptions(device="cpu", sizes=parse_sizes("136x32")), log=quiet)

    failed = {(r.graph, r.runner, r.image) for r in report.rows if r.status == FAIL}
    for graph in ("decoder", "encoder"):  # images of one tile are unaffected: 32x32 passes
        assert {(graph, "inductor tiled", (128, 128)), (graph, "inductor tiled vs untiled", (128, 128)),
                (graph, "inductor tiled", (32, 136))} <= failed
    assert all(r.status == PASS for r in rows_of(report, "inductor"))
    assert all(r.reason.startswith("max abs") for r in report.rows if r.status == FAIL)
    assert not report.passed


def test_cli_sizes(folder):
    from vaebuild.cli.verify import verify

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.callback()(lambda: None)
    app.command(name="verify")(verify)
    runner = CliRunner()
    bad = runner.invoke(app, ["verify", str(folder), "--device", "cpu", "--sizes", "8200x512"])
    assert bad.exit_code == 2 and bad.stderr.strip().startswith("error: --sizes 8200x512: no encoder engine")
    assert len(bad.stderr.strip().splitlines()) == 1
    malformed = runner.invoke(app, ["verify", str(folder), "--device", "cpu", "--sizes", "100x100"])
    assert malformed.exit_code == 2 and "--sizes entry '100x100'" in malformed.stderr


# ---------------------------------------------------------------------- bench


def test_bench_has_tiled_rows_also_where_no_whole_image_engine_serves(vae, folder):
    sizes = (BenchSize("a", 64, 64), BenchSize("b", 32, 136))
    options = BenchOptions(sizes=sizes, device="cpu", runs=1, warmup=0, engines=folder, flops=False,
                           fresh_process_loads=False)
    result = run_bench(vae, {"kind": "test"}, options, log=quiet)

    engine_rows = {(r["size"], r["graph"], r["folder"]): r for r in result["rows"] if r["kind"] == "engine"}
    assert [e["tiled"] for e in result["engines"]] == [False, True]
    for graph, tiles in (("decoder", DECODER_TILES), ("encoder", ENCODER_TILES)):
        assert engine_rows["64x64", graph, 0]["status"] == "ok"
        assert engine_rows["136x32", graph, 0]["status"] == "not run"
        for size in ("64x64", "136x32"):
            row = engine_rows[size, graph, 1]
            assert row["status"] == "ok" and row["engine"] == tiles and row["row"].startswith(f"engine {folder.name} tiled")
            assert "peak_mem_mib" in row  # measured on CUDA only
        assert engine_rows["64x64", graph, 1]["load_seconds"] is not None
    text = render_markdown(result)
    assert "decoder ms 3-D / 2-D / E1 / E2" in text
    assert "every size through its exact tiles of 48x64 (HxW; tiling=True)" in text


# ---------------------------------------------------------------------- tiling="auto" after out of memory


@pytest.mark.parametrize("graph", ["decoder", "encoder"])
def test_auto_runs_a_whole_image_call_that_ran_out_of_memory_through_tiles(folder, graph, monkeypatch):
    import torch

    from vaebuild.runtime import VaeRuntime

    runtime = VaeRuntime(folder, device="cpu", allow_fallback=False)
    x = torch.randn(1, runtime.z_dim, 1, 10, 12) if graph == "decoder" else torch.rand(1, 3, 1, 80, 96) * 2 - 1
    tiled = getattr(VaeRuntime(folder, device="cpu", allow_fallback=False, tiling=True), METHOD[graph])(x)
    untiled = getattr(runtime, METHOD[graph])(x)
    whole = runtime.last_route[graph].engine
    assert runtime.last_route[graph].kind == "engine" and not whole.startswith("tiles/")
    real_infer = runtime._infer

    def infer(runner, entry, feed, profile=None):
        if entry.rel_path == whole and out_of_memory:
            out_of_memory.pop()
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_infer(runner, entry, feed, profile)

    out_of_memory = [True]
    monkeypatch.setattr(runtime, "_infer", infer)
    assert torch.equal(getattr(runtime, METHOD[graph])(x), tiled)
    assert runtime.last_route[graph].kind == "tiles" and whole in runtime.resident_engines
    assert torch.equal(getattr(runtime, METHOD[graph])(x), untiled)  # the next call: the whole-image engine again
    assert runtime.last_route[graph].engine == whole

    never = VaeRuntime(folder, device="cpu", allow_fallback=False, tiling=False)
    monkeypatch.setattr(never, "_infer", infer)
    out_of_memory.append(True)
    with pytest.raises(EngineUnavailableError, match="ran out of memory"):
        getattr(never, METHOD[graph])(x)


# ---------------------------------------------------------------------- benchmarks/packages/tiles_bench.py


def test_tiles_bench_runs_on_the_cpu(folder, tmp_path):
    spec = importlib.util.spec_from_file_location("tiles_bench", ROOT / "benchmarks/packages/tiles_bench.py")
    tiles_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiles_bench)
    out = tmp_path / "results"
    record = tiles_bench.main([
        "--engines", str(folder), "--out", str(out), "--device", "cpu", "--sizes", "64x64,8200x64",
        "--tiles", "48x64,32x32", "--diffusers-sizes", "64x64", "--diffusers-tile", "32", "--runs", "1",
        "--warmup", "0", "--diffusers-runs", "1",
    ])
    rows = {(r["size"], r["graph"], r["mode"], r.get("tile")): r for r in record["rows"]}
    for graph in ("decoder", "encoder"):
        assert rows["64x64", graph, "untiled", None]["median_ms"] > 0
        for tile in ("48x64", "32x32"):
            assert rows["64x64", graph, "tiled", tile]["max_abs"] <= 1e-5
            assert rows["8200x64", graph, "tiled", tile]["note"].startswith("not served: ")  # past 8192 a side
        assert rows["8200x64", graph, "untiled", None]["note"].startswith("not served: ")
    diffusers = rows["64x64", "decoder", "diffusers tiled", None]
    assert diffusers["max_abs"] > 1e-5 and diffusers["max_abs_vs_diffusers_untiled"] > 1e-5  # blended, not exact
    assert rows["64x64", "decoder", "diffusers untiled", None]["max_abs"] <= 1e-4
    saved = json.loads((out / "tiles_bench.json").read_text())
    assert len(saved["rows"]) == len(record["rows"])
    text = (out / "tiles_bench.md").read_text()
    assert "## Time and memory against tile size" in text and re.search(r"\| 64x64 \| decoder \| diffusers tiled \|", text)
