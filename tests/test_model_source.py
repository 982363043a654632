"""Loading the VAE from every supported source, and the one-line error for each way it can fail."""

import json
import shutil

import huggingface_hub.constants
import pytest
from diffusers import AutoencoderKLQwenImage
from safetensors.torch import save_file

from vaebuild.errors import ModelLoadError, UserInputError
from vaebuild.model.source import ModelSource, load_vae, weights_sha256

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
VAE_CLASS = "AutoencoderKLQwenImage"


@pytest.fixture(scope="module")
def tiny_sha(tiny_vae):
    return weights_sha256(tiny_vae)


@pytest.fixture
def pipeline_dir(tiny_vae_dir, tmp_path):
    """A diffusers pipeline folder: model_index.json plus the VAE under vae/."""
    root = tmp_path / "pipeline"
    shutil.copytree(tiny_vae_dir, root / "vae")
    index = {"_class_name": "QwenImagePipeline", "vae": ["diffusers", VAE_CLASS]}
    (root / "model_index.json").write_text(json.dumps(index))
    return root



@pytest.fixture
def single_file(tiny_vae, tiny_vae_dir, tmp_path):
    """(checkpoint.safetensors with diffusers keys, its config.json)."""
    checkpoint = tmp_path / "qwen_vae.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_vae.state_dict().items()}, str(checkpoint))
    config = tmp_path / "qwen_vae_config.json"
    shutil.copy(tiny_vae_dir / "config.json", config)
    return checkpoint, config


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache that huggingface_hub (env var and import-time constant) points at."""
    cache = tmp_path / "hf_hub_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads HF_HUB_CACHE once at import time; snapshot_download reads the constant.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def _cache_repo(cache, repo_id, vae_dir):
    """Lay out `repo_id` in `cache` as `hf download` would: snapshots/<commit>/vae/..., refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(vae_dir, snapshot / "vae")
    (snapshot / "model_index.json").write_text(json.dumps({"_class_name": "QwenImagePipeline"}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def _assert_loaded(vae, expected_sha):
    assert isinstance(vae, AutoencoderKLQwenImage)
    assert not vae.training
    assert weights_sha256(vae) == expected_sha


def _assert_one_line(err, *fragments):
    text = str(err)
    assert "\n" not in text and text.strip() == text and text
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in {text!r}"


# --- loading ------------------------------------------------------------------------------------


def test_load_vae_folder(tiny_vae_dir, tiny_sha):
    source = ModelSource(model=str(tiny_vae_dir))
    assert source.describe() == {"kind": "vae-folder", "model": str(tiny_vae_dir)}
    _assert_loaded(load_vae(source), tiny_sha)


def test_load_pipeline_folder(pipeline_dir, tiny_sha):
    source = ModelSource(model=str(pipeline_dir))
    assert source.describe()["kind"] == "pipeline-folder"
    _assert_loaded(load_vae(source), tiny_sha)


def test_load_single_file_with_config(single_file, tiny_sha):
    checkpoint, config = single_file
    source = ModelSource(model=str(checkpoint), config=str(config))
    assert source.describe()["kind"] == "single-file"
    _assert_loaded(load_vae(source), tiny_sha)


def test_load_hf_id_from_local_cache(hf_cache, tiny_vae_dir, tiny_sha):
    _cache_repo(hf_cache, "some-org/qwen-image-test", tiny_vae_dir)
    source = ModelSource(model="some-org/qwen-image-test")
    assert source.describe() == {"kind": "hf-cache", "model": "some-org/qwen-image-test"}
    _assert_loaded(load_vae(source), tiny_sha)


def test_random_init_is_deterministic_per_seed():
    first = weights_sha256(load_vae(ModelSource(random_init=True, seed=0)))
    again = load_vae(ModelSource(random_init=True, seed=0))
    other = weights_sha256(load_vae(ModelSource(random_init=True, seed=1)))
    _assert_loaded(again, first)
    assert other != first
    assert ModelSource(random_init=True, seed=7).describe() == {"kind": "random-init", "seed": 7, "class": VAE_CLASS}


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"model": ""}, {"model": "some/folder", "random_init": True}],
    ids=["neither", "empty_model", "both"],
)
def test_model_source_needs_exactly_one_source(kwargs):
    with pytest.raises(UserInputError) as info:
        ModelSource(**kwargs)
    _assert_one_line(info.value, "--model", "--random-init")


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/nonexistent/qwen_vae", "./no_such_folder", "no_such_file.safetensors"])
def test_missing_path(path):
    with pytest.raises(ModelLoadError) as info:
        load_vae(ModelSource(model=path))
    _assert_one_line(info.value, path, "does not exist")


