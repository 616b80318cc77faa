"""The client bundle: what a device receives to train its slice of the model, and the checks it runs before use.

A bundle is a folder: `manifest.json`, the ONNX graphs (or ONNX Runtime training artifacts) and
`trainables.npz` (the initial prompts and tail). The manifest names every file with its SHA-256, so a device can
refuse a corrupt or tampered bundle before loading any of it. Written by `export/` (where PyTorch is), read on the
device (no PyTorch): this module is the contract between the two and imports neither.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sfp_common.errors import ConfigError
from sfp_common.preprocess import Preprocessing

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TRAINABLES = "trainables.npz"
OPTIMIZERS = ("sgd", "adamw")
STATE_SLOTS = {"sgd": ("momentum_buffer",), "adamw": ("exp_avg", "exp_avg_sq")}   # torch.optim's state names
# The files a manifest's `graphs` must name, per backend. portable: standard-ONNX train-step graphs.
# training: ONNX Runtime's on-device training artifacts (one checkpoint, three modules, ORT's SGD optimizer).
GRAPH_ROLES = {
    "portable": ("front", "tail_step", "tail_logits", "prompt_step", "local_step", "local_logits"),
    "training": ("checkpoint", "local_training", "local_eval", "tail_training", "tail_eval", "front_training",
                 "front_eval", "optimizer"),
}
BACKENDS = tuple(GRAPH_ROLES)
# Either backend, bundles without head blocks: `embed` (images -> the frozen patch + position embedding), so a device
# embeds each sample once per round and puts the current prompts in itself. Bundles exported before it had none.
EMBED = "embed"


def param_key(name: str) -> str:
    """Graph input naming: trainables, optimizer state and their updated values ("new." + key) are graph I/O."""
    return f"param.{name}"


def state_key(slot: str, name: str) -> str:
    return f"state.{slot}.{name}"


NEW = "new."


class BundleError(ConfigError):
    """A bundle that is missing, corrupt, or does not fit what the device was asked to do."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    part: str = "tail"      # "prompts" or "tail": which graph family updates it


@dataclass(frozen=True)
class OptimizerSpec:
    """The client optimizer, baked into the training graphs; only the learning rate is chosen per step."""

    name: str = "adamw"
    weight_decay: float = 0.0
    momentum: float = 0.9                   # sgd
    betas: tuple[float, float] = (0.9, 0.999)   # adamw
    eps: float = 1e-8                       # adamw

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.name!r}; choose one of {', '.join(OPTIMIZERS)}")
        values = (self.weight_decay, self.momentum, *self.betas, self.eps)
        if not all(math.isfinite(v) and v >= 0 for v in values) or not all(b < 1 for b in self.betas):
            raise ConfigError(f"optimizer hyperparameters out of range: {self}")

    @property
    def slots(self) -> tuple[str, ...]:
        return STATE_SLOTS[self.name]


