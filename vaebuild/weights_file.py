"""One copy of the 2-D graphs' weights per engine folder (`weights.safetensors`), shared by its packages.

Inductor builds compile weight-free packages (their constants are looked up by name at load time)
and write the encoder and decoder graphs' weights once, at the build precision, under their
graph-module names (`encoder.*`, `quant_conv.*`, `post_quant_conv.*`, `decoder.*`: they do not
collide). Convolution weights (4-D tensors) are stored channels-last, as `[out, kh, kw, in]`
(metadata `{"vaebuild_4d_layout": "channels_last"}`), the layout packages take them in, so a load gives
them as views; readers here return every tensor in its module's shape. The manifest records the file's
sha256; `FolderWeights` refuses a file whose hash differs, loads it to a device once and hands the same
tensors to every package.
"""

import hashlib
import json
import logging
import mmap
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vaebuild.errors import UserInputError
from vaebuild.fileio import atomic_output

WEIGHTS_NAME = "weights.safetensors"
ALIGN_BYTES = 256
CHUNK_BYTES = 8 << 20  # the file is also hashed in chunks of this size, so a load can check them in parallel
LAYOUT_KEY = "vaebuild_4d_layout"  # safetensors metadata: how 4-D tensors are stored
_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
           "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
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
    """Write the graphs' tensors to `path` atomically; return its manifest record (hashed from the bytes written)."""
    from safetensors.torch import save

    path = Path(path)
    tensors = {name: _stored(t.cpu()).clone() for name, t in graph_tensors(graphs).items()}
    data = save(tensors, metadata={LAYOUT_KEY: "channels_last"})
    with atomic_output(path, suffix=".safetensors") as tmp:
        tmp.write_bytes(data)
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    return {
        "path": path.name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size_bytes": len(data),
        "tensors": len(tensors),
        "dtypes": dtypes,
        "chunk_bytes": CHUNK_BYTES,
        "chunk_sha256": chunk_hashes(memoryview(data), CHUNK_BYTES),
    }


def _stored(tensor):
    """How `write_weights_file` stores a tensor: a 4-D one as `[out, kh, kw, in]` (channels-last order)."""
    return tensor.permute(0, 2, 3, 1).contiguous() if tensor.dim() == 4 else tensor


def _stored_channels_last(metadata):
    """Whether a file with this safetensors metadata stores 4-D tensors channels-last (files of `write_weights_file`)."""
    return (metadata or {}).get(LAYOUT_KEY) == "channels_last"


def _logical(tensor, stored_channels_last):
    """A tensor as read from a file, in its module's shape (a view: channels-last strides if so stored)."""
    return tensor.permute(0, 3, 1, 2) if stored_channels_last and tensor.dim() == 4 else tensor


def chunk_hashes(data, chunk_bytes, pool=None):
    """sha256 of each `chunk_bytes` piece of `data` (hashlib releases the GIL: a pool hashes them in parallel)."""
    pieces = [data[start:start + chunk_bytes] for start in range(0, len(data), chunk_bytes)]
    digest = lambda piece: hashlib.sha256(piece).hexdigest()  # noqa: E731
    return list(pool.map(digest, pieces)) if pool else [digest(piece) for piece in pieces]


def read_to_device(path, device, check=None, channels_last=False):
    """{name: tensor} of a safetensors file on `device`, all in one allocation, each tensor 256-byte aligned.

    4-D tensors come back channels-last if `channels_last`, else contiguous: a view when the file stores
    them that way (files of `write_weights_file` store them channels-last, older files contiguous), else
    rearranged on the device after the host copies, through a spare region at the end of the allocation
    (no temporary allocation stays in torch's caching allocator).

    Compiled kernels assume aligned constants (views at the file's packed offsets gave CUDA
    "misaligned address" errors), so each tensor gets its own aligned slot, copied straight from the
    file mapped into memory (a `read()` of the 89 MB file cost 50-90 ms on the H100 host; a device
    staging buffer would stay in torch's allocator cache). The mapping is not populated up front: on a
    freshly written file `MAP_POPULATE` took 32-38 ms there, one copy of the unpopulated mapping 13-17 ms;
    on a file written minutes before, both loads took 19-27 ms (benchmarks/results/h100/h100_weights_load_populate.log).
    The copies (and the hash threads) fault the pages in as they read them. `check(data, pool)`, if given,
    runs on the file's bytes in a thread pool meanwhile, and raises to refuse the file.
    """
    import torch

    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise UserInputError(f"{path} is {size} bytes, too short for a safetensors file; rebuild the folder")
        # Private and writable (copy-on-write, never written: torch.frombuffer wants a writable buffer).
        mapped = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    data = memoryview(mapped)
    host = torch.frombuffer(mapped, dtype=torch.uint8)
    header, header_size = _header(path, data, size)
    stored_channels_last = _stored_channels_last(header.pop("__metadata__", None))
    slots, cursor = {}, 0
    for name, info in header.items():
        start, end = info["data_offsets"]
        slots[name] = (cursor, start, end)
        cursor += _aligned(end - start)
    rearranged = [name for name in header if len(header[name]["shape"]) == 4] if channels_last != stored_channels_last else []
    spare = cursor
    cursor += max((_aligned(slots[name][2] - slots[name][1]) for name in rearranged), default=0)
    packed = host[8 + header_size:]
    with ThreadPoolExecutor() as pool:
        checked = pool.submit(check, data, pool) if check else None
        flat = torch.empty(cursor, dtype=torch.uint8, device=device)
        for slot, start, end in slots.values():
            flat[slot:slot + end - start].copy_(packed[start:end])
        if checked:
            checked.result()
    tensors = {}
    for name, (slot, start, end) in slots.items():
        dtype = getattr(torch, _DTYPES[header[name]["dtype"]])
        tensors[name] = _logical(flat[slot:slot + end - start].view(dtype).view(header[name]["shape"]), stored_channels_last)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for name in rearranged:  # on the device, after every host copy: device copies do not wait for the host
        slot, start, end = slots[name]
        tensor = tensors[name]
        copy = flat[spare:spare + end - start].view(tensor.dtype).as_strided(tensor.shape, tensor.stride())
        copy.copy_(tensor)
        strides = torch.empty(tensor.shape, device="meta", memory_format=memory_format).stride()
        tensors[name] = flat[slot:slot + end - start].view(tensor.dtype).as_strided(tensor.shape, strides)
        tensors[name].copy_(copy)
    return tensors


