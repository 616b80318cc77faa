"""Transport goodput: the protocol over Mosquitto against raw paho publishes of the same tensor bytes.

For each message size (16 KB to 20 MB of float32 tensor data), N messages go from a sender to a receiver in
another process (as a device and the server are) through a local Mosquitto, QoS 1, side by side in one run:
- `raw`: paho-mqtt publishes of the bare tensor bytes, one MQTT message each, nothing checked;
- `raw-nodelay`: the same with TCP_NODELAY on both clients' sockets, as the protocol's `Link` sets it (Nagle's
  algorithm with delayed ACKs stalls request/response exchanges: see `bench/transport.py --latency`), so the table
  separates what the socket option costs from what the protocol's own work costs;
- `protocol`: `Link.send` of a `Message` (header, CRC-32, chunking at `--max-packet`, 1 MB by default like EMQX's
  limit), received by `Link.subscribe` (reassembly, every check, decoding to float32).
Goodput = tensor bytes delivered / time from the first publish until the receiver reports the last one in (a
small MQTT message back); median of `--trials`, the three kinds interleaved. Beside it, the CPU time each process
(sender, broker, receiver; all their threads, from /proc) spent per message: on a machine with fewer cores than
busy processes, goodput is what the three together can afford, so the CPU columns say where the time goes.
`--profile` runs the protocol side alone, samples the sender and the receiver with py-spy (`pip install py-spy`,
the `dev` extra) and writes the Python lines that cost most, per message size, to <out>/profile-<bytes>.md.

    python bench/transport.py [--sizes 16384,65536,262144,1048576,4194304,20971520] [--trials 9]
                              [--out bench/results/transport] [--profile | --latency]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import socket
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


def raw_client(url: str, name: str, nodelay: bool = False) -> mqtt.Client:
    host, port = url.split("//")[1].split(":")
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
    client.max_queued_messages_set(0)
    client.connect(host, int(port))
    if nodelay:
        client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.loop_start()
    return client


def receiver(url: str, max_packet: int) -> None:
    """The receiving process: raw paho clients and a protocol Link, driven by `bench/expect` messages."""
    control = raw_client(url, "bench-receiver-control")
    done = lambda kind: control.publish("bench/done", kind, qos=1)   # noqa: E731
    arrivals = {kind: Arrivals(kind, done) for kind in KINDS}
    for kind in ("raw", "raw-nodelay"):
        client = raw_client(url, f"{kind}-in", nodelay=kind == "raw-nodelay")
        client.on_message = arrivals[kind].hit
        client.subscribe(f"bench/{kind}", qos=1)
    proto_link = Link(url, "proto-in", max_packet=max_packet).connect()
    proto_link.subscribe("bench/protocol", arrivals["protocol"].hit)

    def on_expect(client, userdata, msg) -> None:
        kind, count = json.loads(msg.payload)
        arrivals[kind].expect(count)
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
        self.pids: dict[str, int] = {"sender": os.getpid()}
        self.control.on_message = lambda c, u, msg: self.events[msg.topic.split("/")[1]].set()
        self.control.subscribe("bench/ready", qos=1)
        self.control.subscribe("bench/done", qos=1)

    def timed(self, kind: str, count: int, publish, timeout: float) -> tuple[float, dict[str, float]]:
        """Seconds until the receiver has all `count`, and the CPU seconds each process spent meanwhile."""
        for event in self.events.values():
            event.clear()
        self.control.publish("bench/expect", json.dumps([kind, count]), qos=1)
        if not self.events["ready"].wait(30):
            raise SystemExit("the receiver does not answer")
        cpu = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        start = time.perf_counter()
        for seq in range(count):
            publish(seq)
        if not self.events["done"].wait(timeout):
            raise SystemExit(f"{kind}: not all {count} messages arrived")
        elapsed = time.perf_counter() - start
        return elapsed, {name: cpu_seconds(pid) - cpu[name] for name, pid in self.pids.items()}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (Linux /proc/<pid>/stat, fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


IDLE = {"select", "poll", "epoll_wait", "clock_nanosleep", "pthread_cond_wait", "pthread_cond_timedwait",
        "__futex_abstimed_wait_common", "futex_wait", "sem_wait", "sem_timedwait", "do_futex_wait"}


class Sampler:
    """py-spy sampling one process (all threads, native frames too) while the protocol side runs."""

    def __init__(self, pid: int, path: Path) -> None:
        self.path = path
        spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        if spy is None:
            raise SystemExit("--profile needs py-spy: pip install py-spy (the dev extra)")
        self.proc = subprocess.Popen([spy, "record", "--pid", str(pid), "--native",
                                      "--rate", "200", "--format", "raw", "--output", str(path)],
                                     stdout=subprocess.DEVNULL)

    def stop(self) -> collections.Counter:
        """Samples by the function they were in (own time), after py-spy has written them."""
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(60)
        own: collections.Counter = collections.Counter()
        for line in self.path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            frames = stack.split(";")
            leaf = frames[-1].split(" (")[0]
            python = next((f for f in reversed(frames) if ".py:" in f), None)
            if leaf in IDLE or "_wait" in leaf or "acquire_lock" in leaf:
                continue            # waiting: for the socket, a lock or the GIL
            own[python if python else leaf] += int(count)
        return own


def profile(driver: Driver, size: int, count: int, send, timeout: float, out: Path) -> None:
    """Where the protocol's CPU goes at one size: each process's costliest Python lines, top 25."""
    samplers = {name: Sampler(driver.pids[name], out / f"profile-{size}-{name}.raw")
                for name in ("sender", "receiver")}
    time.sleep(1.0)                   # py-spy attaches
    elapsed, cpu = driver.timed("protocol", count, send, timeout)
    lines = [f"# protocol, {size:,} B tensors x {count} messages: {elapsed:.2f} s; CPU seconds "
             + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items())]
    for name, sampler in samplers.items():
        own = sampler.stop()
        total = sum(own.values()) or 1
        lines += ["", f"## {name}: {total} busy samples, by the innermost Python line (waits left out)", "",
                  "| own % | Python frame |", "|---|---|"]
        lines += [f"| {100 * c / total:.1f} | {f} |" for f, c in own.most_common(25)]
        sampler.path.unlink()
    (out / f"profile-{size}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


KINDS = ("raw", "raw-nodelay", "protocol")


def latency(url: str, sizes: list[int], trials: int, out: Path) -> None:
    """Request/response round trips (a device's forward and the body's answer): a message to a responder that
    sends it straight back, one at a time; median and 90th percentile of `trials` per size and kind."""
    rows = []
    for kind in KINDS:
        back = threading.Event()
        if kind == "protocol":
            ask, answer = (Link(url, f"lat-{n}").connect() for n in ("ask", "answer"))
            answer.subscribe("bench/ping", lambda t, m: answer.send("bench/pong", m))
            ask.subscribe("bench/pong", lambda t, m: back.set())
            close = [ask.close, answer.close]
        else:
            ask, answer = (raw_client(url, f"lat-{kind}-{n}", nodelay=kind == "raw-nodelay")
                           for n in ("ask", "answer"))
            answer.on_message = lambda c, u, m, a=answer: a.publish("bench/pong", m.payload, qos=1)
            ask.on_message = lambda c, u, m: back.set()
            for client, topic in ((answer, "bench/ping"), (ask, "bench/pong")):
                client.subscribe(topic, qos=1)
            close = [ask.disconnect, answer.disconnect, ask.loop_stop, answer.loop_stop]
        time.sleep(0.5)               # the raw clients' subscriptions are in
        for size in sizes:
            tensor = np.random.default_rng(0).standard_normal(size // 4).astype(np.float32)
            payload = tensor.tobytes()
            seconds = []
            for seq in range(trials + 2):
                back.clear()
                start = time.perf_counter()
                if kind == "protocol":
                    ask.send("bench/ping", Message("forward", "bench", 1, seq, tensors={"x": tensor}))
                else:
                    ask.publish("bench/ping", payload, qos=1)
                if not back.wait(10):
                    raise SystemExit(f"{kind}: no answer to a {size}-byte request")
                seconds.append(time.perf_counter() - start)
            seconds = sorted(seconds[2:])               # the first two warm up
            rows.append({"kind": kind, "bytes": size, "median_ms": 1e3 * float(np.median(seconds)),
                         "p90_ms": 1e3 * seconds[int(0.9 * (len(seconds) - 1))]})
            print(f"{kind:>12} {size / 2**10:>8.0f} KiB: median {rows[-1]['median_ms']:.2f} ms, "
                  f"p90 {rows[-1]['p90_ms']:.2f} ms", flush=True)
        for step in close:
            step()
    machine = machine_facts("bench/transport.py", sys.argv[1:], broker="Mosquitto, loopback")
    (out / "latency.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    lines = [f"Machine: {machine['cpu']}, {machine['cores']} cores; Mosquitto on loopback, QoS 1. Command: "
             f"`{machine['command']}`. Request/response round trip, milliseconds, median (90th percentile) of "
             f"{trials}.", "", "| bytes | " + " | ".join(KINDS) + " |", "|---" * (len(KINDS) + 1) + "|"]
    for size in sizes:
        cells = {r["kind"]: f"{r['median_ms']:.2f} ({r['p90_ms']:.2f})" for r in rows if r["bytes"] == size}
        lines.append(f"| {size:,} | " + " | ".join(cells[k] for k in KINDS) + " |")
    (out / "latency.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sizes = [r["bytes"] / 2**20 for r in rows]
    fig, (ax, ratio) = plt.subplots(1, 2, figsize=(11, 4))
    ax.plot(sizes, [r["raw_MBps"] for r in rows], marker="o", label="raw paho publish")
    ax.plot(sizes, [r["raw-nodelay_MBps"] for r in rows], marker="o", label="raw paho, TCP_NODELAY")
    ax.plot(sizes, [r["protocol_MBps"] for r in rows], marker="o", label="protocol (checked, chunked)")
    ax.set(xscale="log", xlabel="tensor bytes per message (MiB)", ylabel="goodput (MB/s)", ylim=(0, None),
           title="Goodput over Mosquitto (loopback)")
    ratio.plot(sizes, [r["ratio"] for r in rows], marker="o", color="C2", label="protocol / raw")
    ratio.plot(sizes, [r["ratio_nodelay"] for r in rows], marker="o", color="C1",
               label="protocol / raw with TCP_NODELAY")
    ratio.axhline(0.8, color="C3", ls="--", lw=1, label="target 0.8x")
    ratio.axhline(1.0, color="gray", ls=":", lw=1, label="as fast as raw")
    ratio.set(xscale="log", xlabel="tensor bytes per message (MiB)", ylabel="protocol / raw paho", ylim=(0, None),
              title="Protocol against raw paho, same run")
    for axis in (ax, ratio):
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="16384,65536,262144,1048576,4194304,20971520")
    ap.add_argument("--trials", type=int, default=9)
    ap.add_argument("--max-packet", type=int, default=1 << 20)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "transport")
    ap.add_argument("--profile", action="store_true", help="sample the protocol side with py-spy instead")
    ap.add_argument("--latency", action="store_true", help="measure request/response round trips instead")
    ap.add_argument("--receiver", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.receiver:
        receiver(a.receiver, a.max_packet)
        return
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    broker = LocalBroker(max_packet=64 << 20)
    with broker as url:
        if a.latency:
            latency(url, [int(v) for v in a.sizes.split(",")], max(a.trials, 40), a.out)
            return
        driver = Driver(url)
        child = subprocess.Popen([sys.executable, __file__, "--receiver", url, "--max-packet", str(a.max_packet)],
                                 env={**os.environ, "PYTHONPATH": str(ROOT)})
        driver.pids.update(broker=broker.process.pid, receiver=child.pid)
        if not driver.events["ready"].wait(60):
            raise SystemExit("the receiver did not start")
        raw_out = {kind: raw_client(url, f"{kind}-out", nodelay=kind == "raw-nodelay")
                   for kind in ("raw", "raw-nodelay")}
        proto_out = Link(url, "proto-out", max_packet=a.max_packet).connect()
        try:
            for size in map(int, a.sizes.split(",")):
                tensor = np.random.default_rng(0).standard_normal(size // 4).astype(np.float32)
                payload = tensor.tobytes()
                count = int(min(2000, max(5, (128 << 20) // size)))
                timeout = 60 + size * count / 20e6
                senders = {kind: (lambda seq, c=client, t=f"bench/{kind}": c.publish(t, payload, qos=1))
                           for kind, client in raw_out.items()}
                senders["protocol"] = lambda seq: proto_out.send("bench/protocol", Message(
                    "update", "bench", 1, seq, tensors={"x": tensor}))
                for kind in KINDS:                                                       # warm-up
                    driver.timed(kind, 2, senders[kind], timeout)
                if a.profile:
                    profile(driver, size, count * a.trials, senders["protocol"], timeout * a.trials, a.out)
                    continue
                runs: dict[str, list] = {kind: [] for kind in KINDS}
                for _ in range(a.trials):     # interleaved, so drift on a shared machine hits all alike
                    for kind in KINDS:
                        runs[kind].append(driver.timed(kind, count, senders[kind], timeout))
                row = {"bytes": size, "messages": count}
                for kind, timed in runs.items():
                    row[f"{kind}_MBps"] = size * count / float(np.median([t for t, _ in timed])) / 1e6
                    for name in driver.pids:      # CPU microseconds per message, over all the trials
                        row[f"{kind}_{name}_us"] = 1e6 * sum(c[name] for _, c in timed) / (count * a.trials)
                row["ratio"] = row["protocol_MBps"] / row["raw_MBps"]
                row["ratio_nodelay"] = row["protocol_MBps"] / row["raw-nodelay_MBps"]
                rows.append(row)
                print(f"{size / 2**10:>8.0f} KiB x {count:>3}: raw {row['raw_MBps']:7.1f} MB/s, with TCP_NODELAY "
                      f"{row['raw-nodelay_MBps']:7.1f}, protocol {row['protocol_MBps']:7.1f} MB/s, ratio "
                      f"{row['ratio']:.2f} ({row['ratio_nodelay']:.2f}); CPU us/message raw|protocol "
                      + ", ".join(f"{n} {row[f'raw_{n}_us']:.0f}|{row[f'protocol_{n}_us']:.0f}"
                                  for n in driver.pids), flush=True)
        finally:
            child.kill()
            for client in raw_out.values():
                client.disconnect()
                client.loop_stop()
            proto_out.close()
    if a.profile:
        return
    machine = machine_facts("bench/transport.py", sys.argv[1:], broker="Mosquitto, loopback")
    (a.out / "results.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    lines = [f"Machine: {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}; Mosquitto on "
             f"loopback, QoS 1, sender and receiver in separate processes. Command: `{machine['command']}`. "
             "CPU: microseconds per message in each process (all threads), raw | protocol.", "",
             "| tensor bytes / message | messages | raw paho MB/s | raw, TCP_NODELAY MB/s | protocol MB/s "
             "| protocol / raw | protocol / raw with TCP_NODELAY "
             "| sender CPU us | broker CPU us | receiver CPU us |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['bytes']:,} | {r['messages']} | {r['raw_MBps']:.1f} | {r['raw-nodelay_MBps']:.1f} | "
              f"{r['protocol_MBps']:.1f} | {r['ratio']:.2f} | {r['ratio_nodelay']:.2f} | " + " | ".join(f"{r[f'raw_{n}_us']:.0f} \\| {r[f'protocol_{n}_us']:.0f}"
                                                  for n in ("sender", "broker", "receiver")) + " |" for r in rows]
    if (a.out / "latency.md").exists():
        lines += ["", "Request/response round trips (`--latency`: what split training waits on, and why the protocol "
                  "sets TCP_NODELAY).", "", (a.out / "latency.md").read_text().strip()]
    profiles = sorted(a.out.glob("profile-*.md"), key=lambda p: int(p.stem.split("-")[1]))
    if profiles:
        lines += ["", "Where the protocol's CPU goes (py-spy, `--profile`): "
                  + ", ".join(f"[{p.stem.split('-')[1]} B]({p.name})" for p in profiles) + "."]
    (a.out / "results.md").write_text("\n".join(lines) + "\n")
    plot(rows, a.out / "goodput.png")
    print("\n".join(lines[2:]))


if __name__ == "__main__":
    main()