@dataclass(frozen=True)
class Manifest:
    backend: str
    model_id: str
    num_classes: int
    embed_dim: int
    prompts: int
    head_blocks: int
    tail_blocks: int
    num_prefix_tokens: int      # cls + register tokens; the prompts follow them
    num_tokens: int             # tokens per image the head sends to the server
    tail_tokens: int            # tokens per image the tail reads back from the server (1: cls only)
    preprocessing: Preprocessing
    optimizer: OptimizerSpec
    opset: int
    trainables: tuple[TensorSpec, ...]
    graphs: dict[str, str]      # role -> file
    files: dict[str, str] = field(default_factory=dict)        # file -> sha256
    verification: dict[str, Any] = field(default_factory=dict)  # what the exporter checked, and the errors seen
    format_version: int = FORMAT_VERSION

    @property
    def embeds(self) -> bool:
        """Whether the smashed tokens are the embed graph's output with the prompts put in (no head blocks)."""
        return self.head_blocks == 0 and EMBED in self.graphs

    @property
    def prompt_gradient_only(self) -> bool:
        """With no head blocks the server sends dL/dprompts summed over the batch, not dL/dtokens."""
        return self.head_blocks == 0

    def trainable_names(self, part: str | None = None) -> list[str]:
        return [t.name for t in self.trainables if part is None or t.part == part]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        try:
            raw = json.loads(text)
            if not isinstance(raw, dict):
                raise TypeError("the manifest is not a JSON object")
            version = raw.get("format_version")
            if version != FORMAT_VERSION:
                raise BundleError(f"bundle format version {version!r} is not supported (this device reads "
                                  f"version {FORMAT_VERSION}); export the bundle again with this release")
            raw = dict(raw)
            raw["preprocessing"] = Preprocessing(**{**raw["preprocessing"],
                                                    "input_size": tuple(raw["preprocessing"]["input_size"]),
                                                    "mean": tuple(raw["preprocessing"]["mean"]),
                                                    "std": tuple(raw["preprocessing"]["std"])})
            raw["optimizer"] = OptimizerSpec(**{**raw["optimizer"], "betas": tuple(raw["optimizer"]["betas"])})
            raw["trainables"] = tuple(TensorSpec(**{**t, "shape": tuple(int(d) for d in t["shape"])})
                                      for t in raw["trainables"])
            manifest = cls(**raw)
        except BundleError:
            raise
        except (ValueError, TypeError, KeyError) as err:
            raise BundleError(f"bundle manifest is malformed: {type(err).__name__}: {err}") from None
        if manifest.backend not in BACKENDS:
            raise BundleError(f"unknown bundle backend {manifest.backend!r}; this device knows {', '.join(BACKENDS)}")
        missing = [role for role in GRAPH_ROLES[manifest.backend] if role not in manifest.graphs]
        if missing:
            raise BundleError(f"bundle manifest names no graph for {', '.join(missing)}")
        return manifest


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: str | Path, manifest: Manifest) -> Manifest:
    """Hash every file in the folder (the manifest aside) into the manifest, and write it."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): sha256_of(p) for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    manifest = Manifest(**{**manifest.__dict__, "files": files})
    (folder / MANIFEST).write_text(manifest.to_json())
    return manifest


def read_bundle(folder: str | Path) -> Manifest:
    """The manifest of a bundle whose every file is present and unchanged, and whose trainables fit it."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise BundleError(f"{folder} is not a client bundle: it has no {MANIFEST}")
    manifest = Manifest.from_json((folder / MANIFEST).read_text())
    for role, name in manifest.graphs.items():
        if name not in manifest.files:
            raise BundleError(f"graph {role} ({name}) is not among the bundle's hashed files")
    if TRAINABLES not in manifest.files:
        raise BundleError(f"bundle has no {TRAINABLES}")
    for name, expected in manifest.files.items():
        path = folder / name
        if ".." in Path(name).parts or Path(name).is_absolute():
            raise BundleError(f"bundle names a file outside itself: {name}")
        if not path.is_file():
            raise BundleError(f"bundle file {name} is missing")
        if sha256_of(path) != expected:
            raise BundleError(f"bundle file {name} does not match its hash: corrupt or changed after export")
    check_trainables(manifest, load_trainables(folder, manifest))
    return manifest


def load_trainables(folder: str | Path, manifest: Manifest) -> dict[str, np.ndarray]:
    try:
        with np.load(Path(folder) / TRAINABLES, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except (OSError, ValueError) as err:
        raise BundleError(f"{TRAINABLES} cannot be read: {err}") from None


def check_trainables(manifest: Manifest, tensors: dict[str, np.ndarray], what: str = "trainables") -> None:
    """Exactly the manifest's tensors, each with its shape and dtype, all finite: anything else is refused."""
    expected = {t.name: t for t in manifest.trainables}
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise BundleError(f"{what} do not match the bundle: missing {missing or 'none'}, unexpected {extra or 'none'}")
    for name, spec in expected.items():
        value = tensors[name]
        if tuple(value.shape) != spec.shape or value.dtype != np.dtype(spec.dtype):
            raise BundleError(f"{what}: {name} is {value.dtype}{list(value.shape)}, the bundle expects "
                              f"{spec.dtype}{list(spec.shape)}")
        if not np.isfinite(value).all():
            raise BundleError(f"{what}: {name} holds NaN or Inf")


# ------------------------------------------------------------------------------------------ the archive on the wire
def pack_bundle(folder: str | Path) -> bytes:
    """A bundle folder as the gzipped tar sent to a device in its enrollment reply (sorted: same folder, same
    bytes)."""
    folder, buffer = Path(folder), io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=path.relative_to(folder).as_posix())
    return buffer.getvalue()


def install_bundle(archive: bytes, target: Path) -> Manifest:
    """Unpack an archive beside `target`, verify every hash, then swap it in; a bad one leaves `target` as it was."""
    target = Path(target)
    staging = target.with_name(target.name + ".new")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
            tar.extractall(staging, filter="data")
        manifest = read_bundle(staging)
    except (tarfile.TarError, OSError, BundleError) as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise BundleError(f"the bundle received is not valid: {err}") from None
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return manifest
