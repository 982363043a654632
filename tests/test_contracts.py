"""`vaebuild.contracts.runtime_contract`: LightX2V's fp16 rule applies to TensorRT folders only."""

import pytest

from vaebuild.contracts import LIGHTX2V_TRT, VAEBUILD, runtime_contract
from vaebuild.errors import UserInputError


@pytest.mark.parametrize("backend", ["tensorrt", "tensorrt_rtx"])
def test_fp16_tensorrt_folders_follow_lightx2v(backend):
    assert runtime_contract(backend, "fp16") == LIGHTX2V_TRT == "lightx2v-trt"
    assert runtime_contract(backend, "fp16", allow_non_fp16=True) == LIGHTX2V_TRT


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_other_tensorrt_precisions_need_the_flag(precision):
    with pytest.raises(UserInputError, match=f"^{precision} TensorRT engines would be read wrongly by LightX2V.*"
                                             "--precision fp16, or pass --allow-non-fp16"):
        runtime_contract("tensorrt", precision)
    assert runtime_contract("tensorrt", precision, allow_non_fp16=True) == VAEBUILD == "vaebuild"


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_other_backends_are_never_lightx2v_folders(precision):
    assert runtime_contract("inductor", precision) == VAEBUILD
