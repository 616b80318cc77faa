"""Mini-batch order, shared by the reference federation and the device so both draw the same batches."""
from __future__ import annotations

import numpy as np


def batch_order(num_samples: int, batch_size: int, rng: np.random.Generator, shuffle: bool = True) -> list[np.ndarray]:
    """Index arrays of one pass over `num_samples` samples; the last batch may be short."""
    order = rng.permutation(num_samples) if shuffle else np.arange(num_samples)
    return [order[i:i + batch_size] for i in range(0, num_samples, batch_size)]


def client_seed(seed: int, round_index: int, client: int) -> int:
    """The batch-order seed of client `client` (its index in the federation) in a round; the reference
    federation and the distributed server derive it the same way."""
    return int(np.random.SeedSequence([seed, round_index, client]).generate_state(1)[0])
