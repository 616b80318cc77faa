"""What a federation is, as `sfp-cloud serve` runs it: one typed configuration, torch-free, whose defaults are
the command line's (cloud_server/cli.py reads them from here) and which a TOML file can set (`serve --config`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sfp_common.recipe import Recipe
from sfp_common.split_spec import SplitSpec


@dataclass(frozen=True)
class FederationConfig:
    federation: str
    model: str                          # timm name or checkpoint
    classes: tuple[str, ...]
    state_dir: Path                     # also holds security/: accounts, enrollment tokens (cloud_server/security)
    split: SplitSpec = field(default_factory=SplitSpec)
    recipe: Recipe = field(default_factory=Recipe)     # what each device does in a round (sfp_common/recipe.py)
    img_size: int | None = None
    pretrained: bool = True
    seed: int = 0
    rounds: int = 5
    fraction: float = 1.0
    min_devices: int = 1
    round_deadline_s: float = 600.0
    evaluate_on_devices: bool = True
    backends: tuple[str, ...] = ("portable",)     # exported at start; others on first enrollment
    training_python: str | None = None
