"""Validate an exported ONNX graph: the ONNX checker, shape inference, and ORT-vs-PyTorch parity."""

import time
from dataclasses import asdict, dataclass

import numpy as np
import onnx
import torch

from vaebuild.errors import MismatchError


@dataclass(frozen=True)
class ParityResult:
    """How far ONNX Runtime's output is from PyTorch's on one input."""

    graph: str
    input_shape: tuple
    max_abs: float
    max_rel: float  # max |onnx - torch| / max |torch|
    tolerance: float
    executed_as: str  # the dtype ONNX Runtime really computed in
    seconds: float

    @property
    def passed(self):
        return bool(np.isfinite(self.max_abs)) and self.max_rel <= self.tolerance

    def to_dict(self):
        return {**asdict(self), "input_shape": list(self.input_shape), "passed": self.passed}


def check_model_file(path):
    """Run the ONNX checker with full (strict) shape inference on a saved model."""
    onnx.checker.check_model(str(path), full_check=True)


def fp32_twin(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a bfloat16 graph computing in float32 with the same (bf16-rounded) weights.

    ONNX Runtime's CPU provider has no bfloat16 convolution, so a bf16 export is checked through
    this twin: it proves the graph and its weights, not bf16 arithmetic.
    """
    from onnx import TensorProto, numpy_helper

    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    bf16, f32 = TensorProto.BFLOAT16, TensorProto.FLOAT

    def upcast(tensor):
        if tensor.data_type == bf16:
            values = numpy_helper.to_array(tensor).astype(np.float32)
            tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))

    for init in twin.graph.initializer:
        upcast(init)
    for node in twin.graph.node:
        for attr in node.attribute:
            if attr.name == "to" and attr.i == bf16:
                attr.i = f32
            if attr.type == onnx.AttributeProto.TENSOR:
                upcast(attr.t)
    for info in [*twin.graph.input, *twin.graph.output, *twin.graph.value_info]:
        if info.type.tensor_type.elem_type == bf16:
            info.type.tensor_type.elem_type = f32
    return twin


def run_onnxruntime(model: onnx.ModelProto, feed: np.ndarray):
    """Run a single-input model on ONNX Runtime's CPU provider; returns (output, dtype it ran in)."""
    import onnxruntime as ort

    input_type = model.graph.input[0].type.tensor_type.elem_type
    if input_type == onnx.TensorProto.BFLOAT16:
        model = fp32_twin(model)
        executed_as = "float32 twin of bf16 graph"
    else:
        executed_as = onnx.helper.tensor_dtype_to_np_dtype(input_type).name
    np_dtype = onnx.helper.tensor_dtype_to_np_dtype(model.graph.input[0].type.tensor_type.elem_type)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    output = session.run(None, {model.graph.input[0].name: feed.astype(np_dtype)})[0]
    return output.astype(np.float32), executed_as


def compare_with_torch(graph_name, onnx_path, reference_module, feed: torch.Tensor, tolerance):
    """Compare ONNX Runtime on `onnx_path` with a float32 PyTorch `reference_module` on one input."""
    start = time.perf_counter()
    model = onnx.load(str(onnx_path))
    actual, executed_as = run_onnxruntime(model, feed.numpy())
    with torch.no_grad():
        expected = reference_module(feed).float().numpy()
    diff = np.abs(actual - expected)
    max_abs = float(diff.max()) if np.isfinite(actual).all() else float("inf")
    scale = float(np.abs(expected).max()) or 1.0
    return ParityResult(
        graph=graph_name,
        input_shape=tuple(feed.shape),
        max_abs=max_abs,
        max_rel=max_abs / scale,
        tolerance=tolerance,
        executed_as=executed_as,
        seconds=time.perf_counter() - start,
    )


def raise_on_failures(results):
    """Raise one MismatchError naming every graph whose parity failed."""
    failed = [r for r in results if not r.passed]
    if failed:
        details = "; ".join(
            f"{r.graph} at {list(r.input_shape)}: max rel {r.max_rel:.3g} > {r.tolerance:g}" for r in failed
        )
        raise MismatchError(f"ONNX export disagrees with PyTorch: {details}; nothing was written")
