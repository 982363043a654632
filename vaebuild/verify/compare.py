"""Running one planned row of `vaebuild verify` through Polygraphy, and judging it.

Each row feeds one seeded input, rounded to the engine's precision, through Polygraphy's
`Comparator` to the PyTorch reference (`vaebuild.verify.reference`) and to the row's runner:
`onnxrt` (ONNX Runtime on the exported graph; a bf16 graph runs as its float32 twin) or the
engine's backend runner (`trt`, `inductor`).

Metrics per row (one output per graph): max |out - ref|, mean |out - ref|, rel = max |out - ref| /
max |ref| (normalised by the reference's peak, not element-wise), and for the decoder the PSNR of
both images mapped from [-1, 1] to [0, 255] (unrounded). The encoder's latents have no fixed peak,
so its PSNR is n/a and the max-error check alone gates it. The pass rule applied to them is
described in `vaebuild.verify.report`.
"""

import math
import time
from collections import OrderedDict

from vaebuild.backends import get_backend
from vaebuild.errors import VaebuildError, one_line
from vaebuild.model import TILE_GRAPHS
from vaebuild.verify.reference import REFERENCE_NAME, reference_runner
from vaebuild.verify.report import FAIL, PASS, UNTILED


def run_row(row, context, reference, options, weights):
    """Run the reference and the row's runner on one input through Polygraphy, and fill the row's metrics."""
    entry, tolerances = context["entry"], context["tolerances"]
    feed = _seeded_feed(row.graph, row.shape, reference.vae.config, context["precision"], options.seed)
    feed = feed.to(_feed_dtype(row.runner, context["precision"]))
    row.max_abs_limit, row.min_psnr = None, tolerances.min_psnr if row.graph == "decoder" else None
    start = time.perf_counter()
    try:
        reference(row.graph, feed.float())
    except Exception as err:  # e.g. out of memory at a large shape
        row.status, row.reason = FAIL, f"PyTorch reference failed: {one_line(err)}"
        return
    try:
        runner = _make_runner(row, context, weights)
        ref_runner = reference_runner(row.graph, entry["input"], entry["output"], row.shape, feed.dtype, reference)
        runs = _polygraphy_run(ref_runner, runner, entry["input"], feed)
    except VaebuildError as err:
        row.status, row.reason = FAIL, str(err)
        return
    except Exception as err:  # ORT / TensorRT / Polygraphy errors: the row fails, the others still run
        row.status, row.reason = FAIL, f"{row.runner} failed: {one_line(err)}"
        return
    finally:
        row.seconds = round(time.perf_counter() - start, 3)
    _judge(row, runs, entry["output"], tolerances)


def run_tiled_row(row, context, reference, options, runtimes):
    """Run a tiled row (`plan.plan_tiled_rows`): the folder's tile engines through `VaeRuntime(tiling=True)` against
    the float32 reference, or against the whole-image engine through `VaeRuntime(tiling=False)` (row.runner ends in
    "vs untiled"); `runtimes` is `TiledRuntimes`. Judged by the same rule and tolerances as the other rows."""
    tolerances = context["tolerances"]
    input_name, output_name = context["io"]
    feed = _seeded_feed(row.graph, row.shape, reference.vae.config, context["precision"], options.seed)
    feed = feed.to(_feed_dtype(row.runner, context["precision"]))
    row.max_abs_limit, row.min_psnr = None, tolerances.min_psnr if row.graph == "decoder" else None
    start = time.perf_counter()
    try:
        if context["against"] == UNTILED:
            ref_runner = runtime_runner(UNTILED, runtimes.untiled, row.graph, input_name, output_name, row.shape,
                                        feed.dtype)
        else:
            reference(row.graph, feed.float())
            ref_runner = reference_runner(row.graph, input_name, output_name, row.shape, feed.dtype, reference)
    except Exception as err:  # e.g. out of memory at a large shape
        row.seconds = round(time.perf_counter() - start, 3)
        row.status, row.reason = FAIL, f"PyTorch reference failed: {one_line(err)}"
        return
    try:
        runner = runtime_runner(row.runner, runtimes.tiled, row.graph, input_name, output_name, row.shape, feed.dtype)
        runs = _polygraphy_run(ref_runner, runner, input_name, feed)
    except VaebuildError as err:  # e.g. EngineUnavailableError: a window no tile engine takes
        row.status, row.reason = FAIL, str(err)
        return
    except Exception as err:
        row.status, row.reason = FAIL, f"{row.runner} failed: {one_line(err)}"
        return
    finally:
        row.seconds = round(time.perf_counter() - start, 3)
    _judge(row, runs, output_name, tolerances, ref_name=ref_runner.name)


class TiledRuntimes:
    """The two runtimes of the tiled rows, made on first use: `tiled` (`tiling=True`) and `untiled` (`tiling=False`),
    both loading engines lazily and never falling back to PyTorch, on the device the tile engines were built for."""

    def __init__(self, folder, manifest):
        self.folder = folder
        devices = [e.get("device") for e in manifest["engines"] if e["graph"] in TILE_GRAPHS]
        self.device = next((d for d in devices if d), None)
        self._made = {}

    def _get(self, tiling):
        from vaebuild.runtime import VaeRuntime

        if tiling not in self._made:
            self._made[tiling] = VaeRuntime(self.folder, device=self.device, resident="lazy", tiling=tiling,
                                            allow_fallback=False)
        return self._made[tiling]

    @property
    def tiled(self):
        return self._get(True)

    @property
    def untiled(self):
        return self._get(False)

    def release(self):
        for runtime in self._made.values():
            runtime.release()
        self._made.clear()


