"""Check a bundle against PyTorch before anyone trains with it: the exporter refuses one that disagrees.

PyTorch autograd + torch.optim take steps on the model the bundle was cut from, and each step is recorded as a
case (`edge_client/parity.py`): the trainables and optimizer state it started from, its batch, its outputs, the
server's answers and where it ended. The device runtime then replays every case from the same starting tensors,
in the backend's own environment. Steps run local first, then split, then tail-only (the cached-feature local
update: the tail alone on features the device holds), at batch sizes other than the export one, and every step
after the first starts from non-zero optimizer state. That is what catches the exporter's silent
failures: a gradient scaled by the batch, a dropped `eps`, merged inputs.

Tolerances (sfp_common/parity.py): outputs (tokens, logits, loss, dL/dfeatures) and optimizer state
(gradient-level) to a max relative error of 1e-4; parameter updates to 1e-4 (SGD) or, for AdamW, an rms relative
error of 1e-3 over the elements whose gradient is above the scale of eps (below it AdamW divides float noise by
noise, in PyTorch fp32 as well: docs/onnx-train-step-prototype.md); every value finite.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

from edge_client.parity import Case
from export.split import SplitViT
from sfp_common.bundle import BundleError, Manifest, OptimizerSpec, state_key
from sfp_common.parity import ParityReport


def torch_optimizer(params: list[torch.nn.Parameter], spec: OptimizerSpec, lr: float) -> torch.optim.Optimizer:
    if spec.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay)


def _snapshot(opt: torch.optim.Optimizer, named: dict[str, torch.nn.Parameter], slots: tuple[str, ...],
              when: str) -> Case:
    out = {f"{when}/param/{n}": p.detach().numpy().copy() for n, p in named.items()}
    for name, p in named.items():
        for slot in slots:
            value = opt.state.get(p, {}).get(slot)
            out[f"{when}/state/{state_key(slot, name)}"] = (value.detach().numpy().copy() if value is not None
                                                            else np.zeros(tuple(p.shape), np.float32))
    return out


def reference_cases(model: SplitViT, manifest: Manifest, batch_sizes: tuple[int, ...] = (1, 3, 8),
                    steps: int = 2, lr: float = 1e-2, seed: int = 0) -> list[Case]:
    """`steps` local, then split, then tail-only steps per batch size, each one PyTorch step recorded as a case."""
    rng = np.random.default_rng(seed)
    slots = manifest.optimizer.slots
    cases = []
    for batch in batch_sizes:
        ref = copy.deepcopy(model).eval()
        ref.set_trainable(("prompts", "tail"))
        params = dict(ref.named_parameters())
        named = {name: params[name] for name in manifest.trainable_names()}
        opt = torch_optimizer(list(named.values()), manifest.optimizer, lr)
        for done, phase in enumerate(["local"] * steps + ["split"] * steps + ["tail"] * steps):
            x = rng.standard_normal((batch, *manifest.preprocessing.input_size)).astype(np.float32)
            y = rng.integers(0, manifest.num_classes, batch)
            case = {"images": x, "labels": y, "lr": np.array(lr), "step": np.array(done),
                    **_snapshot(opt, named, slots, "before")}
            opt.zero_grad()
            if phase == "local":
                logits = ref.forward_local(torch.from_numpy(x))
                loss = F.cross_entropy(logits, torch.from_numpy(y))
                loss.backward()
                case.update(logits=logits.detach().numpy(), loss=np.array(loss.item()))
            elif phase == "tail":       # the prompts get no gradient: torch.optim leaves them as they are
                features = torch.from_numpy(
                    rng.standard_normal((batch, manifest.tail_tokens, manifest.embed_dim)).astype(np.float32))
                logits = ref.tail(features.requires_grad_(True))
                loss = F.cross_entropy(logits, torch.from_numpy(y))
                loss.backward()
                case.update(features=features.detach().numpy(), tail_logits=logits.detach().numpy(),
                            loss=np.array(loss.item()), dfeatures=features.grad.numpy())
            else:
                case.update(_split_step(ref, x, y))
            opt.step()
            cases.append({**case, **_snapshot(opt, named, slots, "after")})
    return cases


def _split_step(ref: SplitViT, x: np.ndarray, y: np.ndarray) -> Case:
    """PyTorch's split step; the tensors that cross between device and server are recorded for the replay."""
    smashed = ref.head(torch.from_numpy(x))
    tokens = smashed.detach().requires_grad_(True)
    body_out = ref.body(tokens)
    needed = body_out[:, ref.tail.pooled_positions(body_out.shape[1])]
    features = needed.detach().requires_grad_(True)
    logits = ref.tail(features)
    loss = F.cross_entropy(logits, torch.from_numpy(y))
    loss.backward()
    needed.backward(features.grad)
    if ref.spec.head_blocks == 0:   # the server sends dL/dprompts, summed over the batch
        first, count = ref.head.num_prefix_tokens, ref.spec.prompts
        server_grad = tokens.grad[:, first:first + count].sum(dim=0)
        ref.head.prompts.grad = server_grad.clone()
    else:
        server_grad = tokens.grad
        smashed.backward(tokens.grad)
    return {"tokens": smashed.detach().numpy(), "features": features.detach().numpy(),
            "tail_logits": logits.detach().numpy(), "loss": np.array(loss.item()),
            "dfeatures": features.grad.numpy(), "server_grad": server_grad.detach().numpy().copy()}


def check_or_refuse(report: ParityReport, what: str) -> None:
    if report.failures:
        raise BundleError(f"{what} disagrees with PyTorch; no bundle written:\n  " + "\n  ".join(report.failures))
