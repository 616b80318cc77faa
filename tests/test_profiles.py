"""Firmware profiles load, are refused when malformed, and `auto` recognises the boards by their files."""
import json

import pytest

from edge_client.profiles import available, detect, load_profile
from sfp_common.errors import ConfigError


def test_every_shipped_profile_loads():
    names = available()
    assert {"raspberry-pi-4", "raspberry-pi-5", "jetson-nano", "jetson-orin-nano", "x86"} <= set(names)
    for name in names:
        p = load_profile(name)
        assert p.name == name and p.providers[-1] == "CPUExecutionProvider"


@pytest.mark.parametrize("model,tegra,expected", [
    ("Raspberry Pi 4 Model B Rev 1.4", False, "raspberry-pi-4"),
    ("Raspberry Pi 5 Model B Rev 1.0", False, "raspberry-pi-5"),
    ("NVIDIA Jetson Nano Developer Kit", True, "jetson-nano"),
    ("NVIDIA Jetson Orin Nano Developer Kit", True, "jetson-orin-nano"),
])
def test_auto_detects_the_board(tmp_path, model, tegra, expected):
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/model").write_bytes(model.encode() + b"\0")
    if tegra:
        (tmp_path / "etc").mkdir()
        (tmp_path / "etc/nv_tegra_release").write_text("# R32 (release), REVISION: 7.1")
    assert detect(str(tmp_path)) == expected


def test_auto_on_a_plain_pc_is_x86(tmp_path, monkeypatch):
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    assert detect(str(tmp_path)) == "x86"
    monkeypatch.setattr("platform.machine", lambda: "riscv64")
    with pytest.raises(ConfigError, match="no profile matches"):
        detect(str(tmp_path))


def test_bad_profiles_are_refused(tmp_path):
    good = json.loads(json.dumps(load_profile("x86").as_dict()))
    for change, message in [({"backend": "tensorflow"}, "out of range"), ({"wire": "fp64"}, "out of range"),
                            ({"batch_size": 0}, "out of range"), ({"colour": "red"}, "malformed")]:
        path = tmp_path / "p.json"
        path.write_text(json.dumps({**good, **change}))
        with pytest.raises(ConfigError, match=message):
            load_profile(str(path))
    with pytest.raises(ConfigError, match="unknown profile"):
        load_profile("toaster")
