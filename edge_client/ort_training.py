"""The `training` backend: ONNX Runtime's on-device training artifacts, run with `onnxruntime.training.api`.

Needs the `onnxruntime-training-cpu` package (x86_64 wheels only, last release 1.19.2; the artifacts are ORT's
standard format, also run by its C, C++, C# and Java training APIs). One CheckpointState holds the prompts, the
tail and the optimizer's state; three Modules share it (local: images -> loss; tail: features -> loss and
dL/dfeatures; front: the prompt update from the server's gradient, and smashing in eval mode) and two ORT
Optimizers apply each step. How the bundle is built, and why the optimizer's state lives inside the training
graphs: export/ort_artifacts.py.

A split batch's update is applied by `prompt_step`: ORT's Optimizer steps every trainable at once, and each
parameter's gradient buffer belongs to the last Module built that uses it, so the tail's direction (computed by
`tail_step`) and the prompts' are applied together, once both are known. Until then `trainables()` shows the
tail before the step, and a second `tail_step` without a `prompt_step` is refused.
"""
from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np

from edge_client.runtime import (ClientRuntime, TailStep, check_batch, check_features, check_labels,
                                 check_server_grad)
from sfp_common.bundle import EMBED, BundleError, Manifest, state_key


def training_api():
    """onnxruntime.training.api without PyTorch: the package's __init__ loads `optim`, whose fp16 wrappers
    need PyTorch, so that one subpackage is stubbed first (api itself needs numpy and the C extension)."""
    sys.modules.setdefault("onnxruntime.training.optim", types.ModuleType("onnxruntime.training.optim"))
    try:
        import onnxruntime
        from onnxruntime.training import api
        onnxruntime.set_default_logger_severity(3)
    except ImportError:
        raise BundleError("this is a 'training' bundle and needs the onnxruntime-training-cpu package "
                          "(pip install 'sfprompt-edge[ort-training]'); plain onnxruntime runs 'portable' "
                          "bundles") from None
    return onnxruntime, api