def _header(path, data, size):
    """(header, its size) of a safetensors file's bytes; UserInputError (one line) for a truncated or malformed file."""
    (header_size,) = struct.unpack("<Q", data[:8])
    problem = None
    if 8 + header_size > size:
        problem = f"its header says {header_size} bytes and the file has {size}"
    else:
        try:
            header = json.loads(bytes(data[8:8 + header_size]))
        except ValueError as err:
            problem = f"its header is not JSON ({err})"
        else:
            ends = [info["data_offsets"][1] for name, info in header.items() if name != "__metadata__"]
            if ends and 8 + header_size + max(ends) > size:
                problem = f"its tensors need {8 + header_size + max(ends)} bytes and the file has {size}"
    if problem:
        raise UserInputError(f"{path} is truncated or not a safetensors file ({problem}); rebuild the folder")
    return header, header_size


def _aligned(size):
    return -(-size // ALIGN_BYTES) * ALIGN_BYTES


def load_into(modules, path):
    """Load the weights file at `path` into `modules` (strict: every tensor of each module must be there)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        stored_channels_last = _stored_channels_last(f.metadata())
    tensors = {name: _logical(t, stored_channels_last) for name, t in load_file(str(path)).items()}
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
        self._lock = threading.Lock()  # one load per device and layout, whichever threads ask

    def tensors(self, device, channels_last=False):
        """{name: tensor} on `device` (4-D ones channels-last if asked: `read_to_device`); raises
        UserInputError (one line) for a tampered or mismatched file."""
        import torch

        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        key = (str(device), channels_last)
        with self._lock:
            if key not in self._on_device:
                self._on_device[key] = self._read(device, channels_last)
            return self._on_device[key]

    def _read(self, device, channels_last):
        source = self.override or self.path
        if not source.is_file():
            raise UserInputError(f"weights file {source} is missing; rebuild the folder (or drop weights=)")
        if source == self.path:
            size = source.stat().st_size
            if size != self.record["size_bytes"]:
                raise UserInputError(f"{source}: contents differ from the manifest ({size} bytes, it records "
                                     f"{self.record['size_bytes']}: truncated or replaced); rebuild the folder")
            return read_to_device(source, device, check=self._check_hash, channels_last=channels_last)
        tensors = read_to_device(source, device, channels_last=channels_last)
        self._check_like_folder_file(source, tensors)
        logger.info("using weights from %s instead of %s", source, self.path)
        return tensors

    def release(self):
        """Drop every device copy (of either layout)."""
        with self._lock:
            self._on_device.clear()

    def _check_hash(self, data, pool):
        """Refuse the folder's file unless its bytes hash to what the manifest recorded."""
        record = self.record
        if "chunk_sha256" in record:
            matches = chunk_hashes(data, record["chunk_bytes"], pool) == record["chunk_sha256"]
        else:
            matches = hashlib.sha256(data).hexdigest() == record["sha256"]
        if len(data) != record["size_bytes"] or not matches:
            raise UserInputError(
                f"{self.path}: contents differ from the manifest's sha256 {record['sha256'][:12]}... "
                "(corrupt or replaced); rebuild the folder"
            )

    def _check_like_folder_file(self, source, tensors):
        import torch
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as expected:
            names = set(expected.keys())
            stored_channels_last = _stored_channels_last(expected.metadata())
            for name in sorted(names):
                if name not in tensors:
                    raise UserInputError(f"{source} has no tensor {name!r}; pass weights of this architecture")
                stored = torch.empty(expected.get_slice(name).get_shape(), device="meta")
                shape = list(_logical(stored, stored_channels_last).shape)
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
