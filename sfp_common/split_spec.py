"""Where a ViT is cut (export/split.py does the cutting): torch-free, so configurations and command lines can
name a split without PyTorch."""
from __future__ import annotations

from dataclasses import dataclass

from sfp_common.errors import ConfigError


@dataclass(frozen=True)
class SplitSpec:
    """Where to cut: P prompts, the first `head_blocks` blocks to the head, the last `tail_blocks` to the tail."""

    prompts: int = 10
    head_blocks: int = 0
    tail_blocks: int = 0

    def check(self, depth: int) -> None:
        if self.prompts < 0 or self.head_blocks < 0 or self.tail_blocks < 0:
            raise ConfigError(f"prompts, head_blocks and tail_blocks must be >= 0, got {self}")
        if self.head_blocks + self.tail_blocks > depth:
            raise ConfigError(
                f"head_blocks ({self.head_blocks}) + tail_blocks ({self.tail_blocks}) exceed the model's "
                f"{depth} blocks")
