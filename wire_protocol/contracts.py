"""What the messages between server and devices carry besides tensors: a device's profile (sent at enrollment,
checked by the server), a round's plan (sent with every round), and the broker account a device enrolls with.
Both sides import them from here."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sfp_common.bundle import BACKENDS
from sfp_common.errors import ConfigError
from sfp_common.recipe import Recipe
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
    max_head_blocks: int          # the deepest head this device can run: its bundle is cut there (at most the split's)
    wire: str                     # smashed tokens and features: fp32 | fp16 | bf16 | int8
    max_packet: int               # MQTT packet limit: larger messages are chunked
    keepalive: int
    match: dict
    embed_cache_mb: int = 256     # the most memory a round's embedded tokens may take (edge_client/round.py)

    def __post_init__(self) -> None:
        numbers = (self.threads, self.batch_size, self.max_head_blocks, self.max_packet, self.keepalive,
                   self.embed_cache_mb)
        if (self.backend not in BACKENDS or self.wire not in FLOAT_WIRES
                or not all(isinstance(n, int) and not isinstance(n, bool) for n in numbers)
                or self.threads < 1 or not 1 <= self.batch_size <= 4096 or self.max_head_blocks < 0
                or self.max_packet < 4096 or self.keepalive < 1 or self.embed_cache_mb < 0):
            raise ConfigError(f"profile {self.name} has values out of range: {self}")

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RoundPlan:
    """What the server asks of a device for one round: the federation's recipe (sfp_common/recipe.py) with the
    device's own batch size and wire precision, and the batch order's seed, chosen per device and round."""

    recipe: Recipe
    seed: int

    def as_dict(self) -> dict:
        return {"recipe": self.recipe.as_dict(), "seed": self.seed}

    @classmethod
    def from_dict(cls, values: Any) -> RoundPlan:
        if not isinstance(values, dict) or set(values) != {"recipe", "seed"}:
            raise ConfigError(f"a round plan is {{recipe, seed}}, got {values!r:.200}")
        seed = values["seed"]
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64:
            raise ConfigError(f"a round plan's seed must be an integer in [0, 2^64), got {seed!r:.50}")
        return cls(Recipe.from_dict(values["recipe"]), seed)


def enroll_account(device: str) -> str:
    """The one-off broker account a device enrolls with; its password is the device's enrollment token."""
    return f"enroll-{device}"
