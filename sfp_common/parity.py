"""How two computations of the same tensor are compared: by the exporter's check and by the parity tests."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

OUTPUT_TOL = 1e-4            # outputs and optimizer state: max relative error
SGD_UPDATE_TOL = 1e-4        # SGD parameter updates: max relative error
ADAMW_UPDATE_RMS_TOL = 1e-3  # AdamW parameter updates: rms relative error where the gradient is above eps scale
EPS_SCALE = 100.0            # AdamW elements with sqrt(v_hat) below EPS_SCALE * eps are float-noise dominated


def max_rel(a: np.ndarray | float, b: np.ndarray | float) -> float:
    """max|a-b| / max|b|; infinite when the shapes differ or either side is not finite (a NaN never passes)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("inf")
    return float(np.abs(a - b).max(initial=0.0) / max(np.abs(b).max(initial=0.0), 1e-12))


def rms_rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("inf")
    return float(np.sqrt(((a - b) ** 2).sum() / max((b ** 2).sum(), 1e-30)))


def adamw_well_scaled(exp_avg_sq: np.ndarray, step: int, beta2: float, eps: float) -> np.ndarray:
    """Elements whose AdamW update is decided by the gradient, not by float noise divided by noise (where
    PyTorch fp32 and fp64 disagree as much as any two implementations do)."""
    v_hat = exp_avg_sq / (1 - beta2 ** step)
    return np.sqrt(v_hat) >= EPS_SCALE * eps


def update_error(optimizer: str, new: np.ndarray, expected: np.ndarray, before: np.ndarray,
                 well_scaled: np.ndarray | None = None) -> tuple[float, float]:
    """(error, limit) of one parameter's update against the expected one, as the optimizer allows."""
    if not np.isfinite(new).all():
        return float("inf"), 0.0
    if optimizer == "sgd":
        return max_rel(new - before, expected - before), SGD_UPDATE_TOL
    mask = np.ones(new.shape, bool) if well_scaled is None else well_scaled
    if not mask.any():
        return 0.0, ADAMW_UPDATE_RMS_TOL
    return rms_rel((new - before)[mask], (expected - before)[mask]), ADAMW_UPDATE_RMS_TOL


@dataclass
class ParityReport:
    """Worst error per checked quantity over all steps and batch sizes, and the limit it was held to."""

    errors: dict[str, float] = field(default_factory=dict)
    limits: dict[str, float] = field(default_factory=dict)
    batch_sizes: tuple[int, ...] = ()
    steps: int = 0

    def note(self, key: str, error: float, limit: float) -> None:
        self.errors[key] = max(self.errors.get(key, 0.0), error)
        self.limits[key] = limit

    @property
    def failures(self) -> list[str]:
        return [f"{k}: {self.errors[k]:.2e} > {self.limits[k]:.0e}" for k in self.errors
                if not self.errors[k] <= self.limits[k]]

    def as_dict(self) -> dict:
        return {"batch_sizes": list(self.batch_sizes), "steps_per_phase": self.steps,
                "max_errors": {k: float(f"{v:.3e}") for k, v in sorted(self.errors.items())},
                "limits": {k: self.limits[k] for k in sorted(self.limits)}}
