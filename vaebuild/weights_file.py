"""One copy of the 2-D graphs' weights per engine folder (`weights.safetensors`), shared by its packages.

Inductor builds compile weight-free packages (their constants are looked up by name at load time)
and write the encoder and decoder graphs' weights once, at the build precision, under their
graph-module names (`encoder.*`, `quant_conv.*`, `post_quant_conv.*`, `decoder.*`: they do not
collide). The manifest records the file's sha256; `FolderWeights` refuses a file whose hash
differs, loads it to a device once and hands the same tensors to every package.
"""

import hashlib
import logging
from pathlib import Path

from vaebuild.errors import UserInputError
from vaebuild.fileio import atomic_output, sha256_file

WEIGHTS_NAME = "weights.safetensors"
logger = logging.getLogger("vaebuild.runtime")


def graph_tensors(graphs):
    """{name: tensor} of every parameter and buffer of the graph modules (names are unique across them)."""
    tensors = {}
    for module in graphs:
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if name in tensors:
                raise ValueError(f"tensor name {name!r} appears in two graphs")
            tensors[name] = tensor.detach().contiguous()
    return tensors


def write_weights_file(path, graphs):
    """Write the graphs' tensors to `path` atomically; return its manifest record."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {name: t.cpu().clone() for name, t in graph_tensors(graphs).items()}
    with atomic_output(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp))
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    return {
        "path": path.name,
        "sha256": sha256_file(path),
        "size_bytes": path.stat().st_size,
        "tensors": len(tensors),
        "dtypes": dtypes,
    }


def load_into(modules, path):
    """Load the weights file at `path` into `modules` (strict: every tensor of each module must be there)."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    for module in modules:
        own = dict(module.state_dict())
        missing = [name for name in own if name not in tensors]
        if missing:
            raise UserInputError(f"{path} has no tensor {missing[0]!r} ({len(missing)} missing); rebuild the folder")
        module.load_state_dict({name: tensors[name] for name in own})


class FolderWeights:
    """The shared weights of one engine folder, loaded to each device once, on first use.

    `override`: another safetensors file of the same architecture (e.g. a fine-tune's weights written
    by `write_weights_file`): its tensor names, shapes and dtypes must equal the folder file's; its
    hash is not checked against the manifest (verification then speaks of the folder's weights only).
    """

    def __init__(self, folder, record, override=None):
        self.folder = Path(folder)
        self.record = record
        self.path = self.folder / record["path"]
        self.override = Path(override) if override else None
        self._on_device = {}

    def tensors(self, device):
        """{name: tensor} on `device`; raises UserInputError (one line) for a tampered or mismatched file."""
        import torch

        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        key = str(device)
        if key not in self._on_device:
            source = self.override or self.path
            tensors = self._read_checked(source)
            self._on_device[key] = {name: t.to(device) for name, t in tensors.items()}
        return self._on_device[key]

    def release(self):
        """Drop every device copy."""
        self._on_device.clear()

    def _read_checked(self, source):
        from safetensors.torch import load

        if not source.is_file():
            raise UserInputError(f"weights file {source} is missing; rebuild the folder (or drop --weights)")
        data = source.read_bytes()
        if source == self.path:
            digest = hashlib.sha256(data).hexdigest()
            if digest != self.record["sha256"]:
                raise UserInputError(
                    f"{source}: sha256 {digest[:12]}... differs from the manifest's {self.record['sha256'][:12]}... "
                    "(corrupt or replaced); rebuild the folder"
                )
            return load(data)
        tensors = load(data)
        self._check_like_folder_file(source, tensors)
        logger.info("using weights from %s instead of %s", source, self.path)
        return tensors

    def _check_like_folder_file(self, source, tensors):
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as expected:
            names = set(expected.keys())
            for name in sorted(names):
                if name not in tensors:
                    raise UserInputError(f"{source} has no tensor {name!r}; pass weights of this architecture")
                shape = list(expected.get_slice(name).get_shape())
                got = tensors[name]
                if list(got.shape) != shape or str(got.dtype).removeprefix("torch.") not in self.record["dtypes"]:
                    raise UserInputError(
                        f"{source}: tensor {name!r} is {str(got.dtype).removeprefix('torch.')} {list(got.shape)}, "
                        f"the packages expect {'/'.join(self.record['dtypes'])} {shape}"
                    )
        extra = sorted(set(tensors) - names)
        if extra:
            raise UserInputError(f"{source} has tensor {extra[0]!r}, which these packages do not use; "
                                 "pass weights of this architecture")
