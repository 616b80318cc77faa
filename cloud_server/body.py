"""The server's half of split training: the frozen ViT body, serving many devices at once.

`BodyCompute` is the arithmetic, on the best torch device there is. A forward runs without autograd, batched
across every request waiting; the tokens are kept, and a backward recomputes the forward with autograd for the
requests that arrived together, then backpropagates the devices' dL/dfeatures. Recomputing costs one more body
forward per batch, and in exchange no autograd graph waits in memory on a network round trip (64 devices x a
ViT-B graph each would not fit a GPU's memory for long).

`BodyWorker` puts it on the broker: forwards come through an MQTT 5 shared subscription (any worker of the group
takes one), the reply names the worker, and the device sends its backward to that worker's own topic. A second
worker process adds capacity with nothing else changed.

What crosses is what the reference federation's meter sends (simulation/methods.py `split_step`, traffic
"ours"): tokens up and features down in the device's wire dtype, dL/dfeatures up and the prompt gradient (summed
over the batch, no head blocks) or dL/dtokens down in fp32. When the federation and the device opted in
(`Recipe.server_keeps_tokens`), a forward's tokens come with their sample ids and the worker keeps them; later
forwards bring only the ids and the current prompts, and the worker rebuilds the tokens (sfp_common/token_store.py).
A worker that lacks some (it restarted, or another worker kept them) answers "missing", and the device sends the
batch whole again.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from cloud_server.metrics import Metrics
from export.split import SplitViT
from sfp_common.token_store import DEFAULT_MAX_BYTES, TokenStore
from wire_protocol.envelope import Message
from wire_protocol.link import BrokerAccess, Link
from wire_protocol.receipts import receipt_key, sign
from wire_protocol.topics import Topics

log = logging.getLogger(__name__)


def best_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class BodyCompute:
    """The body from every cut a device may run (0 to the federation's head blocks): the blocks after the device's
    head blocks, the same modules shared by every cut."""

    def __init__(self, model: SplitViT, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        self.device = torch.device(device) if device is not None else best_device()
        self.dtype = dtype
        self.head_blocks = model.spec.head_blocks          # the federation's: the most a device runs
        self.cuts = {k: model.recut(k).body.to(self.device).eval() for k in range(self.head_blocks + 1)}
        for p in self.cuts[0].parameters():
            p.requires_grad_(False)
        self.pooled = model.tail.pooled_positions
        self.first_prompt = model.head.num_prefix_tokens
        self.prompts = model.spec.prompts

    def _run(self, tokens: torch.Tensor, head_blocks: int) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            out = self.cuts[head_blocks](tokens)
        return out[:, self.pooled(out.shape[1])].float()

    def forward(self, batches: list[np.ndarray], head_blocks: int | None = None) -> list[np.ndarray]:
        """Features for each request's tokens (all from devices cut after `head_blocks`), computed as one batch."""
        k = self.head_blocks if head_blocks is None else head_blocks
        sizes = [len(b) for b in batches]
        with torch.no_grad():
            x = torch.from_numpy(np.concatenate(batches)).to(self.device)
            out = self._run(x, k).cpu().numpy()
        return np.split(out, np.cumsum(sizes)[:-1])

    def backward(self, batches: list[np.ndarray], dfeatures: list[np.ndarray], head_blocks: int | None = None
                 ) -> list[np.ndarray]:
        """Each request's gradient for the device: dL/dprompts [P, D] summed over its batch (a device with no head
        blocks), or dL/dtokens."""
        k = self.head_blocks if head_blocks is None else head_blocks
        sizes = [len(b) for b in batches]
        x = torch.from_numpy(np.concatenate(batches)).to(self.device).requires_grad_(True)
        upstream = torch.from_numpy(np.concatenate(dfeatures)).to(self.device)
        self._run(x, k).backward(upstream)
        grads = np.split(x.grad.cpu().numpy(), np.cumsum(sizes)[:-1])
        if k == 0:
            first, count = self.first_prompt, self.prompts
            return [g[:, first:first + count].sum(axis=0) for g in grads]
        return grads


@dataclass
class _Request:
    kind: str          # forward | backward
    message: Message
    tokens: np.ndarray | None = None     # None in a forward that brings only prompts: rebuilt from the store
    head_blocks: int = 0   # the device's cut: the body runs from there
    ids: np.ndarray | None = None        # the samples' ids, when the device lets the server keep its tokens


class BodyWorker:
    """Serves forward/backward requests from the broker until `stop()`; one compute thread, batching what waits."""

    def __init__(self, link: Link, topics: Topics, compute: BodyCompute, worker_id: str, num_tokens: int,
                 embed_dim: int, max_batch_requests: int = 64, window_s: float = 0.002,
                 max_kept: int = 4096, on_samples: Callable[[int], None] | None = None,
                 receipts: bytes | None = None, token_store_bytes: int = DEFAULT_MAX_BYTES) -> None:
        """`receipts`: the key each backward's receipt is signed with (wire_protocol/receipts.py).
        `token_store_bytes`: the most the tokens kept for devices that opted in may take (in memory)."""
        self.link, self.topics, self.compute, self.worker_id = link, topics, compute, worker_id
        self.receipts = receipts if receipts is not None else receipt_key(topics.federation, None)
        self.on_samples = on_samples          # samples through each forward batch (the server's metrics)
        self.num_tokens, self.embed_dim = num_tokens, embed_dim
        self.max_batch_requests, self.window_s, self.max_kept = max_batch_requests, window_s, max_kept
        self.queue: queue.Queue[_Request | None] = queue.Queue()
        # (device, round, seq) -> the forward's tokens and cut, until its backward
        self.kept: OrderedDict[tuple[str, int, int], tuple[np.ndarray, int]] = OrderedDict()
        self.tokens = TokenStore(token_store_bytes)      # touched by the compute thread only
        self.served = {"forward": 0, "backward": 0, "samples": 0, "batches": 0, "errors": 0, "rebuilt": 0}
        self._thread = threading.Thread(target=self._loop, name=f"body-{worker_id}", daemon=True)
        self._published, self._dirty = 0.0, False

    def start(self) -> BodyWorker:
        if self.link.shared_subscriptions:
            self.link.subscribe(self.topics.shared_forward(), self._on_forward)
        else:
            log.warning("body worker %s: the broker offers no shared subscriptions, so this worker takes every "
                        "forward of the federation: run one body worker only", self.worker_id)
            self.link.subscribe(self.topics.all_forward(), self._on_forward)
        self.link.subscribe(self.topics.worker_backward(self.worker_id), self._on_backward)
        self._thread.start()
        self.publish_status()
        return self

    def stop(self) -> None:
        self.queue.put(None)
        self._thread.join(10)
        self.publish_status("stopped")

    # ----------------------------------------------------------------------------- network thread: check, queue
    def _claimed_by_topic(self, topic: str, message: Message) -> bool:
        if self.topics.device_of(topic) != message.device:
            self.link.refuse(topic, f"device id {message.device!r} does not match the topic", "forged")
            return False
        return True

    def _on_forward(self, topic: str, message: Message) -> None:
        if not self._claimed_by_topic(topic, message):
            return
        tokens, ids, prompts = (message.tensors.get(name) for name in ("tokens", "ids", "prompts"))
        k = message.meta.get("head_blocks", self.compute.head_blocks)
        if type(k) is not int or k not in self.compute.cuts:
            self._error(message, f"a device's head blocks are 0 to {self.compute.head_blocks}, got {k!r}")
            return
        if message.type != "forward" or (tokens is None) == (prompts is None):
            self._error(message, "a forward brings either tokens or (with ids) prompts")
            return
        if ids is not None and (ids.dtype != np.int32 or ids.ndim != 1 or not len(ids) or ids.min() < 0 or k != 0
                                or len(set(ids.tolist())) != len(ids)):
            self._error(message, "a forward's ids are distinct int32 >= 0, one per sample, and only from a device "
                                 "with no head blocks (its tokens depend on nothing but the prompts)")
            return
        if tokens is not None and (tokens.dtype != np.float32 or tokens.ndim != 3 or len(tokens) == 0 or (
                tokens.shape[1:] != (self.num_tokens, self.embed_dim)) or (ids is not None and len(ids) != len(tokens))):
            self._error(message, f"a forward needs float tokens [B, {self.num_tokens}, {self.embed_dim}] (and B ids)")
            return
        if prompts is not None and (ids is None or prompts.dtype != np.float32
                                    or prompts.shape != (self.compute.prompts, self.embed_dim)):
            self._error(message, f"a forward of kept tokens needs their ids and prompts "
                                 f"[{self.compute.prompts}, {self.embed_dim}]")
            return
        self.queue.put(_Request("forward", message, tokens, k, ids))

    def _on_backward(self, topic: str, message: Message) -> None:
        if not self._claimed_by_topic(topic, message):
            return
        dfeatures = message.tensors.get("dfeatures")
        if message.type != "backward" or dfeatures is None or dfeatures.dtype != np.float32:
            self._error(message, "a backward needs float dfeatures")
            return
        self.queue.put(_Request("backward", message))

    def _error(self, message: Message, reason: str) -> None:
        self.served["errors"] += 1
        self.link.refuse(self.topics.forward(message.device), reason, "bad request")
        self.link.send(self.topics.down(message.device, "error"),
                       Message("error", message.device, message.round, message.seq, {"reason": reason}))

    # ----------------------------------------------------------------------------- compute thread
    def _loop(self) -> None:
        """Serve in batches: everything that waits (what arrived while the last batch ran, or within `window_s` of
        a request into an idle worker) is taken; the oldest request's kind goes as one batch, the rest waits."""
        waiting: list[_Request] = []
        stopping = False
        while not (stopping and not waiting):
            if not waiting:
                first = self._next()
                if first is None:
                    return
                waiting, deadline = [first], time.monotonic() + self.window_s
            else:
                deadline = time.monotonic()          # work is waiting: take what is queued, do not wait
            while not stopping and len(waiting) < 4 * self.max_batch_requests:
                try:
                    item = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                else:
                    waiting.append(item)
            kind, k = waiting[0].kind, waiting[0].head_blocks        # requests from one cut batch together
            group = [r for r in waiting if (r.kind, r.head_blocks) == (kind, k)][:self.max_batch_requests]
            chosen = {id(r) for r in group}
            waiting = [r for r in waiting if id(r) not in chosen]
            try:
                self._forward(group) if kind == "forward" else self._backward(group)
            except Exception as err:   # a bad batch must not stop the worker
                log.exception("body worker %s: a %s batch failed", self.worker_id, kind)
                for r in group:
                    self._error(r.message, f"the body failed: {type(err).__name__}: {err}")

    def _next(self) -> _Request | None:
        """The next request; while idle, the status is brought up to date."""
        while True:
            try:
                return self.queue.get(timeout=0.5)
            except queue.Empty:
                if self._dirty:
                    self.publish_status()

    def _forward(self, group: list[_Request]) -> None:
        group = [r for r in group if self._tokens_of(r)]
        if not group:
            return
        features = self.compute.forward([r.tokens for r in group], group[0].head_blocks)
        for r, f in zip(group, features):
            m = r.message
            if not m.meta.get("evaluate"):        # evaluation batches have no backward
                self.kept[(m.device, m.round, m.seq)] = (r.tokens, r.head_blocks)
            wire = m.wires.get("tokens", m.wires.get("prompts", "fp32"))
            self.link.send(self.topics.down(m.device, "features"),
                           Message("features", m.device, m.round, m.seq, {"worker": self.worker_id},
                                   {"features": f}, {"features": wire}))
        while len(self.kept) > self.max_kept:
            self.kept.popitem(last=False)
        self._count("forward", group)

    def _tokens_of(self, r: _Request) -> bool:
        """Keep a forward's tokens with their ids, or rebuild them from the kept ones; False: the device was told
        that some are missing (it sends the batch whole)."""
        m = r.message
        if r.ids is None:
            return True
        if r.tokens is not None:
            self.tokens.put(m.device, r.ids, r.tokens, m.wires.get("tokens", "fp32"))
            return True
        missing = self.tokens.missing(m.device, r.ids)
        if missing:
            self.link.send(self.topics.down(m.device, "error"), Message(
                "error", m.device, m.round, m.seq, {"reason": f"{len(missing)} of the batch's samples are not kept "
                                                              f"here", "missing": True}))
            return False
        r.tokens = self.tokens.rebuild(m.device, r.ids, m.tensors["prompts"], self.compute.first_prompt)
        self.served["rebuilt"] += 1
        return True

    def _backward(self, group: list[_Request]) -> None:
        """The group's backwards, batched per cut (a backward learns its cut from the forward it follows)."""
        by_cut: dict[int, list[tuple[_Request, np.ndarray]]] = {}
        for r in group:
            m = r.message
            tokens, k = self.kept.pop((m.device, m.round, m.seq), (None, None))
            expected = None if tokens is None else (len(tokens), *self._feature_shape())
            if tokens is None or m.tensors["dfeatures"].shape != expected:
                self._error(m, "no forward is waiting for this backward" if tokens is None else
                            f"dfeatures must be {list(expected)}, got {list(m.tensors['dfeatures'].shape)}")
                continue
            by_cut.setdefault(k, []).append((r, tokens))
        for k, ready in by_cut.items():
            grads = self.compute.backward([t for _, t in ready], [r.message.tensors["dfeatures"] for r, _ in ready], k)
            for (r, t), g in zip(ready, grads):
                m = r.message
                receipt = sign(self.receipts, m.device, m.round, m.seq, len(t))
                self.link.send(self.topics.down(m.device, "gradient"),
                               Message("gradient", m.device, m.round, m.seq, {"worker": self.worker_id,
                                                                              "receipt": receipt}, {"gradient": g}))
            self._count("backward", [r for r, _ in ready])

    def _feature_shape(self) -> tuple[int, int]:
        return len(range(self.num_tokens)[self.compute.pooled(self.num_tokens)]), self.embed_dim

    def _count(self, kind: str, group: list) -> None:
        self.served[kind] += len(group)
        self.served["batches"] += 1
        if kind == "forward":
            samples = sum(len(r.tokens) for r in group)
            self.served["samples"] += samples
            if self.on_samples is not None:
                self.on_samples(samples)
        self._dirty = True
        if time.monotonic() - self._published > 5.0:
            self.publish_status()

    def publish_status(self, state: str = "online") -> None:
        """Retained: what this worker has served (dashboards, `sfp-cloud fleet`)."""
        self._published, self._dirty = time.monotonic(), False
        self.link.publish_json(self.topics.worker_status(self.worker_id),
                               {"worker": self.worker_id, "state": state, "device": str(self.compute.device),
                                **self.served, "refused": dict(self.link.refused),
                                "updated": round(time.time(), 3)}, retain=True)


def start_worker(broker: str, federation: str, model: SplitViT, worker_id: str, torch_device: str, body_dtype: str,
                 max_packet: int, access: BrokerAccess | None = None, metrics: Metrics | None = None,
                 token_store_bytes: int = DEFAULT_MAX_BYTES) -> BodyWorker:
    """A body worker on its own connection, serving until stopped; with `metrics` (a server's), what it refuses
    and the samples it serves are counted there."""
    from export.onnx_graphs import image_shape
    compute = BodyCompute(model, None if torch_device == "auto" else torch_device,
                          torch.bfloat16 if body_dtype == "bf16" else torch.float32)
    with torch.no_grad():
        num_tokens, dim = model.head(torch.zeros(1, *image_shape(model))).shape[1:]
    link = Link(broker, f"{federation}-body-{worker_id}", max_packet=max_packet, access=access,
                on_refused=None if metrics is None else lambda kind, reason: metrics.refused.labels(kind).inc()
                ).connect()
    worker = BodyWorker(link, Topics(federation), compute, worker_id, num_tokens, dim,
                        on_samples=None if metrics is None else metrics.body_samples.inc,
                        receipts=receipt_key(federation, access.password if access else None),
                        token_store_bytes=token_store_bytes).start()
    log.info("body worker %s on %s (%s)", worker_id, compute.device, body_dtype)
    return worker
