"""Chaos: a federation on this machine with faults injected at random, round after round, against the same
federation without faults.

    python bench/chaos.py --rounds 20 --devices 4 --seed 0 --out bench/results/chaos

The federation is `cloud_server.demo.LocalFederation` (a secured Mosquitto, `sfp-cloud serve`, `sfp-edge`
devices, one process each) on the in-house backbone, with the devices holding the reference federation's client
shares of a subset of MNIST 5k. The fault-free run is the in-process reference federation with the same seed,
which the MQTT federation reproduces exactly (tests/test_federation_mqtt.py). A round starts once every device
is online, so faults hit rounds in progress. While the rounds run, a fault is drawn at random every `--interval`
seconds (on average):

- `kill device`: SIGKILL, started again from its state folder `--down` seconds later;
- `freeze device`: SIGSTOP, resumed `--freeze` seconds later (longer than 1.5 keepalives: the broker gives up);
- `kill server`: SIGKILL, started again `--down` seconds later (it resumes after its last checkpoint);
- `restart broker`: stopped and started on the same port (no persistence: sessions and retained state gone);
- `garbage`: a burst of malformed, bit-flipped, forged and replayed messages on the server's topics.

Reported: rounds completed and attempts run again, faults injected by kind, messages the server refused by kind
(its log), and the final global model's accuracy on the central test set against the fault-free run's.
Output: <out>/results.json, results.md, timeline.png; the processes' folders and logs in --work.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.device_step import machine_facts  # noqa: E402
from cloud_server.demo import LocalFederation  # noqa: E402
from sfp_common.split_spec import SplitSpec  # noqa: E402
from sfp_common.datasets import write_device_folder  # noqa: E402
from simulation.engine import Federation, SimConfig, load_state  # noqa: E402
from sfp_common.recipe import Recipe  # noqa: E402
from wire_protocol.envelope import Message, pack  # noqa: E402
from wire_protocol.link import Link  # noqa: E402

FAULTS = ("kill device", "freeze device", "kill server", "restart broker", "garbage")
REFUSED = re.compile(r"refused a message on \S+ \(([^)]+)\)")


def profile_file(folder: Path, train: Recipe, name: str = "chaos-x86", keepalive: int = 5) -> Path:
    """The devices' profile: the reference's batch size and token dtype, a short keepalive."""
    path = folder / "profile.json"
    path.write_text(json.dumps({
        "name": name, "description": f"x86 device for bench/{name.split('-')[0]}", "match": {},
        "backend": "portable", "providers": ["CPUExecutionProvider"], "threads": 1, "batch_size": train.batch_size,
        "max_head_blocks": 0, "wire": train.wire, "max_packet": 1 << 20, "keepalive": keepalive}))
    return path


GARBAGE_BURST = 20


def garbage(fed: LocalFederation, rng: np.random.Generator, devices: int, count: int = GARBAGE_BURST) -> None:
    """Malformed and hostile packets on the topics the server listens on, from an account that may send them
    (the service account: the broker's ACLs would stop a device's account from most of these)."""
    link = Link(fed.url, f"chaos-garbage-{rng.integers(1 << 30)}", access=fed.access).connect()
    topics, sent = fed.topics, []
    for _ in range(count):
        device = f"device-{rng.integers(devices)}"
        valid = bytearray(pack(Message("update", device, int(rng.integers(1, 50)), 0, {"num_samples": 5},
                                       {"x": rng.standard_normal(64).astype(np.float32)})))
        kind = rng.integers(4)
        if kind == 0:
            data = rng.bytes(int(rng.integers(1, 2000)))
        elif kind == 1:
            valid[len(valid) - 1 - int(rng.integers(256))] ^= 0x55          # payload bit flipped: CRC
            data = bytes(valid)
        elif kind == 2:
            data = bytes(pack(Message("update", "someone-else", 1, 0, {"num_samples": 5})))   # forged id
        else:
            data = bytes(valid)                                              # a replay of some round
        topic = rng.choice([topics.up(device, "update"), topics.forward(device), topics.up(device, "report")])
        sent.append(link.client.publish(str(topic), data, qos=1))
    for info in sent:                      # all of it reaches the broker before the connection closes
        info.wait_for_publish(10)
    link.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/vit-fmnist.pth")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--samples", type=int, default=2000, help="MNIST 5k training images shared by the devices.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--interval", type=float, default=8.0, help="Mean seconds between faults.")
    ap.add_argument("--down", type=float, default=4.0, help="Seconds a killed part stays down.")
    ap.add_argument("--freeze", type=float, default=10.0, help="Seconds a frozen device stays frozen.")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "chaos")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "chaos",
                    help="The processes' folders: data, states, keys, logs (not results: keep it out of git).")
    a = ap.parse_args()
    if not Path(a.model).is_file():
        raise SystemExit(f"error: backbone {a.model} not found: `make backbone` first")
    a.out.mkdir(parents=True, exist_ok=True)
    work = a.work
    shutil.rmtree(work, ignore_errors=True)          # a fresh federation: an old state folder would be resumed
    train = Recipe(epochs=1)                 # the federation's recipe; the CLI's defaults for the rest
    cfg = SimConfig(method="sfprompt", dataset="mnist5k", model=a.model, clients=a.devices, rounds=a.rounds,
                    alpha=0.5, seed=a.seed, spec=SplitSpec(10), recipe=train, train_samples=a.samples)

    print(f"fault-free run: the reference federation, {a.rounds} rounds", flush=True)
    reference = Federation(cfg)
    shares = [write_device_folder(work / f"device-{c}" / "data", reference.train_set.subset(tr),
                                  reference.train_set.subset(te), [str(i) for i in range(10)])
              for c, (tr, te) in enumerate(reference.client_indices)]
    initial = {n: p.detach().clone() for n, p in reference.client_params.items()}
    fault_free = reference.run()["rounds"]

    fed = LocalFederation(work, shares, [str(i) for i in range(10)], [
        "--model", a.model, "--prompts", "10", "--rounds", str(a.rounds), "--lr", str(train.lr), "--epochs", "1",
        "--keep", str(train.keep), "--seed", str(a.seed), "--min-devices", str(a.devices), "--deadline", "60",
        "--no-device-eval"], str(profile_file(work, train)), tls=True, device_args=["--round-timeout", "20"])
    rng = np.random.default_rng(a.seed)
    events: list[tuple[float, str]] = []
    faults: Counter[str] = Counter()
    start = time.time()
    fed.start_broker()
    try:
        fed.watch()
        fed.start_server()
        for i in range(a.devices):
            fed.enroll(i)
            fed.start_device(i)
        print(f"{a.devices} devices enrolled over TLS; faults every ~{a.interval:.0f} s", flush=True)
        pending: list[tuple[float, str, int]] = []      # (when, action, device) to undo a fault
        down: set[int] = set()
        server_down = False
        next_fault = time.time() + rng.exponential(a.interval)
        rounds_file = work / "server" / "rounds.jsonl"
        completed = lambda: len(rounds_file.read_text().splitlines()) if rounds_file.exists() else 0  # noqa: E731
        while completed() < a.rounds:
            while not fed.summaries.empty():
                row = fed.summaries.get()
                print(f"round {row['round']}/{a.rounds}: {len(row['participants'])} devices "
                      f"({time.time() - start:.0f} s)", flush=True)
            now = time.time()
            for when, action, i in [p for p in pending if p[0] <= now]:
                pending.remove((when, action, i))
                if action == "restart device":
                    fed.start_device(i)
                    down.discard(i)
                elif action == "thaw device":
                    fed.devices[i].send_signal(signal.SIGCONT)
                    down.discard(i)
                elif action == "restart server":
                    fed.start_server()
                    server_down = False
            if now >= next_fault:
                next_fault = now + rng.exponential(a.interval)
                fault = str(rng.choice(FAULTS))
                up = [i for i in range(a.devices) if i not in down]
                if fault in ("kill device", "freeze device") and len(up) > 1:
                    i = int(rng.choice(up))
                    down.add(i)
                    if fault == "kill device":
                        fed.devices[i].kill()
                        pending.append((now + a.down, "restart device", i))
                    else:
                        fed.devices[i].send_signal(signal.SIGSTOP)
                        pending.append((now + a.freeze, "thaw device", i))
                    fault = f"{fault} {i}"
                elif fault == "kill server" and not server_down:
                    fed.server.kill()
                    server_down = True
                    pending.append((now + a.down, "restart server", -1))
                elif fault == "restart broker":
                    fed.broker.stop()
                    time.sleep(1.0)
                    fed.broker.start()
                elif fault == "garbage":
                    garbage(fed, rng, a.devices)
                else:
                    continue
                faults[fault.rsplit(" ", 1)[0] if fault[-1].isdigit() else fault] += 1
                events.append((now - start, fault))
                print(f"  {now - start:6.1f} s: {fault}", flush=True)
            if fed.server.poll() is not None and not server_down and completed() < a.rounds:
                raise SystemExit(f"the server exited on its own; see {work / 'server.log'}")
            time.sleep(0.2)
        fed.server.wait(60)
    finally:
        fed.close()
    seconds = time.time() - start

    summaries = [json.loads(line) for line in (work / "server" / "rounds.jsonl").read_text().splitlines()]
    with np.load(work / "server" / "checkpoint.npz") as npz:
        final = {k: npz[k] for k in npz.files if k != "__round__"}
    load_state(reference.client_params, final)
    chaos_accuracy, _ = reference.evaluate()
    load_state(reference.client_params, {k: v.numpy() for k, v in initial.items()})
    initial_accuracy, _ = reference.evaluate()
    server_log = (work / "server.log").read_text() if (work / "server.log").exists() else ""
    refused = Counter(REFUSED.findall(server_log))
    result = {
        "machine": machine_facts("bench/chaos.py", sys.argv[1:]), "rounds": a.rounds, "devices": a.devices,
        "seconds": round(seconds, 1), "rounds_completed": [s["round"] for s in summaries],
        "attempts_run_again": server_log.count("it will be run again"),
        "participants": [len(s["participants"]) for s in summaries], "faults": dict(faults),
        "events": events, "refused": dict(refused), "accuracy": {
            "initial": initial_accuracy, "chaos": chaos_accuracy, "fault_free": fault_free[-1]["accuracy"]}}
    (a.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores. Command: "
             f"`{result['machine']['command']}`. {a.devices} devices over TLS, in-house backbone, {a.samples} "
             f"MNIST 5k images (Dirichlet 0.5), {a.rounds} rounds, {seconds:.0f} s.", "",
             "| | |", "|---|---|",
             f"| rounds completed | {len(summaries)} of {a.rounds}, each once: "
             f"{[s['round'] for s in summaries] == list(range(1, a.rounds + 1))} |",
             f"| round attempts run again | {result['attempts_run_again']} |",
             f"| devices per completed round | {', '.join(map(str, result['participants']))} |",
             f"| faults injected | {sum(faults.values())}: "
             f"{', '.join(f'{k} {v}' for k, v in sorted(faults.items()))} |",
             f"| garbage packets sent | {GARBAGE_BURST * faults['garbage']} (those that reached a server that was "
             f"down, or a broker being restarted, were lost before anyone could refuse them) |",
             f"| messages the server refused | {sum(refused.values())}: "
             f"{', '.join(f'{k} {v}' for k, v in sorted(refused.items()))} |",
             f"| accuracy (central test set) | chaos {chaos_accuracy:.3f}, fault-free {fault_free[-1]['accuracy']:.3f} "
             f"(same seed), before training {initial_accuracy:.3f} |"]
    (a.out / "results.md").write_text("\n".join(lines) + "\n")
    plot(summaries, events, a.out / "timeline.png")
    print("\n".join(lines))


def plot(summaries: list[dict], events: list[tuple[float, str]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(10, 3.5))
    ax.bar([s["round"] for s in summaries], [len(s["participants"]) for s in summaries], color="C0")
    ax.set(xlabel="round", ylabel="devices in the round", title="Chaos run: devices per completed round")
    ax.grid(alpha=0.3, axis="y")
    text = "; ".join(f"{t:.0f}s {name}" for t, name in events)
    fig.text(0.01, 0.01, f"faults: {text}"[:400], fontsize=6, wrap=True)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
