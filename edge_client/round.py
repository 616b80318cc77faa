"""One SFPrompt round as a device runs it: pruning, split training, the local-loss update, the upload.

The same phases, batch order and step accounting as the reference federation's `client_round`
(simulation/methods.py), both following the round plan's recipe (sfp_common/recipe.py), so a device's round can be
checked against it number for number. The server is anything that answers the two split-training calls: the
MQTT client in a real federation, the PyTorch body in a test.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from edge_client.runtime import ClientRuntime
from sfp_common.batching import batch_order
from sfp_common.defence import noise_generator, token_noise
from sfp_common.pruning import SampleMemory, choose_samples
from sfp_common.token_store import reuses_tokens
from wire_protocol.contracts import RoundPlan


class SplitServer(Protocol):
    def forward(self, tokens: np.ndarray, ids: np.ndarray | None = None) -> np.ndarray:
        """The smashed tokens go up (with the samples' ids when the server is to keep them); the features the
        tail reads come back."""

    def forward_kept(self, prompts: np.ndarray, ids: np.ndarray) -> np.ndarray | None:
        """Only the current prompts and the ids go up, and the server rebuilds the tokens it kept
        (sfp_common/token_store.py); None when it does not hold them all (restarted, another worker)."""

    def backward(self, dfeatures: np.ndarray) -> np.ndarray:
        """dL/dfeatures goes up; dL/dprompts [P, D] (no head blocks) or dL/dtokens comes back."""


@dataclass
class RoundResult:
    upload: dict[str, np.ndarray]   # the trained prompts and tail
    num_samples: int                # FedAvg weight
    kept: int                       # samples that went through split training
    loss_sum: float                 # summed training loss of the last split pass


def run_round(runtime: ClientRuntime, images: np.ndarray, labels: np.ndarray, plan: RoundPlan,
              server: SplitServer, memory: SampleMemory,
              on_phase: Callable[[str], None] = lambda phase: None,
              embed_cache_bytes: int | None = None,
              on_batch: Callable[[int, int], None] = lambda done, total: None,
              owner_agrees: bool = False) -> RoundResult:
    """Train from the trainables already loaded (the global state) with a fresh optimizer. `memory` (this device's
    scores and cached features) is updated in place: hand in a copy when the round may have to be undone.
    `embed_cache_bytes`: the most memory the kept samples' embedded tokens may take (the profile's; None: no
    limit); beyond it each split batch embeds its images again (the same numbers, more compute). `on_batch(done,
    total)`: after each split-training batch, for progress. `owner_agrees`: the device's owner let the server
    keep its tokens; they are kept when the plan asks for it too and the bundle has no head blocks."""
    recipe = plan.recipe
    runtime.reset_optimizer()
    rng = np.random.default_rng(plan.seed)
    noise = noise_generator(rng, recipe.token_noise)
    n = len(labels)
    if recipe.prune != "none":
        on_phase("pruning")
    kept = choose_samples(recipe, memory, rng,
                          lambda: runtime.local_path_scores(images, labels, recipe.batch_size))
    if recipe.local_update == "local-path":
        on_phase("local update")
        for _ in range(recipe.local_epochs):
            for idx in batch_order(n, recipe.batch_size, rng):
                runtime.local_step(images[idx], labels[idx], recipe.lr)
    on_phase("split training")
    keeps = keeps_tokens(runtime, recipe.server_keeps_tokens, owner_agrees)
    embedded = None if keeps else embed_once(runtime, images, kept, recipe.batch_size, embed_cache_bytes)
    loss_sum, done, total = 0.0, 0, recipe.epochs * -(-len(kept) // recipe.batch_size)
    for _ in range(recipe.epochs):
        loss_sum = 0.0
        for idx in batch_order(len(kept), recipe.batch_size, rng):
            rows = kept[idx]
            x, y = images[rows], labels[rows]
            features = None
            if keeps and reuses_tokens(memory.on_server[rows]):
                features = server.forward_kept(runtime.prompts(), rows)
            if features is None:
                tokens = runtime.smash(x) if embedded is None else runtime.attach_prompts(embedded[idx])
                features = server.forward(defended(runtime, tokens, recipe.token_noise, noise),
                                          rows if keeps else None)
                memory.on_server[rows] = keeps
            step = runtime.tail_step(features, y, recipe.lr)
            grad = server.backward(step.dfeatures)
            runtime.prompt_step(grad, recipe.lr, images=None if runtime.manifest.prompt_gradient_only else x)
            memory.record(rows, step.logits, y, features, recipe.wire)
            loss_sum += step.loss * len(y)
            done += 1
            on_batch(done, total)
    if recipe.local_update == "cached-features":
        on_phase("local update")
        cached = memory.cached()
        for _ in range(recipe.local_epochs):
            for idx in batch_order(len(cached), recipe.batch_size, rng):
                rows = cached[idx]
                runtime.tail_only_step(memory.features[rows].astype(np.float32), labels[rows], recipe.lr)
    return RoundResult(runtime.trainables(), n, len(kept), loss_sum)


def keeps_tokens(runtime: ClientRuntime, asked: bool, owner_agrees: bool) -> bool:
    """Whether this round's batches may travel as ids + prompts: the federation asks, the owner agreed, and the
    tokens depend on nothing but the prompts (no head blocks)."""
    return asked and owner_agrees and runtime.manifest.prompt_gradient_only and runtime.manifest.embeds


def defended(runtime: ClientRuntime, tokens: np.ndarray, scale: float, noise: np.random.Generator | None
             ) -> np.ndarray:
    """The smashed tokens as they leave the device: with the recipe's noise on the patch tokens, if any."""
    if noise is None:
        return tokens
    return tokens + token_noise(tokens, runtime.manifest.num_prefix_tokens + runtime.manifest.prompts, scale, noise)


def embed_once(runtime: ClientRuntime, images: np.ndarray, kept: np.ndarray, batch_size: int,
               budget: int | None) -> np.ndarray | None:
    """The kept samples' embedded tokens, in `kept`'s order, computed once for every split pass of the round (the
    embedding is frozen and, with no head blocks, prompt-free); None when the bundle has no embed graph or they
    would take more than `budget` bytes."""
    m = runtime.manifest
    size = len(kept) * (m.num_tokens - m.prompts) * m.embed_dim * 4
    if not m.embeds or not len(kept) or (budget is not None and size > budget):
        return None
    return np.concatenate([runtime.embed(images[kept[i:i + batch_size]]) for i in range(0, len(kept), batch_size)])
