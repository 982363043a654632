"""Which runtime contract an engine folder follows, recorded as the manifest's `runtime_contract`.

- `lightx2v-trt`: LightX2V's TensorRT VAE loader can use the folder as it is: its layout
  (`<ratio>/vae_{encoder,decoder}.trt` or `vae_{encoder,decoder}_multi_profile.trt`), one input and
  one output per engine, and fp16 at both ends (the loader casts inputs to fp16 and reads outputs as
  fp16 whatever the engine holds).
- `vaebuild`: only vaebuild's own runtime (`vaebuild.runtime`) reads it correctly: a TensorRT folder
  of another precision, built on request, or a backend LightX2V does not load.
"""

from vaebuild.errors import UserInputError

LIGHTX2V_TRT = "lightx2v-trt"
VAEBUILD = "vaebuild"
LIGHTX2V_BACKENDS = ("tensorrt", "tensorrt_rtx")  # engines in LightX2V's layout
LIGHTX2V_PRECISION = "fp16"


def runtime_contract(backend: str, precision: str, allow_non_fp16: bool = False) -> str:
    """The contract a `backend` build of a `precision` export follows; refuses a non-fp16 TensorRT build
    unless `allow_non_fp16` (LightX2V would read it wrongly without any error)."""
    if backend not in LIGHTX2V_BACKENDS:
        return VAEBUILD
    if precision == LIGHTX2V_PRECISION:
        return LIGHTX2V_TRT
    if not allow_non_fp16:
        raise UserInputError(
            f"{precision} TensorRT engines would be read wrongly by LightX2V (its loader feeds and reads fp16);"
            " export with --precision fp16, or pass --allow-non-fp16 for a folder only vaebuild's runtime reads"
        )
    return VAEBUILD
