"""Profile specs: the shipped files, selection, shapes and every validation error's message."""

import re
import textwrap
import warnings

import pytest

from vaebuild.errors import SpecError
from vaebuild.builder.specs import (
    ImageSize,
    Profile,
    RoundingWarning,
    default_spec_path,
    find_spec,
    load_spec,
    shipped_specs,
)

T2I = [("16_9", 928, 1664), ("9_16", 1664, 928), ("1_1", 1328, 1328), ("4_3", 1136, 1472), ("3_4", 1024, 768)]
I2I = [
    ("1_1_512", 512, 512),
    ("1_1_1024", 1024, 1024),
    ("16_9_480p", 480, 848),
    ("16_9_720p", 720, 1280),
    ("16_9_1080p", 1088, 1920),
    ("9_16_720p", 1280, 720),
    ("9_16_1080p", 1920, 1088),
    ("4_3_768p", 768, 1024),
    ("3_2_1080p", 1088, 1616),
]

STATIC_ENTRY = '{name: "16_9", height: 928, width: 1664, batch: 1}'
MULTI_ENTRY = """\
  - name: "a"
    min: {height: 64, width: 64}
    opt: {height: 512, width: 512}
    max: {height: 1920, width: 1920}
    batch: {min: 1, opt: 1, max: 1}
"""


def write(tmp_path, text):
    path = tmp_path / "spec.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def static_spec(tmp_path, entries=(STATIC_ENTRY,), header="kind: static\nmax_side: 1920\n"):
    body = "".join(f"  - {e}\n" for e in entries)
    return write(tmp_path, f"{header}profiles:\n{body}")


def multi_spec(tmp_path, entry=MULTI_ENTRY, header="kind: multiprofile\nmax_side: 1920\n"):
    return write(tmp_path, f"{header}profiles:\n{entry}")


def assert_error(path, message):
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value) == f"{path}: {message}"
    assert "\n" not in str(info.value)


# --- shipped files -------------------------------------------------------------------------------


@pytest.fixture
def t2i():
    with pytest.warns(RoundingWarning) as record:
        spec = load_spec(default_spec_path("static"))
    return spec, record


def test_t2i_static_file(t2i):
    spec, _ = t2i
    assert spec.kind == "static" and spec.rounding == "floor16" and spec.max_side == 1920
    assert [(p.name, p.opt.height, p.opt.width) for p in spec.profiles] == T2I
    for p in spec.profiles:
        assert p.min == p.opt == p.max and p.batch == (1, 1, 1)


def test_t2i_rounds_1140_down_with_one_warning_naming_entry_and_sizes(t2i):
    spec, record = t2i
    assert len(record) == 1
    assert str(record[0].message) == (
        f"{default_spec_path('static')}: profiles[3].height=1140 (4_3) is not a multiple of 16;"
        " rounding: floor16 builds 1136"
    )
    assert spec.profiles[3].decoder_shapes()[1] == (1, 16, 1, 142, 184)


