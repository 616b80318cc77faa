"""A method's central ceiling: the same adaptation trained on the pooled data of all clients, no federation.

Reported beside each federated method so the cost of federating (data split, rounds, averaging, pruning) and the
cost of the adaptation itself (prompts and tail instead of the whole model) are seen apart. Same samples (the
union of the clients' training shares), same trainable tensors, optimizer, learning rate and batch size as the
federation; the data goes through the model's full path (head, body, tail in one place). One "round" here is
three passes over the pooled data (`PASSES_PER_ROUND`, whatever the method's recipe does in a round), so a
ceiling's curve lines up with the federation's rounds; the optimizer keeps its state across them, as one
uninterrupted training run would. With one client and one round of as many passes, a whole-model method's ceiling
is exactly its federation (tests/test_central.py checks it).
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from sfp_common.batching import client_seed
from simulation.accounting import ClientMeter
from simulation.engine import Federation
from simulation.methods import batches, get_method, local_step, make_optimizer


def adaptation_of(method: str) -> str:
    """The name of what a method trains, as its ceiling is keyed: methods that train the same tensors through the
    same full path share one ceiling (SFPrompt and its ablations; FL and SFL)."""
    m = get_method(method)
    parts = sorted(set(m.client_parts + m.server_parts))
    if {"head", "body", "tail"} <= set(parts):
        return "full"
    return "-".join(parts)


PASSES_PER_ROUND = 3     # a ceiling's passes per round-equivalent, whatever its method's recipe: 30 in 10 rounds


def train_central(federation: Federation, on_round: Callable[[dict], None] | None = None,
                  progress: bool = False, passes_per_round: int = PASSES_PER_ROUND) -> dict:
    """Train the federation's method's adaptation centrally for rounds x `passes_per_round` passes, on its model
    and clients' data, with its recipe's optimizer, learning rate and batch size; a report shaped like
    `Federation.run`'s (no traffic: nothing crosses a network)."""
    cfg = federation.cfg
    model = federation.model
    x = torch.cat([c.x_train for c in federation.clients])
    y = torch.cat([c.y_train for c in federation.clients])
    params = [*federation.client_params.values(), *federation.server_params.values()]
    opt = make_optimizer(params, cfg.recipe)
    rng = np.random.default_rng(client_seed(cfg.seed, 1, 0))   # one client, round 1: a federation's first batches
    meter = ClientMeter(count_flops=False)
    rows = []
    for r in range(1, cfg.rounds + 1):
        start = time.time()
        for _ in range(passes_per_round):
            order = batches(len(y), cfg.recipe.batch_size, rng)
            loss_sum = sum(local_step(model, x[i], y[i], meter, opt, model)
                           for i in tqdm(order, desc=f"central {r}", leave=False, disable=not progress))
        central, local = federation.evaluate()
        rows.append({"round": r, "accuracy": central, "client_accuracy": local, "bytes_up": 0.0,
                     "bytes_down": 0.0, "client_flops": 0.0, "participants": [],
                     "train_loss": float(loss_sum) / len(y), "kept_samples": float(len(y)),
                     "seconds": round(time.time() - start, 3)})
        if on_round:
            on_round(rows[-1])
    return {**federation.report(rows), "central": True, "adaptation": adaptation_of(cfg.method)}
