"""A device in the federation: enrollment (the bundle arrives over MQTT and is verified), then rounds until
stopped, with its status retained in the broker for any dashboard.

The device's state folder holds `device.json` (who it is, where the broker is, its profile and data folder),
`bundle/` (the verified client bundle), and for a secured broker `credentials.json` (its own broker account,
issued at enrollment; mode 0600) and `ca.crt`, and `memory.npz` (what the device remembers of its own samples
between rounds: scores and cached body features, edge_client/memory.py). That is all a restart needs: the global
state comes with every round.
Images and labels never leave the device; what goes up is smashed tokens, dL/dfeatures, the trained prompts and
tail, sample counts and accuracies.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import queue
import shutil
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edge_client.memory import DeviceMemory
from edge_client.remote_body import RemoteBody, RoundAborted
from edge_client.round import run_round
from edge_client.runtime import ClientRuntime, open_runtime
from sfp_common.bundle import BundleError, install_bundle
from sfp_common.datasets import load_device_folder
from sfp_common.errors import ConfigError
from sfp_common.files import write_atomic
from sfp_common.preprocess import preprocess
from wire_protocol.codec import encoded_bytes
from wire_protocol.contracts import Profile, RoundPlan, enroll_account
from wire_protocol.envelope import Message
from wire_protocol.link import BrokerAccess, Link, LinkError
from wire_protocol.topics import Topics, check_name

log = logging.getLogger(__name__)
CONFIG = "device.json"
BUNDLE = "bundle"
CREDENTIALS = "credentials.json"
CA = "ca.crt"


@dataclass
class DeviceConfig:
    federation: str
    device: str
    broker: str
    profile: dict
    data: str
    classes: list[str]
    num_samples: int
    tls_ca: bool = False            # the broker's CA is the state folder's ca.crt

    @property
    def settings(self) -> Profile:
        return Profile(**{**self.profile, "providers": tuple(self.profile["providers"])})

    def save(self, state: Path) -> None:
        write_atomic(state / CONFIG, json.dumps(asdict(self), indent=2) + "\n", 0o644)

    @classmethod
    def load(cls, state: Path) -> DeviceConfig:
        try:
            return cls(**json.loads((state / CONFIG).read_text()))
        except FileNotFoundError:
            raise ConfigError(f"{state} holds no enrolled device: run `sfp-edge enroll` first") from None
        except (ValueError, TypeError) as err:
            raise ConfigError(f"{state / CONFIG} is malformed: {err}") from None

    def access(self, state: Path) -> BrokerAccess:
        """This device's own broker account (none on an open broker) and CA."""
        ca = str(state / CA) if self.tls_ca else None
        try:
            credentials = json.loads((state / CREDENTIALS).read_text())
            return BrokerAccess(str(credentials["username"]), str(credentials["password"]), ca)
        except FileNotFoundError:
            return BrokerAccess(None, None, ca)
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{state / CREDENTIALS} is malformed: {err}") from None


