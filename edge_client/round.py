"""One SFPrompt round as a device runs it: EL2N pruning, the local-loss update, split training, the upload.

The same phases, batch order and step accounting as the reference federation's `client_round`
(simulation/methods.py), so a device's round can be checked against it number for number. The server is
anything that answers the two split-training calls: the MQTT client in a real federation, the PyTorch body in a
test.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from edge_client.runtime import ClientRuntime
from sfp_common.batching import batch_order
from sfp_common.pruning import select_hardest
from wire_protocol.contracts import RoundPlan


class SplitServer(Protocol):
    def forward(self, tokens: np.ndarray) -> np.ndarray:
        """The smashed tokens go up; the features the tail reads come back."""

    def backward(self, dfeatures: np.ndarray) -> np.ndarray:
        """dL/dfeatures goes up; dL/dprompts [P, D] (no head blocks) or dL/dtokens comes back."""


@dataclass
class RoundResult:
    upload: dict[str, np.ndarray]   # the trained prompts and tail
    num_samples: int                # FedAvg weight
    kept: int                       # samples that went through split training
    loss_sum: float                 # summed training loss of the last split pass


def run_round(runtime: ClientRuntime, images: np.ndarray, labels: np.ndarray, plan: RoundPlan,
              server: SplitServer, on_phase: Callable[[str], None] = lambda phase: None) -> RoundResult:
    """Train from the trainables already loaded (the global state) with a fresh optimizer."""
    runtime.reset_optimizer()
    rng = np.random.default_rng(plan.seed)
    n = len(labels)
    kept = np.arange(n)
    if plan.prune:
        on_phase("pruning")
        kept = select_hardest(runtime.el2n(images, labels, plan.batch_size), plan.keep)
    if plan.local_update:
        on_phase("local update")
        for _ in range(plan.local_loss_epochs):
            for idx in batch_order(n, plan.batch_size, rng):
                runtime.local_step(images[idx], labels[idx], plan.lr)
    on_phase("split training")
    loss_sum = 0.0
    for _ in range(plan.epochs):
        loss_sum = 0.0
        for idx in batch_order(len(kept), plan.batch_size, rng):
            x, y = images[kept[idx]], labels[kept[idx]]
            step = runtime.tail_step(server.forward(runtime.smash(x)), y, plan.lr)
            grad = server.backward(step.dfeatures)
            runtime.prompt_step(grad, plan.lr, images=None if runtime.manifest.prompt_gradient_only else x)
            loss_sum += step.loss * len(y)
    return RoundResult(runtime.trainables(), n, len(kept), loss_sum)
