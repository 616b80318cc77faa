"""The federation's coordinator: enrollment, rounds, FedAvg, checkpoints, evaluation, and the fleet's status.

A round: select online enrolled devices; send each the global prompts and tail with its plan (the federation's
recipe with its profile's batch size and wire precision, and its batch-order seed); wait until every selected device has
answered, gone offline, or the deadline passed; FedAvg what arrived, weighted by sample counts (each bounded by what
the server knows: `cloud_server/ingress.py`); checkpoint; then
optionally ask the online devices to evaluate the new global model on their local test data. The round's summary
is retained in the broker and appended to `rounds.jsonl`.

Enrollment runs on its own thread (exporting a bundle takes seconds), rounds on another; the MQTT thread only
checks (`Ingress`) and queues. Any message that fails a check is refused with a reason and counted; none stops
the server.
"""
from __future__ import annotations

import hashlib
import logging
import queue
import secrets
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from sfp_common.bundle import check_trainables
from sfp_common.errors import ConfigError
from sfp_common.strategy import FedAvgStrategy
from cloud_server.clients import ClientManager
from cloud_server.config import FederationConfig
from cloud_server.ingress import Ingress, Refused
from cloud_server.metrics import Metrics
from cloud_server.registry import Registry
from cloud_server.security import USED_TOKEN_GRACE_S, Security
from wire_protocol.contracts import Profile, RoundPlan
from wire_protocol.envelope import Message
from wire_protocol.link import BrokerAccess, Link
from wire_protocol.receipts import receipt_key
from wire_protocol.topics import Topics

if TYPE_CHECKING:                          # the coordinator itself runs without PyTorch; the bundles' exporter not
    from cloud_server.bundles import BundleService

log = logging.getLogger(__name__)
ENROLL_BATCH = 64           # enrollments handled together (see _enroll_loop)
RELOAD_AGAIN_S = 1.0        # after the last batch, the broker is asked to re-read its accounts again this much later


