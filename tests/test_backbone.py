"""Checkpoints round-trip through timm, the pretraining augmentation does what it says, pretraining reproduces
bit for bit, and the shipped backbone is the recorded one."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from export.backbone import create_vit, preprocessing_of, resolve_model, sidecar_path
from sfp_common.datasets import load_dataset
from sfp_common.preprocess import preprocess
from simulation.pretrain import PRETRAIN_THREADS, pretrain, random_shift
from sfp_common.errors import ConfigError


def test_checkpoint_loads_with_its_weights_and_a_new_classifier(digits_checkpoint):
    saved = torch.load(digits_checkpoint)
    source = resolve_model(digits_checkpoint)
    model = create_vit(source, num_classes=10)
    loaded = model.state_dict()
    for name, value in saved.items():
        if name.startswith("head."):
            assert not torch.equal(loaded[name], value)     # a new task gets a new classifier
        else:
            assert torch.equal(loaded[name], value), name
    assert preprocessing_of(model).input_size == (1, 8, 8)
    assert preprocessing_of(model).mean == (0.3,)


def test_plain_timm_loads_the_same_file(digits_checkpoint):
    meta = json.loads(sidecar_path(digits_checkpoint).read_text())
    model = timm.create_model(meta["architecture"], pretrained=True, num_classes=10,
                              pretrained_cfg_overlay={**meta["pretrained_cfg"], "file": digits_checkpoint},
                              **meta["kwargs"])
    saved = torch.load(digits_checkpoint)
    assert all(torch.equal(value, saved[name]) for name, value in model.state_dict().items())


def test_a_different_class_count_gets_a_matching_classifier(digits_checkpoint):
    model = create_vit(resolve_model(digits_checkpoint), num_classes=3)
    assert model.head.out_features == 3


def test_bad_model_names_and_files(tmp_path, digits_checkpoint):
    with pytest.raises(ConfigError, match="unknown model"):
        resolve_model("definitely_not_a_model")
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_model(str(tmp_path / "missing.pth"))
    lonely = tmp_path / "lonely.pth"
    lonely.write_bytes(b"")
    with pytest.raises(ConfigError, match="no sidecar"):
        resolve_model(str(lonely))
    sidecar_path(lonely).write_text("{not json")
    with pytest.raises(ConfigError, match="not a valid model description"):
        resolve_model(str(lonely))
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"this is not a checkpoint")
    sidecar_path(corrupt).write_text(sidecar_path(digits_checkpoint).read_text())
    with pytest.raises(ConfigError, match="could not load weights"):
        create_vit(resolve_model(str(corrupt)), num_classes=10)


def test_random_shift_moves_each_image_by_at_most_pad():
    images = torch.zeros(64, 1, 6, 6)
    images[:, :, 2, 3] = 1.0
    shifted = random_shift(images, 2, torch.Generator().manual_seed(0))
    assert shifted.shape == images.shape
    rows, cols = [], []
    for img in shifted[:, 0]:
        where = (img == 1).nonzero()
        if len(where):
            rows.append(int(where[0, 0]) - 2)
            cols.append(int(where[0, 1]) - 3)
    assert len(rows) > 32 and max(map(abs, rows)) <= 2 and max(map(abs, cols)) <= 2
    assert len(set(zip(rows, cols))) > 5       # the offsets really vary


ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "vit-fmnist.pth"


def test_the_shipped_backbone_is_the_recorded_one_and_knows_fashion_mnist():
    """models/vit-fmnist.pth is what `sfp-pretrain` wrote at its recorded thread count (the hash beside it), and
    it is a trained backbone: far above chance on Fashion-MNIST test images it never saw."""
    recorded, name = (SHIPPED.parent / "vit-fmnist.pth.sha256").read_text().split()
    assert name == SHIPPED.name and hashlib.sha256(SHIPPED.read_bytes()).hexdigest() == recorded
    provenance = json.loads(sidecar_path(SHIPPED).read_text())["provenance"]
    assert provenance["threads"] == PRETRAIN_THREADS and provenance["recipe"] == "sfp-pretrain"
    model = create_vit(resolve_model(str(SHIPPED)), num_classes=10).eval()
    saved = torch.load(SHIPPED)
    model.load_state_dict(saved)                       # its own classifier: the Fashion-MNIST one
    test = load_dataset("fashion-mnist").test.subset(np.arange(1000))
    x = torch.from_numpy(preprocess(test.images, preprocessing_of(model)))
    with torch.no_grad():
        accuracy = float((model(x).argmax(1).numpy() == test.labels).mean())
    assert accuracy > 0.8, accuracy


def test_pretraining_is_reproducible_bit_for_bit_at_one_thread_count(tmp_path):
    hashes, threads = [], torch.get_num_threads()
    try:
        for run, seed in (("a", 0), ("b", 0), ("c", 1)):
            pretrain(tmp_path / run / "m.pth", epochs=1, batch_size=64, lr=2e-3, seed=seed, limit=256, threads=1)
            hashes.append(hashlib.sha256((tmp_path / run / "m.pth").read_bytes()).hexdigest())
    finally:
        torch.set_num_threads(threads)       # pretrain sets the count it records; the other tests keep theirs
    assert hashes[0] == hashes[1] != hashes[2]
