"""The patch tokens a server keeps when a federation opts in (`Recipe.server_keeps_tokens`), and the rule both sides
follow to use them. Shared by the body workers (cloud_server/body.py) and the reference federation
(simulation/methods.py), so the two keep and rebuild exactly the same tensors. Torch-free.

With no head blocks a sample's smashed tokens are its frozen embedding with the current prompts put in, so the
server can rebuild them from the tokens it received once and the prompts of the batch. Every wire encodes
elementwise or per token (int8's scale is per row of the last axis), so the rebuilt tokens equal, bit for bit,
what the device would have sent: the federation trains the same numbers with far fewer bytes up.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

import numpy as np

DEFAULT_MAX_BYTES = 1 << 30     # a worker's store; beyond it the devices seen longest ago are forgotten


def reuses_tokens(on_server: np.ndarray) -> bool:
    """Whether a batch (of a device that opted in) travels as ids + prompts: the server holds every sample of it.
    A batch with any new sample goes whole, and the server keeps it."""
    return bool(len(on_server)) and bool(on_server.all())


class TokenStore:
    """Tokens by (owner, sample id), as first received, in the precision they arrived in (fp16 exactly as fp16)."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._owners: OrderedDict[Hashable, dict[int, np.ndarray]] = OrderedDict()
        self.bytes = 0

    def put(self, owner: Hashable, ids: np.ndarray, tokens: np.ndarray, wire: str) -> None:
        """Keep each sample's tokens [N, D] (as decoded from `wire`); an id sent again replaces the old ones."""
        kept = self._owners.setdefault(owner, {})
        self._owners.move_to_end(owner)
        dtype = np.float16 if wire == "fp16" else np.float32
        for i, row in zip(ids.tolist(), tokens):
            old = kept.get(i)
            self.bytes -= 0 if old is None else old.nbytes
            kept[i] = row.astype(dtype)
            self.bytes += kept[i].nbytes
        while self.bytes > self.max_bytes and len(self._owners) > 1:
            _, dropped = self._owners.popitem(last=False)
            self.bytes -= sum(t.nbytes for t in dropped.values())

    def missing(self, owner: Hashable, ids: np.ndarray) -> list[int]:
        kept = self._owners.get(owner, {})
        return [i for i in ids.tolist() if i not in kept]

    def rebuild(self, owner: Hashable, ids: np.ndarray, prompts: np.ndarray, first_prompt: int) -> np.ndarray:
        """The batch's tokens [B, N, D] float32: the kept ones with `prompts` [P, D] in their place."""
        self._owners.move_to_end(owner)
        kept = self._owners[owner]
        tokens = np.stack([kept[i] for i in ids.tolist()]).astype(np.float32)
        tokens[:, first_prompt:first_prompt + len(prompts)] = prompts
        return tokens
