"""Getting a timm ViT: by hub name, from a local checkpoint, or fresh for tests.

A checkpoint is a state dict (`.pth` or `.safetensors`) with a JSON sidecar `<file>.json` naming the timm
architecture, its keyword arguments and its pretrained config (input size, mean, std, class count). Loading
goes through timm's own `pretrained_cfg_overlay=dict(file=...)`, so any timm user can load the same file.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from sfp_common.errors import ConfigError
from sfp_common.preprocess import Preprocessing

_CFG_KEYS = ("input_size", "mean", "std", "interpolation", "num_classes")


@dataclass(frozen=True)
class ModelSource:
    """What `--model` named: a timm architecture, its keyword arguments, and where its weights come from."""

    architecture: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None          # a local file; None means the hub's weights (or none)
    pretrained_cfg: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return Path(self.checkpoint).stem if self.checkpoint else self.architecture


def sidecar_path(checkpoint: str | os.PathLike) -> Path:
    return Path(str(checkpoint) + ".json")


def resolve_model(name_or_path: str) -> ModelSource:
    """Read a `--model` value: a checkpoint path (with its sidecar) or a timm model name."""
    path = Path(name_or_path)
    if path.suffix in (".pth", ".pt", ".safetensors", ".bin") or path.exists():
        if not path.is_file():
            raise ConfigError(f"model checkpoint {name_or_path} does not exist")
        meta_file = sidecar_path(path)
        if not meta_file.is_file():
            raise ConfigError(f"checkpoint {name_or_path} has no sidecar {meta_file.name} naming its architecture")
        try:
            meta = json.loads(meta_file.read_text())
            return ModelSource(meta["architecture"], dict(meta.get("kwargs", {})), str(path),
                               dict(meta.get("pretrained_cfg", {})))
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"sidecar {meta_file} is not a valid model description: {err}") from None
    if not timm.is_model(name_or_path):
        raise ConfigError(f"unknown model {name_or_path!r}: not a timm model name nor a checkpoint file")
    return ModelSource(name_or_path)


def create_vit(source: ModelSource, num_classes: int, pretrained: bool = True) -> nn.Module:
    """Build the model with a new `num_classes` classifier; pretrained weights from the checkpoint or the hub."""
    kwargs = dict(source.kwargs)
    if source.checkpoint and pretrained:
        overlay = {k: v for k, v in source.pretrained_cfg.items() if k in _CFG_KEYS}
        overlay["file"] = source.checkpoint
        kwargs["pretrained_cfg_overlay"] = overlay
    try:
        model = timm.create_model(source.architecture, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except Exception as err:  # a corrupt or foreign file fails deep in torch.load/unpickling, in any error type
        where = source.checkpoint or "the Hugging Face hub (offline? name a local checkpoint instead)"
        detail = str(err).splitlines()[0] if str(err) else ""
        raise ConfigError(f"could not load weights for {source.architecture} from {where}: "
                          f"{type(err).__name__} {detail}".rstrip()) from None
    if pretrained:
        model.reset_classifier(num_classes)  # a new task gets a new classifier, even with the same class count
    return model


def preprocessing_of(model: nn.Module) -> Preprocessing:
    """The input pipeline the model expects: timm's data config, with the input size the model was built for
    (a model created with another `img_size` or `in_chans` keeps its architecture's default config)."""
    cfg = dict(timm.data.resolve_data_config({}, model=model))
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None and getattr(patch_embed, "img_size", None) is not None:
        channels = patch_embed.proj.in_channels
        cfg["input_size"] = (channels, *patch_embed.img_size)
        if channels == 1 and len(cfg["mean"]) == 3:
            cfg["mean"], cfg["std"] = cfg["mean"][:1], cfg["std"][:1]
    return Preprocessing.from_timm_config(cfg)


def save_checkpoint(model: nn.Module, path: str | os.PathLike, architecture: str, kwargs: dict[str, Any],
                    pretrained_cfg: dict[str, Any], provenance: dict[str, Any] | None = None) -> Path:
    """Write the state dict and its sidecar so `resolve_model(path)` and plain timm can load it; `provenance`
    (how it was made) goes into the sidecar for people, and is not read back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    meta = {"architecture": architecture, "kwargs": kwargs,
            "pretrained_cfg": {k: pretrained_cfg[k] for k in _CFG_KEYS if k in pretrained_cfg}}
    if provenance:
        meta["provenance"] = provenance
    sidecar_path(path).write_text(json.dumps(meta, indent=2) + "\n")
    return path
