"""EL2N dataset pruning (Paul et al. 2021), as SFPrompt's client self-update uses it."""
from __future__ import annotations

import math

import numpy as np

from sfp_common.errors import ConfigError


def check_keep_fraction(keep: float) -> float:
    if not (0.0 < keep <= 1.0) or math.isnan(keep):
        raise ConfigError(f"keep fraction must be in (0, 1], got {keep}")
    return keep


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


def el2n_scores(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """||softmax(logits) - onehot(label)||_2 per sample: how far the model is from getting each sample right."""
    probs = softmax(logits.astype(np.float64))
    probs[np.arange(len(labels)), labels] -= 1.0
    return np.sqrt((probs * probs).sum(axis=-1))


def keep_count(num_samples: int, keep: float) -> int:
    """How many samples survive pruning: ceil(keep * n), at least one."""
    return max(1, math.ceil(check_keep_fraction(keep) * num_samples - 1e-9))


def select_hardest(scores: np.ndarray, keep: float) -> np.ndarray:
    """Indices (sorted) of the highest-scoring samples; ties broken by index, so the choice is reproducible."""
    count = keep_count(len(scores), keep)
    order = np.lexsort((np.arange(len(scores)), -scores))
    return np.sort(order[:count])
