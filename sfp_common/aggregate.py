"""Aggregation of client updates: typed numpy functions, one job each."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from sfp_common.errors import ConfigError

Arrays = Mapping[str, np.ndarray]


def fedavg_weights(num_samples: Sequence[int]) -> np.ndarray:
    """FedAvg's weights: each client's share of the samples it trained on."""
    counts = np.asarray(num_samples, dtype=np.float64)
    if counts.ndim != 1 or len(counts) == 0 or np.any(counts < 0) or counts.sum() <= 0:
        raise ConfigError(f"FedAvg needs a positive sample count per client, got {list(num_samples)}")
    return counts / counts.sum()


def weighted_average(updates: Sequence[Arrays], weights: np.ndarray) -> dict[str, np.ndarray]:
    """Average named tensors with the given weights (summing to 1), in float64, returned in each tensor's dtype."""
    if len(updates) != len(weights) or not updates:
        raise ConfigError(f"{len(updates)} updates but {len(weights)} weights")
    names = list(updates[0])
    for update in updates[1:]:
        if list(update) != names:
            raise ConfigError("client updates name different tensors: "
                              f"{sorted(set(update) ^ set(names))}")
    result = {}
    for name in names:
        first = updates[0][name]
        total = np.zeros(first.shape, dtype=np.float64)
        for update, weight in zip(updates, weights):
            if update[name].shape != first.shape:
                raise ConfigError(f"tensor {name}: shape {update[name].shape} differs from {first.shape}")
            total += weight * update[name].astype(np.float64)
        result[name] = total.astype(first.dtype)
    return result


def fedavg(updates: Sequence[Arrays], num_samples: Sequence[int]) -> dict[str, np.ndarray]:
    """FedAvg (McMahan et al. 2017): the sample-weighted mean of the clients' tensors."""
    return weighted_average(updates, fedavg_weights(num_samples))
