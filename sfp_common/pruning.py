"""Which local samples go through split training: EL2N scores (Paul et al. 2021), the keep rules, and the
per-sample memory a client keeps between rounds (scores and the body features it received), as
sfp_common/recipe.py defines the choices. Shared by the reference federation and the device."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from sfp_common.errors import ConfigError
from sfp_common.recipe import Recipe


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


def samples_supported(recipe: Recipe, trained: int) -> int:
    """The most local samples a device can hold, given the samples it trained through the body in one round: each
    of the recipe's split passes trains at least `keep_count(n)` of its n samples (all n without pruning)."""
    per_pass = trained // recipe.epochs
    if recipe.prune == "none":
        return per_pass
    n = math.floor(per_pass / recipe.keep) + 1
    while n > 0 and keep_count(n, recipe.keep) > per_pass:
        n -= 1
    return n


def select_by_score(scores: np.ndarray, keep: float, select: str = "hardest") -> np.ndarray:
    """Indices (sorted) of the `keep` fraction with the highest ("hardest") or lowest ("easiest") scores. A NaN
    score (a sample never scored) always survives, beyond the count if need be; ties go to the lower index, so
    the choice is reproducible."""
    if select not in ("hardest", "easiest"):
        raise ConfigError(f"unknown select rule {select!r}; choose hardest or easiest")
    unscored = np.flatnonzero(np.isnan(scores))
    scored = np.flatnonzero(~np.isnan(scores))
    room = max(0, keep_count(len(scores), keep) - len(unscored))
    key = -scores[scored] if select == "hardest" else scores[scored]
    chosen = scored[np.lexsort((scored, key))[:room]]
    return np.sort(np.concatenate([unscored, chosen])).astype(np.int64)


def select_hardest(scores: np.ndarray, keep: float) -> np.ndarray:
    return select_by_score(scores, keep, "hardest")


def select_random(num_samples: int, keep: float, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(num_samples, keep_count(num_samples, keep), replace=False)).astype(np.int64)


def feature_dtype(wire: str) -> type:
    """Cached body features in the precision they crossed the wire in (fp16 stays exact), float32 otherwise."""
    return np.float16 if wire == "fp16" else np.float32


@dataclass
class SampleMemory:
    """What a client remembers of its own samples between rounds, and never sends: each sample's EL2N score and
    the body features it received for it, both from the last time the sample went through split training, and
    whether the server keeps the sample's tokens (sfp_common/token_store.py; only when the federation opted in)."""

    scores: np.ndarray                   # [n] float64; NaN: never scored
    features: np.ndarray | None          # [n, T, D] in the wire's precision; None until the first features
    has_features: np.ndarray             # [n] bool
    on_server: np.ndarray | None = None  # [n] bool: the tokens went up whole with their id (None: all False)

    def __post_init__(self) -> None:
        if self.on_server is None:
            self.on_server = np.zeros(len(self.scores), bool)

    @classmethod
    def empty(cls, num_samples: int) -> SampleMemory:
        return cls(np.full(num_samples, np.nan), None, np.zeros(num_samples, bool))

    @classmethod
    def shaped_like(cls, num_samples: int, unscored: int, cached: int, on_server: int = 0) -> SampleMemory:
        """A stand-in with the same counts of unscored, cached and server-kept samples (counting a round needs no
        values)."""
        memory = cls.empty(num_samples)
        memory.scores[unscored:] = 0.0
        memory.has_features[:cached] = True
        memory.on_server[:on_server] = True
        return memory

    def __len__(self) -> int:
        return len(self.scores)

    def record(self, indices: np.ndarray, logits: np.ndarray, labels: np.ndarray, features: np.ndarray,
               wire: str) -> None:
        """A split-training batch: its tail logits (before the step) and the features the body sent."""
        self.scores[indices] = el2n_scores(logits, labels)
        if self.features is None:
            self.features = np.zeros((len(self), *features.shape[1:]), feature_dtype(wire))
        self.features[indices] = features
        self.has_features[indices] = True

    def cached(self) -> np.ndarray:
        """Indices of the samples with features, in order."""
        return np.flatnonzero(self.has_features)

    def copy(self) -> SampleMemory:
        return SampleMemory(self.scores.copy(), None if self.features is None else self.features.copy(),
                            self.has_features.copy(), self.on_server.copy())

    def arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        out = {f"{prefix}scores": self.scores, f"{prefix}has_features": self.has_features,
               f"{prefix}on_server": self.on_server}
        if self.features is not None:
            out[f"{prefix}features"] = self.features
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], num_samples: int, prefix: str = "") -> SampleMemory | None:
        """The memory stored under `prefix`, or None when it is missing or for other data (its sample count
        differs)."""
        try:
            scores = np.asarray(arrays[f"{prefix}scores"], np.float64)
            has = np.asarray(arrays[f"{prefix}has_features"], bool)
        except KeyError:
            return None
        features = arrays.get(f"{prefix}features")
        on_server = np.asarray(arrays.get(f"{prefix}on_server", np.zeros(num_samples, bool)), bool)  # older files
        if scores.shape != (num_samples,) or has.shape != (num_samples,) or on_server.shape != (num_samples,) or (
                features is not None and (features.ndim != 3 or len(features) != num_samples)):
            return None
        return cls(scores.copy(), None if features is None else np.array(features), has.copy(), on_server.copy())

def choose_samples(recipe: Recipe, memory: SampleMemory, rng: np.random.Generator,
                   local_path_scores: Callable[[], np.ndarray | None]) -> np.ndarray:
    """Phase 1a: the indices (sorted) of the samples split training sees this round. `local_path_scores` is called
    only by the paper's "local-el2n" rule (None from it: counting on meta tensors, keep the first ones)."""
    n = len(memory)
    if recipe.prune == "none":
        return np.arange(n)
    if recipe.prune == "random":
        return select_random(n, recipe.keep, rng)
    scores = local_path_scores() if recipe.prune == "local-el2n" else memory.scores
    if scores is None:
        return np.arange(keep_count(n, recipe.keep))
    return select_by_score(scores, recipe.keep, recipe.select)
