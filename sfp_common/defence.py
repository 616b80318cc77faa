"""A defence against inversion of the smashed tokens (what `sfp-audit` measures, bench/results/audit/): Gaussian
noise a device adds to its patch tokens before they leave it. One function for the reference federation, the
device and the audit, so all three measure the same thing. Torch-free: the device imports it."""
from __future__ import annotations

import numpy as np


def noise_generator(rng: np.random.Generator, scale: float) -> np.random.Generator | None:
    """The round's noise stream, split off the round's generator (one draw, only when the defence is on, so a
    round without it draws exactly what it always did)."""
    return np.random.default_rng(int(rng.integers(2**63))) if scale > 0 else None


def token_noise(tokens: np.ndarray, first_patch: int, scale: float, rng: np.random.Generator) -> np.ndarray:
    """The noise to add to `tokens` [B, T, D]: std `scale` x the batch's patch-token RMS on the patch tokens (from
    index `first_patch`), zero on the cls/register tokens and the prompts, which the server knows anyway."""
    noise = np.zeros(tokens.shape, np.float32)
    rms = np.float32(np.sqrt(np.mean(np.square(tokens[:, first_patch:], dtype=np.float64))))
    noise[:, first_patch:] = np.float32(scale) * rms * rng.standard_normal(noise[:, first_patch:].shape,
                                                                            dtype=np.float32)
    return noise
