"""The Link's paho client (wire_protocol/mqtt_client.py) against stock paho over a real Mosquitto: what it sends,
stock paho receives byte for byte, and what stock paho sends, it receives byte for byte, with properties, in
order, at every size around its buffer and copy thresholds."""
import threading

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from wire_protocol.mqtt_client import GATHER_BYTES, READ_BYTES, Client, Gather

SIZES = [0, 1, 100, GATHER_BYTES - 1, GATHER_BYTES, 16 << 10, READ_BYTES - 40, READ_BYTES - 1, READ_BYTES,
         READ_BYTES + 1, 3 * READ_BYTES + 7, 4 << 20]


def test_a_gathered_packet_slices_like_its_joined_bytes():
    parts = (b"\x30\x05head", np.arange(300, dtype=np.uint8), b"", memoryview(b"tail"))
    joined = b"".join(bytes(memoryview(p)) for p in parts)
    packet = Gather(parts)
    assert len(packet) == len(joined)
    for cut in (0, 1, 6, 7, 100, 306, 307, len(joined) - 1, len(joined)):
        rest = packet[cut:]
        assert b"".join(rest.parts) == joined[cut:] and len(rest) == len(joined) - cut


class Inbox:
    """Everything a client receives on `test/#`, and an event when `expected` messages are in."""

    def __init__(self, client: mqtt.Client, expected: int) -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self.expected, self.done, self.subscribed = expected, threading.Event(), threading.Event()
        client.on_message = self.on_message
        client.on_subscribe = lambda *args: self.subscribed.set()

    def on_message(self, client, userdata, message) -> None:
        self.messages.append(message)
        if len(self.messages) == self.expected:
            self.done.set()


def connected(kind: type, broker: str, name: str) -> mqtt.Client:
    host, port = broker.split("//")[1].split(":")
    client = kind(CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
    client.max_queued_messages_set(0)
    client.connect(host, int(port))
    client.loop_start()
    return client


def payloads(seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    sizes = SIZES + [200] * 300          # a burst of small ones: many packets per read
    return [rng.integers(0, 256, size, dtype=np.uint8).tobytes() for size in sizes]


@pytest.mark.parametrize("sender, receiver", [(Client, mqtt.Client), (mqtt.Client, Client)],
                         ids=["ours-to-stock", "stock-to-ours"])
def test_every_size_arrives_byte_for_byte_in_order_with_its_properties(broker, sender, receiver):
    sent = payloads(seed=len(receiver.__name__))
    source, sink = connected(sender, broker, "test-sender"), connected(receiver, broker, "test-receiver")
    inbox = Inbox(sink, expected=len(sent))
    try:
        sink.subscribe("test/#", qos=1)
        assert inbox.subscribed.wait(10)
        infos = []
        for i, payload in enumerate(sent):
            properties = None
            if i % 7 == 3:              # some with properties, which the receiver must parse
                properties = Properties(PacketTypes.PUBLISH)
                properties.UserProperty = [("index", str(i))]
                properties.ContentType = "application/octet-stream"
            infos.append(source.publish(f"test/{i % 3}", payload, qos=1 if i % 5 else 0, properties=properties))
        assert inbox.done.wait(60), f"{len(inbox.messages)} of {len(sent)} arrived"
        # QoS 0 ones may overtake QoS 1 ones waiting for their turn in flight: order holds within each QoS
        for qos in (0, 1):
            expected = [(f"test/{i % 3}", p, i % 7 == 3) for i, p in enumerate(sent) if (i % 5 != 0) == qos]
            got = [(m.topic, bytes(m.payload), m.properties is not None and hasattr(m.properties, "UserProperty"))
                   for m in inbox.messages if m.qos == qos]
            assert got == expected
        for message in inbox.messages:
            if getattr(message.properties, "UserProperty", None):
                i = int(message.properties.UserProperty[0][1])
                assert bytes(message.payload) == sent[i] and message.properties.UserProperty == [("index", str(i))]
                assert message.properties.ContentType == "application/octet-stream"
        for info in infos:              # QoS 1: acknowledged by the broker (our PUBACK path), QoS 0: written
            info.wait_for_publish(10)
            assert info.is_published()
    finally:
        for client in (source, sink):
            client.disconnect()
            client.loop_stop()


def test_an_on_publish_callback_still_gets_pahos_reason_code(broker):
    client = connected(Client, broker, "test-acked")
    acked, reasons = threading.Event(), []
    client.on_publish = lambda c, u, mid, reason, properties: (reasons.append(reason), acked.set())
    try:
        client.publish("test/acked", b"x" * GATHER_BYTES, qos=1)
        assert acked.wait(10)
        assert reasons[0].packetType == PacketTypes.PUBACK and not reasons[0].is_failure
    finally:
        client.disconnect()
        client.loop_stop()
