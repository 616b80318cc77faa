"""Split sample indices over federated clients: IID, or label-skewed by a Dirichlet prior."""

from __future__ import annotations

import math

import numpy as np

from sfp_common.errors import ConfigError

MAX_DIRICHLET_TRIES = 1000


def _check_clients(n_samples: int, n_clients: int) -> None:
    if n_clients < 1:
        raise ConfigError(f"need at least 1 client, got {n_clients}")
    if n_clients > n_samples:
        raise ConfigError(f"more clients ({n_clients}) than training samples ({n_samples})")


def _check_min_size(n_samples: int, n_clients: int, min_size: int) -> None:
    if min_size < 0:
        raise ConfigError(f"min_size must be >= 0, got {min_size}")
    if min_size * n_clients > n_samples:
        raise ConfigError(
            f"{n_clients} clients with at least {min_size} samples each need {min_size * n_clients} "
            f"samples, but there are only {n_samples}"
        )


def _finish(parts: list[np.ndarray]) -> list[np.ndarray]:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def iid_partition(n_samples: int, n_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A shuffled, near-equal split: client sizes differ by at most one."""
    _check_clients(n_samples, n_clients)
    return _finish(np.array_split(rng.permutation(n_samples), n_clients))


def dirichlet_partition(
    labels: np.ndarray, n_clients: int, alpha: float, rng: np.random.Generator, min_size: int = 2
) -> list[np.ndarray]:
    """Label skew: each class is spread over clients by Dir(alpha) shares; small alpha = few classes per client.

    Draws again until every client holds min_size samples, since an empty client cannot train or be tested.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ConfigError(f"labels must be one-dimensional, got shape {list(labels.shape)}")
    n = len(labels)
    _check_clients(n, n_clients)
    if not (math.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"Dirichlet alpha must be a positive finite number, got {alpha}")
    _check_min_size(n, n_clients, min_size)
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(MAX_DIRICHLET_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
        for members in by_class:
            shares = rng.dirichlet(np.full(n_clients, float(alpha)))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
            for client, chunk in enumerate(np.split(rng.permutation(members), cuts)):
                parts[client].append(chunk)
        merged = [np.concatenate(p) for p in parts]
        if min(len(p) for p in merged) >= min_size:
            return _finish(merged)
    raise ConfigError(
        f"no Dirichlet(alpha={alpha}) split gave all {n_clients} clients at least {min_size} samples "
        f"in {MAX_DIRICHLET_TRIES} tries; raise alpha or use fewer clients"
    )


def partition(
    labels: np.ndarray, n_clients: int, alpha: float | None, rng: np.random.Generator, min_size: int = 2
) -> list[np.ndarray]:
    """alpha None means IID; otherwise Dirichlet label skew."""
    if alpha is None:
        # Checked here too so IID and Dirichlet runs reject the same settings.
        _check_clients(len(labels), n_clients)
        _check_min_size(len(labels), n_clients, min_size)
        return iid_partition(len(labels), n_clients, rng)
    return dirichlet_partition(labels, n_clients, alpha, rng, min_size)


def split_local_test(
    indices: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Each client's own (train, test) split; a positive fraction always leaves >= 1 of each when it can."""
    if not (math.isfinite(test_fraction) and 0 <= test_fraction < 1):
        raise ConfigError(f"test_fraction must be in [0, 1), got {test_fraction}")
    indices = np.asarray(indices, dtype=np.int64)
    n = len(indices)
    if n == 0:
        raise ConfigError("cannot split a client with no samples into train and test")
    n_test = min(int(test_fraction * n + 0.5), n - 1)  # round half up, keep one to train on
    if test_fraction > 0 and n >= 2:
        n_test = max(n_test, 1)
    shuffled = rng.permutation(indices)
    return np.sort(shuffled[n_test:]), np.sort(shuffled[:n_test])
