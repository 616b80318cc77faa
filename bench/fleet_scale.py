"""Fleet scale: what one coordinator, one body worker and one Mosquitto cost as the fleet grows.

    python bench/fleet_scale.py --devices 10,100,300 --rounds 3 --churn 0.1 --out bench/results/fleet-scale

For each N, on this machine: a secured Mosquitto (TLS, an account per device, ACLs), `sfp-cloud serve` (the
coordinator and one body worker in one process, the in-house backbone on CPU) and N real devices: `DeviceAgent`s,
many per process (`--hosts` processes), each enrolled with its own single-use token (the server sends each its
bundle and makes its broker account), holding two training images and one test image of MNIST 5k, then taking
part in rounds over the real protocol: split training through the body worker, its update (checked against the
body's receipts), the evaluation of the new global model.

Measured per N: the enrollment rate (devices enrolled per second, all hosts enrolling at once); per round its wall
time, the slowest device's own round (as the device timed it, waiting on the body included) and the difference,
the coordination overhead (sending N round messages, collecting, FedAvg, the evaluation pass, the checkpoint); the
server's CPU seconds per round and per device; the peak RSS of the server, the broker and the device processes;
the bytes the broker read and wrote per round (its /proc io counters: TLS records, every client); the devices'
protocol messages per round; and updates lost: devices selected for a round, online to its end, whose update is
not in it (must be 0), and messages the server refused (must be 0).
Churn (`--churn`, at the largest N): after each round that fraction of the devices leaves (cleanly, their
presence offline) and those that left the round before come back from their state folders; every round must
still complete with the others, each once.
Output: <out>/results.json, results.md, fleet_scale.png; the processes' folders and logs in --work.
"""
from __future__ import annotations

import argparse
import json
import queue
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.device_step import machine_facts  # noqa: E402
from bench.fleet_host import Host  # noqa: E402
from cloud_server.broker import free_port  # noqa: E402
from cloud_server.demo import FEDERATION, LocalFederation  # noqa: E402
from cloud_server.security import Security  # noqa: E402
from sfp_common.datasets import load_dataset, write_device_folder  # noqa: E402
from sfp_common.recipe import Recipe  # noqa: E402


# ---------------------------------------------------------------------------------------------- measuring
def cpu_seconds(pid: int) -> float:
    from bench.transport import cpu_seconds as cpu
    return cpu(pid)


def status_kb(pid: int, field: str) -> int:
    """A /proc/<pid>/status field in kB (VmHWM: peak RSS, VmRSS: now)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def io_bytes(pid: int) -> tuple[int, int]:
    """Bytes a process read and wrote through system calls (/proc/<pid>/io): a broker's are its sockets'."""
    fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return int(fields["rchar"]), int(fields["wchar"])


def scrape(port: int) -> dict[str, float]:
    """The server's Prometheus counters, summed over labels."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            key = name.split("{")[0]
            out[key] = out.get(key, 0.0) + float(value)
    return out