def load_without_warnings(path):
    """`load_spec`, failing on any warning (a shipped spec with only exact sizes warns about nothing)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return load_spec(path)


def test_i2i_multiprofile_file():
    spec = load_without_warnings(default_spec_path("multiprofile"))
    assert spec.kind == "multiprofile" and spec.rounding == "reject" and spec.max_side == 1920
    assert [(p.name, p.opt.height, p.opt.width) for p in spec.profiles] == I2I
    for p in spec.profiles:
        assert p.min == ImageSize(64, 64) and p.max == ImageSize(1920, 1920) and p.batch == (1, 1, 1)
        assert p.decoder_shapes()[0] == (1, 16, 1, 8, 8) and p.decoder_shapes()[2] == (1, 16, 1, 240, 240)


def test_i2i_covers_every_multiple_of_8_up_to_max_side():
    spec = load_spec(default_spec_path("multiprofile"))
    sides = range(64, spec.max_side + 1, 8)
    assert all(any(p.contains(1, h, w) for p in spec.profiles) for h in sides for w in sides)


T2I_LIGHTX2V_MAIN = [
    ("16_9", 928, 1664), ("9_16", 1664, 928), ("1_1", 1328, 1328), ("4_3", 1104, 1472), ("3_4", 1472, 1104),
    ("3_2", 1584, 1056), ("2_3", 1056, 1584),
]


def test_t2i_static_for_lightx2v_main():
    spec = load_without_warnings(find_spec("t2i_static_lightx2v_main"))
    assert spec.kind == "static" and spec.rounding == "reject" and spec.max_side == 1920
    assert [(p.name, p.opt.height, p.opt.width) for p in spec.profiles] == T2I_LIGHTX2V_MAIN


def test_edit_spec_is_every_size_the_edit_pipelines_encode_at():
    """The shipped file is what the rule generates, and the rule finds every size diffusers' own function gives."""
    import math

    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

    from vaebuild.builder.edit_sizes import edit_sizes, edit_spec_yaml

    assert find_spec("qwen_image_edit").read_text() == edit_spec_yaml()
    spec = load_without_warnings(find_spec("qwen_image_edit"))
    built = {(p.opt.width, p.opt.height) for p in spec.profiles}
    swept = {calculate_dimensions(1024 * 1024, math.exp(math.log(3) * (2 * i / 20000 - 1)))[:2] for i in range(20001)}
    assert built == set(edit_sizes()) and swept <= built and len(built) == len(spec.profiles)
    assert {(1184, 896), (896, 1184), (1248, 832), (1376, 768), (1024, 1024)} <= built
    assert all(w % 32 == 0 and h % 32 == 0 and max(w, h) <= spec.max_side for w, h in built)


def test_large_spec():
    spec = load_without_warnings(find_spec("large_static"))
    assert spec.max_side == 4096
    assert [(p.opt.width, p.opt.height) for p in spec.profiles] == [
        (2048, 2048), (2560, 1440), (1440, 2560), (3840, 2160), (2160, 3840)]


def test_max_side_is_at_most_4096(tmp_path):
    assert load_spec(static_spec(tmp_path, ['{name: "4k", height: 4096, width: 4096, batch: 1}'],
                                 "kind: static\nmax_side: 4096\n")).max_side == 4096
    assert_error(static_spec(tmp_path, header="kind: static\nmax_side: 4104\n"),
                 "max_side=4104 > 4096, the largest side vaebuild builds; lower it to 4096 or less (tile larger images)")
    assert_error(static_spec(tmp_path, ['{name: "big", height: 4112, width: 64, batch: 1}'],
                             "kind: static\nmax_side: 4096\n"),
                 "profiles[0].height=4112 > max_side 4096; lower it or raise max_side")


def test_every_shipped_spec_loads():
    shipped = shipped_specs()
    assert {"t2i_static", "t2i_static_lightx2v_main", "i2i_multiprofile"} <= set(shipped)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RoundingWarning)
        for name, path in shipped.items():
            assert load_spec(path).profiles, name


