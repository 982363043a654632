"""Specs past 1920 a side (issue 26): static sizes and dynamic ranges up to 4096, the shipped `large_static`, and the
validation errors at those sizes, each naming the offending key. The shipped TensorRT specs keep LightX2V's 1920."""

import warnings

import pytest
from test_specs import assert_error, multi_spec, static_spec

from vaebuild.builder.specs import MAX_SIDE_LIMIT, PIPELINE_MULTIPLE, RoundingWarning, find_spec, load_spec

HEADER_4K = "kind: static\nmax_side: 4096\n"
MULTI_4K = """\
  - name: "large"
    min: {height: 64, width: 64}
    opt: {height: 2160, width: 3840}
    max: {height: 4096, width: 4096}
    batch: {min: 1, opt: 1, max: 1}
"""


def test_large_static_sides_are_pipeline_multiples_within_its_max_side():
    spec = load_spec(find_spec("large_static"))
    assert spec.kind == "static" and spec.rounding == "reject" and spec.max_side == MAX_SIDE_LIMIT == 4096
    assert {p.name for p in spec.profiles} == {"2048x2048", "2560x1440", "1440x2560", "3840x2160", "2160x3840"}
    for p in spec.profiles:
        assert p.name == f"{p.opt.width}x{p.opt.height}" and p.min == p.opt == p.max and p.batch == (1, 1, 1)
        assert p.opt.height % PIPELINE_MULTIPLE == 0 and p.opt.width % PIPELINE_MULTIPLE == 0
        assert max(p.opt.height, p.opt.width) <= spec.max_side
    assert spec.profiles[3].decoder_shapes(16)[1] == (1, 16, 1, 270, 480)  # 3840x2160: latents 270x480


def test_the_lightx2v_specs_keep_1920():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RoundingWarning)
        for name in ("t2i_static", "t2i_static_lightx2v_main", "i2i_multiprofile", "qwen_image_edit", "all_static"):
            assert load_spec(find_spec(name)).max_side == 1920, name


def test_a_dynamic_range_up_to_4096_loads(tmp_path):
    spec = load_spec(multi_spec(tmp_path, MULTI_4K, header="kind: multiprofile\nmax_side: 4096\n"))
    (profile,) = spec.profiles
    assert profile.contains(1, 2160, 3840) and profile.contains(1, 4096, 4096) and not profile.contains(1, 4104, 64)
    assert profile.decoder_shapes(16)[2] == (1, 16, 1, 512, 512)


def test_a_range_past_max_side_names_its_key(tmp_path):
    path = multi_spec(tmp_path, MULTI_4K, header="kind: multiprofile\nmax_side: 2048\n")
    assert_error(path, "profiles[0].opt.height=2160 > max_side 2048; lower it or raise max_side")


def test_max_side_past_4096_names_max_side(tmp_path):
    path = multi_spec(tmp_path, MULTI_4K, header="kind: multiprofile\nmax_side: 8192\n")
    assert_error(path, "max_side=8192 > 4096, the largest side vaebuild builds; lower it to 4096 or less "
                       "(tile larger images)")


def test_a_4k_side_not_a_multiple_of_8_names_its_key(tmp_path):
    path = static_spec(tmp_path, ['{name: "4k", height: 2164, width: 3840, batch: 1}'], header=HEADER_4K)
    assert_error(path, "profiles[0].height=2164 is not a multiple of 8; use 2160 (what Qwen-Image pipelines build) "
                       "or set rounding: floor16")


def test_floor16_rounds_a_4k_side_with_a_warning(tmp_path):
    path = static_spec(tmp_path, ['{name: "4k", height: 2168, width: 3840, batch: 1}'],
                       header=HEADER_4K + "rounding: floor16\n")
    with pytest.warns(RoundingWarning) as record:
        spec = load_spec(path)
    assert [str(w.message) for w in record] == [
        f"{path}: profiles[0].height=2168 (4k) is not a multiple of 16; rounding: floor16 builds 2160"]
    assert (spec.profiles[0].opt.height, spec.profiles[0].opt.width) == (2160, 3840)


def test_a_second_entry_past_max_side_names_its_index(tmp_path):
    path = static_spec(tmp_path, ['{name: "ok", height: 2160, width: 3840, batch: 1}',
                                  '{name: "big", height: 2160, width: 4112, batch: 1}'], header=HEADER_4K)
    assert_error(path, "profiles[1].width=4112 > max_side 4096; lower it or raise max_side")
