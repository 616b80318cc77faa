"""A client's peak memory for one method: what the device holds and computes in a round, in a fresh process.

    python bench/client_memory.py --method sfprompt --model models/vit-fmnist.pth --batch 16

Only the parts the device holds are materialised (the model is built on the meta device first): head and tail
for split methods, the whole model for FL and FedPrompt. The server's replies (body output, gradient at the
smashed tokens or at the prompts) are random tensors of the shapes the method's traffic variant receives: memory
does not depend on their values. The device runs its round's step kinds as its recipe says (the paper's local-path
EL2N and local-loss step, split steps, tail steps on cached features, which are held for `samples` local samples
in fp16; or whole-model steps) a few times with the method's optimizer. Printed: peak RSS above the process's RSS
before the model's parts were materialised (the peak is reset there: interpreter, imports and the batch of images
are excluded), in MB.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click


def _status_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (the peak since the last reset) from /proc/self/status, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    """Forget the peak so far (Linux >= 4.0): imports and building the model on meta must not count."""
    Path("/proc/self/clear_refs").write_text("5")


def measure(method_name: str, model: str, batch: int, traffic: str = "ours", steps: int = 3,
            samples: int = 320) -> dict:
    """Run in this process (call it in a fresh one: RSS peaks never come down)."""
    import torch
    import torch.nn.functional as F

    from export.backbone import create_vit, resolve_model
    from export.split import SplitViT
    from sfp_common.split_spec import SplitSpec
    from simulation.methods import get_method, make_optimizer, named_params

    torch.set_num_threads(1)
    method = get_method(method_name)
    source = resolve_model(model)
    spec = SplitSpec(10 if method.uses_prompts else 0)
    with torch.device("meta"):
        vit = create_vit(source, num_classes=10, pretrained=False)
        split = SplitViT(vit, spec)
    channels, size = vit.patch_embed.proj.in_channels, vit.patch_embed.img_size
    x = torch.randn(batch, channels, *size)
    y = torch.randint(0, 10, (batch,))
    _reset_peak()
    before = _status_mb("VmRSS")

    held = (split,) if not method.split else (split.head, split.tail)
    for part in held:
        part.to_empty(device="cpu")
        for p in part.parameters():
            torch.nn.init.normal_(p, std=0.02)
    split.set_trainable(method.client_parts)
    params = list(named_params(split, method.client_parts).values())
    opt = make_optimizer(params, method.recipe)
    dim = vit.embed_dim

    def whole_step() -> None:
        opt.zero_grad()
        F.cross_entropy(split(x), y).backward()
        opt.step()

    def local_step() -> None:
        opt.zero_grad()
        F.cross_entropy(split.forward_local(x), y).backward()
        opt.step()

    def split_step() -> None:
        opt.zero_grad()
        smashed = split.head(x)
        tokens = smashed.shape[1]
        received = torch.randn(batch, 1 if traffic == "ours" else tokens, dim, requires_grad=True)
        F.cross_entropy(split.tail(received), y).backward()
        if traffic == "ours" and method.uses_prompts and "head" not in method.client_parts:
            split.head.prompts.grad = torch.randn(spec.prompts, dim)
        else:
            smashed.backward(torch.randn_like(smashed))
        opt.step()

    recipe = method.recipe
    cache = None
    if method.split and recipe.local_update == "cached-features":    # the features kept for every local sample
        cache = torch.zeros(samples, 1 if traffic == "ours" else split.head(x[:1]).shape[1], dim, dtype=torch.float16)

    def cached_step() -> None:
        opt.zero_grad()
        F.cross_entropy(split.tail(cache[:batch].float()), y).backward()
        opt.step()

    for _ in range(steps):
        if not method.split:
            whole_step()
            continue
        if recipe.prune == "local-el2n":
            with torch.no_grad():
                split.forward_local(x)
        if recipe.local_update == "local-path":
            local_step()
        split_step()
        if cache is not None:
            cached_step()
    params_mb = sum(p.numel() * p.element_size() for part in held for p in part.parameters()) / 2**20
    return {"method": method_name, "traffic": traffic, "batch": batch, "model": source.label,
            "peak_mb": _status_mb("VmHWM") - before, "parameters_mb": params_mb}


def measure_in_fresh_process(method: str, model: str, batch: int, traffic: str = "ours") -> dict:
    out = subprocess.run([sys.executable, __file__, "--method", method, "--model", model, "--batch", str(batch),
                          "--traffic", traffic], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    return json.loads(out.stdout.strip().splitlines()[-1])


@click.command(context_settings={"show_default": True})
@click.option("--method", default="sfprompt")
@click.option("--model", default="models/vit-fmnist.pth")
@click.option("--batch", default=16)
@click.option("--traffic", type=click.Choice(["ours", "paper"]), default="ours")
def main(method: str, model: str, batch: int, traffic: str) -> None:
    """Print one JSON line: the client's peak memory for METHOD."""
    print(json.dumps(measure(method, model, batch, traffic)))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
