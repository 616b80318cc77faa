"""The federation's policy, as Flower's strategies hold it: who trains in a round, the plan each is sent, how their
updates combine and how their evaluations add up. One object, run by the reference federation
(`simulation/engine.py`) and by the server (`cloud_server/coordinator.py`), so the two cannot choose differently.
Torch-free and broker-free: testable on its own."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from sfp_common.aggregate import fedavg
from sfp_common.batching import client_seed
from sfp_common.errors import ConfigError
from sfp_common.recipe import Recipe
from wire_protocol.contracts import RoundPlan

Client = TypeVar("Client", int, str)


@dataclass(frozen=True)
class FedAvgStrategy:
    recipe: Recipe = field(default_factory=Recipe)
    seed: int = 0
    fraction: float = 1.0                  # of the available clients, each round (at least one)

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"client fraction must be in (0, 1], got {self.fraction}")

    def select(self, available: Sequence[Client], round_index: int) -> list[Client]:
        """A seeded sample of the available clients, drawn from the round's own seed (a restarted server, or
        the reference, draws the same ones)."""
        ordered = sorted(available)
        if not ordered:
            return []
        count = min(len(ordered), max(1, round(self.fraction * len(ordered))))
        picked = np.random.default_rng([self.seed, round_index]).choice(len(ordered), size=count, replace=False)
        return sorted(ordered[i] for i in picked)

    def plan(self, round_index: int, client_index: int, batch_size: int | None = None,
             wire: str | None = None) -> RoundPlan:
        """The recipe (with a device's own batch size and wire precision) and the client's batch-order seed."""
        changes = {k: v for k, v in (("batch_size", batch_size), ("wire", wire)) if v is not None}
        return RoundPlan(self.recipe.but(**changes), client_seed(self.seed, round_index, client_index))

    def aggregate(self, updates: Sequence[Mapping[str, np.ndarray]], num_samples: Sequence[int]
                  ) -> dict[str, np.ndarray]:
        """FedAvg, in the order given (the clients' index order: float sums depend on it)."""
        return fedavg(updates, num_samples)

    @staticmethod
    def evaluation(reports: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Clients' local test results, sample-weighted."""
        correct = sum(int(r.get("correct", 0)) for r in reports)
        samples = sum(int(r.get("samples", 0)) for r in reports)
        return {"accuracy": correct / samples if samples else None, "evaluated_on": samples}