def runtime_runner(name, runtime, graph, input_name, output_name, shape, dtype):
    """A Polygraphy runner calling `runtime.encode` / `runtime.decode` (a `VaeRuntime`) on its device; it raises
    instead of falling back when the runtime was made with `allow_fallback=False`."""
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata
    from polygraphy.datatype import DataType

    class VaeRuntimeRunner(BaseRunner):
        def __init__(self):
            super().__init__(name=name)

        def get_input_metadata_impl(self):
            return TensorMetadata().add(input_name, DataType.from_dtype(dtype), shape)

        def infer_impl(self, feed_dict):
            import torch

            x = torch.as_tensor(feed_dict[input_name]).to(runtime.device)
            run = runtime.decode if graph == "decoder" else runtime.encode
            start = time.perf_counter()
            out = run(x)
            self.inference_time = time.perf_counter() - start  # Polygraphy adds it up
            return OrderedDict([(output_name, out)])

    return VaeRuntimeRunner()


def _seeded_feed(graph, shape, vae_config, precision, seed):
    """The seeded float32 input, rounded to the engine's precision so every runner sees the same values."""
    import torch

    from vaebuild.model.inputs import sample_input

    feed = sample_input(graph, shape, vae_config, seed=seed)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    return feed.to(dtype).float() if dtype else feed


def _make_runner(row, context, weights):
    if row.runner == "onnxrt":
        return _onnxrt_runner(context["onnx"].path, context["precision"])
    entry = context["entry"]
    return get_backend(entry["backend"]).load_runner(
        context["engine_path"], entry, row.profile_index, weights=weights, name=row.runner, device=entry.get("device")
    )


def _feed_dtype(runner, precision):
    """The input dtype a runner checks for: the engine's precision, or the ONNX graph's input type
    (a bf16 graph runs as its float32 twin)."""
    import torch

    from vaebuild.model.precision import get_precision

    if runner == "onnxrt" and precision == "bf16":
        return torch.float32
    return get_precision(precision).dtype


def _onnxrt_runner(path, precision):
    import onnx
    import onnxruntime
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    from vaebuild.export.check import fp32_twin

    model = str(path)
    first_input = onnx.load(str(path), load_external_data=False).graph.input[0]
    if first_input.type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16:
        model = fp32_twin(onnx.load(str(path))).SerializeToString()
    providers = ["cuda", "cpu"] if "CUDAExecutionProvider" in onnxruntime.get_available_providers() else ["cpu"]
    return OnnxrtRunner(SessionFromOnnx(model, providers=providers), name="onnxrt")


def _polygraphy_run(ref_runner, runner, input_name, feed):
    """Comparator.run on [ref_runner, runner] with one feed dict; outputs as float32 numpy."""
    from polygraphy.comparator import Comparator
    from polygraphy.logger import G_LOGGER

    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        runs = Comparator.run([ref_runner, runner], data_loader=[OrderedDict([(input_name, feed)])])
        return Comparator.postprocess(runs, _to_float32_numpy)


def _to_float32_numpy(iteration):
    import numpy as np
    import torch

    for name in list(iteration.keys()):
        value = iteration[name]
        if isinstance(value, torch.Tensor):
            value = value.detach().float().cpu().numpy()
        iteration[name] = np.asarray(value, dtype=np.float32).copy()
    return iteration


def _judge(row, runs, name, tolerances, ref_name=REFERENCE_NAME):
    """Fill the metrics of `row` from the two runs (its runner's against `ref_name`'s output `name`) and decide pass
    or FAIL."""
    import numpy as np
    from polygraphy.comparator import Comparator, OutputCompareResult, SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    ref_iteration, out_iteration = runs[ref_name][0], runs[row.runner][0]
    if name not in out_iteration:
        row.status, row.reason = FAIL, f"{row.runner} produced no output named {name!r} (got {list(out_iteration.keys())})"
        return
    ref, out = ref_iteration[name], out_iteration[name]
    if ref.shape != out.shape:
        row.status, row.reason = FAIL, f"output shape {list(out.shape)} != reference {list(ref.shape)}"
        return
    peak = float(np.abs(ref).max()) if ref.size else 0.0
    row.max_abs_limit = tolerances.max_abs_limit(peak)
    compare = SimpleCompareFunc(atol=row.max_abs_limit, rtol=0.0, check_error_stat="max")
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        accuracy = Comparator.compare_accuracy(runs, comparisons=[(1, 0)], compare_func=compare)
    result = accuracy[0][(row.runner, ref_name)][0].get(name)
    if not isinstance(result, OutputCompareResult):
        row.status, row.reason = FAIL, f"Polygraphy could not compare output {name!r}"
        return
    row.max_abs, row.mean_abs = result.max_absdiff, result.mean_absdiff
    row.rel = row.max_abs / peak if peak else (0.0 if row.max_abs == 0 else math.inf)
    failures = []
    if not np.isfinite(out).all():
        failures.append(f"{int((~np.isfinite(out)).sum())} non-finite values")
    if not bool(result):
        failures.append(
            f"max abs {row.max_abs:.3g} > {row.max_abs_limit:.3g} "
            f"(max of atol {tolerances.atol:g}, rtol {tolerances.rtol:g} x peak {peak:.3g})"
        )
    if row.graph == "decoder":
        row.psnr = _psnr_255(out, ref)
        if not row.psnr >= tolerances.min_psnr:
            failures.append(f"PSNR {row.psnr:.1f} dB < {tolerances.min_psnr:g} dB")
    row.status = FAIL if failures else PASS
    row.reason = "; ".join(failures) or None


def _psnr_255(out, ref):
    """PSNR of two [-1, 1] images mapped to [0, 255] (unrounded); inf when identical."""
    import numpy as np

    mse = float(np.mean(((out.astype(np.float64) - ref.astype(np.float64)) * 127.5) ** 2))
    if not math.isfinite(mse):
        return math.nan
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)
