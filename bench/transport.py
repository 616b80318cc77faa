"""Transport goodput: the protocol over Mosquitto against raw paho publishes of the same tensor bytes.

For each message size (64 KB to 20 MB of float32 tensor data), N messages go from a sender to a receiver in
another process (as a device and the server are) through a local Mosquitto, QoS 1, side by side in one run:
- `raw`: paho-mqtt publishes of the bare tensor bytes, one MQTT message each, nothing checked;
- `protocol`: `Link.send` of a `Message` (header, CRC-32, chunking at `--max-packet`, 1 MB by default like EMQX's
  limit), received by `Link.subscribe` (reassembly, every check, decoding to float32).
Goodput = tensor bytes delivered / time from the first publish until the receiver reports the last one in (a
small MQTT message back); median of `--trials`, the two kinds interleaved.

    python bench/transport.py [--sizes 65536,262144,1048576,4194304,20971520] [--trials 3]
                              [--out bench/results/transport]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.device_step import machine_facts  # noqa: E402
from cloud_server.broker import LocalBroker  # noqa: E402
from wire_protocol.envelope import Message  # noqa: E402
from wire_protocol.link import Link  # noqa: E402


class Arrivals:
    """Receiver side: counts deliveries of one kind and says `done` (over MQTT) when the expected count is in."""

    def __init__(self, kind: str, reply) -> None:
        self.kind, self.reply, self.count, self.target = kind, reply, 0, None

    def expect(self, n: int) -> None:
        self.count, self.target = 0, n

    def hit(self, *_) -> None:
        self.count += 1
        if self.count == self.target:
            self.reply(self.kind)


def raw_client(url: str, name: str) -> mqtt.Client:
    host, port = url.split("//")[1].split(":")
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
    client.max_queued_messages_set(0)
    client.connect(host, int(port))
    client.loop_start()
    return client


def receiver(url: str, max_packet: int) -> None:
    """The receiving process: a raw paho client and a protocol Link, driven by `bench/expect` messages."""
    control = raw_client(url, "bench-receiver-control")
    done = lambda kind: control.publish("bench/done", kind, qos=1)   # noqa: E731
    raw_in, proto_link = raw_client(url, "raw-in"), Link(url, "proto-in", max_packet=max_packet).connect()
    raw, proto = Arrivals("raw", done), Arrivals("protocol", done)
    raw_in.on_message = raw.hit
    raw_in.subscribe("bench/raw", qos=1)
    proto_link.subscribe("bench/protocol", proto.hit)

    def on_expect(client, userdata, msg) -> None:
        kind, count = json.loads(msg.payload)
        (raw if kind == "raw" else proto).expect(count)
        control.publish("bench/ready", kind, qos=1)
    control.on_message = on_expect
    control.subscribe("bench/expect", qos=1)
    time.sleep(0.5)
    control.publish("bench/ready", "start", qos=1)
    threading.Event().wait()


class Driver:
    """Sender side: tells the receiver what to expect, then times until it says done."""

    def __init__(self, url: str) -> None:
        self.control, self.events = raw_client(url, "bench-driver"), {"ready": threading.Event(),
                                                                       "done": threading.Event()}
        self.control.on_message = lambda c, u, msg: self.events[msg.topic.split("/")[1]].set()
        self.control.subscribe("bench/ready", qos=1)
        self.control.subscribe("bench/done", qos=1)

    def timed(self, kind: str, count: int, publish, timeout: float) -> float:
        for event in self.events.values():
            event.clear()
        self.control.publish("bench/expect", json.dumps([kind, count]), qos=1)
        if not self.events["ready"].wait(30):
            raise SystemExit("the receiver does not answer")
        start = time.perf_counter()
        for seq in range(count):
            publish(seq)
        if not self.events["done"].wait(timeout):
            raise SystemExit(f"{kind}: not all {count} messages arrived")
        return time.perf_counter() - start


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sizes = [r["bytes"] / 2**20 for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(sizes, [r["raw_MBps"] for r in rows], marker="o", label="raw paho publish")
    ax.plot(sizes, [r["protocol_MBps"] for r in rows], marker="o", label="protocol (checked, chunked at 1 MB)")
    ax.set(xscale="log", xlabel="tensor bytes per message (MiB)", ylabel="goodput (MB/s)",
           title="Goodput over Mosquitto (loopback)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="65536,262144,1048576,4194304,20971520")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--max-packet", type=int, default=1 << 20)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "transport")
    ap.add_argument("--receiver", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.receiver:
        receiver(a.receiver, a.max_packet)
        return
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with LocalBroker(max_packet=64 << 20) as url:
        driver = Driver(url)
        child = subprocess.Popen([sys.executable, __file__, "--receiver", url, "--max-packet", str(a.max_packet)],
                                 env={**os.environ, "PYTHONPATH": str(ROOT)})
        if not driver.events["ready"].wait(60):
            raise SystemExit("the receiver did not start")
        raw_out = raw_client(url, "raw-out")
        proto_out = Link(url, "proto-out", max_packet=a.max_packet).connect()
        try:
            for size in map(int, a.sizes.split(",")):
                tensor = np.random.default_rng(0).standard_normal(size // 4).astype(np.float32)
                payload = tensor.tobytes()
                count = int(min(200, max(5, (64 << 20) // size)))
                timeout = 60 + size * count / 20e6
                send_raw = lambda seq: raw_out.publish("bench/raw", payload, qos=1)   # noqa: E731
                send_proto = lambda seq: proto_out.send("bench/protocol", Message(    # noqa: E731
                    "update", "bench", 1, seq, tensors={"x": tensor}))
                driver.timed("raw", 2, send_raw, timeout)                                # warm-up
                driver.timed("protocol", 2, send_proto, timeout)
                raw_t, proto_t = [], []
                for _ in range(a.trials):     # interleaved, so drift on a shared machine hits both alike
                    raw_t.append(driver.timed("raw", count, send_raw, timeout))
                    proto_t.append(driver.timed("protocol", count, send_proto, timeout))
                raw_mbps = size * count / float(np.median(raw_t)) / 1e6
                proto_mbps = size * count / float(np.median(proto_t)) / 1e6
                rows.append({"bytes": size, "messages": count, "raw_MBps": raw_mbps, "protocol_MBps": proto_mbps,
                             "ratio": proto_mbps / raw_mbps})
                print(f"{size / 2**10:>8.0f} KiB x {count:>3}: raw {raw_mbps:7.1f} MB/s, protocol "
                      f"{proto_mbps:7.1f} MB/s, ratio {proto_mbps / raw_mbps:.2f}", flush=True)
        finally:
            child.kill()
            raw_out.disconnect()
            raw_out.loop_stop()
            proto_out.close()
    machine = machine_facts("bench/transport.py", sys.argv[1:], broker="Mosquitto, loopback")
    (a.out / "results.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    lines = [f"Machine: {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}; Mosquitto on "
             f"loopback, QoS 1, sender and receiver in separate processes. Command: `{machine['command']}`.", "",
             "| tensor bytes / message | messages | raw paho MB/s | protocol MB/s | protocol / raw |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['bytes']:,} | {r['messages']} | {r['raw_MBps']:.1f} | {r['protocol_MBps']:.1f} | "
              f"{r['ratio']:.2f} |" for r in rows]
    (a.out / "results.md").write_text("\n".join(lines) + "\n")
    plot(rows, a.out / "goodput.png")
    print("\n".join(lines[2:]))


if __name__ == "__main__":
    main()
