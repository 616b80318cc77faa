"""One MQTT 5 connection that speaks the protocol: messages out (chunked to the packet limit), messages in
(reassembled, checked, handed to the subscriber), retained JSON for status, and the bytes counted both ways.

paho-mqtt 2.x runs the network in its own thread (paho's client with four per-message costs taken out:
mqtt_client.py). A small received message is checked and handed to its handlers right there; a large one (at
least `INLINE_BYTES`), and anything that arrives while one is still being handled, goes to a second thread, so the
CRC and copies of a large tensor overlap the reading of the next, and arrival order holds either way. Handing over
costs a thread wake-up per message (the receiver's CPU per 64 KB message: 194 us with every message handed over,
121 us without; bench/transport.py), which is why small messages stay. Handlers must be quick either way (hand
long work to a queue). A received payload is a bytearray (the client cuts the packet's header off in place). A
message that fails its checks never reaches a handler: it is counted under its kind, logged, and passed to
`on_refused`, and the connection carries on.
"""
from __future__ import annotations

import itertools
import json
import logging
import queue
import socket
import ssl
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from sfp_common.errors import ServiceError
from wire_protocol.chunking import CHUNK_BYTES, Reassembler, split
from wire_protocol.envelope import Message, WireError, frame, unpack
from wire_protocol.mqtt_client import Client

log = logging.getLogger(__name__)
MessageHandler = Callable[[str, Message], None]
JsonHandler = Callable[[str, Any], None]
INLINE_BYTES = 256 << 10      # received payloads below this are handled on the network thread when nothing waits
MAX_ROUTES = 1 << 16          # topics whose handlers are remembered (a server has a few per device of its fleet)


