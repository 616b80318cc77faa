"""The `portable` backend: standard-ONNX train-step graphs run by the plain `onnxruntime` package.

Runs wherever onnxruntime has a wheel (x86, Raspberry Pi, Jetson). Every graph takes the trainables and optimizer
state as inputs and returns their new values, so this class only keeps a dict of arrays keyed by the graphs'
input names and feeds each graph what it asks for.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from edge_client.runtime import (ClientRuntime, TailStep, check_batch, check_features, check_labels,
                                  check_server_grad)
from sfp_common.bundle import EMBED, NEW, BundleError, Manifest, param_key, state_key

BATCH_INPUTS = ("images", "labels", "features", "upstream", "prompt_grad", "step", "lr")


class PortableRuntime(ClientRuntime):
    def __init__(self, folder: str | Path, manifest: Manifest, threads: int = 1,
                 providers: list[str] | None = None) -> None:
        super().__init__(folder, manifest, threads)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        providers = providers or ["CPUExecutionProvider"]
        self.sessions: dict[str, ort.InferenceSession] = {}
        for role, name in manifest.graphs.items():
            try:
                self.sessions[role] = ort.InferenceSession(str(self.folder / name), options, providers=providers)
            except Exception as err:   # onnxruntime raises its own exception types for unreadable graphs
                raise BundleError(f"graph {role} ({name}) cannot be loaded by onnxruntime: {err}") from None
        self.values: dict[str, np.ndarray] = {}     # param.*, state.*.*, step: the graphs' own input names
        self.io = {role: ([a.name for a in s.get_inputs()], [o.name for o in s.get_outputs()])
                   for role, s in self.sessions.items()}
        self._check_graph_inputs()

    def _check_graph_inputs(self) -> None:
        """Every graph input is a batch input or a tensor the manifest declares: a mismatched bundle fails here,
        not with a KeyError in the middle of a round."""
        names = [t.name for t in self.manifest.trainables]
        known = set(BATCH_INPUTS) | {param_key(n) for n in names} | {
            state_key(slot, n) for slot in self.manifest.optimizer.slots for n in names}
        for role, (inputs, _) in self.io.items():
            unknown = [name for name in inputs if name not in known]
            if unknown:
                raise BundleError(f"graph {role} takes inputs the manifest does not declare: {unknown}")

    def _run(self, role: str, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        input_names, output_names = self.io[role]
        inputs = {name: feeds[name] if name in feeds else self.values[name] for name in input_names}
        result = dict(zip(output_names, self.sessions[role].run(output_names, inputs)))
        for name, value in result.items():
            if name.startswith(NEW) and name != "new.step":
                self.values[name[len(NEW):]] = value
        return result

    @staticmethod
    def _scalar(value: float) -> np.ndarray:
        return np.array(value, dtype=np.float32)

    def front_tokens(self, images: np.ndarray) -> np.ndarray:
        return self._run("front", images=check_batch(images, self.manifest))["tokens"]

    def embed(self, images: np.ndarray) -> np.ndarray:
        return self._run(EMBED, images=check_batch(images, self.manifest))["embedded"]

    def prompts(self) -> np.ndarray:
        return self.values[param_key("head.prompts")]

    def _tail(self, features: np.ndarray, labels: np.ndarray, lr: float) -> dict[str, np.ndarray]:
        features = check_features(features, self.manifest)
        return self._run("tail_step", features=features, labels=check_labels(labels, len(features), self.manifest),
                         lr=self._scalar(lr))

    def tail_step(self, features: np.ndarray, labels: np.ndarray, lr: float) -> TailStep:
        out = self._tail(features, labels, lr)
        return TailStep(float(out["loss"]), out["logits"], out["dfeatures"])

    def tail_only_step(self, features: np.ndarray, labels: np.ndarray, lr: float) -> TailStep:
        out = self._tail(features, labels, lr)
        self.values["step"] = out["new.step"]      # the tail's step is the whole step: no prompt_step follows
        return TailStep(float(out["loss"]), out["logits"], out["dfeatures"])

    def prompt_step(self, server_grad: np.ndarray, lr: float, images: np.ndarray | None = None) -> None:
        m = self.manifest
        grad, images = check_server_grad(server_grad, m, images)
        if m.prompt_gradient_only:
            out = self._run("prompt_step", prompt_grad=grad, lr=self._scalar(lr))
        else:
            out = self._run("prompt_step", images=images, upstream=grad, lr=self._scalar(lr))
        self.values["step"] = out["new.step"]

    def local_step(self, images: np.ndarray, labels: np.ndarray, lr: float) -> tuple[float, np.ndarray]:
        images = check_batch(images, self.manifest)
        out = self._run("local_step", images=images, labels=check_labels(labels, len(images), self.manifest),
                        lr=self._scalar(lr))
        self.values["step"] = out["new.step"]
        return float(out["loss"]), out["logits"]

    def local_logits(self, images: np.ndarray) -> np.ndarray:
        return self._run("local_logits", images=check_batch(images, self.manifest))["logits"]

    def tail_logits(self, features: np.ndarray) -> np.ndarray:
        return self._run("tail_logits", features=check_features(features, self.manifest))["logits"]

    def trainables(self) -> dict[str, np.ndarray]:
        return {t.name: self.values[param_key(t.name)].copy() for t in self.manifest.trainables}

    def _set_trainables(self, tensors: dict[str, np.ndarray]) -> None:
        self.values.update({param_key(name): value for name, value in tensors.items()})

    def optimizer_state(self) -> tuple[dict[str, np.ndarray], int]:
        state = {k: v.copy() for k, v in self.values.items() if k.startswith("state.")}
        return state, int(self.values["step"])

    def load_optimizer_state(self, state: dict[str, np.ndarray], step: int) -> None:
        self._check_state(state)
        self.values.update({k: np.array(v, dtype=np.float32, copy=True) for k, v in state.items()})
        self.values["step"] = np.array(float(step), dtype=np.float32)