class TrainingRuntime(ClientRuntime):
    def __init__(self, folder: str | Path, manifest: Manifest, threads: int = 1,
                 providers: list[str] | None = None) -> None:
        super().__init__(folder, manifest, threads)
        if providers not in (None, ["CPUExecutionProvider"]):
            raise BundleError(f"the training backend runs on the CPU here; providers {providers} not supported")
        ort, api = training_api()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        path = {role: str(self.folder / name) for role, name in manifest.graphs.items()}
        try:
            self.state = api.CheckpointState.load_checkpoint(path["checkpoint"])
            self._check_checkpoint()
            # An Optimizer reads each parameter's gradient buffer when it is built, and a Module gives the
            # parameters it uses new buffers: so local + its optimizer first, then front, tail and theirs.
            self.local = api.Module(path["local_training"], self.state, path["local_eval"], session_options=options)
            self.local_optimizer = api.Optimizer(path["optimizer"], self.local)
            self.front = api.Module(path["front_training"], self.state, path["front_eval"], session_options=options)
            self.tail = api.Module(path["tail_training"], self.state, path["tail_eval"], session_options=options)
            self.split_optimizer = api.Optimizer(path["optimizer"], self.tail)
            self.embedder = (ort.InferenceSession(path[EMBED], options, providers=["CPUExecutionProvider"])
                             if EMBED in path else None)
        except BundleError:
            raise
        except Exception as err:   # onnxruntime raises its own exception types for unreadable artifacts
            raise BundleError(f"the bundle's training artifacts cannot be loaded: {err}") from None
        self.step = 0
        self.pending_lr: float | None = None     # a tail step whose update waits for prompt_step

    def _check_checkpoint(self) -> None:
        names = [t.name for t in self.manifest.trainables]
        expected = {n: t.shape for n, t in zip(names, self.manifest.trainables)}
        expected.update({state_key(slot, t.name): t.shape for slot in self.manifest.optimizer.slots
                         for t in self.manifest.trainables})
        found = {name: tuple(p.data.shape) for name, p in self.state.parameters}
        if found != expected:
            raise BundleError(f"the training checkpoint holds {sorted(found.items())}, the manifest declares "
                              f"{sorted(expected.items())}")

    def _call(self, module, train: bool, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        module.train(train)
        if "step" in module.input_names():
            feeds["step"] = np.array([self.step], np.float32)
        outputs = module(*[feeds[name] for name in module.input_names()])
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        named = dict(zip(module.output_names(), outputs))
        if train:
            named["loss"] = outputs[0]    # the loss block names its output after an internal node
        return named

    # --------------------------------------------------------------------- backend operations
    def front_tokens(self, images: np.ndarray) -> np.ndarray:
        return self._call(self.front, False, images=check_batch(images, self.manifest))["tokens"]

    def embed(self, images: np.ndarray) -> np.ndarray:
        if self.embedder is None:
            raise BundleError("this bundle has no embed graph")
        return self.embedder.run(["embedded"], {"images": check_batch(images, self.manifest)})[0]

    def prompts(self) -> np.ndarray:
        return self._get("head.prompts")

    def tail_step(self, features: np.ndarray, labels: np.ndarray, lr: float) -> TailStep:
        if self.pending_lr is not None:
            raise BundleError("tail_step twice without a prompt_step: the first split batch was never finished")
        features = check_features(features, self.manifest)
        out = self._call(self.tail, True, features=features,
                         labels=check_labels(labels, len(features), self.manifest))
        self.pending_lr = lr
        return TailStep(float(out["loss"]), out["logits"], out["dfeatures"])

    def prompt_step(self, server_grad: np.ndarray, lr: float, images: np.ndarray | None = None) -> None:
        m = self.manifest
        grad, images = check_server_grad(server_grad, m, images)
        if self.pending_lr is None:
            raise BundleError("prompt_step without a tail_step: a split batch is smash, tail_step, prompt_step")
        if lr != self.pending_lr:
            raise BundleError(f"a split batch has one learning rate: tail_step had {self.pending_lr}, not {lr}")
        if m.prompt_gradient_only:
            self._call(self.front, True, upstream=grad)
        else:
            self._call(self.front, True, images=images, upstream=grad)
        self.split_optimizer.set_learning_rate(lr)
        self.split_optimizer.step()
        self.pending_lr = None
        self.step += 1

    def tail_only_step(self, features: np.ndarray, labels: np.ndarray, lr: float) -> TailStep:
        """ORT's Optimizer steps every parameter from its buffer, and the prompts' still holds the last split
        batch's direction: the prompts are put back after the step, so only the tail moves."""
        step = self.tail_step(features, labels, lr)
        held = {name: self._get(name) for name in self.manifest.trainable_names("prompts")}
        self.split_optimizer.set_learning_rate(lr)
        self.split_optimizer.step()
        for name, value in held.items():
            self._put(name, value)
        self.pending_lr = None
        self.step += 1
        return step

    def local_step(self, images: np.ndarray, labels: np.ndarray, lr: float) -> tuple[float, np.ndarray]:
        images = check_batch(images, self.manifest)
        out = self._call(self.local, True, images=images, labels=check_labels(labels, len(images), self.manifest))
        self.local_optimizer.set_learning_rate(lr)
        self.local_optimizer.step()
        self.step += 1
        return float(out["loss"]), out["logits"]

    def local_logits(self, images: np.ndarray) -> np.ndarray:
        return self._call(self.local, False, images=check_batch(images, self.manifest))["logits"]

    def tail_logits(self, features: np.ndarray) -> np.ndarray:
        return self._call(self.tail, False, features=check_features(features, self.manifest))["logits"]

    # --------------------------------------------------------------------- tensors in and out
    def _get(self, name: str) -> np.ndarray:
        return np.array(self.state.parameters[name].data, dtype=np.float32, copy=True)

    def _put(self, name: str, value: np.ndarray) -> None:
        self.state.parameters[name] = np.ascontiguousarray(value, dtype=np.float32)

    def trainables(self) -> dict[str, np.ndarray]:
        return {t.name: self._get(t.name) for t in self.manifest.trainables}

    def _set_trainables(self, tensors: dict[str, np.ndarray]) -> None:
        for name, value in tensors.items():
            self._put(name, value)

    def optimizer_state(self) -> tuple[dict[str, np.ndarray], int]:
        keys = [state_key(slot, t.name) for slot in self.manifest.optimizer.slots for t in self.manifest.trainables]
        return {key: self._get(key) for key in keys}, self.step

    def load_optimizer_state(self, state: dict[str, np.ndarray], step: int) -> None:
        self._check_state(state)
        for key, value in state.items():
            self._put(key, value)
        self.step = int(step)
        self.pending_lr = None
