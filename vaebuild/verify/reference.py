"""The PyTorch reference of `vaebuild verify`, and the Polygraphy runner that serves it.

The reference: diffusers `AutoencoderKLQwenImage.encode(x).latent_dist.parameters` /
`.decode(z).sample` (the unfolded causal 3-D model, with its feature cache) in float32, on the
GPU when one is visible; weights re-loaded from the manifest's `model` entry (or `--model`) and
required to hash to the manifest's `weights_sha256`. TF32 is off while it runs, and each distinct
input is computed once (`ReferenceCache`).
"""

import contextlib
import hashlib
import time
from collections import OrderedDict

from vaebuild.errors import UserInputError

REFERENCE_NAME = "pytorch"  # the reference runner's name in Polygraphy's results


def model_source(manifest, options, folder):
    """Where the reference's weights come from: `options.model`, else the manifest's `model` entry."""
    from vaebuild.manifest import MANIFEST_NAME
    from vaebuild.model.source import ModelSource

    if options.model:
        return ModelSource(model=options.model, allow_pickle=options.allow_pickle)
    model = manifest.get("model") or {}
    source = ModelSource.from_description(model, allow_pickle=options.allow_pickle)
    if source is not None:
        return source
    raise UserInputError(
        f"{folder / MANIFEST_NAME}: model {model!r} cannot be re-loaded for the PyTorch reference; "
        "pass --model PATH_OR_HF_ID"
    )


def load_reference(source, expected_hash):
    """(vae, weights sha256) from `source`; UserInputError unless the weights hash to `expected_hash`."""
    from vaebuild.model.source import load_vae, weights_sha256

    vae = load_vae(source)
    actual = weights_sha256(vae)
    if actual != expected_hash:
        raise UserInputError(
            f"the weights of {source.describe()} (sha256 {actual[:12]}...) are not the ones these engines were built "
            f"from ({expected_hash[:12]}...); pass --model with the exported model"
        )
    return vae, actual


def reference_device(device):
    """The device the reference runs on ("cuda" or "cpu") for `--device` auto | cpu | cuda; UserInputError when
    cuda is asked for but no GPU is visible."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserInputError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return device


class ReferenceCache:
    """diffusers encode/decode in float32, each distinct input computed once."""

    def __init__(self, vae, device):
        self.vae, self.device, self.outputs = vae, device, {}
        self._on_device = False

    def __call__(self, graph, feed):
        import torch

        key = (graph, tuple(feed.shape), hashlib.sha256(feed.numpy().tobytes()).hexdigest())
        if key not in self.outputs:
            if not self._on_device:
                self.vae.to(self.device)  # load_vae gives float32 already
                self._on_device = True
            start = time.perf_counter()
            x = feed.to(self.device)
            with torch.no_grad(), _strict_fp32():
                if graph == "encoder":
                    out = self.vae.encode(x).latent_dist.parameters
                else:
                    out = self.vae.decode(x).sample
            self.outputs[key] = (out.float().cpu(), time.perf_counter() - start)
        return self.outputs[key]


@contextlib.contextmanager
def _strict_fp32():
    """Disable TF32 matmuls/convolutions for the reference (they would cost ~3 decimal digits)."""
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def reference_runner(graph, input_name, output_name, shape, dtype, reference):
    """A Polygraphy runner serving the cached diffusers reference output (it accepts inputs of `dtype`)."""
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata
    from polygraphy.datatype import DataType

    class DiffusersReferenceRunner(BaseRunner):
        def __init__(self):
            super().__init__(name=REFERENCE_NAME)

        def get_input_metadata_impl(self):
            return TensorMetadata().add(input_name, DataType.from_dtype(dtype), shape)

        def infer_impl(self, feed_dict):
            import torch

            output, seconds = reference(graph, torch.as_tensor(feed_dict[input_name]).float().cpu())
            self.inference_time = seconds
            return OrderedDict([(output_name, output)])

    return DiffusersReferenceRunner()
