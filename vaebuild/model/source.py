"""Where the VAE comes from: a local folder, a cached Hugging Face id, a single file, or seeded random init.

`--random-init` is only ever used when the user asks for it; every other source either loads
real weights or fails with a one-line `ModelLoadError`. Folders load safetensors only, unless
`allow_pickle` (`--allow-pickle`) lets diffusers fall back to a pickled `.bin`, which can run code
when loaded; single-file `.pt/.bin/.ckpt` checkpoints load with `torch.load(weights_only=True)`.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from vaebuild.errors import ModelLoadError, UserInputError, one_line

VAE_CLASS_NAME = "AutoencoderKLQwenImage"
SINGLE_FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")


@dataclass(frozen=True)
class ModelSource:
    """A description of where to load the VAE from. Exactly one of `model` or `random_init`."""

    model: str | None = None
    random_init: bool = False
    seed: int = 0
    config: str | None = None  # optional config.json for a single-file checkpoint
    allow_pickle: bool = False  # let a folder without safetensors load pickled weights

    def __post_init__(self):
        if bool(self.model) == bool(self.random_init):
            raise UserInputError(
                "choose the VAE: pass --model PATH_OR_HF_ID, or --random-init for the Qwen-Image "
                "architecture with seeded random weights"
            )

    def describe(self):
        """A JSON-ready description for build records (`from_description` turns it back into a source)."""
        if self.random_init:
            return {"kind": "random-init", "seed": self.seed, "class": VAE_CLASS_NAME}
        described = {"kind": self._kind(), "model": self.model}
        if self.config:
            described["config"] = self.config
        if self.allow_pickle:
            described["allow_pickle"] = True
        return described

    @classmethod
    def from_description(cls, described, allow_pickle=False):
        """The source a `describe()` record came from, or None when the record cannot be re-loaded.

        A record never allows pickled weights by itself: `allow_pickle` is the caller's choice.
        """
        if described.get("kind") == "random-init":
            return cls(random_init=True, seed=int(described.get("seed", 0)))
        if described.get("model"):
            return cls(model=str(described["model"]), config=described.get("config"), allow_pickle=allow_pickle)
        return None

    def _kind(self):
        path = Path(self.model)
        if path.is_file():
            return "single-file"
        if path.is_dir():
            return "pipeline-folder" if (path / "vae").is_dir() else "vae-folder"
        return "hf-cache"


def load_vae(source: ModelSource):
    """Load the VAE described by `source` in float32, in eval mode, on the CPU."""
    from diffusers import AutoencoderKLQwenImage
    import torch

    if source.random_init:
        torch.manual_seed(source.seed)
        vae = AutoencoderKLQwenImage()
        _randomize_norm_gains(vae, source.seed)
        return vae.eval()
    path = Path(source.model)
    if path.is_file():
        return _load_single_file(path, source.config).eval()
    if path.is_dir():
        return _load_folder(path, source.allow_pickle).eval()
    if _looks_like_path(source.model):
        raise ModelLoadError(f"model path '{source.model}' does not exist; pass an existing folder or file")
    return _load_folder(_cached_snapshot(source.model), source.allow_pickle).eval()


def _randomize_norm_gains(vae, seed):
    """Give RMS-norm gains non-trivial values so random-init tests exercise every parameter."""
    import torch

    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in vae.named_parameters():
            if name.endswith(".gamma"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))


def _looks_like_path(text):
    return text.startswith((".", "/", "~")) or text.count("/") != 1 or Path(text).suffix != ""


def _vae_folder(path: Path) -> Path:
    if (path / "vae" / "config.json").is_file():
        return path / "vae"
    if (path / "config.json").is_file():
        return path
    raise ModelLoadError(
        f"'{path}' has neither config.json nor vae/config.json; pass a diffusers pipeline folder or its vae/ folder"
    )


def _load_folder(path: Path, allow_pickle: bool):
    from diffusers import AutoencoderKLQwenImage

    folder = _vae_folder(path)
    try:
        class_name = json.loads((folder / "config.json").read_text()).get("_class_name")
    except (OSError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{folder / 'config.json'} is not valid JSON ({err}); re-download or fix it") from None
    if class_name not in (None, VAE_CLASS_NAME):
        raise ModelLoadError(
            f"{folder / 'config.json'} describes {class_name}, not {VAE_CLASS_NAME}; pass the Qwen-Image VAE folder"
        )
    try:
        return AutoencoderKLQwenImage.from_pretrained(
            folder, local_files_only=True, low_cpu_mem_usage=False, use_safetensors=None if allow_pickle else True
        )
    except Exception as err:  # diffusers raises many types for corrupt or partial weights
        pickled = sorted(p.name for p in folder.glob("*.bin"))
        if not allow_pickle and pickled and not any(folder.glob("*.safetensors")):
            raise ModelLoadError(
                f"{folder} has no safetensors weights, only pickled {', '.join(pickled)}, which can run code when "
                "loaded; convert it to safetensors, or pass --allow-pickle if you trust it"
            ) from None
        raise ModelLoadError(f"could not load weights from {folder}: {one_line(err)}") from None


def _load_single_file(path: Path, config_path):
    from diffusers import AutoencoderKLQwenImage

    if path.suffix not in SINGLE_FILE_SUFFIXES:
        raise ModelLoadError(f"'{path}' is not a checkpoint ({', '.join(SINGLE_FILE_SUFFIXES)}); pass a folder or a checkpoint")
    config = {}
    if config_path:
        try:
            config = json.loads(Path(config_path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ModelLoadError(f"could not read --config {config_path}: {one_line(err)}") from None
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    try:
        vae = AutoencoderKLQwenImage(**config)
    except TypeError as err:
        raise ModelLoadError(f"--config {config_path} is not an {VAE_CLASS_NAME} config: {one_line(err)}") from None
    state = _read_state_dict(path)
    if not any(key.startswith("decoder.mid_block.") for key in state):
        from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

        state = convert_wan_vae_to_diffusers(state)
    model_state = vae.state_dict()
    reshaped = [key for key, tensor in state.items() if key in model_state and tensor.shape != model_state[key].shape]
    if reshaped:  # load_state_dict raises a many-line RuntimeError for these even with strict=False
        key = reshaped[0]
        raise ModelLoadError(
            f"{path} does not match the {VAE_CLASS_NAME} config ({len(reshaped)} tensors of other shapes, e.g. {key} "
            f"is {list(state[key].shape)} in the file, {list(model_state[key].shape)} in the config); "
            "pass --config for its architecture"
        )
    missing, unexpected = vae.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelLoadError(
            f"{path} does not match the {VAE_CLASS_NAME} config ({len(missing)} missing keys, e.g. "
            f"{missing[:1]}; {len(unexpected)} unexpected, e.g. {unexpected[:1]}); pass --config for its architecture"
        )
    return vae


def _read_state_dict(path: Path):
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        import torch

        state = torch.load(path, map_location="cpu", weights_only=True)
        return state.get("state_dict", state)
    except Exception as err:
        raise ModelLoadError(f"could not read checkpoint {path}: {one_line(err)}") from None


def _cached_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=["vae/*", "config.json", "*.safetensors"]))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError, OSError):
        raise ModelLoadError(
            f"'{repo_id}' is not in the local Hugging Face cache and vaebuild never downloads; run "
            f"`hf download {repo_id} --include 'vae/*'` on a connected machine, or pass --model /path/to/folder"
        ) from None


def weights_sha256(module) -> str:
    """Hash of a module's parameters and buffers (names, dtypes, shapes and bytes), independent of file format."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
