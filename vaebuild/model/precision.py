"""Export precisions: their torch dtypes and the parity tolerances used right after export."""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Precision:
    """One export precision: the dtype the ONNX tensors carry and its ORT-vs-PyTorch tolerance."""

    name: str
    dtype: torch.dtype
    # Tolerance on max |onnx - torch| relative to max |torch|, at the small validation size.
    max_rel_error: float
    # Oldest ONNX opset whose operators accept this dtype (Conv takes bfloat16 from opset 22).
    min_opset: int


PRECISIONS = {
    "fp32": Precision("fp32", torch.float32, 1e-4, 18),
    "fp16": Precision("fp16", torch.float16, 2e-2, 18),
    # bf16 is checked through its float32 twin, but the graph's constants (e.g. the RMS-norm scale
    # sqrt(dim)) stay rounded to bf16's 8-bit mantissa: the full-size model lands near 3e-3.
    "bf16": Precision("bf16", torch.bfloat16, 2e-2, 22),
}


def get_precision(name):
    """The `Precision` called `name`; a clear error lists the valid names."""
    from vaebuild.errors import UserInputError

    try:
        return PRECISIONS[name]
    except KeyError:
        raise UserInputError(f"unknown precision '{name}'; use one of {', '.join(PRECISIONS)}") from None
