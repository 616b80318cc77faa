"""The enrolled devices and the global state, kept in the server's state folder so a restart loses nothing.

`registry.json`: every enrolled device with its stable index (its order of enrollment: the batch-order seed of a
device is derived from it, as the reference federation derives a client's from the client's index), profile,
hardware facts and sample count. `checkpoint.npz`: the global prompts and tail after the last completed round,
and that round's number. `rounds.jsonl`: one summary per completed round. Every write is atomic.
"""
from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sfp_common.errors import ConfigError
from sfp_common.files import write_atomic


@dataclass
class Device:
    id: str
    index: int
    profile: dict
    hardware: dict
    num_samples: int
    backend: str
    head_blocks: int = 0            # where its bundle is cut (its profile's most, at most the federation's)
    enrolled_at: float = field(default_factory=time.time)


class Registry:
    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self._deferred = False              # in a batch: saved when it ends
        self.devices: dict[str, Device] = {}
        path = self.folder / "registry.json"
        if path.exists():
            try:
                self.devices = {d["id"]: Device(**d) for d in json.loads(path.read_text())["devices"]}
            except (ValueError, KeyError, TypeError) as err:
                raise ConfigError(f"{path} is malformed: {err}") from None

    def enroll(self, device: str, profile: dict, hardware: dict, num_samples: int, backend: str,
               head_blocks: int = 0) -> Device:
        """Add a device, or update one enrolling again (it keeps its index)."""
        with self.lock:
            known = self.devices.get(device)
            index = known.index if known else len(self.devices)
            self.devices[device] = Device(device, index, profile, hardware, num_samples, backend, head_blocks)
            if not self._deferred:
                self._save()
            return self.devices[device]

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Several enrollments saved once (the file holds every device)."""
        self._deferred = True
        try:
            yield
        finally:
            self._deferred = False
            with self.lock:
                self._save()

    def _save(self) -> None:
        devices = [asdict(d) for d in sorted(self.devices.values(), key=lambda d: d.index)]
        write_atomic(self.folder / "registry.json", (json.dumps({"devices": devices}, indent=1) + "\n").encode())

    def get(self, device: str) -> Device | None:
        with self.lock:
            return self.devices.get(device)

    # ------------------------------------------------------------------ global state
    def save_checkpoint(self, round_index: int, state: dict[str, np.ndarray], summary: dict[str, Any]) -> None:
        """Commit a round: its summary is appended first, then the checkpoint replaced atomically (the commit
        point). A crash in between leaves a summary beyond the checkpoint, which `load_checkpoint` drops, so a
        round is never recorded done without its model, nor twice."""
        with open(self.folder / "rounds.jsonl", "a") as f:
            f.write(json.dumps(summary) + "\n")
            f.flush()
            os.fsync(f.fileno())
        path = self.folder / "checkpoint.npz"
        tmp = path.with_name("checkpoint.tmp.npz")
        np.savez(tmp, __round__=np.array(round_index), **state)
        tmp.replace(path)

    def load_checkpoint(self) -> tuple[int, dict[str, np.ndarray]] | None:
        path = self.folder / "checkpoint.npz"
        try:
            if not path.exists():
                done, state = 0, None
            else:
                with np.load(path, allow_pickle=False) as npz:
                    state = {k: npz[k] for k in npz.files if k != "__round__"}
                    done = int(npz["__round__"])
        except (OSError, ValueError, KeyError) as err:
            raise ConfigError(f"checkpoint {path} cannot be read: {err}") from None
        kept = [s for s in self.summaries() if isinstance(s, dict) and s.get("round", 0) <= done]
        rounds = self.folder / "rounds.jsonl"
        if rounds.exists() and len(rounds.read_text().splitlines()) != len(kept):
            # summaries of rounds whose checkpoint never landed, or a line cut short by a crash
            write_atomic(self.folder / "rounds.jsonl", "".join(json.dumps(s) + "\n" for s in kept).encode())
        return None if state is None else (done, state)

    def summaries(self) -> list[dict]:
        """The completed rounds' summaries; a line cut short by a crash is skipped."""
        path = self.folder / "rounds.jsonl"
        out = []
        for line in path.read_text().splitlines() if path.exists() else []:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out
