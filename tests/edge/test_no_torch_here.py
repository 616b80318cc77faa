"""In the device's own environment (`SFP_DEVICE_ENV=1`, as `make test` runs tests/edge), torch is not installed."""
import importlib.util
import os

import pytest


@pytest.mark.skipif(os.environ.get("SFP_DEVICE_ENV") != "1", reason="only meaningful in the device environment")
def test_torch_timm_and_onnxruntime_training_are_not_installed():
    missing = {name: importlib.util.find_spec(name) is None for name in ("torch", "timm", "torchvision")}
    assert all(missing.values()), missing
    import onnxruntime
    assert importlib.util.find_spec("onnxruntime.training") is None, onnxruntime.__file__
    print(f"device environment: no torch, no timm, onnxruntime {onnxruntime.__version__}")
