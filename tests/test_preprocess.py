"""Preprocessing reproduces a timm config's input by plain arithmetic and Pillow, nothing else."""

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sfp_common import preprocess as pp
from sfp_common.errors import ConfigError
from sfp_common.preprocess import Preprocessing, preprocess

IMAGENET = Preprocessing((3, 5, 4), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _norm(pixels_hwc: np.ndarray, mean, std) -> np.ndarray:
    """Reference in float64: [H,W,C] uint8 -> [C,H,W]."""
    x = pixels_hwc.astype(np.float64) / 255.0
    return ((x - np.asarray(mean)) / np.asarray(std)).transpose(2, 0, 1)


def test_hand_computed_grayscale():
    img = np.array([[[0, 51], [255, 102]]], dtype=np.uint8)  # one 2x2 image
    out = preprocess(img, Preprocessing((1, 2, 2), (0.5,), (0.25,)))
    assert out.dtype == np.float32 and out.shape == (1, 1, 2, 2)
    # (v/255 - 0.5) / 0.25: 0 -> -2, 51 -> -1.2, 255 -> 2, 102 -> -0.4
    np.testing.assert_allclose(out[0, 0], [[-2.0, -1.2], [2.0, -0.4]], rtol=1e-6)


def test_grayscale_replicated_for_rgb_model():
    img = np.array([[[10, 200]]], dtype=np.uint8)
    out = preprocess(img, Preprocessing((3, 1, 2), (0.1, 0.2, 0.3), (0.5, 1.0, 2.0)))
    expected = [[(10 / 255 - m) / s, (200 / 255 - m) / s] for m, s in ((0.1, 0.5), (0.2, 1.0), (0.3, 2.0))]
    np.testing.assert_allclose(out[0, :, 0, :], expected, rtol=1e-6)


def test_rgb_channels_normalised_separately():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (3, 5, 4, 3), dtype=np.uint8)
    out = preprocess(imgs, IMAGENET)
    for i in range(3):
        np.testing.assert_allclose(out[i], _norm(imgs[i], IMAGENET.mean, IMAGENET.std), rtol=1e-5, atol=1e-6)


def test_rgb_to_one_channel_uses_pillow_luma():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    out = preprocess([img], Preprocessing((1, 6, 6), (0.0,), (1.0,)))
    luma = np.asarray(Image.fromarray(img).convert("L"))
    np.testing.assert_allclose(out[0, 0], luma / 255.0, rtol=1e-6)
    # ITU-R 601-2 luma, independent of Pillow, to within Pillow's integer rounding.
    itu = img @ np.array([0.299, 0.587, 0.114])
    assert np.abs(out[0, 0] * 255 - itu).max() <= 1.0


@pytest.mark.parametrize("interpolation", sorted(pp.RESAMPLING))
def test_resize_matches_pillow_directly(interpolation):
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)
    prep = Preprocessing((3, 16, 11), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), interpolation)
    out = preprocess([img], prep)
    resample = getattr(Image.Resampling, interpolation.upper())
    resized = np.asarray(Image.fromarray(img).resize((11, 16), resample))  # PIL takes (W, H)
    np.testing.assert_allclose(out[0], _norm(resized, prep.mean, prep.std), rtol=1e-5, atol=1e-6)


def test_grayscale_resized_for_rgb_model_equals_converting_first():
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (7, 9), dtype=np.uint8)
    prep = Preprocessing((3, 12, 12), (0.1, 0.2, 0.3), (0.3, 0.2, 0.1))
    rgb_first = np.asarray(Image.fromarray(img).convert("RGB").resize((12, 12), Image.Resampling.BICUBIC))
    np.testing.assert_allclose(preprocess([img], prep)[0], _norm(rgb_first, prep.mean, prep.std), rtol=1e-5, atol=1e-5)


def test_stacked_and_list_inputs_give_identical_results():
    rng = np.random.default_rng(4)
    for shape, prep in (
        ((4, 8, 8), Preprocessing((3, 8, 8), (0.5,) * 3, (0.2,) * 3)),  # fast path
        ((4, 8, 8, 3), Preprocessing((3, 8, 8), (0.4, 0.5, 0.6), (0.2, 0.3, 0.4))),  # fast path
        ((4, 8, 8, 3), Preprocessing((3, 20, 15), (0.4, 0.5, 0.6), (0.2, 0.3, 0.4))),  # resize
        ((4, 8, 8), Preprocessing((1, 3, 5), (0.5,), (0.5,), "lanczos")),  # resize
    ):
        imgs = rng.integers(0, 256, shape, dtype=np.uint8)
        stacked = preprocess(imgs, prep)
        listed = preprocess(list(imgs), prep)
        assert stacked.shape == (4, *prep.input_size)
        assert np.array_equal(stacked, listed)


