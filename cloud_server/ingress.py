"""What the coordinator accepts from the fleet, checked before anything acts on it.

Every message a device can send passes here first: who sent it (the topic's device and the envelope's must agree,
the device must be enrolled), whether it belongs to the round in progress, and what it claims (an update's
tensors and FedAvg weight, a report's counts), bounded by what the server knows. A message that fails is refused
with a reason and a kind (`Refused`); the coordinator logs, counts and drops it, and never stops for one.
"""
from __future__ import annotations

import math
from typing import Any, Callable

from sfp_common.bundle import BundleError, Manifest, check_trainables
from sfp_common.pruning import samples_supported
from sfp_common.recipe import Recipe
from cloud_server.registry import Registry
from wire_protocol.envelope import Message
from wire_protocol.receipts import served_samples
from wire_protocol.topics import Topics

DEVICE_TYPES = ("enroll", "update", "report")
# What an update reports beside its tensors, averaged into the round's summary: numbers >= 0 when present.
UPDATE_STATISTICS = ("loss", "kept", "payload_up", "payload_down", "seconds")


class Refused(Exception):
    """A message the server will not act on: `reason` for the log and the device, `kind` for the metrics."""

    def __init__(self, reason: str, kind: str) -> None:
        super().__init__(reason)
        self.reason, self.kind = reason, kind


class Ingress:
    def __init__(self, topics: Topics, registry: Registry, manifest: Callable[[], Manifest], recipe: Recipe,
                 receipts: bytes) -> None:
        """`manifest`: the federation's trainables (read when first needed: the bundles export lazily);
        `receipts`: the key the body workers sign their receipts with (wire_protocol/receipts.py)."""
        self.topics, self.registry, self.manifest, self.recipe, self.receipts = (
            topics, registry, manifest, recipe, receipts)

    def admit(self, topic: str, message: Message, round_in_progress: int | None) -> None:
        """A device's message on its `up/` topic: from whom it says, of a kind a device sends, and (updates and
        reports) from an enrolled device for the round in progress: replays and late answers are not even queued."""
        device = self.topics.device_of(topic)
        if device != message.device:
            raise Refused(f"device id {message.device!r} does not match the topic", "forged")
        if message.type not in DEVICE_TYPES:
            raise Refused(f"a device does not send {message.type!r} messages", "unexpected type")
        if message.type == "enroll":
            return
        if self.registry.get(device) is None:
            raise Refused(f"unknown device {device!r}", "unknown device")
        if message.round != round_in_progress:
            raise Refused(f"a message for round {message.round}; round in progress: {round_in_progress}", "stale")

    def presence(self, topic: str, value: Any) -> tuple[str, bool]:
        """(device, online) from a retained presence message."""
        device = self.topics.device_of(topic)
        if device is None or not isinstance(value, dict):
            raise Refused("a device's presence must be a JSON object", "malformed")
        return device, value.get("state") == "online"

    def check_claims(self, message: Message) -> None:
        """What a device claims, bounded by what the server knows, so one device cannot dominate the average: an
        update's FedAvg weight by the sample count it enrolled with and by the samples the body workers trained
        for it this round (their signed receipts); a report's counts by each other."""
        try:
            if message.type == "update":
                self._check_update(message)
            else:
                correct, samples = int(message.meta["correct"]), int(message.meta["samples"])
                if not 0 <= correct <= samples:
                    raise ValueError(f"{message.device} reports {correct} correct of {samples} samples")
        except (BundleError, KeyError, TypeError, ValueError) as err:
            raise Refused(str(err), f"bad {message.type}") from None

    def _check_update(self, message: Message) -> None:
        device = message.device
        check_trainables(self.manifest(), message.tensors, f"update from {device}")
        claimed, enrolled = int(message.meta["num_samples"]), self.registry.get(device).num_samples
        if not 1 <= claimed <= enrolled:
            raise ValueError(f"{device} claims {claimed} training samples; it enrolled with {enrolled}")
        for name in UPDATE_STATISTICS:
            value = message.meta.get(name, 0)
            if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{device} reports {name} {value!r}: not a number >= 0")
        served = served_samples(self.receipts, device, message.round, message.meta.get("receipts"))
        supported = samples_supported(self.recipe, served)
        if claimed > supported:
            raise ValueError(f"{device} claims {claimed} training samples; the body trained {served} for it "
                             f"this round, which supports at most {supported}")
