"""uint8 images -> model input exactly as a timm pretrained config asks, without torch (runs on devices too)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from PIL import Image

from sfp_common.errors import ConfigError

RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
_BLOCK_ELEMENTS = 1 << 22  # pixels converted to float32 at a time (16 MiB)


@dataclass(frozen=True)
class Preprocessing:
    input_size: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if len(self.input_size) != 3 or any(int(v) != v or v < 1 for v in self.input_size):
            raise ConfigError(f"input_size must be three positive integers (C, H, W), got {self.input_size}")
        if self.input_size[0] not in (1, 3):
            raise ConfigError(f"input_size must have 1 or 3 channels, got {self.input_size[0]}")
        c = self.input_size[0]
        for key, values in (("mean", self.mean), ("std", self.std)):
            if len(values) != c:
                raise ConfigError(f"{key} has {len(values)} values but the model takes {c} channel(s)")
            if not all(math.isfinite(v) for v in values):
                raise ConfigError(f"{key} must be finite, got {values}")
        if any(v <= 0 for v in self.std):
            raise ConfigError(f"std must be positive, got {self.std}")
        if self.interpolation not in RESAMPLING:
            raise ConfigError(
                f"unsupported interpolation {self.interpolation!r}; use one of {', '.join(RESAMPLING)}"
            )

    @classmethod
    def from_timm_config(cls, cfg: Mapping) -> Preprocessing:
        """Accept timm's pretrained_cfg or resolved data config; a 1-value mean/std is broadcast to RGB."""
        missing = [k for k in ("input_size", "mean", "std") if k not in cfg]
        if missing:
            raise ConfigError(f"preprocessing config lacks {', '.join(missing)}")
        try:
            size = tuple(int(v) for v in cfg["input_size"])
            mean = tuple(float(v) for v in cfg["mean"])
            std = tuple(float(v) for v in cfg["std"])
        except (TypeError, ValueError) as e:
            raise ConfigError(f"bad preprocessing config {dict(cfg)}: {e}") from e
        if len(size) == 3 and size[0] == 3:
            mean = mean * 3 if len(mean) == 1 else mean
            std = std * 3 if len(std) == 1 else std
        return cls(size, mean, std, str(cfg.get("interpolation") or "bicubic"))  # type: ignore[arg-type]

    def to_dict(self) -> dict:
        return {
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }


def preprocess(images: np.ndarray | list[np.ndarray], prep: Preprocessing) -> np.ndarray:
    """float32 [N, C, H, W]; stacked arrays already at the model's size skip Pillow entirely."""
    c, h, w = prep.input_size
    if isinstance(images, np.ndarray):
        _check_image(images, batched=True)
        gray = images.ndim == 3
        if images.shape[1:3] == (h, w) and (gray or c == 3):
            return _normalize(images, prep)
        images = list(images)
    for i, img in enumerate(images):
        _check_image(np.asarray(img), batched=False, index=i)
    if not images:
        return np.zeros((0, c, h, w), dtype=np.float32)
    # Drop channels before resizing and replicate after: the same pixels as converting first, less work.
    fitted = [_fit(np.asarray(img), prep) for img in images]
    if c == 3 and len({f.ndim for f in fitted}) > 1:
        fitted = [f if f.ndim == 3 else np.repeat(f[..., None], 3, axis=-1) for f in fitted]
    return _normalize(np.stack(fitted), prep)


def _check_image(arr: np.ndarray, batched: bool, index: int | None = None) -> None:
    where = "images" if index is None else f"image {index}"
    if arr.dtype != np.uint8:
        raise ConfigError(f"{where} must be uint8, got {arr.dtype}")
    base = 3 if batched else 2
    shape = "[N,H,W] or [N,H,W,3]" if batched else "[H,W] or [H,W,3]"
    if arr.ndim not in (base, base + 1) or (arr.ndim == base + 1 and arr.shape[-1] != 3):
        raise ConfigError(f"{where} must have shape {shape}, got {list(arr.shape)}")


def _fit(img: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """One image at the model's size; 2-D stays 2-D unless the model wants one channel from RGB."""
    c, h, w = prep.input_size
    if img.ndim == 3 and c == 1:
        pil = Image.fromarray(img).convert("L")
    elif img.shape[:2] != (h, w):
        pil = Image.fromarray(img)  # uint8 2-D -> "L", [H,W,3] -> "RGB"
    else:
        return img
    if pil.size != (w, h):
        pil = pil.resize((w, h), RESAMPLING[prep.interpolation])
    return np.asarray(pil)


def _normalize(images: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """(x/255 - mean)/std in float32, in cache-sized blocks: 60k Fashion-MNIST images take well under a second."""
    c, h, w = prep.input_size
    mean = np.asarray(prep.mean, dtype=np.float32).reshape(c, 1, 1)
    std = np.asarray(prep.std, dtype=np.float32).reshape(c, 1, 1)
    out = np.empty((len(images), c, h, w), dtype=np.float32)
    block = max(1, _BLOCK_ELEMENTS // (c * h * w))
    for start in range(0, len(images), block):
        chunk = images[start:start + block]
        dst = out[start:start + block]
        dst[...] = chunk[:, None] if chunk.ndim == 3 else chunk.transpose(0, 3, 1, 2)
        dst /= np.float32(255.0)
        dst -= mean
        dst /= std
    return out
