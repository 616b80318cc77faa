"""The topic tree of one federation. Everything lives under `sfp/<federation>/`:

    server/status                       retained JSON: the server's state (dashboards read it)
    server/devices                      retained JSON: the enrolled devices, seen or not
    devices/<device>/presence           retained JSON: online or offline (the device's Last Will: offline, lost)
    devices/<device>/status             retained JSON: what the device last did (activity, round, bytes, last seen);
                                        never overwritten by the Will, so a crash keeps what was known
    devices/<device>/up/<type>          device -> server: enroll, update, report
    devices/<device>/down/<type>        server -> device: enrolled, refused, round, features, gradient, error
    body/<device>/forward               device -> any body worker (MQTT 5 shared subscription)
    workers/<worker>/backward/<device>  device -> the body worker that ran its forward
    workers/<worker>/status             retained JSON: what the body worker has served
    rounds/<round>                      retained JSON: the round's summary

Per-device subtrees let the broker's ACLs confine each device to its own topics.
"""
from __future__ import annotations

import re

ROOT = "sfp"
SHARED_GROUP = "body"
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def check_name(kind: str, name: str) -> str:
    """Federation, device and worker ids are topic levels: no wildcards, separators or empty names."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{kind} id {name!r} must be 1-64 characters of letters, digits, '_', '.', '-'")
    return name


class Topics:
    def __init__(self, federation: str) -> None:
        self.federation = check_name("federation", federation)
        self.base = f"{ROOT}/{self.federation}"

    def server_status(self) -> str:
        return f"{self.base}/server/status"

    def enrolled(self) -> str:
        return f"{self.base}/server/devices"

    def device_status(self, device: str) -> str:
        return f"{self.base}/devices/{device}/status"

    def device_presence(self, device: str) -> str:
        return f"{self.base}/devices/{device}/presence"

    def up(self, device: str, kind: str) -> str:
        return f"{self.base}/devices/{device}/up/{kind}"

    def down(self, device: str, kind: str) -> str:
        return f"{self.base}/devices/{device}/down/{kind}"

    def forward(self, device: str) -> str:
        return f"{self.base}/body/{device}/forward"

    def backward(self, worker: str, device: str) -> str:
        return f"{self.base}/workers/{worker}/backward/{device}"

    def worker_status(self, worker: str) -> str:
        return f"{self.base}/workers/{worker}/status"

    def round_summary(self, round_index: int) -> str:
        return f"{self.base}/rounds/{round_index:05d}"

    # subscriptions
    def all_up(self) -> str:
        return f"{self.base}/devices/+/up/+"

    def all_status(self) -> str:
        return f"{self.base}/devices/+/status"

    def all_presence(self) -> str:
        return f"{self.base}/devices/+/presence"

    def all_forward(self) -> str:
        return f"{self.base}/body/+/forward"

    def shared_forward(self) -> str:
        return f"$share/{SHARED_GROUP}/{self.all_forward()}"

    def round_summary_filter(self) -> str:
        return f"{self.base}/rounds/+"

    def worker_backward(self, worker: str) -> str:
        return f"{self.base}/workers/{worker}/backward/+"

    def device_down(self, device: str) -> str:
        return f"{self.base}/devices/{device}/down/+"

    def device_of(self, topic: str) -> str | None:
        """The device id a topic belongs to (the level after devices/, body/ or backward/), if any."""
        levels = topic.split("/")
        if topic.startswith(self.base + "/") and len(levels) >= 4:
            if levels[2] in ("devices", "body"):
                return levels[3]
            if levels[2] == "workers" and len(levels) == 6:
                return levels[5]
        return None