def test_fast_path_never_touches_pillow(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("Pillow used on the fast path")

    monkeypatch.setattr(pp.Image, "fromarray", boom)
    imgs = np.random.default_rng(5).integers(0, 256, (3, 4, 4), dtype=np.uint8)
    assert preprocess(imgs, Preprocessing((3, 4, 4), (0.5,) * 3, (0.5,) * 3)).shape == (3, 3, 4, 4)


def test_fast_path_is_fast_at_fashion_mnist_scale():
    imgs = np.random.default_rng(6).integers(0, 256, (60000, 28, 28), dtype=np.uint8)
    start = time.perf_counter()
    out = preprocess(imgs, Preprocessing((1, 28, 28), (0.2860,), (0.3530,)))
    assert time.perf_counter() - start < 2.0
    assert out.shape == (60000, 1, 28, 28)


def test_mixed_list_of_sizes_and_modes():
    rng = np.random.default_rng(7)
    imgs = [rng.integers(0, 256, (5, 7), dtype=np.uint8), rng.integers(0, 256, (9, 4, 3), dtype=np.uint8)]
    prep = Preprocessing((3, 6, 6), (0.5,) * 3, (0.5,) * 3, "bilinear")
    out = preprocess(imgs, prep)
    assert out.shape == (2, 3, 6, 6)
    gray = np.asarray(Image.fromarray(imgs[0]).resize((6, 6), Image.Resampling.BILINEAR))
    np.testing.assert_allclose(out[0], _norm(np.dstack([gray] * 3), prep.mean, prep.std), rtol=1e-5, atol=1e-6)
    assert preprocess([], prep).shape == (0, 3, 6, 6)


def test_bad_inputs_are_rejected():
    prep = Preprocessing((1, 4, 4), (0.5,), (0.5,))
    with pytest.raises(ConfigError, match="must be uint8, got float32"):
        preprocess(np.zeros((2, 4, 4), np.float32), prep)
    with pytest.raises(ConfigError, match="must have shape"):
        preprocess(np.zeros((4, 4), np.uint8), prep)
    with pytest.raises(ConfigError, match="must have shape"):
        preprocess(np.zeros((1, 4, 4, 4), np.uint8), prep)  # RGBA
    with pytest.raises(ConfigError, match="image 1 must be uint8"):
        preprocess([np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.int64)], prep)


def test_from_timm_config_and_round_trip():
    cfg = {"input_size": (3, 224, 224), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
           "interpolation": "bicubic", "crop_pct": 0.9}
    prep = Preprocessing.from_timm_config(cfg)
    assert prep == Preprocessing((3, 224, 224), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")
    import json

    assert Preprocessing.from_timm_config(json.loads(json.dumps(prep.to_dict()))) == prep
    broadcast = Preprocessing.from_timm_config({"input_size": [3, 32, 32], "mean": [0.1], "std": [0.3]})
    assert broadcast.mean == (0.1,) * 3 and broadcast.std == (0.3,) * 3 and broadcast.interpolation == "bicubic"


def test_real_timm_pretrained_config_is_accepted():
    timm = pytest.importorskip("timm")
    from timm.data import resolve_data_config

    cfg = timm.get_pretrained_cfg("vit_tiny_patch16_224.augreg_in21k_ft_in1k").to_dict()
    for source in (cfg, resolve_data_config(pretrained_cfg=cfg)):
        prep = Preprocessing.from_timm_config(source)
        assert prep.input_size == tuple(source["input_size"]) and prep.interpolation == source["interpolation"]
        assert prep.mean == tuple(source["mean"]) and prep.std == tuple(source["std"])


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"input_size": (1, 8, 8), "mean": (0.5,) * 3, "std": (0.5,) * 3}, "mean has 3 values but the model takes 1"),
        ({"input_size": (3, 8, 8), "mean": (0.5, 0.5), "std": (0.5,) * 3}, "mean has 2 values"),
        ({"input_size": (3, 8, 8), "mean": (0.5,) * 3, "std": (0.5, 0.0, 0.5)}, "std must be positive"),
        ({"input_size": (3, 8, 8), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "random"},
         "unsupported interpolation 'random'"),
        ({"input_size": (8, 8), "mean": (0.5,), "std": (0.5,)}, "three positive integers"),
        ({"input_size": (4, 8, 8), "mean": (0.5,) * 4, "std": (0.5,) * 4}, "1 or 3 channels"),
        ({"input_size": (3, 8, 8), "std": (0.5,) * 3}, "lacks mean"),
        ({"input_size": (3, 8, 8), "mean": ("x",) * 3, "std": (0.5,) * 3}, "bad preprocessing config"),
        ({"input_size": (3, 8, 8), "mean": (float("nan"),) * 3, "std": (0.5,) * 3}, "mean must be finite"),
    ],
)
def test_bad_configs_are_rejected(cfg, message):
    with pytest.raises(ConfigError, match=message):
        Preprocessing.from_timm_config(cfg)


def test_sfp_common_stays_torch_free():
    code = (
        "import sys, sfp_common.datasets, sfp_common.preprocess, sfp_common.partition; "
        "assert 'torch' not in sys.modules and 'sklearn' not in sys.modules and 'mlxtend' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
