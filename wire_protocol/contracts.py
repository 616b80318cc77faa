"""What the messages between server and devices carry besides tensors: a device's profile (sent at enrollment,
checked by the server), a round's plan (sent with every round), and the broker account a device enrolls with.
Both sides import them from here."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from sfp_common.bundle import BACKENDS
from sfp_common.errors import ConfigError
from wire_protocol.codec import FLOAT_WIRES


@dataclass(frozen=True)
class Profile:
    """A class of device and how it takes part (firmware_profiles/*.json); checked on both sides."""

    name: str
    description: str
    backend: str                  # portable | training
    providers: tuple[str, ...]    # ONNX Runtime execution providers, in order of preference
    threads: int
    batch_size: int               # the device's batch for pruning, local update and split training
    max_head_blocks: int          # the deepest head this device can run; the federation's split must fit
    wire: str                     # smashed tokens and features: fp32 | fp16 | bf16 | int8
    max_packet: int               # MQTT packet limit: larger messages are chunked
    keepalive: int
    match: dict

    def __post_init__(self) -> None:
        numbers = (self.threads, self.batch_size, self.max_head_blocks, self.max_packet, self.keepalive)
        if (self.backend not in BACKENDS or self.wire not in FLOAT_WIRES
                or not all(isinstance(n, int) and not isinstance(n, bool) for n in numbers)
                or self.threads < 1 or not 1 <= self.batch_size <= 4096 or self.max_head_blocks < 0
                or self.max_packet < 4096 or self.keepalive < 1):
            raise ConfigError(f"profile {self.name} has values out of range: {self}")

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RoundPlan:
    """What the server asks of a device for one round."""

    lr: float
    batch_size: int = 16
    epochs: int = 3                 # passes of split training over the kept samples
    local_loss_epochs: int = 1      # passes of the local-loss update over all local samples
    keep: float = 0.5               # EL2N keep fraction
    prune: bool = True
    local_update: bool = True
    seed: int = 0                   # the batch order's seed, chosen by the server per device and round


def enroll_account(device: str) -> str:
    """The one-off broker account a device enrolls with; its password is the device's enrollment token."""
    return f"enroll-{device}"
