"""The protocol over a real Mosquitto: large messages chunked below the packet limit arrive whole and counted,
bad packets are refused without hurting the connection, and presence follows the Last Will."""
import queue
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from wire_protocol.envelope import Message
from wire_protocol.link import INLINE_BYTES, Link, LinkError, _overlap, parse_broker, wait_for

LARGE = INLINE_BYTES + 4096     # handed to the dispatcher
from wire_protocol.topics import Topics


@pytest.fixture
def pair(broker):
    a = Link(broker, "test-a", max_packet=256 << 10).connect()
    b = Link(broker, "test-b", max_packet=256 << 10).connect()
    yield a, b
    a.close()
    b.close()


def test_a_large_message_arrives_whole_and_both_sides_count_the_same_bytes(pair):
    a, b = pair
    got = queue.Queue()
    b.subscribe("t/big/+", lambda topic, m: got.put((topic, m)))
    time.sleep(0.2)
    x = np.random.default_rng(0).standard_normal((5, 1000, 256)).astype(np.float32)    # 5.1 MB, 20 chunks
    sent = a.send("t/big/1", Message("update", "test-a", 2, 9, {"n": 3}, {"x": x, "y": x[:1]},
                                     {"y": "bf16"}))
    topic, m = got.get(timeout=10)
    assert topic == "t/big/1" and (m.type, m.round, m.seq, m.meta) == ("update", 2, 9, {"n": 3})
    np.testing.assert_array_equal(m.tensors["x"], x)
    assert wait_for(lambda: b.traffic.received == sent, 5)
    assert a.traffic.payload_sent == b.traffic.payload_received == x.nbytes + x[:1].size * 2
    assert a.traffic.sent == sent > a.traffic.payload_sent


def test_bad_packets_are_refused_and_the_link_keeps_working(pair):
    a, b = pair
    got, refused = queue.Queue(), []
    b.on_refused = lambda kind, reason: refused.append(reason)
    b.subscribe("t/bad", lambda topic, m: got.put(m))
    time.sleep(0.2)
    a.client.publish("t/bad", b"hello", qos=1)
    a.client.publish("t/bad", b"SFPW\xff\xff\xff\x7f{}", qos=1)
    a.send("t/bad", Message("report", "test-a", meta={"ok": True}))
    assert got.get(timeout=5).meta == {"ok": True}
    assert wait_for(lambda: len(refused) == 2, 5), refused
    assert sum(b.refused.values()) == 2


WILLING = """
import sys, time
from wire_protocol.link import Link
link = Link(sys.argv[1], "doomed", keepalive=5, will=("t/status/doomed", {"state": "offline"})).connect()
link.publish_json("t/status/doomed", {"state": "online"}, retain=True)
print("up", flush=True)
time.sleep(60)
"""


def test_a_killed_client_shows_offline_through_its_will(broker):
    watcher = Link(broker, "watcher").connect()
    seen = queue.Queue()
    watcher.subscribe_json("t/status/+", lambda topic, value: seen.put(value["state"]))
    proc = subprocess.Popen([sys.executable, "-c", WILLING, broker], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        assert seen.get(timeout=5) == "online"
        proc.kill()
        assert seen.get(timeout=5) == "offline"
    finally:
        proc.kill()
        watcher.close()


def test_connection_problems_are_clear():
    with pytest.raises(LinkError, match="nothing accepts connections at .*is the broker running"):
        Link("mqtt://127.0.0.1:1", "nobody").connect(timeout=2)
    with pytest.raises(ValueError, match="not mqtt://"):
        parse_broker("http://example.org")
    assert parse_broker("mqtts://broker.local") == ("broker.local", 8883, True)
    assert Topics("f").shared_forward() == "$share/body/sfp/f/body/+/forward"


def test_overlapping_subscriptions_deliver_once_to_each_handler(pair):
    a, b = pair
    narrow, wide = [], []
    b.subscribe("t/over/+", lambda topic, m: narrow.append(m.seq))
    b.subscribe("t/#", lambda topic, m: wide.append(m.seq))
    time.sleep(0.2)
    for seq in (1, 2):
        a.send("t/over/x", Message("report", "test-a", seq=seq))
    assert wait_for(lambda: len(wide) >= 2, 5)
    time.sleep(0.3)
    assert narrow == [1, 2] and wide == [1, 2]


def test_a_filter_added_over_an_earlier_one_does_not_bring_its_retained_messages_again(pair):
    """The earlier filter is subscribed again, now with an identifier: its handler must not see the retained
    status twice, and both handlers still get one copy of what follows."""
    a, b = pair
    a.publish_json("t/keep/status", {"state": "up"}, retain=True)
    first, second = queue.Queue(), queue.Queue()
    b.subscribe_json("t/keep/+", lambda topic, value: first.put(value))
    assert first.get(timeout=5) == {"state": "up"}
    b.subscribe_json("t/keep/#", lambda topic, value: second.put(value))
    assert second.get(timeout=5) == {"state": "up"}           # the new filter's own retained copy
    a.publish_json("t/keep/status", {"state": "down"})
    assert first.get(timeout=5) == {"state": "down"} and second.get(timeout=5) == {"state": "down"}
    time.sleep(0.3)
    assert first.empty() and second.empty()


@pytest.mark.parametrize("a,b,overlap", [
    ("t/+", "t/#", True), ("t/#", "t", True), ("t/x", "t/x", True), ("t/+/y", "t/x/+", True),
    ("$share/g/t/+/up", "t/d1/up", True), ("#", "a/b/c", True),
    ("t/x", "t/y", False), ("t/+", "t/x/y", False), ("t/+/y", "t/x/z", False), ("t", "t/x", False),
    ("sfp/f/devices/+/up/+", "sfp/f/devices/+/presence", False)])
def test_filters_overlap_when_some_topic_matches_both(a, b, overlap):
    assert _overlap(a, b) is overlap and _overlap(b, a) is overlap


def test_small_and_large_messages_keep_their_order_however_they_are_handed_over(broker):
    """Small messages are handled on the network thread, large ones on the dispatcher: a burst that mixes them
    (and small ones arriving while a slow large one is still being handled) comes out in the order sent."""
    a, b = (Link(broker, f"test-{n}", max_packet=2 * LARGE).connect() for n in "ab")
    order, threads, arrived = [], set(), queue.Queue()

    def handler(topic, m):
        if m.seq == 1:
            time.sleep(0.3)          # the first large message is still in hand while the rest arrive
        order.append(m.seq)
        threads.add(threading.current_thread().name)
        arrived.put(m.seq)
    b.subscribe("t/order", handler)
    big = np.ones(LARGE // 4, np.float32)
    a.send("t/order", Message("update", "test-a", 1, 0, tensors={"x": np.zeros(8, np.float32)}))
    assert arrived.get(timeout=5) == 0           # alone: handled on the network thread
    for seq in range(1, 41):
        tensors = {"x": big} if seq % 10 == 1 else {"x": np.full(8, seq, np.float32)}
        a.send("t/order", Message("update", "test-a", 1, seq, tensors=tensors))
    assert wait_for(lambda: len(order) == 41, 10)
    assert order == list(range(41))
    assert any(name.endswith("-dispatch") for name in threads) and len(threads) == 2, threads
    a.close()
    b.close()