def test_find_spec_takes_a_path_or_a_shipped_name(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("kind: static")
    assert find_spec(path) == path
    assert find_spec(str(path)) == path
    assert find_spec("i2i_multiprofile") == default_spec_path("multiprofile")
    with pytest.raises(SpecError, match=r"^nope: no such spec file or shipped spec; pass a YAML path or one of: "
                                        r"all_static, i2i_multiprofile, .*t2i_static"):
        find_spec("nope")


def test_unknown_default_kind():
    with pytest.raises(SpecError, match=r"^unknown spec kind 'dynamic'; known: static, multiprofile$"):
        default_spec_path("dynamic")


# --- shapes and containment ----------------------------------------------------------------------


PROFILE = Profile("p", ImageSize(64, 128), ImageSize(512, 768), ImageSize(1024, 1536), (1, 2, 4))


def test_shapes():
    assert PROFILE.encoder_shapes() == ((1, 3, 1, 64, 128), (2, 3, 1, 512, 768), (4, 3, 1, 1024, 1536))
    assert PROFILE.decoder_shapes() == ((1, 16, 1, 8, 16), (2, 16, 1, 64, 96), (4, 16, 1, 128, 192))
    assert PROFILE.decoder_shapes(latent_channels=4)[1] == (2, 4, 1, 64, 96)
    assert PROFILE.encoder_shapes(image_channels=1)[1] == (2, 1, 1, 512, 768)
    assert ImageSize(1136, 1472).latent() == (142, 184)


@pytest.mark.parametrize(
    ("batch", "height", "width", "inside"),
    [(1, 64, 128, True), (4, 1024, 1536, True), (2, 512, 768, True), (5, 512, 768, False),
     (0, 512, 768, False), (1, 56, 768, False), (1, 1032, 768, False), (1, 512, 120, False),
     (1, 512, 1544, False)],
)
def test_contains(batch, height, width, inside):
    assert PROFILE.contains(batch, height, width) is inside


# --- selection -----------------------------------------------------------------------------------


def test_select_keeps_file_order(t2i):
    spec, _ = t2i
    picked = spec.select(["3_4", "16_9"])
    assert picked.names == ("16_9", "3_4")
    assert picked.path == spec.path and picked.kind == spec.kind


def test_select_unknown_ratio(t2i):
    spec, _ = t2i
    with pytest.raises(SpecError) as info:
        spec.select(["1_1", "5_4"])
    assert str(info.value) == f"unknown ratio '5_4' in {spec.path}; known: 16_9, 9_16, 1_1, 4_3, 3_4"


def test_select_nothing(t2i):
    spec, _ = t2i
    with pytest.raises(SpecError, match=r"^no ratio selected from .*; known: 16_9, 9_16, 1_1, 4_3, 3_4$"):
        spec.select([])


# --- file-level errors ---------------------------------------------------------------------------


def test_missing_file(tmp_path):
    assert_error(tmp_path / "nope.yaml", "no such spec file; check the path")


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(SpecError, match=r": cannot read \(Is a directory\); check the path$"):
        load_spec(tmp_path)


def test_yaml_syntax_error_names_line(tmp_path):
    path = write(tmp_path, "kind: static\nmax_side: 1920\nprofiles: [\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert re.fullmatch(rf"{re.escape(str(path))}: YAML error at line 4, column 1: .+; fix the YAML", str(info.value))


def test_yaml_duplicate_key(tmp_path):
    path = write(tmp_path, "kind: static\nkind: multiprofile\nmax_side: 1920\nprofiles: []\n")
    assert_error(path, "YAML error at line 2, column 1: duplicate key 'kind'; fix the YAML")


@pytest.mark.parametrize(
    ("text", "what"), [("- 1\n- 2\n", "a list"), ("", "empty"), ("hello\n", "a string")]
)
def test_top_level_not_a_mapping(tmp_path, text, what):
    assert_error(
        write(tmp_path, text), f"the top level is {what}; write a mapping with keys kind, max_side, rounding, profiles"
    )


def test_unknown_top_level_key(tmp_path):
    path = static_spec(tmp_path, header="kind: static\nmax_side: 1920\nmax_sid: 1920\n")
    assert_error(path, "unknown key 'max_sid' in the top level; known: kind, max_side, rounding, profiles")


def test_missing_top_level_key(tmp_path):
    path = static_spec(tmp_path, header="kind: static\n")
    assert_error(path, "the top level is missing 'max_side'; add it")


def test_bad_kind(tmp_path):
    path = static_spec(tmp_path, header="kind: dynamic\nmax_side: 1920\n")
    assert_error(path, "kind='dynamic' is not one of static, multiprofile; set one of them")


def test_bad_rounding(tmp_path):
    path = static_spec(tmp_path, header="kind: static\nmax_side: 1920\nrounding: ceil\n")
    assert_error(path, "rounding='ceil' is not one of reject, floor16; set one of them")


def test_bad_max_side(tmp_path):
    path = static_spec(tmp_path, header="kind: static\nmax_side: big\n")
    assert_error(path, "max_side='big' is not an integer; write a whole number")


def test_empty_profiles(tmp_path):
    path = write(tmp_path, "kind: static\nmax_side: 1920\nprofiles: []\n")
    assert_error(path, "profiles is empty; list at least one profile")


def test_profiles_not_a_list(tmp_path):
    path = write(tmp_path, "kind: static\nmax_side: 1920\nprofiles: {name: a}\n")
    assert_error(path, "profiles is a mapping; write a list of profile entries")


# --- entry errors --------------------------------------------------------------------------------


def test_unknown_key_in_static_entry(tmp_path):
    path = static_spec(tmp_path, [STATIC_ENTRY, '{name: "b", hieght: 928, width: 1664, batch: 1}'])
    assert_error(path, "unknown key 'hieght' in profiles[1]; known: name, height, width, batch")


def test_multiprofile_keys_in_static_spec(tmp_path):
    path = write(tmp_path, f"kind: static\nmax_side: 1920\nprofiles:\n{MULTI_ENTRY}")
    assert_error(path, "unknown key 'min' in profiles[0]; known: name, height, width, batch")


def test_unknown_key_in_multi_size(tmp_path):
    path = multi_spec(tmp_path, MULTI_ENTRY.replace("opt: {height: 512,", "opt: {heigth: 512,"))
    assert_error(path, "unknown key 'heigth' in profiles[0].opt; known: height, width")


def test_unknown_key_in_multi_batch(tmp_path):
    path = multi_spec(tmp_path, MULTI_ENTRY.replace("batch: {min: 1,", "batch: {minimum: 1,"))
    assert_error(path, "unknown key 'minimum' in profiles[0].batch; known: min, opt, max")


def test_missing_field_in_static_entry(tmp_path):
    path = static_spec(tmp_path, ['{name: "a", height: 928, batch: 1}'])
    assert_error(path, "profiles[0] is missing 'width'; add it")


def test_missing_field_in_multi_entry(tmp_path):
    path = multi_spec(tmp_path, MULTI_ENTRY.replace("    opt: {height: 512, width: 512}\n", ""))
    assert_error(path, "profiles[0] is missing 'opt'; add it")


def test_missing_field_in_multi_size(tmp_path):
    path = multi_spec(tmp_path, MULTI_ENTRY.replace("max: {height: 1920, width: 1920}", "max: {height: 1920}"))
    assert_error(path, "profiles[0].max is missing 'width'; add it")


def test_entry_not_a_mapping(tmp_path):
    path = static_spec(tmp_path, ["16_9"])
    assert_error(path, "profiles[0] is a number; write a mapping with keys name, height, width, batch")


def test_multi_size_not_a_mapping(tmp_path):
    path = multi_spec(tmp_path, MULTI_ENTRY.replace("opt: {height: 512, width: 512}", "opt: [512, 512]"))
    assert_error(path, "profiles[0].opt is a list; write a mapping with keys height, width")


def test_unquoted_name(tmp_path):
    path = static_spec(tmp_path, ["{name: 16_9, height: 928, width: 1664, batch: 1}"])
    assert_error(
        path,
        "profiles[0].name=169 is not a string; quote it, e.g. name: \"16_9\" (YAML reads 16_9 as the number 169)",
    )


def test_bad_name(tmp_path):
    path = static_spec(tmp_path, ['{name: "../x", height: 928, width: 1664, batch: 1}'])
    assert_error(path, "profiles[0].name='../x' is not a valid name; use letters, digits, '_', '.' and '-'")


def test_duplicate_names(tmp_path):
    path = static_spec(tmp_path, [STATIC_ENTRY, '{name: "1_1", height: 1328, width: 1328, batch: 1}', STATIC_ENTRY])
    assert_error(path, "profiles[2].name='16_9' repeats profiles[0].name; give each profile a unique name")


@pytest.mark.parametrize(
    ("level_a", "level_b", "a", "b"), [("min", "opt", 1024, 512), ("opt", "max", 1920, 1024)]
)
@pytest.mark.parametrize("dim", ["height", "width"])
def test_size_order(tmp_path, dim, level_a, level_b, a, b):
    entry = MULTI_ENTRY
    for level, value in ((level_a, a), (level_b, b)):
        line = next(line for line in entry.splitlines() if line.strip().startswith(f"{level}:"))
        entry = entry.replace(line, line.replace(re.search(rf"{dim}: \d+", line).group(), f"{dim}: {value}"))
    path = multi_spec(tmp_path, entry)
    assert_error(
        path, f"profiles[0].{level_a}.{dim}={a} > profiles[0].{level_b}.{dim}={b}; need min <= opt <= max"
    )


@pytest.mark.parametrize(("batch", "bad"), [("{min: 2, opt: 1, max: 4}", ("min", 2, "opt", 1)),
                                            ("{min: 1, opt: 4, max: 2}", ("opt", 4, "max", 2))])
def test_batch_order(tmp_path, batch, bad):
    path = multi_spec(tmp_path, MULTI_ENTRY.replace("{min: 1, opt: 1, max: 1}", batch))
    lo, a, hi, b = bad
    assert_error(path, f"profiles[0].batch.{lo}={a} > profiles[0].batch.{hi}={b}; need min <= opt <= max")


def test_batch_below_one(tmp_path):
    path = static_spec(tmp_path, ['{name: "a", height: 928, width: 1664, batch: 0}'])
    assert_error(path, "profiles[0].batch=0 < 1; use at least 1")


def test_side_not_multiple_of_8_rejected(tmp_path):
    path = static_spec(tmp_path, ['{name: "4_3", height: 1140, width: 1472, batch: 1}'])
    assert_error(
        path,
        "profiles[0].height=1140 is not a multiple of 8; use 1136 (what Qwen-Image pipelines build)"
        " or set rounding: floor16",
    )


def test_multi_side_not_multiple_of_8_rejected(tmp_path):
    entry = MULTI_ENTRY.replace("opt: {height: 512, width: 512}", "opt: {height: 512, width: 1620}")
    path = multi_spec(tmp_path, entry)
    assert_error(
        path,
        "profiles[0].opt.width=1620 is not a multiple of 8; use 1616 (what Qwen-Image pipelines build)"
        " or set rounding: floor16",
    )


def test_reject_keeps_multiples_of_8(tmp_path):
    spec = load_spec(static_spec(tmp_path, ['{name: "a", height: 1144, width: 8, batch: 1}']))
    assert spec.profiles[0].opt == ImageSize(1144, 8)


def test_floor16_rounds_multi_sides_with_warning(tmp_path):
    entry = MULTI_ENTRY.replace("opt: {height: 512, width: 512}", "opt: {height: 1088, width: 1620}")
    path = multi_spec(tmp_path, entry, header="kind: multiprofile\nmax_side: 1920\nrounding: floor16\n")
    with pytest.warns(RoundingWarning) as record:
        spec = load_spec(path)
    assert [str(w.message) for w in record] == [
        f"{path}: profiles[0].opt.width=1620 (a) is not a multiple of 16; rounding: floor16 builds 1616"
    ]
    assert spec.profiles[0].opt == ImageSize(1088, 1616)


def test_floor16_smallest_side(tmp_path):
    path = static_spec(tmp_path, ['{name: "a", height: 8, width: 64, batch: 1}'],
                       header="kind: static\nmax_side: 1920\nrounding: floor16\n")
    assert_error(path, "profiles[0].height=8 < 16; use at least 16")


def test_side_above_max_side(tmp_path):
    path = multi_spec(tmp_path, MULTI_ENTRY.replace("max: {height: 1920,", "max: {height: 2048,"))
    assert_error(path, "profiles[0].max.height=2048 > max_side 1920; lower it or raise max_side")


@pytest.mark.parametrize("value", [4, 0, -8])
def test_side_below_8(tmp_path, value):
    path = static_spec(tmp_path, [f'{{name: "a", height: 928, width: {value}, batch: 1}}'])
    assert_error(path, f"profiles[0].width={value} < 8; use at least 8")


@pytest.mark.parametrize(
    ("value", "shown"), [("928.0", "928.0"), ('"928"', "'928'"), ("true", "True"), ("null", "None")]
)
def test_side_not_an_integer(tmp_path, value, shown):
    path = static_spec(tmp_path, [f'{{name: "a", height: {value}, width: 1664, batch: 1}}'])
    assert_error(path, f"profiles[0].height={shown} is not an integer; write a whole number")
