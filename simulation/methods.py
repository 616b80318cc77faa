"""What one client does in one round, for SFPrompt, its ablations and the baselines, on one engine.

Client and server run in one process here, but every tensor that would cross the network goes through the
`ClientMeter` (encoded, counted, decoded) and the autograd graph is cut at each crossing, exactly as a
distributed run cuts it. So the client's compute is measurable on its own, and the distributed federation can
be compared with this one number for number.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from export.split import SplitViT
from sfp_common.batching import batch_order
from sfp_common.defence import noise_generator, token_noise
from sfp_common.errors import ConfigError
from sfp_common.pruning import SampleMemory, choose_samples, el2n_scores
from sfp_common.recipe import Recipe
from sfp_common.token_store import TokenStore, reuses_tokens
from simulation.accounting import ClientMeter

TRAFFIC_VARIANTS = ("ours", "paper")
# The baselines train for three passes a round and run none of SFPrompt's phase 1; so do split-only and the paper's
# reading of phase 1 (with its one local pass), as they were first measured. The ablations of the default recipe
# drop one of its parts and keep the rest.
WHOLE_MODEL = Recipe(lr=1e-3, epochs=3, prune="none", local_update="none")
SPLIT_ONLY = Recipe(epochs=3, prune="none", local_update="none")
PAPER_PHASE1 = Recipe(epochs=3, prune="local-el2n", local_update="local-path", local_epochs=1)


@dataclass(frozen=True)
class Method:
    """A federated method as data: who holds what, what trains, and its own recipe (sfp_common/recipe.py): the
    learning rate and which SFPrompt phases run."""

    name: str
    uses_prompts: bool
    client_parts: tuple[str, ...]           # trained on the device, downloaded and uploaded every round
    server_parts: tuple[str, ...] = ()      # trained on the server (SplitFed's body), averaged there
    split: bool = True                      # False: the whole model runs on the device
    recipe: Recipe = field(default_factory=Recipe)


PROMPTS_TAIL = ("prompts", "tail")
METHODS = {m.name: m for m in (
    Method("sfprompt", True, PROMPTS_TAIL),
    Method("sfprompt-split-only", True, PROMPTS_TAIL, recipe=SPLIT_ONLY),
    # The paper's phase 1 as this project first read it: EL2N and the local-loss update on the body-skipped path.
    Method("sfprompt-paper-phase1", True, PROMPTS_TAIL, recipe=PAPER_PHASE1),
    Method("sfprompt-no-prune", True, PROMPTS_TAIL, recipe=Recipe(prune="none")),
    Method("sfprompt-no-local", True, PROMPTS_TAIL, recipe=Recipe(local_update="none")),
    Method("fl", False, ("head", "body", "tail"), split=False, recipe=WHOLE_MODEL),
    Method("fedprompt", True, ("prompts", "classifier"), split=False, recipe=WHOLE_MODEL.but(lr=3e-2)),
    Method("sfl", False, ("head", "tail"), server_parts=("body",), recipe=WHOLE_MODEL),
)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


@dataclass(frozen=True)
class ClientData:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def num_train(self) -> int:
        return len(self.y_train)


@dataclass
class ClientResult:
    meter: ClientMeter
    upload: dict[str, torch.Tensor]     # the client's trained tensors, as the server decodes them
    num_samples: int                    # FedAvg weight: the client's local training samples
    kept: int                           # samples that went through split training
    loss_sum: torch.Tensor              # summed training loss of the last phase (a tensor: meta-safe)


def make_optimizer(params: list[torch.nn.Parameter], recipe: Recipe) -> torch.optim.Optimizer:
    """torch.optim's own optimizer for the recipe's OptimizerSpec, the one the device's graphs reproduce."""
    spec = recipe.optimizer
    if spec.name == "adamw":
        return torch.optim.AdamW(params, lr=recipe.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay)
    return torch.optim.SGD(params, lr=recipe.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)


def batches(n: int, batch_size: int, rng: np.random.Generator) -> list[torch.Tensor]:
    return [torch.from_numpy(i) for i in batch_order(n, batch_size, rng)]


def named_params(model: SplitViT, parts: tuple[str, ...]) -> dict[str, torch.nn.Parameter]:
    params = dict(model.named_parameters())
    return {name: params[name] for name in model.trainable_names(parts)}


def _sends_prompt_gradient_only(model: SplitViT, method: Method, traffic: str) -> bool:
    """With no head blocks and only prompts trained in the head, dL/dp summed over the batch is all the head needs."""
    return (traffic == "ours" and model.spec.head_blocks == 0 and method.uses_prompts
            and "head" not in method.client_parts)


@dataclass
class SplitBatch:
    loss_sum: torch.Tensor      # summed loss of the batch
    logits: torch.Tensor        # the tail's logits before the step (they score the batch's samples for free)
    features: torch.Tensor      # the body features as the client received them


