"""A device's state folder: `device.json` (who it is, where the broker is, its profile and data folder),
`bundle/` (the verified client bundle), for a secured broker `credentials.json` (its own account, mode 0600) and
`ca.crt`, and `memory.npz` (edge_client/memory.py). That is all a restart needs: the global state comes with
every round."""
from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sfp_common.errors import ConfigError
from sfp_common.files import write_atomic
from wire_protocol.contracts import Profile
from wire_protocol.link import BrokerAccess

CONFIG = "device.json"
BUNDLE = "bundle"
CREDENTIALS = "credentials.json"
CA = "ca.crt"


@dataclass
class DeviceConfig:
    federation: str
    device: str
    broker: str
    profile: dict
    data: str
    classes: list[str]
    num_samples: int
    tls_ca: bool = False            # the broker's CA is the state folder's ca.crt
    # the owner lets the server keep this device's patch tokens when the federation asks (Recipe.server_keeps_tokens)
    server_may_keep_tokens: bool = False

    @property
    def settings(self) -> Profile:
        return Profile(**{**self.profile, "providers": tuple(self.profile["providers"])})

    def save(self, state: Path) -> None:
        write_atomic(state / CONFIG, json.dumps(asdict(self), indent=2) + "\n", 0o644)

    @classmethod
    def load(cls, state: Path) -> DeviceConfig:
        try:
            return cls(**json.loads((state / CONFIG).read_text()))
        except FileNotFoundError:
            raise ConfigError(f"{state} holds no enrolled device: run `sfp-edge enroll` first") from None
        except (ValueError, TypeError) as err:
            raise ConfigError(f"{state / CONFIG} is malformed: {err}") from None

    def access(self, state: Path) -> BrokerAccess:
        """This device's own broker account (none on an open broker) and CA."""
        ca = str(state / CA) if self.tls_ca else None
        try:
            credentials = json.loads((state / CREDENTIALS).read_text())
            return BrokerAccess(str(credentials["username"]), str(credentials["password"]), ca)
        except FileNotFoundError:
            return BrokerAccess(None, None, ca)
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{state / CREDENTIALS} is malformed: {err}") from None


def hardware_facts() -> dict[str, Any]:
    """What the server may know about the device (never its data)."""
    facts: dict[str, Any] = {"machine": platform.machine(), "system": platform.system(), "cpus": os.cpu_count(),
                             "python": platform.python_version()}
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        facts["memory_mb"] = int(pages * size / 2**20)
    except (ValueError, OSError, AttributeError):
        pass
    try:
        import onnxruntime
        facts["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return facts
