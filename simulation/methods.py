"""What one client does in one round, for SFPrompt, its ablations and the baselines, on one engine.

Client and server run in one process here, but every tensor that would cross the network goes through the
`ClientMeter` (encoded, counted, decoded) and the autograd graph is cut at each crossing, exactly as a
distributed run cuts it. So the client's compute is measurable on its own, and the distributed federation can
be compared with this one number for number.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from export.split import SplitViT
from sfp_common.batching import batch_order
from sfp_common.errors import ConfigError
from sfp_common.pruning import el2n_scores, keep_count, select_hardest
from simulation.accounting import ClientMeter

TRAFFIC_VARIANTS = ("ours", "paper")


@dataclass(frozen=True)
class Method:
    """A federated method as data: who holds what, what trains, which SFPrompt phases run."""

    name: str
    uses_prompts: bool
    client_parts: tuple[str, ...]           # trained on the device, downloaded and uploaded every round
    server_parts: tuple[str, ...] = ()      # trained on the server (SplitFed's body), averaged there
    split: bool = True                      # False: the whole model runs on the device
    prune: bool = False                     # EL2N pruning before split training
    local_update: bool = False              # local-loss update (body skipped) before split training
    default_lr: float = 1e-3


METHODS = {m.name: m for m in (
    Method("sfprompt", True, ("prompts", "tail"), prune=True, local_update=True, default_lr=3e-2),
    Method("sfprompt-no-prune", True, ("prompts", "tail"), local_update=True, default_lr=3e-2),
    Method("sfprompt-no-local", True, ("prompts", "tail"), prune=True, default_lr=3e-2),
    Method("sfprompt-split-only", True, ("prompts", "tail"), default_lr=3e-2),     # neither phase-1 addition
    Method("fl", False, ("head", "body", "tail"), split=False, default_lr=1e-3),
    Method("fedprompt", True, ("prompts", "classifier"), split=False, default_lr=3e-2),
    Method("sfl", False, ("head", "tail"), server_parts=("body",), default_lr=1e-3),
)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


@dataclass(frozen=True)
class TrainConfig:
    lr: float
    optimizer: str = "adamw"        # or "sgd" (with momentum)
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 16
    epochs: int = 3                 # passes over the data per round: split training, or the whole model on-device
    local_loss_epochs: int = 1      # SFPrompt's phase-1 local-loss update
    keep: float = 0.5               # EL2N keep fraction
    wire: str = "fp16"              # smashed activations in the "ours" traffic variant
    traffic: str = "ours"           # "paper": four fp32 activation-sized transfers per batch


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


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ConfigError(f"unknown optimizer {cfg.optimizer!r}; choose adamw or sgd")


def batches(n: int, batch_size: int, rng: np.random.Generator) -> list[torch.Tensor]:
    return [torch.from_numpy(i) for i in batch_order(n, batch_size, rng)]


def named_params(model: SplitViT, parts: tuple[str, ...]) -> dict[str, torch.nn.Parameter]:
    params = dict(model.named_parameters())
    return {name: params[name] for name in model.trainable_names(parts)}


def _sends_prompt_gradient_only(model: SplitViT, method: Method, cfg: TrainConfig) -> bool:
    """With no head blocks and only prompts trained in the head, dL/dp summed over the batch is all the head needs."""
    return (cfg.traffic == "ours" and model.spec.head_blocks == 0 and method.uses_prompts
            and "head" not in method.client_parts)


def split_step(model: SplitViT, method: Method, cfg: TrainConfig, x: torch.Tensor, y: torch.Tensor,
               meter: ClientMeter, client_opt: torch.optim.Optimizer,
               server_opt: torch.optim.Optimizer | None) -> torch.Tensor:
    """One batch of split training: head on the client, body on the server, tail on the client, and back."""
    ours = cfg.traffic == "ours"
    act_wire = cfg.wire if ours else "fp32"
    with meter.client_compute():
        client_opt.zero_grad()
        smashed = model.head(x)
    tokens = meter.up(smashed, act_wire).requires_grad_(True)                     # server
    body_out = model.body(tokens)
    needed = body_out[:, model.tail.pooled_positions(body_out.shape[1])] if ours else body_out
    features = meter.down(needed, act_wire).requires_grad_(True)                  # client
    with meter.client_compute():
        loss = F.cross_entropy(model.tail(features), y)
        loss.backward()
    upstream = meter.up(features.grad, "fp32")                                    # server
    if server_opt is not None:
        server_opt.zero_grad()
    needed.backward(upstream)
    if server_opt is not None:
        server_opt.step()
    if _sends_prompt_gradient_only(model, method, cfg):
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
    return loss.detach() * len(y)


def local_step(model: SplitViT, x: torch.Tensor, y: torch.Tensor, meter: ClientMeter,
               opt: torch.optim.Optimizer, forward: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """One batch trained entirely on the device: SFPrompt's local-loss path, or FL's/FedPrompt's whole model."""
    with meter.client_compute():
        opt.zero_grad()
        loss = F.cross_entropy(forward(x), y)
        loss.backward()
        opt.step()
    return loss.detach() * len(y)


def el2n_keep(model: SplitViT, data: ClientData, cfg: TrainConfig, meter: ClientMeter) -> torch.Tensor:
    """Phase 1a: score every local sample through the local path; keep the hardest `keep` fraction."""
    with meter.client_compute(), torch.no_grad():
        logits = torch.cat([model.forward_local(data.x_train[i:i + cfg.batch_size])
                            for i in range(0, data.num_train, cfg.batch_size)])
    if logits.is_meta:  # counting only: which samples are kept does not change what is counted
        return torch.arange(keep_count(data.num_train, cfg.keep))
    kept = select_hardest(el2n_scores(logits.numpy(), data.y_train.numpy()), cfg.keep)
    return torch.from_numpy(kept.astype(np.int64))


def client_round(model: SplitViT, method: Method, cfg: TrainConfig, data: ClientData,
                 rng: np.random.Generator, count_flops: bool = True) -> ClientResult:
    """One client's whole round. `model` holds the global state; its trainable tensors cross the wire both ways."""
    meter = ClientMeter(count_flops=count_flops)
    client_params = named_params(model, method.client_parts)
    with torch.no_grad():
        for param in client_params.values():
            param.copy_(meter.down(param))
    client_opt = make_optimizer(list(client_params.values()), cfg)
    server_params = list(named_params(model, method.server_parts).values())
    server_opt = make_optimizer(server_params, cfg) if server_params else None

    kept = torch.arange(data.num_train)
    loss_sum = torch.zeros(())
    if not method.split:
        for _ in range(cfg.epochs):
            loss_sum = sum(local_step(model, data.x_train[i], data.y_train[i], meter, client_opt, model)
                           for i in batches(data.num_train, cfg.batch_size, rng))
    else:
        if method.prune:
            kept = el2n_keep(model, data, cfg, meter)
        if method.local_update:
            for _ in range(cfg.local_loss_epochs):
                for i in batches(data.num_train, cfg.batch_size, rng):
                    local_step(model, data.x_train[i], data.y_train[i], meter, client_opt, model.forward_local)
        for _ in range(cfg.epochs):
            loss_sum = sum(split_step(model, method, cfg, data.x_train[kept[i]], data.y_train[kept[i]], meter,
                                      client_opt, server_opt)
                           for i in batches(len(kept), cfg.batch_size, rng))
    upload = {name: meter.up(param) for name, param in client_params.items()}
    return ClientResult(meter, upload, data.num_train, len(kept), loss_sum)
