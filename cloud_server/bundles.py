"""The device bundles a federation hands out: exported once per backend into the state folder (checked against
PyTorch by the exporter), kept across restarts while they fit the federation's cut, and packed for the wire."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from cloud_server.config import FederationConfig
from export.backbone import resolve_model
from export.bundle import client_model, export_bundle
from export.split import SplitViT
from sfp_common.split_spec import SplitSpec
from sfp_common.bundle import BundleError, Manifest, OptimizerSpec, pack_bundle, read_bundle
from sfp_common.preprocess import Preprocessing

log = logging.getLogger(__name__)


class BundleService:
    def __init__(self, folder: Path, model: SplitViT, preprocessing: Preprocessing, model_id: str,
                 split: SplitSpec, optimizer: OptimizerSpec, training_python: str | None = None) -> None:
        self.folder, self.model, self.preprocessing, self.model_id = Path(folder), model, preprocessing, model_id
        self.split, self.optimizer, self.training_python = split, optimizer, training_python
        self._bundles: dict[tuple[str, int], tuple[Manifest, bytes]] = {}

    def get(self, backend: str, head_blocks: int | None = None) -> tuple[Manifest, bytes]:
        """The checked bundle for a backend and a cut (default: the federation's) and its archive; exported on
        first use unless a fitting one is kept."""
        k = self.split.head_blocks if head_blocks is None else head_blocks
        if (backend, k) not in self._bundles:
            folder = self.folder / (backend if k == self.split.head_blocks else f"{backend}-k{k}")
            try:
                manifest = read_bundle(folder) if folder.exists() else None
            except BundleError:
                manifest = None
            if manifest is not None and not self.fits(manifest, k):
                log.info("the %s bundle in %s was made for another configuration", backend, folder)
                manifest = None
            if manifest is None:
                log.info("exporting the %s bundle, %d head blocks (checked against PyTorch)", backend, k)
                shutil.rmtree(folder, ignore_errors=True)
                manifest, _ = export_bundle(self.model.recut(k), self.preprocessing, folder, self.model_id,
                                            self.optimizer, backend=backend, training_python=self.training_python)
            self._bundles[(backend, k)] = (manifest, pack_bundle(folder))
        return self._bundles[(backend, k)]

    def ready(self, backend: str, head_blocks: int) -> bool:
        """Whether `get` answers at once (an export takes minutes for a large model on a CPU)."""
        return (backend, head_blocks) in self._bundles

    def fits(self, manifest: Manifest, head_blocks: int) -> bool:
        """A bundle kept from an earlier run serves only if it was cut the way this federation cuts."""
        params = dict(self.model.named_parameters())
        return (manifest.model_id == self.model_id and manifest.optimizer == self.optimizer
                and (manifest.prompts, manifest.head_blocks, manifest.tail_blocks) == (
                    self.split.prompts, head_blocks, self.split.tail_blocks)
                and all(t.name in params and tuple(params[t.name].shape) == t.shape for t in manifest.trainables))

    def manifest(self) -> Manifest:
        """The federation's trainables and shapes (the same in every backend's bundle)."""
        return next(iter(self._bundles.values()))[0] if self._bundles else self.get("portable")[0]

    def initial_state(self) -> dict[str, np.ndarray]:
        """The trainables as the cut model holds them: the global state before round 1."""
        names = set(self.manifest().trainable_names())
        return {n: p.detach().numpy().copy() for n, p in self.model.named_parameters() if n in names}


def federation_bundles(cfg: FederationConfig) -> BundleService:
    """The federation's model, cut as configured, and its bundles for every configured backend, exported (or
    found kept) now, so that enrollments do not wait on an export."""
    source = resolve_model(cfg.model)
    model, preprocessing = client_model(source, len(cfg.classes), cfg.split, cfg.img_size, cfg.pretrained, cfg.seed)
    bundles = BundleService(cfg.state_dir / "bundles", model, preprocessing, source.label, cfg.split,
                            cfg.recipe.optimizer, cfg.training_python)
    for backend in cfg.backends:
        bundles.get(backend)
    return bundles