class Coordinator:
    def __init__(self, cfg: FederationConfig, broker: str, bundles: BundleService, metrics: Metrics | None = None,
                 on_round: Callable[[dict], None] | None = None, max_packet: int = 1 << 20,
                 access: BrokerAccess | None = None, reload_broker: Callable[[], None] | None = None) -> None:
        """`bundles`: the federation's cut model and device bundles (`cloud_server.bundles.federation_bundles`);
        `access`: the service account and CA for a secured broker; `reload_broker`: makes the broker re-read its
        accounts after enrollment changed them (without it, a secured broker learns of new devices only when its
        operator reloads it)."""
        self.cfg, self.metrics, self.on_round = cfg, metrics or Metrics(), on_round
        self.topics = Topics(cfg.federation)
        self.security = Security(cfg.state_dir / "security", cfg.federation, reload=reload_broker)
        self.registry = Registry(cfg.state_dir)
        self.strategy = FedAvgStrategy(cfg.recipe, cfg.seed, cfg.fraction)     # the reference federation's, too
        self.bundles, self.model_id = bundles, bundles.model_id
        resumed = self.registry.load_checkpoint()
        self.next_round = 1
        self.global_state = bundles.initial_state()
        if resumed is not None:
            done, state = resumed
            check_trainables(self.bundles.manifest(), state, "the checkpoint")
            self.next_round, self.global_state = done + 1, state
            log.info("resuming after round %d", done)
        self.clients = ClientManager(self.registry)
        self.receipts = receipt_key(cfg.federation, access.password if access else None)   # the workers' too
        self.ingress = Ingress(self.topics, self.registry, self.bundles.manifest, cfg.recipe, self.receipts)
        self.updates: queue.Queue[Message] = queue.Queue()
        self.enrollments: queue.Queue[Message | None] = queue.Queue()
        # Enrollments answered lately, by (device, its request id, its token's digest): a device that asks again
        # (no answer yet while many enroll: its first answer may still be on its way) gets the same answer.
        self.answered: dict[tuple[str, str, str], tuple[float, dict[str, Any]]] = {}
        self.stop = threading.Event()
        # Set when the broker connection drops (and again on the reconnect): the round in progress runs again
        self.connection_lost = threading.Event()
        self.round_in_progress: int | None = None
        self.status: dict[str, Any] = {"state": "starting", "federation": cfg.federation, "round": None,
                                       "rounds": cfg.rounds, "model": self.model_id}
        self._published: dict[str, Any] | None = None     # the status last published, but its timestamp
        self.link = Link(broker, f"{cfg.federation}-coordinator", max_packet=max_packet,
                         will=(self.topics.server_status(), {**self.status, "state": "offline"}),
                         on_refused=lambda kind, reason: self.metrics.refused.labels(kind).inc(), access=access)
        self.metrics.watch(self.link.traffic)

    # ----------------------------------------------------------------------------------------- MQTT thread
    def start(self) -> Coordinator:
        self.link.on_connect = self._on_connect
        self.link.on_disconnect = self.connection_lost.set
        self.link.connect()
        self.link.subscribe(self.topics.all_up(), self._on_up)
        self.link.subscribe_json(self.topics.all_presence(), self._on_presence)
        threading.Thread(target=self._enroll_loop, name="enrollment", daemon=True).start()
        self.publish_status(state="waiting for devices")
        return self

    def _on_connect(self, reconnected: bool) -> None:
        if reconnected:       # a new session: what was in flight may be lost, the retained status too
            self.connection_lost.set()
            self.publish_status(force=True)

    def _on_up(self, topic: str, message: Message) -> None:
        try:
            self.ingress.admit(topic, message, self.round_in_progress)
        except Refused as refused:
            self.link.refuse(topic, refused.reason, refused.kind)
            return
        (self.enrollments if message.type == "enroll" else self.updates).put(message)

    def _on_presence(self, topic: str, value: Any) -> None:
        try:
            device, online = self.ingress.presence(topic, value)
        except Refused as refused:
            self.link.refuse(topic, refused.reason, refused.kind)
            return
        self.clients.set_presence(device, online)
        self.metrics.online.set(len(self.clients.online()))

    def publish_status(self, force: bool = False, **changes: Any) -> None:
        """The retained server status, published when something in it changed (or `force`: after a reconnect
        the broker may have lost it), not on every pass of a waiting loop."""
        self.status.update(changes, enrolled=len(self.clients.enrolled()), online=len(self.clients.online()))
        shown = {k: v for k, v in self.status.items() if k != "updated"}
        if shown == self._published and not force:
            return
        if self._published is None or shown["enrolled"] != self._published["enrolled"] or force:
            self.link.publish_json(self.topics.enrolled(), self.clients.enrolled(), retain=True)
        self._published = shown
        self.status["updated"] = round(time.time(), 3)
        self.link.publish_json(self.topics.server_status(), self.status, retain=True)

    # ----------------------------------------------------------------------------------------- enrollment
    def _enroll_loop(self) -> None:
        """Enrollments in batches of what is waiting: the accounts and the registry are written, and the broker
        re-reads its accounts, once per batch (once per device made enrolling 1000 at once quadratic:
        bench/fleet_scale.py); the devices are answered after that, when the broker knows their accounts."""
        while True:
            batch = [self.enrollments.get()]
            while len(batch) < ENROLL_BATCH and batch[-1] is not None:
                try:
                    batch.append(self.enrollments.get_nowait())
                except queue.Empty:
                    break
            answers: list[tuple[str, dict[str, Any]]] = []
            try:
                with self.security.batch(), self.registry.batch():
                    for message in batch:
                        if message is None:
                            continue
                        try:
                            answer = self._enroll(message)
                        except Exception as err:    # one bad enrollment never stops the server
                            log.exception("enrollment of %s failed", message.device)
                            self._refuse_enrollment(message.device, f"the server could not enroll the device: {err}")
                            continue
                        if answer is not None:
                            answers.append((message.device, answer))
            except Exception as err:                # the accounts could not be written (or the broker told)
                log.exception("enrolling %d devices failed", len(answers))
                for device, _ in answers:
                    self._refuse_enrollment(device, f"the server could not enroll the device: {err}")
                answers = []
            for device, answer in answers:
                self._send_enrolled(device, answer)
            if answers:
                self.metrics.enrolled.set(len(self.clients.enrolled()))
                self.publish_status()
                if self.enrollments.empty() and not self.stop.wait(RELOAD_AGAIN_S):
                    # Mosquitto forgets a reload asked for while it is reloading: the last batch's accounts
                    # could stay unknown to it (5 of 1000 devices refused); once no enrollment waits, ask again
                    self.security.reload_broker()
            if batch[-1] is None:
                return

    def _refuse_enrollment(self, device: str, reason: str) -> None:
        self.link.refuse(self.topics.up(device, "enroll"), reason, "enrollment")
        self.link.send(self.topics.down(device, "refused"), Message("refused", device, meta={"reason": reason}))

    def _enroll(self, message: Message) -> dict[str, Any] | None:
        """One enrollment: its answer, or None when it was refused (and the device told why)."""
        meta, device = message.meta, message.device
        now = time.time()
        self.answered = {k: v for k, v in self.answered.items() if now - v[0] <= USED_TOKEN_GRACE_S}
        token = str(meta.get("token", ""))
        asked = (device, str(meta.get("request", "")), hashlib.sha256(token.encode()).hexdigest())
        if asked[1] and asked in self.answered:           # the same request again: the same answer, once more
            return self.answered[asked][1]
        redemption = self.security.redeem(device, token)   # single-use: spent from here on
        self.security.prune()
        if not redemption.ok:
            self._refuse_enrollment(device, redemption.reason)
            return None
        try:
            profile = Profile(**{**meta["profile"], "providers": tuple(meta["profile"]["providers"])})
            num_samples = int(meta["num_samples"])
            classes = [str(c) for c in meta.get("classes", [])]
        except (KeyError, TypeError, ValueError, ConfigError) as err:
            self._refuse_enrollment(device, f"malformed enrollment: {err}")
            return None
        unknown = sorted(set(classes) - set(self.cfg.classes))
        if unknown or num_samples < 1:
            self._refuse_enrollment(device, f"data classes {unknown} are not the federation's {list(self.cfg.classes)}"
                                    if unknown else "no training samples")
            return None
        # each device runs the head blocks its profile affords, at most the federation's (its split's): prompts
        # and tail are the same tensors at every cut, and the body serves each request from the device's cut
        head_blocks = min(profile.max_head_blocks, self.cfg.split.head_blocks)
        if not self.bundles.ready(profile.backend, head_blocks):   # the device's wait restarts: it is not lost
            self.link.send(self.topics.down(device, "enrolling"), Message("enrolling", device, meta={
                "note": f"exporting the {profile.backend} bundle cut after {head_blocks} head blocks"}))
        _, data = self.bundles.get(profile.backend, head_blocks)
        entry = self.registry.enroll(device, profile.as_dict(), dict(meta.get("hardware", {})), num_samples,
                                     profile.backend, head_blocks)
        password = self.security.add_device(device)     # the device's own broker account, told to it once
        answer = {"classes": list(self.cfg.classes), "index": entry.index, "federation": self.cfg.federation,
                  "credentials": {"username": device, "password": password}, "backend": profile.backend,
                  "head_blocks": head_blocks}
        if asked[1]:
            self.answered[asked] = (now, answer)
        log.info("enrolled %s (index %d, %s, %d head blocks, %d samples)", device, entry.index, profile.name,
                 head_blocks, num_samples)
        return answer

    def _send_enrolled(self, device: str, answer: dict[str, Any]) -> None:
        _, data = self.bundles.get(answer["backend"], answer["head_blocks"])
        meta = {k: v for k, v in answer.items() if k not in ("backend", "head_blocks")}
        self.link.send(self.topics.down(device, "enrolled"), Message(
            "enrolled", device, meta=meta, tensors={"bundle": np.frombuffer(data, np.uint8)},
            wires={"bundle": "bytes"}))

    # ----------------------------------------------------------------------------------------- rounds
    def plan(self, device: str, round_index: int) -> RoundPlan:
        """The strategy's plan with the device's own batch size and wire precision (its profile's)."""
        entry = self.registry.get(device)
        return self.strategy.plan(round_index, entry.index, int(entry.profile["batch_size"]),
                                  str(entry.profile["wire"]))

    def run(self) -> None:
        """Rounds until the configured number is done or `stop` is set."""
        while self.next_round <= self.cfg.rounds and not self.stop.is_set():
            if not self.link.connected or len(self.clients.online()) < self.cfg.min_devices:
                self.publish_status(state="waiting for devices", round=self.next_round)
                self.stop.wait(0.5)
                continue
            self.run_round(self.next_round)
        self.publish_status(state="finished" if self.next_round > self.cfg.rounds else "stopped")

    def _collect(self, wanted: set[str], round_index: int, attempt: int, kind: str,
                 deadline: float) -> dict[str, Message]:
        """The messages of `kind` for this attempt at this round from the wanted devices, until all are in, the
        rest went offline, the deadline passed, or the broker connection was lost (messages may be lost with it).
        Duplicates, other rounds' and earlier attempts' messages are ignored (idempotent)."""
        got: dict[str, Message] = {}
        while (wanted - set(got) and time.monotonic() < deadline and not self.stop.is_set()
               and not self.connection_lost.is_set()):
            # everyone still missing is offline: asked of the missing ones only (a scan of the whole fleet on every
            # message took 8% of the server's CPU in rounds of 1000 devices, py-spy)
            if not any(self.clients.is_online(d) for d in wanted - got.keys()):
                break
            try:
                message = self.updates.get(timeout=0.2)
            except queue.Empty:
                continue
            topic = self.topics.up(message.device, message.type)
            if message.round != round_index or message.seq != attempt:
                self.link.refuse(topic, f"a message for round {message.round} (attempt {message.seq}) during round "
                                 f"{round_index} (attempt {attempt})", "stale")
                continue
            if message.device not in wanted or message.device in got:
                continue
            if message.type == "report" and "aborted" in message.meta:
                log.warning("%s aborted round %d: %s", message.device, round_index, message.meta["aborted"])
                wanted = wanted - {message.device}
                continue
            if message.type != kind:
                continue
            try:
                self.ingress.check_claims(message)
            except Refused as refused:
                self.link.refuse(topic, refused.reason, refused.kind)
                continue
            got[message.device] = message
        return got

    def run_round(self, round_index: int) -> dict:
        """One attempt at a round. Its messages carry a fresh attempt id (the envelope's seq, echoed by the devices),
        so answers to an earlier attempt, or to a server that ran before a restart, never count."""
        start = time.time()
        attempt = secrets.randbelow(2**31)
        self.connection_lost.clear()
        self.round_in_progress = round_index
        try:
            return self._run_round(round_index, attempt, start)
        finally:
            self.round_in_progress = None

    def _run_round(self, round_index: int, attempt: int, start: float) -> dict:
        selected = self.strategy.select(self.clients.online(), round_index)
        self.publish_status(state="training", round=round_index, participants=selected)
        for device in selected:
            plan = self.plan(device, round_index)
            self.link.send(self.topics.down(device, "round"), Message(
                "round", device, round_index, attempt, meta={"train": True, "plan": plan.as_dict()},
                tensors=self.global_state))
        deadline = time.monotonic() + self.cfg.round_deadline_s
        updates = self._collect(set(selected), round_index, attempt, "update", deadline)
        summary: dict[str, Any] = {"round": round_index, "selected": selected, "participants": sorted(updates)}
        if self.stop.is_set():             # asked to stop: the round is abandoned on purpose, and runs on restart
            log.warning("stopping: round %d abandoned (%d of %d updates in); it runs again when the server restarts",
                        round_index, len(updates), len(selected))
            self.publish_status(state="stopping", round=round_index)
            return summary
        if not updates or self.connection_lost.is_set():    # the round is not done, and runs again
            # A broker that shuts down first sends its clients' Wills: the devices can look offline to us a moment
            # before our own connection drops. A second later the cause is known.
            self.stop.wait(1.0)
            why = "the broker connection was lost" if self.connection_lost.is_set() else "no device delivered an update"
            log.warning("round %d: %s; it will be run again", round_index, why)
            self.publish_status(state="round failed", round=round_index, last_failure={**summary, "reason": why})
            return summary
        ordered = [updates[d] for d in sorted(updates, key=lambda d: self.registry.get(d).index)]
        self.global_state = self.strategy.aggregate([m.tensors for m in ordered],
                                                    [int(m.meta["num_samples"]) for m in ordered])
        self.metrics.updates.inc(len(ordered))
        summary.update(
            train_loss=float(np.mean([m.meta.get("loss", np.nan) for m in ordered])),
            kept_samples=float(np.mean([m.meta.get("kept", 0) for m in ordered])),
            payload_up=float(np.mean([m.meta.get("payload_up", 0) for m in ordered])),
            payload_down=float(np.mean([m.meta.get("payload_down", 0) for m in ordered])),
            slowest_device_s=float(max(m.meta.get("seconds", 0) for m in ordered)))   # its own round, body waits too
        if self.cfg.evaluate_on_devices:
            summary.update(self.evaluate_on_devices(round_index))
        summary["seconds"] = round(time.time() - start, 3)
        summary["finished"] = round(time.time(), 3)         # wall clock, for whoever reads the summaries later
        self.registry.save_checkpoint(round_index, self.global_state, summary)    # the round is done from here
        self.link.publish_json(self.topics.round_summary(round_index), summary, retain=True)
        self.metrics.rounds.inc()
        self.metrics.round_seconds.observe(summary["seconds"])
        if summary.get("accuracy") is not None:
            self.metrics.accuracy.labels("devices").set(summary["accuracy"])
        self.next_round = round_index + 1
        self.publish_status(state="round done", round=round_index, last_round=summary)
        if self.on_round:
            self.on_round(summary)
        return summary

    def evaluate_on_devices(self, round_index: int) -> dict:
        """The new global model on each online device's local test data (through the body): sample-weighted."""
        devices, attempt = self.clients.online(), secrets.randbelow(2**31)
        for device in devices:
            self.link.send(self.topics.down(device, "round"), Message(
                "round", device, round_index, attempt, meta={"train": False}, tensors=self.global_state))
        reports = self._collect(set(devices), round_index, attempt, "report",
                                time.monotonic() + self.cfg.round_deadline_s)
        return {**self.strategy.evaluation([m.meta for m in reports.values()]), "evaluated_by": sorted(reports)}

    def close(self) -> None:
        self.stop.set()
        self.enrollments.put(None)
        # What a dashboard should keep seeing: the last round, the enrolled count; not the start-up Will.
        self.status.update(state="finished" if self.next_round > self.cfg.rounds else "offline",
                           enrolled=len(self.clients.enrolled()), updated=round(time.time(), 3))
        self.link.close(final=[(self.topics.server_status(), self.status)])