class LinkError(ServiceError):
    """The broker cannot be reached, refused us, or dropped us. `refused`: it answered and turned our account
    down (wrong user, password or token)."""

    def __init__(self, message: str, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


@dataclass
class Traffic:
    """What crossed this connection: whole MQTT payloads, and the tensor payloads inside protocol messages."""

    sent: int = 0
    received: int = 0
    payload_sent: int = 0
    payload_received: int = 0
    messages_sent: int = 0
    messages_received: int = 0


def parse_broker(url: str) -> tuple[str, int, bool]:
    """mqtt://host[:1883] or mqtts://host[:8883] -> (host, port, tls)."""
    parsed = urlparse(url if "://" in url else f"mqtt://{url}")
    if parsed.scheme not in ("mqtt", "mqtts") or not parsed.hostname:
        raise ValueError(f"broker {url!r} is not mqtt://host[:port] or mqtts://host[:port]")
    tls = parsed.scheme == "mqtts"
    return parsed.hostname, parsed.port or (8883 if tls else 1883), tls


@dataclass(frozen=True)
class BrokerAccess:
    """How to get into a secured broker: an account, and the CA that signed the broker's certificate (None: the
    system's CAs, for a broker with a public certificate)."""

    username: str | None = None
    password: str | None = None
    ca_file: str | None = None


class Link:
    def __init__(self, broker: str, client_id: str, *, max_packet: int = 1 << 20, max_message: int = 256 << 20,
                 keepalive: int = 30, will: tuple[str, Any] | None = None,
                 on_refused: Callable[[str, str], None] | None = None, access: BrokerAccess | None = None) -> None:
        """`on_refused(kind, reason)` is called for every refused message."""
        self.host, self.port, tls = parse_broker(broker)
        self.client_id, self.max_packet, self.max_message = client_id, max_packet, max_message
        self.keepalive = keepalive
        self.on_refused = on_refused
        self.traffic = Traffic()
        self.refused: Counter[str] = Counter()                        # kind -> count
        self.recent_refusals: deque[tuple[str, str]] = deque(maxlen=200)  # (topic, reason)
        self.reassembler = Reassembler(max_message=max_message)
        self._ids = itertools.count()
        self._handlers: list[tuple[str, Callable[[str, bytes], None]]] = []
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self.on_connect: Callable[[bool], None] | None = None   # (reconnected) after each connection is set up
        self.on_disconnect: Callable[[], None] | None = None     # when an established connection drops
        self._connections = 0
        self._up = False           # connected, and the owner's on_connect has run
        # MQTT 5 shared subscriptions ($share/...), unless the broker's CONNACK says it has none (ejabberd's
        # mod_mqtt closes a session that asks for one)
        self.shared_subscriptions = True
        self._connect_error: str | None = None
        self._last_publish: mqtt.MQTTMessageInfo | None = None
        self.client = Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        access = access or BrokerAccess()
        if tls:
            self.client.tls_set(ca_certs=access.ca_file)
        elif access.ca_file:
            raise ValueError(f"a CA file was given for {broker}, which is not TLS: use mqtts://")
        if access.username is not None:
            self.client.username_pw_set(access.username, access.password)
        if will is not None:
            self.client.will_set(will[0], json.dumps(will[1]), qos=1, retain=True)
        self.client.max_queued_messages_set(0)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self._subacks: dict[int, threading.Event] = {}     # mid -> set by its SUBACK
        self._tagging: dict[int, int] = {}                 # mid -> the subscription it tags, from its SUBACK on
        self._tagged: set[int] = set()                     # subscriptions with an identifier (overlapping ones)
        self._routes: dict[str, list] = {}                 # topic -> its untagged handlers; reset when they change
        self._suback_lock = threading.Lock()               # apart from _lock, which every delivery takes
        self.client.on_message = self._on_message
        self._inbox: queue.Queue = queue.Queue(maxsize=32)   # full: the network thread waits (backpressure)
        self._pending = 0                                    # handed to the dispatcher, not yet handled
        self._dispatcher = threading.Thread(target=self._dispatch, name=f"{client_id}-dispatch", daemon=True)
        self._dispatcher.start()

    # ------------------------------------------------------------------ connection
    def connect(self, timeout: float = 15.0) -> Link:
        """Connect (again, after a refusal); LinkError says why not."""
        where = f"the broker at {self.host}:{self.port}"
        self._connect_error = None
        self._connected.clear()
        try:
            self.client.connect(self.host, self.port, keepalive=self.keepalive, clean_start=True)
        except ssl.SSLCertVerificationError as err:
            raise LinkError(f"the TLS certificate of {where} is not trusted ({err.verify_message}): give the CA "
                            "that signed it with --ca (the federation's own: <state>/security/ca.crt from "
                            "`sfp-cloud secure`)") from None
        except ConnectionRefusedError:
            raise LinkError(f"nothing accepts connections at {self.host}:{self.port}: is the broker running, and "
                            "are the host and port right?") from None
        except socket.gaierror as err:
            raise LinkError(f"cannot resolve the broker's host {self.host!r}: {err.strerror}") from None
        except OSError as err:
            raise LinkError(f"cannot reach {where}: {err}") from None
        self.client.loop_start()
        if not self._connected.wait(timeout) or self._connect_error:
            self.client.loop_stop()
            if self._connect_error:
                raise LinkError(self._connect_error, refused=True)
            raise LinkError(f"no answer from {where} within {timeout:.0f} s: is it an MQTT broker, with mqtts:// "
                            "for a TLS port and mqtt:// for a plain one?")
        return self

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._connect_error = (f"the broker at {self.host}:{self.port} refused the connection ({reason_code}): "
                                   "check the account and its password")
            self._connected.set()
            return
        self.shared_subscriptions = bool(getattr(properties, "SharedSubscriptionAvailable", 1))
        sock = client.socket()
        if sock is not None and hasattr(sock, "setsockopt"):
            # paho never sets it. Without it a 16 KB request waits 44 ms for its answer (Nagle's algorithm against
            # delayed ACKs), with it 1 ms (bench/transport.py --latency; its goodput cost: results.md there)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            topics = [(i, t) for i, (t, _) in enumerate(self._handlers, 1)]
            self._tagged = {i for i, t in topics if any(_overlap(t, u) for j, u in topics if j != i)}
            self._routes.clear()
            tagged = set(self._tagged)
        for sub_id, topic in topics:          # again after a reconnect: the session is clean
            client.subscribe(topic, options=SubscribeOptions(qos=1),
                             properties=_identified(sub_id) if sub_id in tagged else None)
        self._connections += 1
        self._connected.set()
        if self.on_connect is not None:
            # After a reconnect the session is new: anything in flight may be lost, and a restarted broker
            # without persistence has forgotten the retained status. The owner re-announces and recovers.
            try:
                self.on_connect(self._connections > 1)
            except Exception:       # the owner's bug must not stop paho's network thread
                log.exception("%s: on_connect failed", self.client_id)
        self._up = True

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._up = False
        if reason_code.is_failure and self._connections and self._connect_error is None:   # connect() reports its own
            log.warning("%s: disconnected from the broker (%s); reconnecting", self.client_id, reason_code)
            if self.on_disconnect is not None:
                try:
                    self.on_disconnect()
                except Exception:
                    log.exception("%s: on_disconnect failed", self.client_id)

    @property
    def connected(self) -> bool:
        """Connected, and whatever the owner does on (re)connecting is done."""
        return self._up

    def close(self, final: list[tuple[str, Any]] = (), timeout: float = 10.0) -> None:
        """Publish `final` retained JSON (a clean shutdown's status), wait for everything queued, disconnect."""
        for topic, value in final:
            self.publish_json(topic, value, retain=True)
        if self._last_publish is not None:
            try:
                self._last_publish.wait_for_publish(timeout)
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()
        self._inbox.put(None)

    # ------------------------------------------------------------------ out
    def send(self, topic: str, message: Message) -> int:
        """Publish one protocol message (chunked if needed); returns the bytes published."""
        packets = split(frame(message), min(self.max_packet, CHUNK_BYTES), f"{self.client_id}.{next(self._ids)}")
        for packet in packets:
            self._last_publish = self.client.publish(topic, packet, qos=1)
        with self._lock:
            self.traffic.sent += sum(len(p) for p in packets)
            self.traffic.payload_sent += message.payload_bytes
            self.traffic.messages_sent += 1
        return sum(len(p) for p in packets)

    def publish_json(self, topic: str, value: Any, retain: bool = False) -> None:
        self._last_publish = self.client.publish(topic, json.dumps(value, separators=(",", ":")), qos=1,
                                                 retain=retain)

    # ------------------------------------------------------------------ in
    def subscribe(self, topic: str, handler: MessageHandler) -> None:
        """Protocol messages on `topic` (wildcards allowed), checked and reassembled, to handler(topic, message)."""
        def raw(actual: str, payload: bytes) -> None:
            message, error = None, None
            try:
                whole = self.reassembler.feed(actual, payload)
                message = None if whole is None else unpack(whole, self.max_message)
            except WireError as err:
                error = str(err)
            while self.reassembler.dropped:            # messages whose chunks never all came
                self.refuse(*self.reassembler.dropped.pop(0), "incomplete")
            if error is not None:
                self.refuse(actual, error)
            if message is None:
                return
            with self._lock:
                self.traffic.payload_received += message.payload_bytes
                self.traffic.messages_received += 1
            handler(actual, message)
        self._add(topic, raw)

    def subscribe_json(self, topic: str, handler: JsonHandler) -> None:
        def raw(actual: str, payload: bytes) -> None:
            if not payload:       # a cleared retained message
                return
            try:
                value = json.loads(payload)
            except (UnicodeDecodeError, json.JSONDecodeError):
                self.refuse(actual, "not JSON", "malformed")
                return
            handler(actual, value)
        self._add(topic, raw)

    def refuse(self, topic: str, reason: str, kind: str = "malformed") -> None:
        """Count a refused message under its kind (a small fixed set: metrics labels), keep the reason among the
        recent ones, log it, and tell `on_refused`. Also for checks the handlers make themselves."""
        with self._lock:
            self.refused[kind] += 1
            self.recent_refusals.append((topic, reason))
        log.warning("%s: refused a message on %s (%s): %s", self.client_id, topic, kind, reason)
        if self.on_refused is not None:
            self.on_refused(kind, reason)

    def _add(self, topic: str, raw: Callable[[str, bytes], None]) -> None:
        """Register a handler; once connected, return only when the broker has confirmed the subscription
        (its SUBACK): retained messages are then on their way and nothing published afterwards is missed.

        A filter that overlaps another of this connection's (a/+ and a/#) is subscribed with an MQTT 5
        subscription identifier, and the other one again with its own: the broker tags each delivery with the
        subscriptions it is for, so every handler gets one copy. Filters that overlap nothing go untagged: a
        delivery without properties is not parsed for them (mqtt_client.py; stock paho copied the whole payload
        once more for every property it parsed: 300 us of the receiver's 1,500 at 1 MB, bench/transport.py)."""
        with self._lock:
            self._handlers.append((topic, raw))
            sub_id = len(self._handlers)
            overlapping = [i for i, (t, _) in enumerate(self._handlers[:-1], 1) if _overlap(t, topic)]
            if overlapping:
                self._tagged.add(sub_id)
            self._routes.clear()
        if not self._connected.is_set():
            return              # subscribed by _on_connect
        for i in overlapping:
            if i not in self._tagged:   # tagged from its SUBACK on; untagged deliveries before it still reach it
                self._subscribe(self._handlers[i - 1][0], i, tagged=True, retain_handling=1)
        self._subscribe(topic, sub_id, tagged=bool(overlapping))

    def _subscribe(self, topic: str, sub_id: int, tagged: bool, retain_handling: int = 0) -> None:
        """SUBSCRIBE, and wait for the SUBACK unless called on a thread that delivers it. retain_handling 1:
        no retained messages again for a filter subscribed before."""
        event = None
        with self._suback_lock:     # held until the mid is registered: _on_subscribe takes it before looking
            result, mid = self.client.subscribe(
                topic, options=SubscribeOptions(qos=1, retainHandling=retain_handling),
                properties=_identified(sub_id) if tagged else None)
            if result != mqtt.MQTT_ERR_SUCCESS:
                raise LinkError(f"cannot subscribe to {topic}: {mqtt.error_string(result)}")
            if tagged:
                self._tagging[mid] = sub_id
            # paho's thread delivers the SUBACK, and blocks while the dispatcher's inbox is full: neither may wait
            if threading.current_thread() not in (getattr(self.client, "_thread", None), self._dispatcher):
                event = self._subacks[mid] = threading.Event()
        if event is not None and not event.wait(10.0):
            with self._suback_lock:
                self._subacks.pop(mid, None)
            raise LinkError(f"the broker at {self.host}:{self.port} did not confirm the subscription to {topic}")

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self._suback_lock:
            event = self._subacks.pop(mid, None)
            sub_id = self._tagging.pop(mid, None)
        if sub_id is not None:
            with self._lock:
                self._tagged.add(sub_id)
                self._routes.clear()
        if event is not None:
            event.set()

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        # A delivery for overlapping filters carries their subscription identifiers (see _add); any other
        # matches exactly one untagged filter.
        ids = getattr(msg.properties, "SubscriptionIdentifier", None) if msg.properties else None
        topic = msg.topic
        with self._lock:
            self.traffic.received += len(msg.payload)
            if ids:
                handlers = [raw for i, (_, raw) in enumerate(self._handlers, 1) if i in ids]
            else:       # matching a topic against every filter costs more than checking a 16 KB message
                handlers = self._routes.get(topic)
                if handlers is None:
                    if len(self._routes) >= MAX_ROUTES:
                        self._routes.clear()
                    handlers = self._routes[topic] = [
                        raw for i, (sub, raw) in enumerate(self._handlers, 1)
                        if i not in self._tagged and mqtt.topic_matches_sub(_plain(sub), topic)]
            inline = not self._pending and len(msg.payload) < INLINE_BYTES
            if not inline:
                self._pending += 1      # only this thread adds; nothing overtakes what is pending
        if inline:
            self._handle(topic, msg.payload, handlers)
        else:
            self._inbox.put((topic, msg.payload, handlers))

    def _dispatch(self) -> None:
        """Large messages (and what arrives behind them) are checked and handled here, in arrival order, so the
        network thread goes on reading the socket (and answering keepalives) meanwhile; CRC-32, copies and
        decoding release the GIL for large tensors."""
        while True:
            item = self._inbox.get()
            if item is None:
                return
            self._handle(*item)
            with self._lock:
                self._pending -= 1

    def _handle(self, topic: str, payload: bytes, handlers: list[Callable[[str, bytes], None]]) -> None:
        for raw in handlers:
            try:
                raw(topic, payload)
            except Exception:   # a handler's bug must not stop the network thread or the dispatcher
                log.exception("%s: handler for %s failed", self.client_id, topic)


def _identified(sub_id: int) -> Properties:
    props = Properties(PacketTypes.SUBSCRIBE)
    props.SubscriptionIdentifier = sub_id
    return props


def _overlap(a: str, b: str) -> bool:
    """Whether some topic matches both filters."""
    x, y = _plain(a).split("/"), _plain(b).split("/")
    for p, q in zip(x, y):
        if "#" in (p, q):
            return True
        if p != q and "+" not in (p, q):
            return False
    longer = x if len(x) > len(y) else y
    return len(x) == len(y) or (abs(len(x) - len(y)) == 1 and longer[-1] == "#")     # a/# matches a


def _plain(topic: str) -> str:
    """A shared subscription's filter without its `$share/<group>/` prefix."""
    return topic.split("/", 2)[2] if topic.startswith("$share/") else topic


def wait_for(condition: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()
