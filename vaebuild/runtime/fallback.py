"""The runtime's PyTorch fallback: the exact single-frame 2-D model, built on first need."""

import logging
import threading

from vaebuild.errors import UserInputError
from vaebuild.manifest import MANIFEST_NAME

logger = logging.getLogger("vaebuild.runtime")


class FallbackModel:
    """The folded 2-D encoder and decoder of `vae` (default: the manifest's model source), built on the first call."""

    def __init__(self, engine_dir, manifest, vae, device, dtype):
        self.engine_dir = engine_dir
        self.manifest = manifest
        self._vae = vae
        self.device = device
        self.dtype = dtype
        self._graphs = None
        self._lock = threading.Lock()  # built by one thread, once

    @property
    def loaded(self):
        """Whether the 2-D graphs have been built."""
        return self._graphs is not None

    def __call__(self, graph, x):
        """The `graph` ("encoder" or "decoder") output for `x`, already on the device and in the dtype."""
        return self.graph(graph)(x)

    def graph(self, graph):
        """The folded 2-D `graph` module ("encoder" or "decoder"), built on first need (once, from any thread)."""
        with self._lock:
            if self._graphs is None:
                self._build()
        return self._graphs[graph]

    def _build(self):
        from vaebuild.model.graphs import build_graphs

        vae = self._vae if self._vae is not None else self._load_manifest_model()
        encoder, decoder = build_graphs(vae, fold=True, fast_attention=True, fused_norms=True)
        self._graphs = {
            "encoder": encoder.to(device=self.device, dtype=self.dtype),
            "decoder": decoder.to(device=self.device, dtype=self.dtype),
        }
        self._vae = None  # the folded copies are all the fallback needs

    def _load_manifest_model(self):
        from vaebuild.model.source import ModelSource, load_vae, weights_sha256

        described = self.manifest.get("model") or {}
        source = ModelSource.from_description(described)
        if source is None:
            raise UserInputError(
                f"{self.engine_dir / MANIFEST_NAME} does not say where its model came from ({described!r}); "
                "pass fallback_vae= for the PyTorch fallback"
            )
        logger.info("loading the PyTorch fallback VAE from the manifest's model source %s", described)
        vae = load_vae(source)
        if weights_sha256(vae) != self.manifest.get("weights_sha256"):
            logger.warning(
                "the fallback VAE from %s has other weights than the engines in %s were built from",
                described, self.engine_dir,
            )
        return vae