def defended(model: SplitViT, scale: float, smashed: torch.Tensor, noise: np.random.Generator | None
             ) -> torch.Tensor:
    """The smashed tokens as the device sends them: with noise of std `scale` x their RMS on the patch tokens (the
    recipe's `token_noise`; a constant shift: gradients pass through unchanged)."""
    if noise is None or scale == 0 or smashed.is_meta:
        return smashed
    return smashed + torch.from_numpy(token_noise(smashed.detach().numpy(), model.head.first_patch, scale, noise))


@dataclass
class KeptTokens:
    """The server's side of `Recipe.server_keeps_tokens` for one batch: its store of this client's tokens, the
    batch's sample ids, and whether the batch travels as ids + prompts (the server holds all of it) or whole."""

    store: TokenStore
    ids: np.ndarray
    reuse: bool


def token_shape(model: SplitViT) -> tuple[int, int]:
    """[N, D] of one sample's smashed tokens: cls/registers, prompts, patches."""
    head = model.head
    return head.first_patch + head.embedding.patch_embed.num_patches, head.prompts.shape[1]


def split_step(model: SplitViT, method: Method, recipe: Recipe, x: torch.Tensor, y: torch.Tensor,
               meter: ClientMeter, client_opt: torch.optim.Optimizer,
               server_opt: torch.optim.Optimizer | None, traffic: str = "ours",
               embedded: torch.Tensor | None = None, noise: np.random.Generator | None = None,
               kept_tokens: KeptTokens | None = None) -> SplitBatch:
    """One batch of split training: head on the client, body on the server, tail on the client, and back.
    `embedded`: the batch's embedded tokens, computed earlier in the round (no head blocks): only the prompts are
    put in here. `noise`: the round's noise stream when the recipe defends the tokens. `kept_tokens`: the
    server keeps tokens (no head blocks): the batch's ids go up too, and only the prompts when it holds them."""
    ours = traffic == "ours"
    act_wire = recipe.wire if ours else "fp32"
    with meter.client_compute():
        client_opt.zero_grad()
        if kept_tokens is None or not kept_tokens.reuse:
            smashed = model.head(x) if embedded is None else model.head.blocks(model.head.attach_prompts(embedded))
            sent = defended(model, recipe.token_noise, smashed, noise)
    if kept_tokens is not None:
        meter.up(torch.from_numpy(kept_tokens.ids), "int32")
    if kept_tokens is not None and kept_tokens.reuse:                             # server: the kept tokens
        prompts = meter.up(model.head.prompts, act_wire)
        tokens = (torch.empty(len(kept_tokens.ids), *token_shape(model), device="meta") if prompts.is_meta else
                  torch.from_numpy(kept_tokens.store.rebuild("client", kept_tokens.ids, prompts.numpy(),
                                                             model.head.num_prefix_tokens)))
        tokens.requires_grad_(True)
    else:
        tokens = meter.up(sent, act_wire).requires_grad_(True)                    # server
        if kept_tokens is not None and not tokens.is_meta:
            kept_tokens.store.put("client", kept_tokens.ids, tokens.detach().numpy(), act_wire)
    body_out = model.body(tokens)
    needed = body_out[:, model.tail.pooled_positions(body_out.shape[1])] if ours else body_out
    features = meter.down(needed, act_wire).requires_grad_(True)                  # client
    with meter.client_compute():
        logits = model.tail(features)
        loss = F.cross_entropy(logits, y)
        loss.backward()
    upstream = meter.up(features.grad, "fp32")                                    # server
    if server_opt is not None:
        server_opt.zero_grad()
    needed.backward(upstream)
    if server_opt is not None:
        server_opt.step()
    if _sends_prompt_gradient_only(model, method, traffic):
        first = model.head.num_prefix_tokens
        prompt_grad = tokens.grad[:, first:first + model.spec.prompts].sum(dim=0)
        received = meter.down(prompt_grad, "fp32")                                # client
        with meter.client_compute():
            model.head.prompts.grad = received
            client_opt.step()
    else:
        received = meter.down(tokens.grad, "fp32")                                # client
        with meter.client_compute():
            smashed.backward(received)
            client_opt.step()
    return SplitBatch(loss.detach() * len(y), logits.detach(), features.detach())


