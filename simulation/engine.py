"""The reference federation in one process: data split over clients, rounds, FedAvg, evaluation, the report.

Everything later (the ONNX device runtime, the MQTT federation) is checked against this. Deterministic for a
seed: client sampling uses numpy's generator seeded once, each client's batch order its own numpy generator
seeded from (seed, round, client), the one a device seeds for the same round.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from export.backbone import create_vit, preprocessing_of, resolve_model
from export.split import SplitViT
from sfp_common.split_spec import SplitSpec
from sfp_common.datasets import load_dataset
from sfp_common.errors import ConfigError
from sfp_common.partition import partition, split_local_test
from sfp_common.preprocess import preprocess
from sfp_common.pruning import SampleMemory
from sfp_common.recipe import Recipe
from sfp_common.strategy import FedAvgStrategy
from sfp_common.token_store import TokenStore
from simulation.counting import count_client_round
from simulation.methods import (TRAFFIC_VARIANTS, ClientData, Method, client_round, defended, get_method,
                                named_params)


@dataclass(frozen=True)
class SimConfig:
    method: str = "sfprompt"
    dataset: str = "mnist5k"
    model: str = "models/vit-fmnist.pth"
    clients: int = 10
    rounds: int = 5
    alpha: float | None = None             # Dirichlet label skew; None: IID
    seed: int = 0
    fraction: float = 1.0                  # clients sampled per round
    test_fraction: float = 0.2             # each client's own local test split
    spec: SplitSpec = field(default_factory=SplitSpec)
    # per-client head blocks, cycled over the clients (each device runs what its profile affords); empty: all
    # spec.head_blocks. Prompts and tail are the same tensors at every cut, so FedAvg is unchanged.
    client_head_blocks: tuple[int, ...] = ()
    recipe: Recipe | None = None           # None: the method's own (simulation/methods.py)
    traffic: str = "ours"                  # "paper": four fp32 activation-sized transfers per batch
    pretrained: bool = True                # False: random weights (tests, counting)
    train_samples: int | None = None       # a seeded random subset of the training set (quick runs)

    def __post_init__(self) -> None:
        if self.recipe is None:          # the method's own
            object.__setattr__(self, "recipe", get_method(self.method).recipe)

    def check(self) -> None:
        if self.clients < 1 or self.rounds < 1:
            raise ConfigError(f"clients and rounds must be >= 1, got {self.clients} and {self.rounds}")
        if self.alpha is not None and not 0.0 < self.alpha < float("inf"):
            raise ConfigError(f"alpha must be > 0 (omit it for IID), got {self.alpha}")
        if self.traffic not in TRAFFIC_VARIANTS:
            raise ConfigError(f"unknown traffic variant {self.traffic!r}; choose ours or paper")
        if any(not isinstance(k, int) or k < 0 for k in self.client_head_blocks):
            raise ConfigError(f"client head blocks must be integers >= 0, got {self.client_head_blocks}")
        if self.train_samples is not None and self.train_samples < 1:
            raise ConfigError(f"train_samples must be >= 1, got {self.train_samples}")



def state_of(params: dict[str, torch.nn.Parameter]) -> dict[str, np.ndarray]:
    return {name: p.detach().numpy().copy() for name, p in params.items()}


def load_state(params: dict[str, torch.nn.Parameter], state: dict[str, np.ndarray]) -> None:
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(torch.from_numpy(value))


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256,
             forward: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
    """Top-1 accuracy in eval mode (of `forward`, the model's own by default); the model's training mode is
    restored afterwards."""
    if len(y) == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    run = forward or model
    with torch.no_grad():
        correct = sum(int((run(x[i:i + batch_size]).argmax(dim=1) == y[i:i + batch_size]).sum())
                      for i in range(0, len(y), batch_size))
    model.train(was_training)
    return correct / len(y)


class Federation:
    """The model, the clients' data and the global state; `run` does the rounds."""

    def __init__(self, cfg: SimConfig) -> None:
        cfg.check()
        self.cfg = cfg
        self.method: Method = get_method(cfg.method)
        torch.manual_seed(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        self.strategy = FedAvgStrategy(cfg.recipe, cfg.seed, cfg.fraction)    # the server's policy, too
        data = load_dataset(cfg.dataset)
        train_set = data.train
        if cfg.train_samples is not None and cfg.train_samples < len(train_set):
            train_set = train_set.subset(np.sort(self.rng.choice(len(train_set), cfg.train_samples, replace=False)))
        self.dataset_name = data.name
        source = resolve_model(cfg.model)
        self.source = source
        self.model_label = source.label
        vit = create_vit(source, num_classes=len(data.classes), pretrained=cfg.pretrained)
        spec = cfg.spec if self.method.uses_prompts else SplitSpec(0, cfg.spec.head_blocks, cfg.spec.tail_blocks)
        self.model = SplitViT(vit, spec)
        self.model.set_trainable(self.method.client_parts + self.method.server_parts)
        self.client_params = named_params(self.model, self.method.client_parts)
        self.server_params = named_params(self.model, self.method.server_parts)
        self.client_cut = [cfg.client_head_blocks[c % len(cfg.client_head_blocks)] if cfg.client_head_blocks
                           else spec.head_blocks for c in range(cfg.clients)]
        self.cuts = {k: self.model.recut(k) for k in sorted(set(self.client_cut))}

        prep = preprocessing_of(vit)
        self.preprocessing = prep
        x_train = torch.from_numpy(preprocess(train_set.images, prep))
        y_train = torch.from_numpy(train_set.labels)
        self.x_test = torch.from_numpy(preprocess(data.test.images, prep))
        self.y_test = torch.from_numpy(data.test.labels)
        shards = partition(train_set.labels, cfg.clients, cfg.alpha, self.rng)
        self.num_classes = len(data.classes)
        self._flops: dict[tuple[int, ...], int] = {}
        self.clients: list[ClientData] = []
        self.train_set = train_set                      # raw images, so a device can be given the same share
        self.client_indices: list[tuple[np.ndarray, np.ndarray]] = []   # per client: train, local test
        for shard in shards:
            train, test = split_local_test(shard, cfg.test_fraction, self.rng)
            self.client_indices.append((train, test))
            self.clients.append(ClientData(x_train[train], y_train[train], x_train[test], y_train[test]))
        self.memories = [SampleMemory.empty(c.num_train) for c in self.clients]
        # the server's tokens of each client, kept when the recipe opts in (no budget: the reference never forgets)
        self.token_stores = [TokenStore(max_bytes=2**63) for _ in self.clients]

    def client_flops(self, memory: SampleMemory, head_blocks: int | None = None) -> int:
        """A client's FLOPs for a round, counted by running its round on meta tensors (equal to a real round's
        count, see tests/test_accounting.py), once per cut, local sample count and number of samples scored and
        cached before the round (what pruning and the cached-feature update depend on), and kept by the server."""
        spec = self.model.spec if head_blocks is None else self.cuts[head_blocks].spec
        key = (spec.head_blocks, len(memory), int(np.isnan(memory.scores).sum()), int(memory.has_features.sum()),
               int(memory.on_server.sum()))
        if key not in self._flops:
            self._flops[key] = count_client_round(
                self.cfg.method, self.source, self.num_classes, spec, self.cfg.recipe, key[1],
                memory=SampleMemory.shaped_like(*key[1:]), traffic=self.cfg.traffic).flops
        return self._flops[key]

    def evaluate(self, round_index: int = 0) -> tuple[float, float]:
        """Central test accuracy, and the mean of the clients' local test accuracies, of the global model; with
        the recipe's token noise, as a defended device would use it (its tokens noised on their way, too)."""
        forward = None
        if self.method.split and self.cfg.recipe.token_noise:
            model, noise = self.model, np.random.default_rng([self.cfg.seed, round_index])
            scale = self.cfg.recipe.token_noise
            forward = lambda x: model.tail(model.body(defended(model, scale, model.head(x), noise)))  # noqa: E731
        central = accuracy(self.model, self.x_test, self.y_test, forward=forward)
        local = [accuracy(self.model, c.x_test, c.y_test, forward=forward) for c in self.clients if len(c.y_test)]
        return central, float(np.mean(local)) if local else float("nan")

    def run_round(self, round_index: int, progress: bool = False) -> dict:
        start = time.time()
        global_client = state_of(self.client_params)
        global_server = state_of(self.server_params)
        selected = self.strategy.select(range(self.cfg.clients), round_index)
        uploads, server_states, counts, meters, kept, losses = [], [], [], [], [], []
        for client in tqdm(selected, desc=f"round {round_index}", leave=False, disable=not progress):
            load_state(self.client_params, global_client)
            load_state(self.server_params, global_server)
            plan = self.strategy.plan(round_index, client)
            flops = self.client_flops(self.memories[client], self.client_cut[client])
            result = client_round(self.cuts[self.client_cut[client]], self.method, plan.recipe,
                                  self.clients[client], np.random.default_rng(plan.seed),
                                  self.memories[client], self.cfg.traffic, count_flops=False,
                                  token_store=self.token_stores[client])
            result.meter.flops = flops
            uploads.append({name: t.numpy() for name, t in result.upload.items()})
            server_states.append(state_of(self.server_params))
            counts.append(result.num_samples)
            meters.append(result.meter)
            kept.append(result.kept)
            losses.append(float(result.loss_sum) / max(1, result.kept))
        load_state(self.client_params, self.strategy.aggregate(uploads, counts))
        if self.server_params:
            load_state(self.server_params, self.strategy.aggregate(server_states, counts))
        central, local = self.evaluate(round_index)
        return {
            "round": round_index,
            "accuracy": central,
            "client_accuracy": local,
            "bytes_up": float(np.mean([m.bytes_up for m in meters])),
            "bytes_down": float(np.mean([m.bytes_down for m in meters])),
            "client_flops": float(np.mean([m.flops for m in meters])),
            "participants": selected,
            "train_loss": float(np.mean(losses)),
            "kept_samples": float(np.mean(kept)),
            "seconds": round(time.time() - start, 3),
        }

    def run(self, on_round: Callable[[dict], None] | None = None, progress: bool = False) -> dict:
        rows = []
        for r in range(1, self.cfg.rounds + 1):
            rows.append(self.run_round(r, progress))
            if on_round:
                on_round(rows[-1])
        return self.report(rows)

    def report(self, rows: list[dict]) -> dict:
        cfg = self.cfg
        return {
            "method": cfg.method, "model": self.model_label, "dataset": self.dataset_name,
            "clients": cfg.clients, "seed": cfg.seed, "alpha": cfg.alpha, "fraction": cfg.fraction,
            "split": asdict(self.model.spec), "client_head_blocks": self.client_cut, "train": cfg.recipe.as_dict(),
            "traffic": cfg.traffic,
            "samples_per_client": [c.num_train for c in self.clients],
            "rounds": rows,
        }
