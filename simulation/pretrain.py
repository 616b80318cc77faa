"""Pretrain a small ViT on Fashion-MNIST and save it as a timm-loadable checkpoint.

Offline, no pretrained ViT can be downloaded, and prompt tuning on a random backbone proves nothing, so demos and
benchmarks fine-tune this in-house backbone on another task (MNIST 5k). Deterministic for a seed.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import click
import numpy as np
import torch
import torch.nn.functional as F

from export.backbone import ModelSource, create_vit, save_checkpoint
from sfp_common.datasets import load_dataset
from sfp_common.preprocess import Preprocessing, preprocess
from simulation.engine import accuracy

ARCHITECTURE = "vit_tiny_patch16_224"
# 28x28 grayscale, 16 patches of 7x7, width 128, 6 blocks: about a minute an epoch on a 2-core CPU.
SMALL_VIT_KWARGS = {"img_size": 28, "patch_size": 7, "in_chans": 1, "embed_dim": 128, "depth": 6, "num_heads": 4}
# Fashion-MNIST's pixel mean and std, so the checkpoint carries its own normalisation.
# The thread count the shipped checkpoint (models/vit-fmnist.pth) was pretrained at.
PRETRAIN_THREADS = 2
FASHION_MNIST_CFG = {"input_size": [1, 28, 28], "mean": [0.2860], "std": [0.3530], "interpolation": "bilinear",
                     "num_classes": 10}


def random_shift(images: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Pad by `pad` pixels and crop back at a random offset per image: the augmentation a small ViT needs."""
    n, c, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad), value=float(images.min()))
    rows = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator) + torch.arange(h)
    cols = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator) + torch.arange(w)
    return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


def pretrain(out: Path, epochs: int, batch_size: int, lr: float, seed: int, limit: int | None = None,
             threads: int = PRETRAIN_THREADS) -> float:
    """Train, save, and return the test accuracy. Bit-reproducible only at the same thread count (reductions
    split differently), so the count is set here and recorded in the sidecar."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    data = load_dataset("fashion-mnist")
    prep = Preprocessing.from_timm_config(FASHION_MNIST_CFG)
    train = data.train if limit is None else data.train.subset(np.arange(min(limit, len(data.train))))
    x = torch.from_numpy(preprocess(train.images, prep))
    y = torch.from_numpy(train.labels)
    x_test = torch.from_numpy(preprocess(data.test.images, prep))
    y_test = torch.from_numpy(data.test.labels)

    model = create_vit(ModelSource(ARCHITECTURE, SMALL_VIT_KWARGS), num_classes=10, pretrained=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * math.ceil(len(x) / batch_size)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    generator = torch.Generator().manual_seed(seed)
    start = time.time()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(model(random_shift(x[idx], 2, generator)), y[idx], label_smoothing=0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(idx)
        test_accuracy = accuracy(model, x_test, y_test)
        click.echo(f"epoch {epoch + 1}/{epochs}  loss {total / len(x):.4f}  test accuracy {test_accuracy:.4f}  "
                   f"({time.time() - start:.0f} s)", err=True)
    save_checkpoint(model, out, ARCHITECTURE, SMALL_VIT_KWARGS, FASHION_MNIST_CFG, provenance={
        "recipe": "sfp-pretrain", "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
        "limit": limit, "threads": threads, "torch": torch.__version__,
        "fashion_mnist_test_accuracy": round(test_accuracy, 4)})
    return test_accuracy


@click.command()
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("models/vit-fmnist.pth"),
              show_default=True, help="Checkpoint to write (a .json sidecar is written beside it).")
@click.option("--epochs", default=6, show_default=True)
@click.option("--batch-size", default=128, show_default=True)
@click.option("--lr", default=2e-3, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--limit", type=int, default=None, help="Train on the first N images only (smoke runs).")
@click.option("--threads", default=PRETRAIN_THREADS, show_default=True,
              help="Torch threads; the result is reproducible bit for bit only at the same count.")
def main(out: Path, epochs: int, batch_size: int, lr: float, seed: int, limit: int | None, threads: int) -> None:
    """Pretrain the in-house small ViT on Fashion-MNIST."""
    from sfp_common.cli import run_cli
    run_cli(lambda: click.echo(
        f"saved {out} (test accuracy {pretrain(out, epochs, batch_size, lr, seed, limit, threads):.4f})"))