def local_step(model: SplitViT, x: torch.Tensor, y: torch.Tensor, meter: ClientMeter,
               opt: torch.optim.Optimizer, forward: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """One batch trained entirely on the device: the paper's local-loss path, the tail on cached features, or
    FL's/FedPrompt's whole model."""
    with meter.client_compute():
        opt.zero_grad()
        loss = F.cross_entropy(forward(x), y)
        loss.backward()
        opt.step()
    return loss.detach() * len(y)


def local_path_scores(model: SplitViT, data: ClientData, recipe: Recipe, meter: ClientMeter) -> np.ndarray | None:
    """EL2N of every local sample through the body-skipped local path (the paper's reading); None on meta."""
    with meter.client_compute(), torch.no_grad():
        logits = torch.cat([model.forward_local(data.x_train[i:i + recipe.batch_size])
                            for i in range(0, data.num_train, recipe.batch_size)])
    return None if logits.is_meta else el2n_scores(logits.numpy(), data.y_train.numpy())


def feature_shape(model: SplitViT, traffic: str) -> tuple[int, int]:
    """[T, D] of the body features one sample's tail reads: the pooled positions only in our traffic."""
    tokens = model.head.num_prefix_tokens + model.spec.prompts + model.head.embedding.patch_embed.num_patches
    positions = model.tail.pooled_positions(tokens) if traffic == "ours" else slice(0, tokens)
    return len(range(tokens)[positions]), model.head.prompts.shape[1]


def client_round(model: SplitViT, method: Method, recipe: Recipe, data: ClientData, rng: np.random.Generator,
                 memory: SampleMemory | None = None, traffic: str = "ours", count_flops: bool = True,
                 token_store: TokenStore | None = None) -> ClientResult:
    """One client's whole round. `model` holds the global state; its trainable tensors cross the wire both ways.
    `memory` is the client's own record of its samples (sfp_common/pruning.py), updated in place; on meta tensors
    (counting) it only says which samples are scored, cached and kept by the server. `token_store`: the server's
    tokens of this client, kept across rounds when the recipe says so (a fresh one: none kept yet)."""
    meter = ClientMeter(count_flops=count_flops)
    memory = memory if memory is not None else SampleMemory.empty(data.num_train)
    client_params = named_params(model, method.client_parts)
    with torch.no_grad():
        for param in client_params.values():
            param.copy_(meter.down(param))
    client_opt = make_optimizer(list(client_params.values()), recipe)
    server_params = list(named_params(model, method.server_parts).values())
    server_opt = make_optimizer(server_params, recipe) if server_params else None

    n, bs = data.num_train, recipe.batch_size
    kept = np.arange(n)
    loss_sum = torch.zeros(())
    if not method.split:
        for _ in range(recipe.epochs):
            loss_sum = sum(local_step(model, data.x_train[i], data.y_train[i], meter, client_opt, model)
                           for i in batches(n, bs, rng))
        upload = {name: meter.up(param) for name, param in client_params.items()}
        return ClientResult(meter, upload, n, n, loss_sum)

    noise = noise_generator(rng, recipe.token_noise)
    kept = choose_samples(recipe, memory, rng, lambda: local_path_scores(model, data, recipe, meter))
    if recipe.local_update == "local-path":
        for _ in range(recipe.local_epochs):
            for i in batches(n, bs, rng):
                local_step(model, data.x_train[i], data.y_train[i], meter, client_opt, model.forward_local)
    counting = data.x_train.is_meta
    embedded = None
    # with no head blocks the server can keep each sample's tokens; then the device embeds only whole batches
    keeps = recipe.server_keeps_tokens and _sends_prompt_gradient_only(model, method, traffic)
    store = token_store if token_store is not None else TokenStore()
    if _sends_prompt_gradient_only(model, method, traffic) and len(kept) and not keeps:
        # the frozen embedding, prompt-free with no head blocks: once per kept sample per round, as a device does
        with meter.client_compute(), torch.no_grad():
            embedded = model.head.embed(data.x_train[torch.from_numpy(kept)])
    for _ in range(recipe.epochs):
        loss_sum = torch.zeros(())
        for i in batch_order(len(kept), bs, rng):
            idx = torch.from_numpy(kept[i])
            batch_embedded, kept_tokens = None if embedded is None else embedded[torch.from_numpy(i)], None
            if keeps:
                kept_tokens = KeptTokens(store, kept[i], reuses_tokens(memory.on_server[kept[i]]))
                if not kept_tokens.reuse:
                    with meter.client_compute(), torch.no_grad():
                        batch_embedded = model.head.embed(data.x_train[idx])
                    memory.on_server[kept[i]] = True
            step = split_step(model, method, recipe, data.x_train[idx], data.y_train[idx], meter, client_opt,
                              server_opt, traffic, batch_embedded, noise, kept_tokens)
            loss_sum = loss_sum + step.loss_sum
            if not counting:
                memory.record(kept[i], step.logits.numpy(), data.y_train[idx].numpy(), step.features.numpy(),
                              recipe.wire)
            else:
                memory.has_features[kept[i]] = True
    if recipe.local_update == "cached-features":
        cached = memory.cached()
        features = (torch.empty(len(cached), *feature_shape(model, traffic), device="meta") if counting
                    else torch.from_numpy(memory.features[cached].astype(np.float32)))
        labels = data.y_train[torch.from_numpy(cached)]
        step_flops: dict[int, int] = {}     # counting on meta: a tail step's FLOPs depend on its batch size only
        for _ in range(recipe.local_epochs):
            for i in batches(len(cached), bs, rng):
                if counting and len(i) in step_flops:
                    meter.flops += step_flops[len(i)]
                    continue
                before = meter.flops
                local_step(model, features[i], labels[i], meter, client_opt, model.tail)
                step_flops[len(i)] = meter.flops - before
    upload = {name: meter.up(param) for name, param in client_params.items()}
    return ClientResult(meter, upload, n, len(kept), loss_sum)
