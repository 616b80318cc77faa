"""In the device's own environments (`SFP_DEVICE_ENV=portable|training`, as `make test` runs tests/edge), torch is
not installed; the portable one has plain onnxruntime only, the training one onnxruntime-training."""
import importlib.util
import os

import pytest

ENV = os.environ.get("SFP_DEVICE_ENV")


@pytest.mark.skipif(ENV is None, reason="only meaningful in a device environment")
def test_torch_and_timm_are_not_installed_and_onnxruntime_is_the_expected_one():
    missing = {name: importlib.util.find_spec(name) is None for name in ("torch", "timm", "torchvision")}
    assert all(missing.values()), missing
    import onnxruntime
    has_training = importlib.util.find_spec("onnxruntime.training") is not None
    assert has_training == (ENV == "training"), (ENV, onnxruntime.__file__)
    print(f"device environment ({ENV}): no torch, no timm, onnxruntime {onnxruntime.__version__}, "
          f"onnxruntime.training {'present' if has_training else 'absent'}")
