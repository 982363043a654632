"""`vaebuild export`: PyTorch VAE -> `vae_encoder.onnx` + `vae_decoder.onnx` + `export_record.json`.

Each graph is traced once at a tiny size with dynamic batch/height/width (the dynamo exporter
works on symbolic shapes, so the full-size model exports in well under a minute per graph on a
CPU), checked with the ONNX checker and shape inference, then compared with PyTorch through
ONNX Runtime. Files appear under their final names only after every check passed.
"""

import copy
import json
import logging
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.export import Dim

import vaebuild
from vaebuild.env import package_versions
from vaebuild.errors import UserInputError
from vaebuild.export import RECORD_NAME
from vaebuild.export.check import check_model_file, compare_with_torch, raise_on_failures
from vaebuild.fileio import atomic_directory, check_output_folder, sha256_file, write_json
from vaebuild.model.graphs import build_graphs, describe_graphs
from vaebuild.model.inputs import sample_input
from vaebuild.model.precision import get_precision
from vaebuild.model.source import weights_sha256

MAX_SIDE = 8192  # upper bound of the dynamic image dims declared in the graph


@dataclass(frozen=True)
class ExportOptions:
    """How to export: precision, opset, the single-frame fold, the parity-check size, and the device."""

    precision: str = "fp16"
    opset: int | None = None  # None: the precision's oldest valid opset (18; 22 for bf16)
    fold: bool = True
    check_height: int = 64
    check_width: int = 96
    device: str = "auto"  # "auto" | "cpu" | "cuda"

    def __post_init__(self):
        min_opset = get_precision(self.precision).min_opset
        if self.opset is not None and self.opset < min_opset:
            raise UserInputError(
                f"--opset {self.opset} is too old for {self.precision}; use --opset {min_opset} or newer"
            )
        if self.device not in ("auto", "cpu", "cuda"):
            raise UserInputError(f"unknown --device '{self.device}'; use auto, cpu or cuda")
        for side in (self.check_height, self.check_width):
            if side < 16 or side % 8:
                raise UserInputError(f"parity-check side {side} must be a multiple of 8 and at least 16")

    def resolved_opset(self):
        """The opset actually exported."""
        return self.opset or get_precision(self.precision).min_opset

    def torch_device(self):
        """The device tracing and the PyTorch reference run on."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise UserInputError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
        return torch.device(self.device)


def export_onnx(vae, source_description, out_dir, options=ExportOptions(), log=print):
    """Export, check and validate both graphs of `vae` into `out_dir`; return the export record."""
    precision = get_precision(options.precision)
    device = options.torch_device()
    out_dir = Path(out_dir)
    check_output_folder(out_dir)
    weights_hash = weights_sha256(vae)
    log(f"weights sha256 {weights_hash[:16]}...")
    graph_modules = build_graphs(vae, fold=options.fold)
    record_graphs, parity = {}, []
    with atomic_directory(out_dir) as staging:
        for description, module in zip(describe_graphs(vae), graph_modules):
            path = staging / description.file_name
            exported = copy.deepcopy(module).to(device=device, dtype=precision.dtype)
            start = time.perf_counter()
            log(f"[{description.name}] tracing {precision.name} graph (fold={'2-D' if options.fold else '3-D'}) ...")
            _trace_to_onnx(exported, description, path, options.resolved_opset(), device, precision.dtype)
            trace_seconds = time.perf_counter() - start
            log(f"[{description.name}] traced in {trace_seconds:.1f} s; running ONNX checker and shape inference ...")
            check_model_file(path)
            io_shapes = graph_io_shapes(path)
            reference = exported.float().cpu()
            feed_hw = _feed_size(description, options)
            feed = sample_input(description.name, description.input_shape(1, *feed_hw), vae.config, seed=0)
            result = compare_with_torch(description.name, path, reference, feed, precision.max_rel_error)
            log(
                f"[{description.name}] parity vs PyTorch at {list(feed.shape)} ({result.executed_as}): "
                f"max abs {result.max_abs:.3g}, max rel {result.max_rel:.3g} (tolerance {result.tolerance:g}) "
                f"{'OK' if result.passed else 'FAIL'}"
            )
            parity.append(result)
            record_graphs[description.name] = {
                "file": description.file_name,
                "sha256": sha256_file(path),
                "input": {"name": description.input_name, "shape": io_shapes[description.input_name]},
                "output": {"name": description.output_name, "shape": io_shapes[description.output_name]},
                "dtype": precision.name,
                "trace_seconds": round(trace_seconds, 2),
                "parity": result.to_dict(),
            }
        raise_on_failures(parity)
        record = {
            "vaebuild_version": vaebuild.__version__,
            "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": source_description,
            "weights_sha256": weights_hash,
            "vae_config": {k: v for k, v in dict(vae.config).items() if not k.startswith("_")},
            "precision": precision.name,
            "opset": options.resolved_opset(),
            "single_frame_fold": options.fold,
            "graphs": record_graphs,
            "versions": package_versions(),
        }
        write_json(staging / RECORD_NAME, record)
    return record


def export_unless_current(vae, source_description, out_dir, options=ExportOptions(), log=print):
    """`export_onnx`, unless `out_dir` already holds an intact export of the same weights and options."""
    record_path = Path(out_dir) / RECORD_NAME
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        same = (
            record.get("weights_sha256") == weights_sha256(vae)
            and record.get("precision") == options.precision
            and record.get("opset") == options.resolved_opset()
            and record.get("single_frame_fold") == options.fold
            and record.get("vaebuild_version") == vaebuild.__version__
            and all(
                (Path(out_dir) / g["file"]).is_file() and sha256_file(Path(out_dir) / g["file"]) == g["sha256"]
                for g in record.get("graphs", {}).values()
            )
        )
        if same:
            log(f"ONNX in {out_dir} is up to date, export skipped")
            return record
    return export_onnx(vae, source_description, out_dir, options, log)


def _feed_size(description, options):
    if description.name == "encoder":
        return options.check_height, options.check_width
    return options.check_height // 8, options.check_width // 8


def graph_io_shapes(path):
    """Input and output shapes of a saved graph as recorded in it: ints for fixed dims, names for dynamic ones."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return {
        value.name: [dim.dim_param or dim.dim_value for dim in value.type.tensor_type.shape.dim]
        for value in [*graph.input, *graph.output]
    }


def _trace_to_onnx(module, description, path, opset, device, dtype):
    """Trace at a tiny size with dynamic batch, height and width; save as one self-contained file."""
    example_hw = (16, 24) if description.name == "encoder" else (2, 3)
    example = torch.zeros(description.input_shape(2, *example_hw), device=device, dtype=dtype)
    min_side = 16 if description.name == "encoder" else 2
    max_side = MAX_SIDE if description.name == "encoder" else MAX_SIDE // 8
    dynamic = {
        description.input_name: {
            0: Dim("batch", min=1, max=256),
            3: Dim("height", min=min_side, max=max_side),
            4: Dim("width", min=min_side, max=max_side),
        }
    }
    _rename_forward_argument(module, description.input_name)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" notices
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=True,
            dynamic_shapes=dynamic,
            opset_version=opset,
            input_names=[description.input_name],
            output_names=[description.output_name],
            external_data=False,
            verbose=False,
        )


def _rename_forward_argument(module, name):
    """Graph modules name their argument after the tensor (`images` / `latents`); check it matches."""
    import inspect

    argument = next(iter(inspect.signature(module.forward).parameters))
    if argument != name:
        raise AssertionError(f"{type(module).__name__}.forward takes '{argument}', expected '{name}'")

