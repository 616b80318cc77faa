"""The server's body, seen from a device: the two split-training calls of `edge_client.round` over the broker.

`forward` publishes the smashed tokens (in the federation's wire dtype) to the shared body topic, where any body
worker may take them, and waits for the features; the reply names the worker, and `backward` sends dL/dfeatures
to that worker and waits for the gradient. Replies are matched by (round, sequence number); a stale or duplicate
reply is dropped, an error reply, a timeout or `abort` (the server went offline, the connection was lost) aborts
the round. Each gradient comes with the worker's signed receipt for the batch; the round's receipts go with the
update (wire_protocol/receipts.py), so the server can check what the device's FedAvg weight claims.
"""
from __future__ import annotations

import queue
import threading
import time

import numpy as np

from wire_protocol.envelope import Message
from wire_protocol.link import Link
from wire_protocol.topics import Topics


class RoundAborted(RuntimeError):
    """The server could not serve a split batch; the device drops this round and waits for the next."""


class RemoteBody:
    def __init__(self, link: Link, topics: Topics, device: str, wire: str, timeout_s: float = 60.0,
                 stop: threading.Event | None = None, head_blocks: int = 0) -> None:
        """`head_blocks`: where this device's bundle is cut; the body runs from there."""
        self.link, self.topics, self.device, self.wire, self.timeout_s = link, topics, device, wire, timeout_s
        self.head_blocks = head_blocks
        self.stop = stop or threading.Event()      # set: the device is leaving; the round ends at the next reply
        self.replies: queue.Queue[Message] = queue.Queue()
        self.round, self.seq, self.worker = 0, 0, None
        self.receipts: list[list] = []             # this round's, from the gradients
        self.aborted: str | None = None            # set by `abort`: the round ends at the next wait
        self._lock = threading.Lock()

    def deliver(self, message: Message) -> None:
        """Called by the agent for features, gradient and error messages on the device's down topics."""
        self.replies.put(message)

    def begin(self, round_index: int) -> None:
        with self._lock:
            self.round, self.aborted, self.receipts = round_index, None, []
        while not self.replies.empty():
            self.replies.get_nowait()

    def abort(self, reason: str) -> None:
        """End the current round at its next wait (from any thread)."""
        self.aborted = reason

    def forward(self, tokens: np.ndarray, ids: np.ndarray | None = None, evaluate: bool = False) -> np.ndarray:
        """`ids`: the samples' ids, for a server that keeps tokens (sfp_common/token_store.py)."""
        tensors, wires = {"tokens": tokens}, {"tokens": self.wire}
        if ids is not None:
            tensors["ids"], wires["ids"] = ids, "int32"
        reply = self._forward(tensors, wires, evaluate)
        if reply.type == "error":
            raise RoundAborted(f"the server refused the request: {reply.meta.get('reason')}")
        return reply.tensors["features"]

    def forward_kept(self, prompts: np.ndarray, ids: np.ndarray) -> np.ndarray | None:
        """The server rebuilds the batch from the tokens it kept and these prompts; None when it lacks some."""
        reply = self._forward({"prompts": prompts, "ids": ids}, {"prompts": self.wire, "ids": "int32"}, False)
        if reply.type == "error":
            if reply.meta.get("missing"):
                return None
            raise RoundAborted(f"the server refused the request: {reply.meta.get('reason')}")
        return reply.tensors["features"]

    def _forward(self, tensors: dict[str, np.ndarray], wires: dict[str, str], evaluate: bool) -> Message:
        self.seq += 1
        self.link.send(self.topics.forward(self.device),
                       Message("forward", self.device, self.round, self.seq,
                               {"evaluate": evaluate, "head_blocks": self.head_blocks}, tensors, wires))
        reply = self._wait("features", errors=True)
        if reply.type == "features":
            self.worker = reply.meta.get("worker")
        return reply

    def backward(self, dfeatures: np.ndarray) -> np.ndarray:
        if not isinstance(self.worker, str):
            raise RoundAborted("the features did not say which body worker to send the backward to")
        self.link.send(self.topics.backward(self.worker, self.device),
                       Message("backward", self.device, self.round, self.seq, {}, {"dfeatures": dfeatures}))
        reply = self._wait("gradient")
        self.receipts.append(reply.meta.get("receipt"))
        return reply.tensors["gradient"]

    def _wait(self, kind: str, errors: bool = False) -> Message:
        """The reply of `kind` to the current request; an error reply aborts the round, or is returned (`errors`)."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            if self.stop.is_set():
                raise RoundAborted("the device is leaving")
            if self.aborted is not None:
                raise RoundAborted(self.aborted)
            try:
                reply = self.replies.get(timeout=max(0.0, min(0.5, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() >= deadline:
                    raise RoundAborted(f"no {kind} from the server within {self.timeout_s:.0f} s") from None
                continue
            if (reply.round, reply.seq) != (self.round, self.seq):
                continue                      # late or duplicated reply to an earlier request
            if reply.type == "error":
                if errors:
                    return reply
                raise RoundAborted(f"the server refused the request: {reply.meta.get('reason')}")
            if reply.type != kind:
                continue
            if kind not in reply.tensors:
                raise RoundAborted(f"the {kind} reply carries no {kind} tensor")
            return reply
