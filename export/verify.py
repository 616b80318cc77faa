"""Check a bundle against PyTorch before anyone trains with it: the exporter refuses one that disagrees.

The device runtime (the code a device runs) executes each graph of the bundle, and the same step is taken in
PyTorch autograd + torch.optim on the model the bundle was cut from. Every step starts both sides from the same
trainables and optimizer state (PyTorch's, loaded into the device), so each graph is judged on its own, with
non-zero optimizer state after the first step, at batch sizes other than the export one. That is what catches
the exporter's silent failures: a gradient scaled by the batch, a dropped `eps`, merged inputs.

Tolerances (sfp_common/parity.py): outputs (tokens, logits, loss, dL/dfeatures) and optimizer state
(gradient-level) to a max relative error of 1e-4; parameter updates to 1e-4 (SGD) or, for AdamW, an rms relative
error of 1e-3 over the elements whose gradient is above the scale of eps (below it AdamW divides float noise by
noise, in PyTorch fp32 as well: docs/onnx-train-step-prototype.md); every value finite.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from edge_client.runtime import ClientRuntime
from export.split import SplitViT
from sfp_common.bundle import BundleError, state_key
from sfp_common.parity import OUTPUT_TOL, adamw_well_scaled, max_rel, update_error

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


def torch_optimizer(params: list[torch.nn.Parameter], runtime: ClientRuntime, lr: float) -> torch.optim.Optimizer:
    spec = runtime.manifest.optimizer
    if spec.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay)


def _torch_state(opt: torch.optim.Optimizer, named: dict[str, torch.nn.Parameter], slots: tuple[str, ...],
                 steps: int) -> tuple[dict[str, np.ndarray], int]:
    state = {}
    for name, p in named.items():
        st = opt.state.get(p, {})
        for slot in slots:
            value = st.get(slot)
            state[state_key(slot, name)] = (value.detach().numpy().copy() if value is not None
                                            else np.zeros(tuple(p.shape), np.float32))
    return state, steps


def verify_bundle(model: SplitViT, runtime: ClientRuntime, batch_sizes: tuple[int, ...] = (1, 3, 8),
                  steps: int = 2, lr: float = 1e-2, seed: int = 0) -> ParityReport:
    """Local steps, then split steps, for each batch size; each step compared from the same starting state."""
    manifest = runtime.manifest
    report = ParityReport(batch_sizes=tuple(batch_sizes), steps=steps)
    rng = np.random.default_rng(seed)
    slots = manifest.optimizer.slots
    for batch in batch_sizes:
        ref = copy.deepcopy(model).eval()
        ref.set_trainable(("prompts", "tail"))
        params = dict(ref.named_parameters())
        named = {name: params[name] for name in manifest.trainable_names()}
        opt = torch_optimizer(list(named.values()), runtime, lr)
        done = 0
        for phase in ("local", "split"):
            for _ in range(steps):
                x = rng.standard_normal((batch, *manifest.preprocessing.input_size)).astype(np.float32)
                y = rng.integers(0, manifest.num_classes, batch)
                xt, yt = torch.from_numpy(x), torch.from_numpy(y)
                before = {n: p.detach().numpy().copy() for n, p in named.items()}
                runtime.load_trainables(before)
                runtime.load_optimizer_state(*_torch_state(opt, named, slots, done))
                with torch.no_grad():
                    report.note("local_logits", max_rel(runtime.local_logits(x), ref.forward_local(xt).numpy()),
                                OUTPUT_TOL)
                opt.zero_grad()
                if phase == "local":
                    logits = ref.forward_local(xt)
                    loss = F.cross_entropy(logits, yt)
                    loss.backward()
                    opt.step()
                    dev_loss, dev_logits = runtime.local_step(x, y, lr)
                    report.note("local_step loss", max_rel(dev_loss, loss.item()), OUTPUT_TOL)
                    report.note("local_step logits", max_rel(dev_logits, logits.detach().numpy()), OUTPUT_TOL)
                else:
                    _split_step_both(ref, runtime, x, xt, y, yt, opt, lr, report)
                done += 1
                _compare_updates(report, f"{phase} step", runtime, opt, named, before, slots)
    return report


def _split_step_both(ref: SplitViT, runtime: ClientRuntime, x: np.ndarray, xt: torch.Tensor, y: np.ndarray,
                     yt: torch.Tensor, opt: torch.optim.Optimizer, lr: float, report: ParityReport) -> None:
    """PyTorch's split step, and the device's three calls fed the server's answers from the PyTorch side."""
    smashed = ref.head(xt)
    tokens = smashed.detach().requires_grad_(True)
    body_out = ref.body(tokens)
    needed = body_out[:, ref.tail.pooled_positions(body_out.shape[1])]
    features = needed.detach().requires_grad_(True)
    logits = ref.tail(features)
    loss = F.cross_entropy(logits, yt)
    loss.backward()
    needed.backward(features.grad)
    report.note("front tokens", max_rel(runtime.smash(x), smashed.detach().numpy()), OUTPUT_TOL)
    report.note("tail_logits", max_rel(runtime.tail_logits(features.detach().numpy()), logits.detach().numpy()),
                OUTPUT_TOL)
    step = runtime.tail_step(features.detach().numpy(), y, lr)
    report.note("tail_step loss", max_rel(step.loss, loss.item()), OUTPUT_TOL)
    report.note("tail_step logits", max_rel(step.logits, logits.detach().numpy()), OUTPUT_TOL)
    report.note("tail_step dfeatures", max_rel(step.dfeatures, features.grad.numpy()), OUTPUT_TOL)
    first, count = ref.head.num_prefix_tokens, ref.spec.prompts
    if runtime.manifest.prompt_gradient_only:
        prompt_grad = tokens.grad[:, first:first + count].sum(dim=0)
        ref.head.prompts.grad = prompt_grad.clone()
        runtime.prompt_step(prompt_grad.numpy(), lr)
    else:
        smashed.backward(tokens.grad)
        runtime.prompt_step(tokens.grad.numpy(), lr, images=x)
    opt.step()


def _compare_updates(report: ParityReport, tag: str, runtime: ClientRuntime, opt: torch.optim.Optimizer,
                     named: dict[str, torch.nn.Parameter], before: dict[str, np.ndarray],
                     slots: tuple[str, ...]) -> None:
    spec = runtime.manifest.optimizer
    device_params = runtime.trainables()
    device_state, _ = runtime.optimizer_state()
    for name, p in named.items():
        st = opt.state[p]
        for slot in slots:
            report.note(f"{tag} optimizer state", max_rel(device_state[state_key(slot, name)],
                                                          st[slot].detach().numpy()), OUTPUT_TOL)
        well_scaled = None
        if spec.name == "adamw":
            well_scaled = adamw_well_scaled(st["exp_avg_sq"].detach().numpy(), int(st["step"]), spec.betas[1],
                                            spec.eps)
        error, limit = update_error(spec.name, device_params[name], p.detach().numpy(), before[name], well_scaled)
        report.note(f"{tag} update", error, limit)


def check_or_refuse(report: ParityReport, what: str) -> None:
    if report.failures:
        raise BundleError(f"{what} disagrees with PyTorch; no bundle written:\n  " + "\n  ".join(report.failures))