# ---------------------------------------------------------------------------------------------- one fleet
def run_fleet(n: int, a: argparse.Namespace, work: Path, churn: float, say) -> dict:
    """One federation of n devices: enrollment, a.rounds rounds (with churn if > 0), and its measurements."""
    from bench.chaos import profile_file        # here: it imports PyTorch, which the device hosts must not
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    data = load_dataset("mnist5k")
    rng = np.random.default_rng(a.seed)
    picked = rng.choice(len(data.train), 3 * n, replace=n * 3 > len(data.train))
    shares = [write_device_folder(work / f"device-{i}" / "data", data.train.subset(picked[3 * i:3 * i + 2]),
                                  data.train.subset(picked[3 * i + 2:3 * i + 3]), data.classes) for i in range(n)]
    metrics_port = free_port()
    leavers = max(1, round(churn * n)) if churn else 0
    # more rounds than measured: the server is still up when the last is read (small fleets' rounds take a tenth of
    # a second); with churn, rounds go on without the leavers
    fed = LocalFederation(work, shares, data.classes, [
        "--model", a.model, "--rounds", str(a.rounds + 100), "--seed", str(a.seed), "--min-devices", str(n - leavers),
        "--deadline", "600", "--metrics-port", str(metrics_port)],
        str(profile_file(work, Recipe(), name="fleet-x86", keepalive=a.keepalive)), tls=True)
    env = {**fed.env, "PYTHONPATH": str(ROOT)}
    hosts: list[Host] = []
    try:
        fed.start_broker()
        fed.watch()
        ready = threading.Event()
        fed.watcher.subscribe_json(fed.topics.server_status(), lambda topic, value: ready.set() if isinstance(
            value, dict) and value.get("state") == "waiting for devices" else None)
        fed.start_server()
        if not ready.wait(600):           # its bundles exported: enrollment is timed from here
            raise SystemExit(f"the server did not start; see {work / 'server.log'}")
        security = Security(fed.folder, FEDERATION, reload=fed.broker.reload)
        devices = [{"device": f"device-{i}", "token": security.issue_token(f"device-{i}", 3600),
                    "data": str(shares[i]), "state": str(fed.device_state(i))} for i in range(n)]
        groups = [devices[h::a.hosts] for h in range(min(a.hosts, n))]
        for h, group in enumerate(groups):
            spec = work / f"host-{h}.json"
            spec.write_text(json.dumps({"url": fed.url, "ca": str(fed.folder / "ca.crt"), "federation": FEDERATION,
                                        "devices": group,
                                        "profile": str(work / "profile.json"), "parallel": a.parallel,
                                        "round_timeout": 120.0, "heartbeat": 30.0}))
            hosts.append(Host(spec, work / f"host-{h}.log", env))
        errors: list[dict] = []

        def other(event: dict) -> None:
            if event["event"] == "error":
                errors.append(event)
        began = min(h.wait("begin", 120, other)["at"] for h in hosts)
        enrolled: list[dict] = []

        def collect(event: dict) -> None:
            if event["event"] == "enrolled":
                enrolled.append(event)
                if len(enrolled) % max(1, n // 5) == 0:
                    say(f"  {len(enrolled)}/{n} enrolled")
            else:
                other(event)
        for h in hosts:
            h.wait("ready", 600 + 5 * n, collect)
        if errors:
            raise SystemExit(f"{len(errors)} devices failed; first: {errors[0]}")
        finished = max(e["at"] for e in enrolled)
        enrollment = {"devices": len(enrolled), "seconds": round(finished - began, 2),
                      "per_second": round(len(enrolled) / (finished - began), 2),
                      "median_s": round(float(np.median([e["at"] - e["began"] for e in enrolled])), 2)}
        say(f"  enrollment: {n} devices in {enrollment['seconds']:.1f} s ({enrollment['per_second']:.1f}/s)")

        server, broker = fed.server.pid, fed.broker.process.pid

        def traffic() -> dict[str, int]:
            for h in hosts:
                h.send(op="traffic")
            replies = [h.wait("traffic", 60, other) for h in hosts]
            return {k: sum(r[k] for r in replies) for k in ("sent", "received", "messages_sent",
                                                             "messages_received")}
        mark = {"cpu": cpu_seconds(server), "io": io_bytes(broker), "traffic": traffic()}
        away: list[str] = []          # left after the previous round
        stopped_at: dict[str, float] = {}
        rows: list[dict] = []
        names = [d["device"] for d in devices]
        for _ in range(a.rounds):
            try:
                summary = fed.summaries.get(timeout=900)
            except queue.Empty:
                raise SystemExit(f"no round finished within 900 s; see {work / 'server.log'}") from None
            now = {"cpu": cpu_seconds(server), "io": io_bytes(broker), "traffic": traffic()}
            leaving = []
            if churn and len(rows) + 1 < a.rounds:        # the next round runs with them gone
                leaving = sorted(rng.choice(sorted(set(names) - set(away)), leavers, replace=False).tolist())
            # a device told to leave while this round ran left it on purpose; any other selected device without
            # its update in the round is lost
            ended = summary["finished"]
            churned = {d for d, t in stopped_at.items() if ended - summary["seconds"] - 1 <= t <= ended}
            lost = sorted(set(summary["selected"]) - set(summary["participants"]) - churned)
            moved = {k: now["traffic"][k] - mark["traffic"][k] for k in now["traffic"]}
            row = {"round": summary["round"], "seconds": summary["seconds"],
                   "slowest_device_s": summary.get("slowest_device_s"),
                   "overhead_s": round(summary["seconds"] - summary.get("slowest_device_s", 0.0), 3),
                   "selected": len(summary["selected"]), "participants": len(summary["participants"]),
                   "distinct": len(set(summary["participants"])) == len(summary["participants"])
                   and set(summary["participants"]) <= set(summary["selected"]),
                   "left_during": sorted(churned & set(summary["selected"])),
                   "evaluated": len(summary.get("evaluated_by", [])), "lost": lost,
                   "server_cpu_s": round(now["cpu"] - mark["cpu"], 3),
                   "broker_read_MB": round((now["io"][0] - mark["io"][0]) / 1e6, 3),
                   "broker_written_MB": round((now["io"][1] - mark["io"][1]) / 1e6, 3),
                   "device_messages": moved["messages_sent"] + moved["messages_received"],
                   "device_sent_MB": round(moved["sent"] / 1e6, 3),
                   "device_received_MB": round(moved["received"] / 1e6, 3),
                   "left": leaving, "back": away, "accuracy": summary.get("accuracy")}
            rows.append(row)
            say(f"  round {row['round']}: {row['participants']}/{row['selected']} updates, {row['seconds']:.1f} s "
                f"(slowest device {row['slowest_device_s'] or 0:.1f} s), server CPU {row['server_cpu_s']:.1f} s, "
                f"lost {len(lost)}" + (f"; {len(leaving)} leave, {len(away)} come back" if churn else ""))
            if churn and len(rows) < a.rounds:
                for op, changed, reply in (("stop", leaving, "stopped"), ("start", away, "started")):
                    mine = [[d for d in changed if int(d.split("-")[1]) % len(hosts) == i] for i in range(len(hosts))]
                    for h, group in zip(hosts, mine):
                        h.send(op=op, devices=group)
                    for h in hosts:
                        event = h.wait(reply, 600, other)      # starting devices under load is slow
                        stopped_at.update(event.get("at", {}))
                away = leaving
            mark = now
        counters = scrape(metrics_port)
        result = {
            "devices": n, "hosts": len(hosts), "churn": churn, "enrollment": enrollment, "rounds": rows,
            "server_peak_rss_MB": round(status_kb(server, "VmHWM") / 1e3, 1),
            "broker_peak_rss_MB": round(status_kb(broker, "VmHWM") / 1e3, 1),
            "device_hosts_rss_MB": round(sum(status_kb(h.proc.pid, "VmRSS") for h in hosts) / 1e3, 1),
            "refused": int(counters.get("sfp_messages_refused_total", 0)),
            "errors": errors,
            # every update counted once: no device twice in a round, none that was not selected
            "each_once": all(r["distinct"] for r in rows),
        }
        return result
    finally:
        for h in hosts:
            if h.proc.poll() is None:
                try:
                    h.send(op="quit")
                except (BrokenPipeError, OSError):
                    pass
        for h in hosts:
            try:
                h.proc.wait(60)
            except subprocess.TimeoutExpired:
                h.proc.kill()
        fed.close()


# ---------------------------------------------------------------------------------------------- report
def per_round(result: dict, key: str) -> float:
    return float(np.mean([r[key] for r in result["rounds"]]))


def table(results: list[dict]) -> list[str]:
    lines = ["| devices | churn | enrolled / s | round s | slowest device s | overhead s | server CPU s / round "
             "| server CPU ms / device / round | server peak MB | broker peak MB | device hosts MB "
             "| broker MB in + out / round | device messages / round | lost | refused | each once |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        cpu = per_round(r, "server_cpu_s")
        lines.append(
            f"| {r['devices']} | {r['churn']:g} | {r['enrollment']['per_second']:.1f} | {per_round(r, 'seconds'):.1f} "
            f"| {per_round(r, 'slowest_device_s'):.1f} | {per_round(r, 'overhead_s'):.2f} | {cpu:.1f} "
            f"| {1e3 * cpu / r['devices']:.0f} | {r['server_peak_rss_MB']:.0f} | {r['broker_peak_rss_MB']:.0f} "
            f"| {r['device_hosts_rss_MB']:.0f} "
            f"| {per_round(r, 'broker_read_MB') + per_round(r, 'broker_written_MB'):.1f} "
            f"| {per_round(r, 'device_messages'):.0f} | {sum(len(x['lost']) for x in r['rounds'])} "
            f"| {r['refused']} | {'yes' if r['each_once'] else '**no**'} |")
    return lines


def churn_table(result: dict) -> list[str]:
    lines = ["| round | selected | updates | selected, left while it ran | lost | told to leave after it "
             "| started again after it | seconds |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rounds"]:
        lines.append(f"| {r['round']} | {r['selected']} | {r['participants']} | {len(r['left_during'])} | "
                     f"{len(r['lost'])} | {len(r['left'])} | {len(r['back'])} | {r['seconds']:.1f} |")
    return lines


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steady = [r for r in results if not r["churn"]]
    n = np.array([r["devices"] for r in steady], float)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    panels = [
        ("server CPU per round (s)", [per_round(r, "server_cpu_s") for r in steady]),
        ("round wall time (s)", [per_round(r, "seconds") for r in steady]),
        ("broker MB in + out per round", [per_round(r, "broker_read_MB") + per_round(r, "broker_written_MB")
                                          for r in steady]),
    ]
    for ax, (label, values) in zip(axes, panels):
        values = np.array(values)
        ax.plot(n, values, marker="o", label="measured")
        ax.plot(n, values[0] * n / n[0], ls="--", color="gray", lw=1, label=f"linear from N={int(n[0])}")
        ax.set(xlabel="devices", ylabel=label, xlim=(0, None), ylim=(0, None), title=label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("One coordinator, one body worker, one Mosquitto: cost against fleet size")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", default="10,100,300")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--churn", type=float, default=0.1, help="fraction leaving each round, in a run at the largest N")
    ap.add_argument("--hosts", type=int, default=4, help="device processes")
    ap.add_argument("--parallel", type=int, default=8, help="enrollments at once per host")
    ap.add_argument("--keepalive", type=int, default=30)
    ap.add_argument("--model", default="models/vit-fmnist.pth")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fleet-scale")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "fleet-scale")
    ap.add_argument("--resume", action="store_true", help="keep the fleets already in <out>/results.json")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in a.devices.split(",")]
    say = lambda line: print(line, flush=True)            # noqa: E731
    machine = machine_facts("bench/fleet_scale.py", [x for x in sys.argv[1:] if x != "--resume"],
                            broker="Mosquitto, loopback, TLS")
    saved = a.out / "results.json"
    done = {(r["devices"], r["churn"]): r for r in json.loads(saved.read_text())["results"]} if (
        a.resume and saved.exists()) else {}
    results = []
    runs = [(n, 0.0) for n in sizes] + ([(max(sizes), a.churn)] if a.churn else [])
    for n, churn in runs:               # each fleet written down when it is done: a long run can be resumed
        if (n, churn) in done:
            results.append(done[(n, churn)])
            continue
        say(f"{n} devices" + (f", churn {churn:g}" if churn else "") + ":")
        start = time.time()
        results.append(run_fleet(n, a, a.work / f"n{n}{'-churn' if churn else ''}", churn, say))
        results[-1]["wall_s"] = round(time.time() - start, 1)
        saved.write_text(json.dumps({"machine": machine, "results": results}, indent=1) + "\n")
    lines = [f"Machine: {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}; Mosquitto on "
             f"loopback with TLS and an account per device; `sfp-cloud serve` (coordinator + one body worker, "
             f"in-house backbone, CPU); devices in {a.hosts} processes, 2 training images and 1 test image each; "
             f"{a.rounds} rounds per fleet. Command: `{machine['command']}`.", "", *table(results)]
    churned = [r for r in results if r["churn"]]
    if churned:
        lines += ["", f"Churn at {churned[0]['devices']} devices ({churned[0]['churn']:g} leave after each round, "
                  "the previous round's leavers come back):", "", *churn_table(churned[0])]
    (a.out / "results.md").write_text("\n".join(lines) + "\n")
    plot(results, a.out / "fleet_scale.png")
    say("\n".join(lines))


if __name__ == "__main__":
    main()
