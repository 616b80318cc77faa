"""What a client does in a round, defined once: the reference federation (simulation/), the server's round plans
(cloud_server/) and the device (edge_client/) all read this one typed definition and its defaults, so the three
cannot drift apart. Torch-free: the device imports it.

SFPrompt's phase 1 (client self-update) has two parts, each a named choice here; README.md ("The method, as
implemented") says which choices are the paper's and which are ours, and bench/RESULTS.md what each one measured:

- pruning (`prune`): which local samples go through split training this round.
  - "split-el2n" (default): EL2N of each sample from the tail's own logits when the sample last went through split
    training (recorded for free, no extra traffic); a sample never scored yet is always kept, so round 1 trains
    on everything.
  - "local-el2n" (the paper's reading): EL2N through the body-skipped local path, recomputed every round.
  - "random": a fresh random `keep` fraction every round. "none": every sample.
  `select` picks the `keep` fraction with the highest ("hardest") or lowest ("easiest") scores.
- the local-loss update (`local_update`), trained on the device without the server.
  - "cached-features" (default): the tail alone, on the body features the device received for each sample in
    earlier split training (kept between rounds, in the wire's precision), so samples pruned this round still
    train the tail; prompts untouched (the body is needed for their gradient). Runs after split training with
    the same optimizer, `local_epochs` passes over every sample that has features.
  - "local-path" (the paper's reading): prompts and tail through the body-skipped local path, before split
    training, `local_epochs` passes.
  - "none".
`token_noise` is a defence against inversion of the smashed tokens, off by default (sfp_common/defence.py; what it
costs and buys: bench/results/defences/ and bench/results/audit/).
`server_keeps_tokens` trades privacy for traffic, off by default: with no head blocks the patch tokens are the same
every round, so the body workers keep each sample's tokens from their first upload (sfp_common/token_store.py) and
later batches send only the current prompts and the sample ids. The numbers trained are the same; the server then
holds an exactly invertible copy of the device's images (README, "Privacy, plainly"). A device takes part only if
its owner also agreed at enrollment, and only where its cut has no head blocks; it cannot go with token noise.
The defaults (2 split passes, keep the hardest half by split-path EL2N, 40 passes of the tail on cached features)
were chosen from the candidates measured in bench/results/phase1/: more accurate than split training alone with
0.37x its bytes. The tail's passes cost no traffic and, with no tail blocks, a norm and a linear layer per sample;
from 5 to 40 passes accuracy rose by about two points (three seeds, IID and Dirichlet 0.5). "local-path" and
"local-el2n" stay for the `sfprompt-paper-phase1` ablation.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from sfp_common.bundle import OptimizerSpec
from sfp_common.errors import ConfigError
from wire_protocol.codec import FLOAT_WIRES

PRUNE_RULES = ("split-el2n", "local-el2n", "random", "none")
SELECT_RULES = ("hardest", "easiest")
LOCAL_UPDATES = ("cached-features", "local-path", "none")


@dataclass(frozen=True)
class Recipe:
    """One client's round. The defaults are SFPrompt's as this project runs it (see bench/RESULTS.md)."""

    lr: float = 3e-2
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)   # baked into the device's bundle
    batch_size: int = 16            # a device uses its profile's
    epochs: int = 2                 # passes of split training over the kept samples (whole-model methods: local)
    prune: str = "split-el2n"
    keep: float = 0.5               # the fraction of local samples split training sees
    select: str = "hardest"
    local_update: str = "cached-features"
    local_epochs: int = 40
    wire: str = "fp16"              # smashed tokens and features; a device uses its profile's
    token_noise: float = 0.0        # a defence: Gaussian noise on the smashed patch tokens, std x their RMS
    server_keeps_tokens: bool = False   # opt-in: after their first upload, samples travel as ids + the prompts

    def __post_init__(self) -> None:
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"the learning rate must be a number > 0, got {self.lr!r}")
        for name, value, low in (("batch_size", self.batch_size, 1), ("epochs", self.epochs, 1),
                                 ("local_epochs", self.local_epochs, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        if not (isinstance(self.token_noise, (int, float)) and math.isfinite(self.token_noise)
                and self.token_noise >= 0):
            raise ConfigError(f"token noise must be a number >= 0, got {self.token_noise!r}")
        if not (isinstance(self.keep, (int, float)) and 0.0 < self.keep <= 1.0):
            raise ConfigError(f"keep fraction must be in (0, 1], got {self.keep!r}")
        for name, value, choices in (("prune", self.prune, PRUNE_RULES), ("select", self.select, SELECT_RULES),
                                     ("local_update", self.local_update, LOCAL_UPDATES),
                                     ("wire", self.wire, FLOAT_WIRES)):
            if value not in choices:
                raise ConfigError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
        if not isinstance(self.server_keeps_tokens, bool):
            raise ConfigError(f"server_keeps_tokens must be true or false, got {self.server_keeps_tokens!r}")
        if self.server_keeps_tokens and self.token_noise:
            raise ConfigError("token noise and tokens kept by the server do not go together: the server would keep "
                              "the first round's noised tokens and reuse them, so the noise hides nothing new")
        if not isinstance(self.optimizer, OptimizerSpec):
            raise ConfigError(f"optimizer must be an OptimizerSpec, got {self.optimizer!r}")

    @property
    def remembers(self) -> bool:
        """Whether a client keeps per-sample scores or features from one round to the next."""
        return self.prune == "split-el2n" or self.local_update == "cached-features"

    def but(self, **changes: Any) -> Recipe:
        """A copy with some settings changed; None values mean 'keep this one'."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Any) -> Recipe:
        """A recipe as it crosses the wire (JSON), checked: unknown or missing keys and bad values refused."""
        if not isinstance(values, dict):
            raise ConfigError(f"a recipe must be a JSON object, got {type(values).__name__}")
        names = {f.name for f in fields(cls)}
        if set(values) != names:
            raise ConfigError(f"a recipe has the settings {sorted(names)}, got {sorted(values)}")
        try:
            optimizer = dict(values["optimizer"])
            if "betas" in optimizer:
                optimizer["betas"] = tuple(optimizer["betas"])
            return cls(**{**values, "optimizer": OptimizerSpec(**optimizer)})
        except (TypeError, ValueError) as err:
            raise ConfigError(f"malformed recipe: {err}") from None