def hardware_facts() -> dict[str, Any]:
    """What the server may know about the device (never its data)."""
    facts: dict[str, Any] = {"machine": platform.machine(), "system": platform.system(), "cpus": os.cpu_count(),
                             "python": platform.python_version()}
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        facts["memory_mb"] = int(pages * size / 2**20)
    except (ValueError, OSError, AttributeError):
        pass
    try:
        import onnxruntime
        facts["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return facts


def check_device_folder(data: str) -> tuple[int, list[str]]:
    """Decode every training and test image once, before anything is sent (an enrollment token works once): the
    sample count the server registers is what the device will train on, and the class folders that hold images."""
    names = sorted(p.name for p in (Path(data) / "train").iterdir()
                   if p.is_dir() and not p.name.startswith(".")) if (Path(data) / "train").is_dir() else []
    test = Path(data) / "test"
    if test.is_dir():
        names = sorted(set(names) | {p.name for p in test.iterdir() if p.is_dir() and not p.name.startswith(".")})
    folder = load_device_folder(data, names)
    present = sorted({names[int(y)] for y in folder.train.labels})
    return len(folder.train), present


def enroll(broker: str, token: str, profile: Profile, data: str, state: Path, device: str, federation: str,
           timeout: float = 300.0, ca_file: str | None = None) -> DeviceConfig:
    """Register with the server (as the one-off account its token opens), receive and verify the bundle and its
    own broker account, and keep them in `state`."""
    check_name("device", device)
    topics = Topics(federation)
    num_samples, classes = check_device_folder(data)
    replies: queue.Queue[Message] = queue.Queue()
    server: dict[str, Any] = {}
    access = BrokerAccess(enroll_account(device), token, ca_file)
    request = Message("enroll", device, meta={"token": token, "profile": profile.as_dict(),
                                              "hardware": hardware_facts(), "num_samples": num_samples,
                                              "classes": classes})

    def connect() -> Link:
        server.clear()
        try:
            link = Link(broker, f"{device}-enroll", max_packet=profile.max_packet, access=access).connect(
                timeout=min(15.0, timeout))
        except LinkError as err:
            if err.refused:
                raise ConfigError(f"the broker refused this device's enrollment account {enroll_account(device)}: "
                                  "the token is wrong, already used, expired or another device's; ask the operator "
                                  f"for a new one (`sfp-cloud token --device {device}`)") from None
            raise
        link.subscribe(topics.device_down(device), lambda topic, m: replies.put(m))
        link.subscribe_json(topics.server_status(), lambda topic, value: server.update(value))
        return link

    link = connect()
    try:
        deadline, sent = time.monotonic() + timeout, None
        while True:
            # Ask once the server's retained status says it is up. No answer in 15 s (a server that was still
            # starting or restarted never saw the request; a broker that had not yet loaded this account's
            # permissions dropped it): ask again on a fresh connection. The token works once, so a second
            # request the server does see is refused, after the first one's answer.
            if sent is not None and time.monotonic() - sent > 15:
                link.close()
                link, sent = connect(), None
            if server.get("state") in ("finished", "stopped"):
                raise ConfigError(f"federation {federation!r} has {server['state']}: there is nothing to enroll in")
            if server.get("state") not in (None, "offline", "starting") and sent is None:
                link.send(topics.up(device, "enroll"), request)
                sent = time.monotonic()
            try:
                reply = replies.get(timeout=0.5)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise ConfigError(f"no answer to the enrollment within {timeout:.0f} s: is `sfp-cloud serve` "
                                      f"running for federation {federation!r}?") from None
                continue
            if reply.type == "refused":
                raise ConfigError(f"enrollment refused: {reply.meta.get('reason')}")
            if reply.type == "enrolled":
                break
    finally:
        link.close()
    state.mkdir(parents=True, exist_ok=True)
    install_bundle(bytes(reply.tensors["bundle"]), state / BUNDLE)
    credentials = reply.meta.get("credentials")
    if not isinstance(credentials, dict) or not {"username", "password"} <= set(credentials):
        raise ConfigError("the server's enrollment reply carries no broker account for this device")
    write_atomic(state / CREDENTIALS, json.dumps(credentials) + "\n", 0o600)
    if ca_file:
        shutil.copyfile(ca_file, state / CA)
    config = DeviceConfig(federation, device, broker, profile.as_dict(), str(Path(data).resolve()),
                          list(reply.meta["classes"]), num_samples, tls_ca=bool(ca_file))
    config.save(state)
    return config


class DeviceAgent:
    """Takes part in rounds until `stop` is set; restartable from its state folder."""

    def __init__(self, state: Path, stop: threading.Event | None = None, round_timeout_s: float = 120.0) -> None:
        self.state = Path(state)
        self.config = DeviceConfig.load(self.state)
        self.profile = self.config.settings
        self.stop = stop or threading.Event()
        self.topics = Topics(self.config.federation)
        self.runtime: ClientRuntime = open_runtime(self.state / BUNDLE, threads=self.profile.threads,
                                                   providers=list(self.profile.providers))
        data = load_device_folder(self.config.data, self.config.classes)
        prep = self.runtime.manifest.preprocessing
        self.x_train, self.y_train = preprocess(data.train.images, prep), data.train.labels
        self.x_test, self.y_test = (preprocess(data.test.images, prep), data.test.labels) if len(data.test) else (
            None, None)
        self.memory = DeviceMemory(self.state, len(self.y_train))
        self.rounds: queue.Queue[Message] = queue.Queue()
        self.status: dict[str, Any] = {"device": self.config.device, "activity": "idle", "round": None,
                                       "samples": int(len(self.y_train)), "profile": self.profile.name,
                                       "backend": self.runtime.manifest.backend, "bytes_sent": 0,
                                       "bytes_received": 0, "last_seen": None}
        self.link = Link(self.config.broker, self.config.device, max_packet=self.profile.max_packet,
                         keepalive=self.profile.keepalive, access=self.config.access(self.state),
                         will=(self.topics.device_presence(self.config.device), self.presence("offline", "lost")))
        self.remote = RemoteBody(self.link, self.topics, self.config.device, self.profile.wire, round_timeout_s,
                                 self.stop)

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
        try:
            self.link.connect()
        except LinkError as err:
            raise ConfigError(str(err)) from None
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
        self.publish_status(activity="starting", round=index)
        memory = self.memory.begin(index)
        result = run_round(self.runtime, self.x_train, self.y_train, plan, self.remote, memory,
                           on_phase=lambda phase: self.publish_status(activity=phase))
        self.publish_status(activity="uploading")
        mqtt0 = self.link.traffic.sent - sent_raw0
        up = self.link.traffic.payload_sent - sent0 + sum(encoded_bytes(v.shape, "fp32")
                                                          for v in result.upload.values())
        down = self.link.traffic.payload_received - received0
        mqtt_up = self.link.send(self.topics.up(self.config.device, "update"), Message(
            "update", self.config.device, index, message.seq,          # seq: the server's attempt id, echoed
            meta={"num_samples": result.num_samples, "kept": result.kept,
                  "loss": result.loss_sum / max(1, result.kept), "payload_up": up, "payload_down": down,
                  "seconds": round(time.time() - start, 3)},
            tensors=result.upload)) + mqtt0
        self.memory.commit(index, memory)
        self.status["last_round"] = {"round": index, "payload_up": up, "payload_down": down,
                                     "mqtt_up": mqtt_up}

    def _evaluate(self, index: int, attempt: int) -> None:
        self.publish_status(activity="evaluating", round=index)
        correct, total = 0, 0
        if self.x_test is not None:
            batch = self.profile.batch_size
            for i in range(0, len(self.y_test), batch):
                features = self.remote.forward(self.runtime.smash(self.x_test[i:i + batch]), evaluate=True)
                logits = self.runtime.tail_logits(features)
                correct += int((logits.argmax(axis=1) == self.y_test[i:i + batch]).sum())
                total += len(logits)
        self.link.send(self.topics.up(self.config.device, "report"), Message(
            "report", self.config.device, index, attempt,
            meta={"correct": correct, "samples": total, "accuracy": correct / total if total else None}))
