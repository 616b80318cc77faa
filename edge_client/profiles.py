"""Firmware profiles: what a class of device decides about taking part (firmware_profiles/*.json), and which
class this device is (`--profile auto`)."""
from __future__ import annotations

import json
import platform
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from sfp_common.errors import ConfigError
from wire_protocol.contracts import Profile


def available() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("firmware_profiles").iterdir() if p.name.endswith(".json"))


def load_profile(name_or_path: str) -> Profile:
    """A profile by name (firmware_profiles/<name>.json), by path to a JSON file, or `auto`."""
    if name_or_path == "auto":
        name_or_path = detect()
    path = Path(name_or_path)
    if path.suffix == ".json" and path.is_file():
        text = path.read_text()
    elif name_or_path in available():
        text = resources.files("firmware_profiles").joinpath(f"{name_or_path}.json").read_text()
    else:
        raise ConfigError(f"unknown profile {name_or_path!r}; choose one of {', '.join(available())}, auto, "
                          "or a .json file")
    try:
        raw = json.loads(text)
        return Profile(**{**raw, "providers": tuple(raw["providers"])})
    except ConfigError:
        raise
    except (ValueError, TypeError, KeyError) as err:
        raise ConfigError(f"profile {name_or_path} is malformed: {err}") from None


def detect(root: str = "/") -> str:
    """The profile whose `match` fits this machine: the device-tree model (Raspberry Pi, Jetson), the Tegra
    release file (Jetson), or the CPU architecture; x86 when nothing more specific matches."""
    base = Path(root)
    try:
        model = (base / "proc/device-tree/model").read_bytes().decode(errors="replace").strip("\0\n ")
    except OSError:
        model = ""
    tegra = (base / "etc/nv_tegra_release").exists()
    machine = platform.machine()
    best = None
    for name in available():
        match = load_profile(name).match
        if not match:
            continue
        if "device_tree_model" in match and match["device_tree_model"] not in model:
            continue
        if match.get("tegra") and not tegra:
            continue
        if "machine" in match and match["machine"] != machine:
            continue
        specificity = len(match)
        if best is None or specificity > best[0]:
            best = (specificity, name)
    if best is None:
        raise ConfigError(f"no profile matches this device (model {model!r}, machine {machine}); pass "
                          f"--profile with one of {', '.join(available())}")
    return best[1]


GPU_HINT = ("PyPI's aarch64 onnxruntime has only the CPU provider; a Jetson's GPU build comes with JetPack "
            "(NVIDIA's onnxruntime-gpu wheels for its Python), see the README")


def execution_providers(profile: Profile, available: Sequence[str] | None = None) -> tuple[list[str], str | None]:
    """The profile's providers this onnxruntime has, in the profile's order, and one line saying what it lacks
    (None when nothing is missing). A device falls back only to providers its profile lists: none left is a
    ConfigError."""
    import onnxruntime
    have = list(onnxruntime.get_available_providers() if available is None else available)
    usable = [p for p in profile.providers if p in have]
    missing = [p for p in profile.providers if p not in have]
    hint = f" ({GPU_HINT})" if any("CUDA" in p or "TensorRT" in p for p in missing) else ""
    where = f"this onnxruntime {onnxruntime.__version__}"
    if not usable:
        raise ConfigError(f"profile {profile.name} runs only on {', '.join(profile.providers)}, which {where} lacks "
                          f"(it has {', '.join(have)}){hint}")
    if not missing:
        return usable, None
    return usable, (f"profile {profile.name} prefers {', '.join(missing)}, which {where} lacks: running on "
                    f"{', '.join(usable)}{hint}")
