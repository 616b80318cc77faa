"""What a device can do with its bundle, whichever backend trains it: one interface, two implementations.

A split batch is three calls: `smash` (images -> tokens for the server; with no head blocks, `embed` once per
sample per round and `attach_prompts` per batch, as `edge_client/round.py` does), `tail_step` (the server's
features -> loss, logits, the gradient the server needs, and the tail updated), `prompt_step` (the server's
gradient -> the prompts updated). `tail_only_step` trains the tail on features kept from earlier rounds (the default local-loss
update); `local_step` and `local_logits` are the paper's body-skipped local path (its local update and EL2N);
`tail_logits` evaluates. Trainables and optimizer state go in and out as named numpy arrays, keyed as the
bundle names them, so FedAvg, checkpoints and the exporter's check all see the same tensors.

The optimizer's step counter advances once per `local_step`, once per `tail_only_step` and once per split batch
(in `prompt_step`): a split batch updates prompts and tail with one shared step, as one torch optimizer over both
would.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sfp_common.bundle import BundleError, Manifest, check_trainables, load_trainables, read_bundle, state_key
from sfp_common.pruning import el2n_scores

@dataclass(frozen=True)
class TailStep:
    loss: float
    logits: np.ndarray
    dfeatures: np.ndarray      # dL/dfeatures: what goes back up to the server


class ClientRuntime(ABC):
    """The client slice of one bundle, loaded and checked; subclasses run it on one backend."""

    def __init__(self, folder: str | Path, manifest: Manifest, threads: int = 1) -> None:
        self.folder = Path(folder)
        self.manifest = manifest
        self.threads = threads

    # --------------------------------------------------------------------- backend operations
    @abstractmethod
    def front_tokens(self, images: np.ndarray) -> np.ndarray:
        """The front graph: images -> smashed tokens, prompts (and head blocks) included."""

    @abstractmethod
    def embed(self, images: np.ndarray) -> np.ndarray:
        """The embed graph (bundles with `manifest.embeds`): images -> the frozen patch + position embedding."""

    @abstractmethod
    def prompts(self) -> np.ndarray:
        """The current prompts [P, D] (possibly the runtime's own array: read it, do not change it)."""

    @abstractmethod
    def tail_step(self, features: np.ndarray, labels: np.ndarray, lr: float) -> TailStep: ...

    @abstractmethod
    def tail_only_step(self, features: np.ndarray, labels: np.ndarray, lr: float) -> TailStep:
        """A whole optimizer step of the tail alone, on features the device already holds (the cached-feature
        local update): prompts untouched, as torch.optim leaves a parameter without a gradient."""

    @abstractmethod
    def prompt_step(self, server_grad: np.ndarray, lr: float, images: np.ndarray | None = None) -> None:
        """Head blocks = 0: `server_grad` is dL/dprompts [P, D]. Otherwise dL/dtokens, and the images again."""

    @abstractmethod
    def local_step(self, images: np.ndarray, labels: np.ndarray, lr: float) -> tuple[float, np.ndarray]: ...

    @abstractmethod
    def local_logits(self, images: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def tail_logits(self, features: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def trainables(self) -> dict[str, np.ndarray]:
        """Copies of the current prompts and tail."""

    @abstractmethod
    def _set_trainables(self, tensors: dict[str, np.ndarray]) -> None: ...

    @abstractmethod
    def optimizer_state(self) -> tuple[dict[str, np.ndarray], int]:
        """Optimizer state keyed `state.<slot>.<name>`, and the step counter."""

    @abstractmethod
    def load_optimizer_state(self, state: dict[str, np.ndarray], step: int) -> None: ...

    # --------------------------------------------------------------------- shared behaviour
    def smash(self, images: np.ndarray) -> np.ndarray:
        """The smashed tokens for the server."""
        return self.attach_prompts(self.embed(images)) if self.manifest.embeds else self.front_tokens(images)

    def attach_prompts(self, embedded: np.ndarray) -> np.ndarray:
        """`Head.attach_prompts` (export/split.py): cls/register tokens, the current prompts, the patch tokens."""
        m = self.manifest
        if embedded.ndim != 3 or embedded.shape[1:] != (m.num_tokens - m.prompts, m.embed_dim) or not len(embedded):
            raise BundleError(f"embedded tokens must be [B, {m.num_tokens - m.prompts}, {m.embed_dim}], "
                              f"got {list(embedded.shape)}")
        prompts = self.prompts()
        n = m.num_prefix_tokens
        return np.concatenate([embedded[:, :n], np.broadcast_to(prompts, (len(embedded), *prompts.shape)),
                               embedded[:, n:]], axis=1, dtype=np.float32)

    def load_trainables(self, tensors: dict[str, np.ndarray]) -> None:
        """Replace prompts and tail (the global state from the server), after checking names, shapes, values."""
        check_trainables(self.manifest, tensors, "received trainables")
        self._set_trainables({k: np.array(v, dtype=np.float32, copy=True) for k, v in tensors.items()})

    def reset_optimizer(self) -> None:
        """A fresh optimizer: every round starts from zero state, as the reference federation's does."""
        zeros = {state_key(slot, t.name): np.zeros(t.shape, np.float32)
                 for slot in self.manifest.optimizer.slots for t in self.manifest.trainables}
        self.load_optimizer_state(zeros, 0)

    def local_path_scores(self, images: np.ndarray, labels: np.ndarray, batch_size: int) -> np.ndarray:
        """EL2N scores of local samples through the body-skipped local path, in the batches the reference uses."""
        logits = np.concatenate([self.local_logits(images[i:i + batch_size])
                                 for i in range(0, len(images), batch_size)])
        return el2n_scores(logits, labels)

    def save_state(self, path: str | Path) -> None:
        """Trainables, optimizer state and step in one .npz, written atomically (a crash leaves the old file)."""
        state, step = self.optimizer_state()
        arrays = {f"trainables/{k}": v for k, v in self.trainables().items()}
        arrays.update({f"optimizer/{k}": v for k, v in state.items()})
        arrays["step"] = np.array(step, np.int64)
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        tmp.replace(path)

    def load_state(self, path: str | Path) -> None:
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {name: npz[name] for name in npz.files}
        except (OSError, ValueError) as err:
            raise BundleError(f"device state {path} cannot be read: {err}") from None
        trainables = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("trainables/")}
        state = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("optimizer/")}
        if "step" not in arrays:
            raise BundleError(f"device state {path} has no step counter")
        check_trainables(self.manifest, trainables, f"device state {path}")
        self._check_state(state)     # both checked before either is loaded: nothing is half-restored
        self.load_trainables(trainables)
        self.load_optimizer_state(state, int(arrays["step"]))

    def _check_state(self, state: dict[str, np.ndarray]) -> None:
        expected = {state_key(slot, t.name): t.shape
                    for slot in self.manifest.optimizer.slots for t in self.manifest.trainables}
        if set(state) != set(expected):
            raise BundleError(f"optimizer state does not match the bundle: expected {sorted(expected)}, "
                              f"got {sorted(state)}")
        for key, shape in expected.items():
            if tuple(state[key].shape) != shape:
                raise BundleError(f"optimizer state {key} has shape {list(state[key].shape)}, expected {list(shape)}")


def check_labels(labels: np.ndarray, batch: int, manifest: Manifest) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (batch,) or not np.issubdtype(labels.dtype, np.integer):
        raise BundleError(f"labels must be {batch} integers, got {labels.dtype}{list(labels.shape)}")
    if labels.size and (labels.min() < 0 or labels.max() >= manifest.num_classes):
        raise BundleError(f"labels must be in [0, {manifest.num_classes}), got {labels.min()}..{labels.max()}")
    return labels.astype(np.int64)


def check_features(features: np.ndarray, manifest: Manifest) -> np.ndarray:
    """The server's body output at the positions the tail reads: [B, tail_tokens, embed_dim]."""
    expected = (manifest.tail_tokens, manifest.embed_dim)
    if features.ndim != 3 or tuple(features.shape[1:]) != expected or len(features) == 0:
        raise BundleError(f"features must be [B, {expected[0]}, {expected[1]}], got {list(features.shape)}")
    return np.ascontiguousarray(features, dtype=np.float32)


def check_server_grad(server_grad: np.ndarray, manifest: Manifest,
                      images: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """(gradient, images) for a prompt update: dL/dprompts [P, D] with no head blocks; otherwise dL/dtokens and
    the batch's images again (the head is re-run)."""
    grad = np.ascontiguousarray(server_grad, dtype=np.float32)
    m = manifest
    if m.prompt_gradient_only:
        if grad.shape != (m.prompts, m.embed_dim):
            raise BundleError(f"prompt gradient must be [{m.prompts}, {m.embed_dim}], got {list(grad.shape)}")
        return grad, None
    if images is None:
        raise BundleError("with head blocks the prompt update needs the batch's images again")
    images = check_batch(images, m)
    if grad.shape != (len(images), m.num_tokens, m.embed_dim):
        raise BundleError(f"token gradient must be [{len(images)}, {m.num_tokens}, {m.embed_dim}], "
                          f"got {list(grad.shape)}")
    return grad, images


def check_batch(images: np.ndarray, manifest: Manifest, what: str = "images") -> np.ndarray:
    """A float32 NCHW batch of the bundle's input size, or a clear error (ONNX Runtime's is not)."""
    expected = tuple(manifest.preprocessing.input_size)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected or len(images) == 0:
        raise BundleError(f"{what} must be a non-empty batch of shape [B, {', '.join(map(str, expected))}], "
                          f"got {list(images.shape)}")
    return np.ascontiguousarray(images, dtype=np.float32)


def open_runtime(folder: str | Path, threads: int = 1, providers: list[str] | None = None) -> ClientRuntime:
    """Check the bundle, then load it on the backend its manifest names, with its initial trainables."""
    manifest = read_bundle(folder)
    runtime: ClientRuntime
    if manifest.backend == "training":
        from edge_client.ort_training import TrainingRuntime
        runtime = TrainingRuntime(folder, manifest, threads, providers)
    else:
        from edge_client.portable import PortableRuntime
        runtime = PortableRuntime(folder, manifest, threads, providers)
    runtime.load_trainables(load_trainables(folder, manifest))
    runtime.reset_optimizer()
    return runtime
