"""vaebuild's torch ops and the Hopper kernels behind them (the flash-attention `cute/` pattern).

Ops (names `vaebuild::...`, called by name from AOTInductor packages; registered when their module is imported):
- `attention`: `vaebuild::attention_d384`, the mid-block attention (`attention_fwd_gluon` on Hopper with
  Triton 3.6, `attention_fwd_triton` with an older Triton, SDPA elsewhere);
- `conv_norm`: `vaebuild::conv3x3_rms_silu` and `vaebuild::conv3x3_add`, the 96-channel residual blocks'
  fused convolutions (`conv3x3_gluon` on Hopper, diffusers' computation elsewhere).
Helpers the kernels share: `attention_splits` (softmax constants, key splits and their combine), `tma`.
This module imports neither torch nor Triton.
"""

import functools
import importlib.util


@functools.cache
def gluon_available():
    """Whether Triton is installed with the Gluon API vaebuild's Gluon kernels are written in (3.6 and later)."""
    if importlib.util.find_spec("triton") is None:
        return False
    import triton

    return tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (3, 6)


def register_ops():
    """Register every `vaebuild::` op in this process (a package that calls them needs them first)."""
    import vaebuild.kernels.attention  # noqa: F401 - vaebuild::attention_d384
    import vaebuild.kernels.conv_norm  # noqa: F401 - vaebuild::conv3x3_rms_silu, vaebuild::conv3x3_add
