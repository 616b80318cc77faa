"""The device's per-sample memory (scores and cached body features, sfp_common/pruning.py) across rounds and
restarts, kept in its state folder.

The server may run a round again: after its connection was lost, or after it crashed between receiving the
updates and its checkpoint. A re-run must start from the memory the first attempt started from, as the reference
federation (which never re-runs) would, so two generations are kept: the memory before and after the last round
this device trained. Only a round whose update was sent is committed; an aborted one leaves no trace.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np

from sfp_common.files import write_atomic
from sfp_common.pruning import SampleMemory

log = logging.getLogger(__name__)
FILE = "memory.npz"


class DeviceMemory:
    def __init__(self, state: Path, num_samples: int) -> None:
        self.path = Path(state) / FILE
        self.num_samples = num_samples
        self.round: int | None = None            # the last round trained and committed
        self.before = SampleMemory.empty(num_samples)
        self.after = SampleMemory.empty(num_samples)
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        try:
            with np.load(self.path, allow_pickle=False) as npz:
                arrays = {name: npz[name] for name in npz.files}
            before = SampleMemory.from_arrays(arrays, self.num_samples, "before/")
            after = SampleMemory.from_arrays(arrays, self.num_samples, "after/")
            last = int(arrays["round"])
        except (OSError, ValueError, KeyError) as err:
            log.warning("%s cannot be read (%s): starting with an empty memory", self.path, err)
            return
        if before is None or after is None:
            log.warning("%s is for other data: starting with an empty memory", self.path)
            return
        self.round, self.before, self.after = last, before, after

    def begin(self, round_index: int) -> SampleMemory:
        """A working copy for this round: the memory before the last round if this is that round again."""
        return (self.before if round_index == self.round else self.after).copy()

    def commit(self, round_index: int, memory: SampleMemory) -> None:
        if round_index != self.round:
            self.before = self.after
        self.after, self.round = memory, round_index
        buffer = io.BytesIO()
        np.savez(buffer, round=np.array(round_index), **self.before.arrays("before/"), **self.after.arrays("after/"))
        write_atomic(self.path, buffer.getvalue(), 0o600)
