"""Bundles and PyTorch reference steps for the device tests, made where torch is, checked where it is not.

For each (head_blocks, tail_blocks) in {0/0, 1/1} and optimizer in {SGD with momentum, AdamW}, this exports a
tiny bundle per backend (the same model) and records, at batch sizes 1, 3 and 8, one local-loss step, one
split-training step and one tail-only step (the cached-feature local update) taken by the reference federation's
own code (`simulation.methods.local_step` / `split_step`), starting from non-zero optimizer state. Every tensor that crossed the simulated wire is recorded too, so the device test can play the
server's part without torch.

    python tests/edge/make_fixtures.py OUT_DIR
"""
from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import TINY, bundle_folder  # noqa: E402
from export.backbone import ModelSource  # noqa: E402
from export.bundle import check_training_python, client_model, export_bundle  # noqa: E402
from export.onnx_graphs import image_shape  # noqa: E402
from export.split import SplitViT  # noqa: E402
from sfp_common.split_spec import SplitSpec  # noqa: E402
from sfp_common.bundle import OptimizerSpec, state_key  # noqa: E402
from sfp_common.errors import ConfigError  # noqa: E402
from simulation.accounting import ClientMeter  # noqa: E402
from sfp_common.recipe import Recipe  # noqa: E402
from simulation.methods import (METHODS, feature_shape, local_step, make_optimizer, named_params,  # noqa: E402
                                split_step)

CONFIGS = [(0, 0), (1, 1)]
OPTIMIZERS = ["sgd", "adamw"]
BATCH_SIZES = (1, 3, 8)
PHASES = ("local", "split", "tail")
LR = 1e-2
WEIGHT_DECAY = 0.05


class RecordingMeter(ClientMeter):
    """The reference meter (fp32 wire), keeping every tensor that crossed, in order."""

    def __init__(self) -> None:
        super().__init__(count_flops=False)
        self.crossed: list[np.ndarray] = []

    def up(self, tensor, wire="fp32"):
        out = super().up(tensor, wire)
        self.crossed.append(out.detach().numpy().copy())
        return out

    def down(self, tensor, wire="fp32"):
        out = super().down(tensor, wire)
        self.crossed.append(out.detach().numpy().copy())
        return out


def snapshot(params: dict, opt: torch.optim.Optimizer, slots: tuple[str, ...]) -> dict[str, np.ndarray]:
    out = {f"param/{n}": p.detach().numpy().copy() for n, p in params.items()}
    for n, p in params.items():
        for slot in slots:
            out[f"state/{state_key(slot, n)}"] = opt.state[p][slot].detach().numpy().copy()
    return out


def record_cases(model: SplitViT, optimizer: str, folder: Path) -> None:
    method = METHODS["sfprompt"]
    cfg = Recipe(lr=LR, optimizer=OptimizerSpec(optimizer, weight_decay=WEIGHT_DECAY), wire="fp32")
    slots = OptimizerSpec(optimizer).slots
    rng = np.random.default_rng(1)
    c, h, w = image_shape(model)
    for batch in BATCH_SIZES:
        for phase in PHASES:
            ref = copy.deepcopy(model)
            ref.set_trainable(method.client_parts)
            params = named_params(ref, method.client_parts)
            opt = make_optimizer(list(params.values()), cfg)
            # one warm-up step, so the recorded step starts from non-zero optimizer state
            warm_x = torch.from_numpy(rng.standard_normal((batch, c, h, w)).astype(np.float32))
            local_step(ref, warm_x, torch.from_numpy(rng.integers(0, 5, batch)), ClientMeter(count_flops=False),
                       opt, ref.forward_local)
            x = rng.standard_normal((batch, c, h, w)).astype(np.float32)
            y = rng.integers(0, 5, batch)
            case = {"images": x, "labels": y, "lr": np.array(LR), "step": np.array(1)}
            case.update({f"before/{k}": v for k, v in snapshot(params, opt, slots).items()})
            if phase == "local":
                with torch.no_grad():
                    logits = ref.forward_local(torch.from_numpy(x)).numpy()
                loss = local_step(ref, torch.from_numpy(x), torch.from_numpy(y), ClientMeter(count_flops=False), opt,
                                  ref.forward_local)
                case.update(loss=np.array(float(loss) / batch), logits=logits)
            elif phase == "tail":
                features = torch.from_numpy(rng.standard_normal((batch, *feature_shape(ref, "ours"))).astype(np.float32))
                with torch.no_grad():
                    logits = ref.tail(features).numpy()
                loss = local_step(ref, features, torch.from_numpy(y), ClientMeter(count_flops=False), opt, ref.tail)
                case.update(features=features.numpy(), tail_logits=logits, loss=np.array(float(loss) / batch))
            else:
                meter = RecordingMeter()
                step = split_step(ref, method, cfg, torch.from_numpy(x), torch.from_numpy(y), meter, opt, None)
                tokens, features, dfeatures, server_grad = meter.crossed
                case.update(tokens=tokens, features=features, dfeatures=dfeatures, server_grad=server_grad,
                            loss=np.array(float(step.loss_sum) / batch))
            case.update({f"after/{k}": v for k, v in snapshot(params, opt, slots).items()})
            np.savez(folder / f"case_{phase}_b{batch}.npz", **case)


def main(out: Path) -> None:
    """Portable bundles always; training bundles when an onnxruntime-training Python is available
    (SFP_ORT_TRAINING_PYTHON or .venv-ort-training), since only that environment can build them."""
    out.mkdir(parents=True, exist_ok=True)
    backends = ["portable"]
    try:
        check_training_python(None)
        backends.append("training")
    except ConfigError as err:
        print(f"fixtures: no training bundles ({err})", flush=True)
    names = []
    for head_blocks, tail_blocks in CONFIGS:
        for optimizer in OPTIMIZERS:
            name = f"k{head_blocks}m{tail_blocks}-{optimizer}"
            model, prep = client_model(ModelSource("vit_tiny_patch16_224", dict(TINY)), 5,
                                       SplitSpec(3, head_blocks, tail_blocks), pretrained=False)
            for backend in backends:
                export_bundle(model, prep, out / name / bundle_folder(backend), "tiny-test-vit",
                              OptimizerSpec(optimizer, weight_decay=WEIGHT_DECAY), backend=backend)
            record_cases(model, optimizer, out / name)
            names.append(name)
            print(f"fixtures: {name} ({', '.join(backends)})", flush=True)
    (out / "index.json").write_text(json.dumps({"names": names, "backends": backends}) + "\n")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))