def test_folder_without_config(tmp_path):
    (tmp_path / WEIGHTS_NAME).write_bytes(b"")
    with pytest.raises(ModelLoadError) as info:
        load_vae(ModelSource(model=str(tmp_path)))
    _assert_one_line(info.value, str(tmp_path), "config.json")


def test_config_of_another_class(tiny_vae_dir, tmp_path):
    folder = tmp_path / "wan_vae"
    shutil.copytree(tiny_vae_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_class_name": "AutoencoderKLWan"}))
    with pytest.raises(ModelLoadError) as info:
        load_vae(ModelSource(model=str(folder)))
    _assert_one_line(info.value, "AutoencoderKLWan", VAE_CLASS)


def test_config_not_json(tiny_vae_dir, tmp_path):
    folder = tmp_path / "bad_json"
    shutil.copytree(tiny_vae_dir, folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError) as info:
        load_vae(ModelSource(model=str(folder)))
    _assert_one_line(info.value, "config.json", "not valid JSON")


def test_truncated_weights(tiny_vae_dir, tmp_path):
    folder = tmp_path / "truncated"
    shutil.copytree(tiny_vae_dir, folder)
    weights = folder / WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError) as info:
        load_vae(ModelSource(model=str(folder)))
    _assert_one_line(info.value, "could not load weights", str(folder))


def test_truncated_single_file(single_file):
    checkpoint, config = single_file
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    with pytest.raises(ModelLoadError) as info:
        load_vae(ModelSource(model=str(checkpoint), config=str(config)))
    _assert_one_line(info.value, "could not read checkpoint", str(checkpoint))


def test_hf_id_not_in_cache(hf_cache, tiny_vae_dir):
    _cache_repo(hf_cache, "some-org/other-model", tiny_vae_dir)
    with pytest.raises(ModelLoadError) as info:
        load_vae(ModelSource(model="some-org/not-downloaded"))
    _assert_one_line(info.value, "'some-org/not-downloaded'", "not in the local Hugging Face cache", "--model /path")


@pytest.mark.parametrize(
    "config_change",
    [{"base_dim": 8}, {"num_res_blocks": 2}, None],
    ids=["other_shapes", "other_layers", "default_qwen_config"],
)
def test_single_file_with_mismatched_config(single_file, tmp_path, config_change):
    checkpoint, config = single_file
    if config_change is None:
        config_arg = None  # the default (full Qwen-Image) architecture
    else:
        changed = tmp_path / "changed_config.json"
        changed.write_text(json.dumps({**json.loads(config.read_text()), **config_change}))
        config_arg = str(changed)
    with pytest.raises(ModelLoadError) as info:
        load_vae(ModelSource(model=str(checkpoint), config=config_arg))
    _assert_one_line(info.value, str(checkpoint), "does not match", "--config")


def test_single_file_with_config_of_another_class(single_file, tmp_path):
    checkpoint, _ = single_file
    config = tmp_path / "wan_config.json"
    config.write_text(json.dumps({"_class_name": "AutoencoderKLWan", "is_residual": True, "patch_size": 2}))
    with pytest.raises(ModelLoadError) as info:
        load_vae(ModelSource(model=str(checkpoint), config=str(config)))
    _assert_one_line(info.value, str(config), f"not an {VAE_CLASS} config")


def test_single_file_with_unknown_suffix(tmp_path):
    checkpoint = tmp_path / "weights.onnx"
    checkpoint.write_bytes(b"x")
    with pytest.raises(ModelLoadError) as info:
        load_vae(ModelSource(model=str(checkpoint)))
    _assert_one_line(info.value, str(checkpoint), ".safetensors")


def test_description_round_trips_to_the_same_source(tmp_path):
    for source in (
        ModelSource(random_init=True, seed=7),
        ModelSource(model=str(tmp_path)),
        ModelSource(model=str(tmp_path / "vae.safetensors"), config=str(tmp_path / "config.json")),
        ModelSource(model=str(tmp_path), allow_pickle=True),
    ):
        assert ModelSource.from_description(source.describe(), allow_pickle=source.allow_pickle) == source
    assert ModelSource.from_description({"kind": "test"}) is None


def test_a_description_never_allows_pickle_by_itself(tmp_path):
    described = ModelSource(model=str(tmp_path), allow_pickle=True).describe()
    assert described["allow_pickle"] is True
    assert ModelSource.from_description(described) == ModelSource(model=str(tmp_path))
