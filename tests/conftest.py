import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

try:  # the device's environment (tests/edge/) has no torch; everything else here needs it
    import timm
    import torch
except ImportError:
    torch = timm = None

TINY = {"img_size": 16, "patch_size": 4, "in_chans": 3, "embed_dim": 32, "depth": 4, "num_heads": 2}

if torch is not None:
    torch.set_num_threads(1)  # tiny models: threads cost more than they give, and the suite stays predictable


def tiny_vit(num_classes: int = 5, **overrides) -> "torch.nn.Module":
    """A ViT small enough for unit tests; any timm ViT keyword can be overridden."""
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes,
                             **{**TINY, **overrides}).eval()


def write_digits_checkpoint(folder) -> str:
    """A tiny ViT for 8x8 grayscale digits, saved the way sfp-pretrain saves one."""
    from export.backbone import save_checkpoint
    kwargs = {"img_size": 8, "patch_size": 4, "in_chans": 1, "embed_dim": 32, "depth": 3, "num_heads": 2}
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **kwargs)
    cfg = {"input_size": [1, 8, 8], "mean": [0.3], "std": [0.35], "interpolation": "bilinear", "num_classes": 10}
    return str(save_checkpoint(model, folder / "tiny.pth", "vit_tiny_patch16_224", kwargs, cfg))


@pytest.fixture
def digits_checkpoint(tmp_path):
    return write_digits_checkpoint(tmp_path)


@pytest.fixture(scope="module")
def module_digits_checkpoint(tmp_path_factory):
    return write_digits_checkpoint(tmp_path_factory.mktemp("checkpoint"))


# ----------------------------------------------------------------------------------------------- device tests
# tests/edge/ runs in the device's environment (no torch), against bundles and reference steps made with torch.
# SFP_EDGE_FIXTURES names the folder tests/edge/make_fixtures.py wrote (how `make test` runs them in the torch-free
# environment). Without it, the fixtures are made here, which needs torch; without either the tests fail: a
# device test that silently skips proves nothing.
@pytest.fixture(scope="session")
def fixtures_dir(tmp_path_factory) -> Path:
    given = os.environ.get("SFP_EDGE_FIXTURES")
    if given:
        folder = Path(given)
        if not (folder / "index.json").is_file():
            pytest.fail(f"SFP_EDGE_FIXTURES={given} has no index.json: run tests/edge/make_fixtures.py first")
        return folder
    folder = tmp_path_factory.mktemp("edge-fixtures")
    script = Path(__file__).parent / "edge" / "make_fixtures.py"
    subprocess.run([sys.executable, str(script), str(folder)], check=True, cwd=script.parents[2],
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    return folder


@pytest.fixture(scope="session")
def fixture_names(fixtures_dir) -> list[str]:
    return json.loads((fixtures_dir / "index.json").read_text())["names"]


@pytest.fixture(scope="session")
def fixture_backends(fixtures_dir) -> list[str]:
    return json.loads((fixtures_dir / "index.json").read_text())["backends"]


def bundle_folder(backend: str) -> str:
    return f"bundle-{backend}"


def require_backend(backend: str, built: list[str]) -> None:
    """Each backend's device tests run in that backend's environment: SFP_DEVICE_ENV=portable (plain onnxruntime)
    or training (onnxruntime-training); the main environment runs portable bundles. There, missing fixtures fail."""
    here = os.environ.get("SFP_DEVICE_ENV", "portable")
    if backend != here:
        pytest.skip(f"{backend} bundles are tested in their own environment (make test: SFP_DEVICE_ENV={backend})")
    if backend not in built:
        pytest.fail(f"no {backend} fixtures were built: tests/edge/make_fixtures.py needs SFP_ORT_TRAINING_PYTHON")


# ----------------------------------------------------------------------------------------------- the broker
@pytest.fixture(scope="session")
def broker():
    """A real Mosquitto on loopback (the OS package; `.ci/run` installs it). Missing, the tests fail: an MQTT test
    that skips proves nothing."""
    from cloud_server.broker import LocalBroker
    with LocalBroker() as url:
        yield url
