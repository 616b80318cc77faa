"""A profile's execution providers against the onnxruntime really installed here: a device runs on what its
profile lists and its onnxruntime has, says in one line what it lacks, and refuses when nothing is left."""
import dataclasses
import logging

import onnxruntime
import pytest

from edge_client.enrollment import enroll
from edge_client.profiles import execution_providers, load_profile
from sfp_common.errors import ConfigError, ServiceError

HAS_CUDA = "CUDAExecutionProvider" in onnxruntime.get_available_providers()


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime has the CUDA provider")
def test_a_jetson_profile_on_a_cpu_only_onnxruntime_falls_back_and_says_so():
    usable, lacking = execution_providers(load_profile("jetson-orin-nano"))
    assert usable == ["CPUExecutionProvider"]
    assert "CUDAExecutionProvider" in lacking and onnxruntime.__version__ in lacking and "JetPack" in lacking
    assert "\n" not in lacking


def test_a_profile_that_allows_nothing_this_onnxruntime_has_is_refused():
    gpu_only = dataclasses.replace(load_profile("jetson-orin-nano"), providers=("NoSuchExecutionProvider",))
    with pytest.raises(ConfigError, match="runs only on NoSuchExecutionProvider, which this onnxruntime"):
        execution_providers(gpu_only)
    assert execution_providers(load_profile("x86")) == (["CPUExecutionProvider"], None)


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime has the CUDA provider")
def test_enrollment_says_it_before_it_connects(tmp_path, caplog):
    from PIL import Image
    (tmp_path / "data" / "train" / "0").mkdir(parents=True)
    Image.new("L", (8, 8)).save(tmp_path / "data" / "train" / "0" / "a.png")
    with caplog.at_level(logging.WARNING), pytest.raises(ServiceError, match="nothing accepts"):   # no broker
        enroll("mqtt://127.0.0.1:1", "t", load_profile("jetson-orin-nano"), str(tmp_path / "data"),
               tmp_path / "state", "jet-1", "demo", timeout=2)
    assert [r.getMessage() for r in caplog.records if "CUDAExecutionProvider" in r.getMessage()]
