"""A device in the federation once enrolled (edge_client/enrollment.py): rounds until stopped, with its presence
and status retained in the broker for any dashboard; restartable from its state folder (edge_client/device_state.py).
Images and labels never leave the device; what goes up is smashed tokens, dL/dfeatures, the trained prompts and
tail, sample counts and accuracies.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edge_client.device_state import BUNDLE, DeviceConfig
from edge_client.memory import DeviceMemory
from edge_client.profiles import execution_providers
from edge_client.remote_body import RemoteBody, RoundAborted
from edge_client.round import defended, run_round
from edge_client.runtime import ClientRuntime, open_runtime
from sfp_common.bundle import BundleError
from sfp_common.datasets import load_device_folder
from sfp_common.errors import ConfigError
from sfp_common.preprocess import preprocess
from wire_protocol.codec import encoded_bytes
from wire_protocol.contracts import RoundPlan
from wire_protocol.envelope import Message
from wire_protocol.link import Link, LinkError
from wire_protocol.topics import Topics

log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 5.0          # split training longer than this shows its progress, at most this often
# A broker may refuse a just-enrolled device's account for a while: the server made it and asked the broker to
# re-read its accounts, which it does when it gets to it (seen with 300 and 1000 devices enrolling at once).
NEW_ACCOUNT_GRACE_S = 60.0


class RoundProgress:
    """What a person watching the device sees of a round: a line per phase, and split training's progress when
    it takes long enough to wonder (the status in the broker carries the same, for dashboards)."""

    def __init__(self, device: str, round_index: int, publish: Callable[..., None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.device, self.round, self.publish, self.clock = device, round_index, publish, clock
        self.started = self.last = clock()

    def phase(self, name: str) -> None:
        log.info("%s: round %d: %s", self.device, self.round, name)
        self.publish(activity=name, progress=None)
        self.started = self.last = self.clock()

    def batch(self, done: int, total: int) -> None:
        now = self.clock()
        if now - self.last < PROGRESS_EVERY_S and done < total or now - self.started < PROGRESS_EVERY_S:
            return
        self.last = now
        percent = 100 * done // total
        log.info("%s: round %d: split training %d%% (%d/%d batches)", self.device, self.round, percent, done, total)
        self.publish(progress=percent)


class DeviceAgent:
    """Takes part in rounds until `stop` is set; restartable from its state folder."""

    def __init__(self, state: Path, stop: threading.Event | None = None, round_timeout_s: float = 120.0) -> None:
        self.state = Path(state)
        self.config = DeviceConfig.load(self.state)
        self.profile = self.config.settings
        self.stop = stop or threading.Event()
        self.topics = Topics(self.config.federation)
        self.runtime: ClientRuntime = open_runtime(self.state / BUNDLE, threads=self.profile.threads,
                                                   providers=execution_providers(self.profile)[0])
        data = load_device_folder(self.config.data, self.config.classes)
        prep = self.runtime.manifest.preprocessing
        self.x_train, self.y_train = preprocess(data.train.images, prep), data.train.labels
        self.x_test, self.y_test = (preprocess(data.test.images, prep), data.test.labels) if len(data.test) else (
            None, None)
        self.memory = DeviceMemory(self.state, len(self.y_train))
        self.token_noise = 0.0          # the last round plan's: evaluation forwards are defended as training's
        self.rounds: queue.Queue[Message] = queue.Queue()
        self.status: dict[str, Any] = {"device": self.config.device, "activity": "idle", "round": None,
                                       "samples": int(len(self.y_train)), "profile": self.profile.name,
                                       "backend": self.runtime.manifest.backend, "bytes_sent": 0,
                                       "bytes_received": 0, "last_seen": None}
        self.link = Link(self.config.broker, self.config.device, max_packet=self.profile.max_packet,
                         keepalive=self.profile.keepalive, access=self.config.access(self.state),
                         will=(self.topics.device_presence(self.config.device), self.presence("offline", "lost")))
        self.remote = RemoteBody(self.link, self.topics, self.config.device, self.profile.wire, round_timeout_s,
                                 self.stop, self.runtime.manifest.head_blocks)

    # ------------------------------------------------------------------------------------------ status
    def presence(self, state: str, cause: str | None = None) -> dict[str, Any]:
        """Presence apart from the status: the Will replaces only this, so a crash keeps the last activity."""
        return {"device": self.config.device, "state": state, **({"cause": cause} if cause else {})}

    def publish_status(self, **changes: Any) -> None:
        self.status.update(changes)
        self.status.update(last_seen=round(time.time(), 3), bytes_sent=self.link.traffic.sent,
                           bytes_received=self.link.traffic.received)
        self.link.publish_json(self.topics.device_status(self.config.device), self.status, retain=True)

    # ------------------------------------------------------------------------------------------ messages
    def _on_down(self, topic: str, message: Message) -> None:
        if message.device != self.config.device:
            self.link.refuse(topic, f"addressed to {message.device!r}", "forged")
        elif message.type == "round":
            self.rounds.put(message)
        elif message.type in ("features", "gradient", "error"):
            self.remote.deliver(message)

    def _on_server(self, topic: str, value: Any) -> None:
        if isinstance(value, dict) and value.get("state") == "offline":
            self.remote.abort("the server went offline")     # its replies will not come; the next server re-runs

    def _on_connect(self, reconnected: bool) -> None:
        if reconnected:
            self.remote.abort("the connection to the broker was lost: replies in flight may be lost")
            self.link.publish_json(self.topics.device_presence(self.config.device), self.presence("online"),
                                   retain=True)     # the broker published the Will when the connection dropped
            self.publish_status()

    # ------------------------------------------------------------------------------------------ main loop
    def run(self, heartbeat_s: float = 10.0) -> None:
        self.link.on_connect = self._on_connect
        deadline, pause = time.monotonic() + NEW_ACCOUNT_GRACE_S, 1.0
        while True:
            try:
                self.link.connect()
                break
            except LinkError as err:
                if not err.refused or time.monotonic() + pause > deadline or self.stop.is_set():
                    raise ConfigError(str(err)) from None
                log.info("%s: the broker does not know this account yet; trying again", self.config.device)
                self.stop.wait(pause)
                pause = min(2 * pause, 10.0)
        self.link.subscribe(self.topics.device_down(self.config.device), self._on_down)
        self.link.subscribe_json(self.topics.server_status(), self._on_server)
        self.link.publish_json(self.topics.device_presence(self.config.device), self.presence("online"), retain=True)
        self.publish_status(activity="idle")
        last = time.monotonic()
        try:
            while not self.stop.is_set():
                try:
                    message = self.rounds.get(timeout=0.2)
                except queue.Empty:
                    if time.monotonic() - last > heartbeat_s:
                        self.publish_status()
                        last = time.monotonic()
                    continue
                self.handle_round(message)
                last = time.monotonic()
        finally:
            self.status.update(activity="stopped", last_seen=round(time.time(), 3), bytes_sent=self.link.traffic.sent,
                               bytes_received=self.link.traffic.received)
            self.link.close(final=[(self.topics.device_status(self.config.device), self.status),
                                   (self.topics.device_presence(self.config.device),
                                    self.presence("offline", "stopped"))])

    def handle_round(self, message: Message) -> None:
        """One round's work: train and upload, or evaluate and report. A failed round is reported, not fatal."""
        index = message.round
        try:
            self.runtime.load_trainables(message.tensors)
        except BundleError as err:
            self.link.refuse(self.topics.down(self.config.device, "round"), str(err), "bad round")
            return
        self.remote.begin(index)
        start, sent0, received0 = time.time(), self.link.traffic.payload_sent, \
            self.link.traffic.payload_received - message.payload_bytes
        try:
            if message.meta.get("train", True):
                self._train(message, index, start, sent0, received0)
            else:
                self._evaluate(index, message.seq)
        except (RoundAborted, BundleError) as err:     # the server's answer was missing or did not fit
            log.warning("%s: round %d aborted: %s", self.config.device, index, err)
            self.link.send(self.topics.up(self.config.device, "report"),
                           Message("report", self.config.device, index, message.seq, meta={"aborted": str(err)}))
        self.publish_status(activity="idle")

    def _train(self, message: Message, index: int, start: float, sent0: int, received0: int) -> None:
        """Run the round, upload; the last round's tensor bytes (and all bytes sent) go into the status."""
        try:
            plan = RoundPlan.from_dict(message.meta["plan"])
        except (KeyError, ConfigError) as err:
            raise RoundAborted(f"the round's plan is malformed: {err}") from None
        if plan.recipe.optimizer != self.runtime.manifest.optimizer:      # the bundle's graphs bake its optimizer
            raise RoundAborted(f"the round's optimizer {plan.recipe.optimizer} is not the bundle's "
                               f"{self.runtime.manifest.optimizer}")
        sent_raw0 = self.link.traffic.sent
        progress = RoundProgress(self.config.device, index, self.publish_status)
        self.status["round"] = index
        progress.phase("starting")
        memory = self.memory.begin(index)
        self.token_noise = plan.recipe.token_noise
        result = run_round(self.runtime, self.x_train, self.y_train, plan, self.remote, memory,
                           on_phase=progress.phase, embed_cache_bytes=self.profile.embed_cache_mb << 20,
                           on_batch=progress.batch, owner_agrees=self.config.server_may_keep_tokens)
        progress.phase("uploading")
        mqtt0 = self.link.traffic.sent - sent_raw0
        up = self.link.traffic.payload_sent - sent0 + sum(encoded_bytes(v.shape, "fp32")
                                                          for v in result.upload.values())
        down = self.link.traffic.payload_received - received0
        mqtt_up = self.link.send(self.topics.up(self.config.device, "update"), Message(
            "update", self.config.device, index, message.seq,          # seq: the server's attempt id, echoed
            meta={"num_samples": result.num_samples, "kept": result.kept,
                  "loss": result.loss_sum / max(1, result.kept), "payload_up": up, "payload_down": down,
                  "seconds": round(time.time() - start, 3), "receipts": self.remote.receipts},
            tensors=result.upload)) + mqtt0
        self.memory.commit(index, memory)
        self.status["last_round"] = {"round": index, "payload_up": up, "payload_down": down,
                                     "mqtt_up": mqtt_up}

    def _evaluate(self, index: int, attempt: int) -> None:
        self.status["round"] = index
        RoundProgress(self.config.device, index, self.publish_status).phase("evaluating")
        correct, total = 0, 0
        noise = np.random.default_rng([index, attempt]) if self.token_noise else None
        if self.x_test is not None:
            batch = self.profile.batch_size
            for i in range(0, len(self.y_test), batch):
                tokens = defended(self.runtime, self.runtime.smash(self.x_test[i:i + batch]), self.token_noise,
                                  noise)
                features = self.remote.forward(tokens, evaluate=True)
                logits = self.runtime.tail_logits(features)
                correct += int((logits.argmax(axis=1) == self.y_test[i:i + batch]).sum())
                total += len(logits)
        self.link.send(self.topics.up(self.config.device, "report"), Message(
            "report", self.config.device, index, attempt,
            meta={"correct": correct, "samples": total, "accuracy": correct / total if total else None}))
