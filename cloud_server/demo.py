"""`sfp-cloud demo`: a whole federation on this machine, as it runs for real, one process per part.

A Mosquitto broker on loopback, secured as `sfp-cloud secure` sets one up (TLS with a local CA, an account per
device, ACLs; `tls=False` for an open one); `sfp-cloud serve` (coordinator + body worker); N devices, each given a
single-use token, enrolled with `sfp-edge enroll` on its own non-IID share of MNIST 5k (Dirichlet label skew,
written as image folders) and run with `sfp-edge run`. Progress comes from the broker (the round summaries the
server retains); at the end the fleet table, `rounds.md`, `rounds.json` and `federation.png` (accuracy and bytes
per round) land in the output folder. The backbone is the in-house ViT pretrained on Fashion-MNIST (`sfp-pretrain`), fine-tuned on MNIST.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from cloud_server.broker import LocalBroker, free_port
from cloud_server.fleet import format_fleet, format_round, read_retained
from cloud_server.security import SERVICE, Security, secure
from sfp_common.datasets import load_dataset, write_device_folder
from sfp_common.errors import ConfigError
from sfp_common.partition import partition, split_local_test
from wire_protocol.link import BrokerAccess, Link
from wire_protocol.topics import Topics

FEDERATION = "demo"


def write_shares(out: Path, devices: int, alpha: float | None, seed: int) -> tuple[list[Path], list[str]]:
    """Each device's own share of MNIST 5k's training set, with a local test split, as image folders."""
    data = load_dataset("mnist5k")
    rng = np.random.default_rng(seed)
    folders = []
    for i, shard in enumerate(partition(data.train.labels, devices, alpha, rng)):
        train, test = split_local_test(shard, 0.2, rng)
        folders.append(write_device_folder(out / f"device-{i}" / "data", data.train.subset(train),
                                           data.train.subset(test), data.classes))
    return folders, data.classes


BENCHMARK = Path(__file__).resolve().parents[1] / "bench" / "results" / "comparison" / "summary.json"
REFERENCE_RUNS = {"sfprompt": "SFPrompt", "sfprompt-split-only": "split-only", "fl": "FL (whole model)"}


def benchmark_references(alpha: float | None, path: Path = BENCHMARK) -> dict[str, float]:
    """Final accuracies from the committed comparison (bench/results/comparison) for the demo's partition, and the
    prompts + tail central ceiling: the lines the demo's result is read against. Empty without the file."""
    if not path.exists():
        return {}
    summary = json.loads(path.read_text())
    partition = "iid" if alpha is None else f"dir{alpha:g}"
    rows = {r["run"]: r for r in summary["partitions"].get(partition, summary["partitions"].get("iid", []))}
    out = {label: rows[run]["final_accuracy"] for run, label in REFERENCE_RUNS.items() if run in rows}
    ceiling = rows.get("sfprompt", {}).get("ceiling_accuracy")
    if ceiling is not None:
        out["central ceiling (prompts + tail)"] = ceiling
    return out


def plot(rows: list[dict], path: Path, references: dict[str, float], alpha: float | None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rounds = [r["round"] for r in rows]
    fig, (acc, traffic) = plt.subplots(1, 2, figsize=(11, 4.5))
    acc.plot(rounds, [100 * (r.get("accuracy") or np.nan) for r in rows], marker="o", color="C0", lw=2,
             label="this demo: devices' local test data")
    for (label, value), style in zip(references.items(), ("--", "-.", ":", (0, (5, 1)))):
        acc.axhline(100 * value, color="gray", ls=style, lw=1, label=f"benchmark: {label}")
    partition = "IID" if alpha is None else f"Dirichlet {alpha:g}"
    acc.set(xlabel="round", ylabel="accuracy (%)", ylim=(0, 100), xticks=rounds,
            title=f"Accuracy of the global model ({partition})")
    acc.grid(alpha=0.3)
    acc.legend(fontsize=7, loc="lower right",
               title="benchmark: bench/results/comparison, 10 clients,\n10 rounds, central test set" if references
               else None, title_fontsize=7)
    traffic.bar(np.array(rounds) - 0.2, [r.get("payload_up", 0) / 1e6 for r in rows], 0.4, label="up")
    traffic.bar(np.array(rounds) + 0.2, [r.get("payload_down", 0) / 1e6 for r in rows], 0.4, label="down")
    traffic.set(xlabel="round", ylabel="MB per device", title="Tensor bytes per device and round")
    traffic.legend(loc="center right")
    traffic.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def rounds_table(rows: list[dict]) -> str:
    lines = ["| round | devices | accuracy | loss | KB up / device | KB down / device | seconds |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = f"{r['accuracy']:.4f}" if r.get("accuracy") is not None else "-"
        lines.append(f"| {r['round']} | {len(r['participants'])} | {acc} | {r.get('train_loss', float('nan')):.4f} | "
                     f"{r.get('payload_up', 0) / 1e3:.1f} | {r.get('payload_down', 0) / 1e3:.1f} | "
                     f"{r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


class LocalFederation:
    """A whole federation on this machine, one process per part: a Mosquitto broker (secured as `sfp-cloud secure`
    sets one up, unless `tls=False`), `sfp-cloud serve`, and devices each given a single-use token, enrolled with
    `sfp-edge enroll` and run with `sfp-edge run`. Parts can be killed, frozen and restarted (bench/chaos.py)."""

    def __init__(self, out: Path, shares: list[Path], classes: list[str], serve_args: list[str],
                 profile: str = "auto", tls: bool = True, device_args: list[str] = ()) -> None:
        self.out, self.shares, self.classes, self.profile, self.tls = out, shares, classes, profile, tls
        self.serve_args, self.device_args = serve_args, list(device_args)
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "SFP_LOG": "WARNING"}
        self.folder, self.port = out / "server" / "security", free_port()
        self.access, self.ca = BrokerAccess(), []
        if tls:
            self.access = BrokerAccess(SERVICE, secure(self.folder, FEDERATION, ("localhost", "127.0.0.1"),
                                                       self.port), str(self.folder / "ca.crt"))
            self.ca = ["--ca", str(self.folder / "ca.crt")]
        self.broker = LocalBroker(port=self.port, log=out / "broker.log", security=self.folder if tls else None)
        self.url = self.broker.url
        self.procs: list[subprocess.Popen] = []
        self.devices: list[subprocess.Popen | None] = [None] * len(shares)
        self.server: subprocess.Popen | None = None
        self.summaries: queue.Queue[dict] = queue.Queue()
        self.watcher: Link | None = None
        self.topics = Topics(FEDERATION)

    def spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", *args], env=self.env, stderr=subprocess.STDOUT,
                                stdout=open(self.out / f"{name}.log", "a"))
        self.procs.append(proc)
        return proc

    def start_broker(self) -> None:
        self.broker.start()

    def start_server(self) -> None:
        self.server = self.spawn("server", ["cloud_server.cli", "serve", "--broker", self.url, "--federation",
                                            FEDERATION, "--classes", ",".join(self.classes), "--state",
                                            str(self.out / "server"), "--broker-reload",
                                            f"kill -HUP {self.broker.process.pid}", *self.serve_args])

    def start_dashboard(self, port: int = 0) -> str:
        """`sfp-cloud dashboard` for this federation; returns the fleet page's address."""
        args = ["cloud_server.cli", "dashboard", "--broker", self.url, "--federation", FEDERATION, "--port", str(port)]
        if self.tls:
            args += ["--state", str(self.out / "server"), "--broker-reload", f"kill -HUP {self.broker.process.pid}"]
        proc = subprocess.Popen([sys.executable, "-m", *args], env=self.env, stdout=subprocess.PIPE,
                                stderr=open(self.out / "dashboard.log", "a"), text=True)
        self.procs.append(proc)
        line = proc.stdout.readline()           # "fleet page: http://...", or nothing when it failed
        if not line.startswith("fleet page: "):
            raise ConfigError(f"the fleet page did not start; see {self.out / 'dashboard.log'}")
        return line.split()[2]

    def enroll(self, i: int) -> str:
        token = Security(self.folder, FEDERATION, reload=self.broker.reload).issue_token(f"device-{i}", 3600)
        enrolled = subprocess.run(
            [sys.executable, "-m", "edge_client.cli", "enroll", "--broker", self.url, "--token", token, *self.ca,
             "--profile", self.profile, "--data", str(self.shares[i]), "--federation", FEDERATION,
             "--device-id", f"device-{i}", "--state", str(self.device_state(i)), "--timeout", "600",
             # the demo's devices are the user's own: asked to let the server keep tokens, they agree
             *(["--let-server-keep-tokens"] if "--server-keeps-tokens" in self.serve_args else [])],
            env=self.env, capture_output=True, text=True)
        if enrolled.returncode != 0:
            raise ConfigError(f"device-{i} could not enroll: {enrolled.stderr.strip()}")
        return enrolled.stdout.strip()

    def device_state(self, i: int) -> Path:
        return self.out / f"device-{i}" / "state"

    def start_device(self, i: int) -> None:
        self.devices[i] = self.spawn(f"device-{i}", ["edge_client.cli", "run", "--state", str(self.device_state(i)),
                                                     *self.device_args])

    def watch(self) -> None:
        """Round summaries, as the server retains them, into `summaries`."""
        self.watcher = Link(self.url, f"{FEDERATION}-watcher", access=self.access).connect()
        self.watcher.subscribe_json(self.topics.round_summary_filter(), lambda topic, value: self.summaries.put(value))

    def fleet(self) -> str:
        return format_fleet(self.topics, read_retained(self.watcher, self.topics, 1.0))

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if self.watcher is not None:
            self.watcher.close()
        self.broker.stop()


def run_demo(out: Path, model: str, devices: int, rounds: int, alpha: float | None, seed: int, prompts: int,
             profile: str, say: Callable[[str], None] = print, tls: bool = True,
             serve_args: tuple[str, ...] = ()) -> list[dict]:
    """`serve_args`: recipe options for `sfp-cloud serve` (none: SFPrompt's default recipe)."""
    if not Path(model).is_file():
        raise ConfigError(f"backbone {model} not found: pretrain it with `make backbone` (sfp-pretrain)")
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    say(f"writing {devices} non-IID shares of MNIST 5k (Dirichlet alpha={alpha})")
    shares, classes = write_shares(out, devices, alpha, seed)
    fed = LocalFederation(out, shares, classes, ["--model", model, "--prompts", str(prompts), "--rounds",
                                                 str(rounds), "--seed", str(seed), "--min-devices", str(devices),
                                                 "--deadline", "900", *serve_args], profile, tls)
    fed.start_broker()
    say(f"broker: Mosquitto at {fed.url}" + (f" (TLS, CA {fed.folder / 'ca.crt'}, an account per device)"
                                               if tls else ""))
    try:
        fed.watch()
        fed.start_server()
        try:
            say(f"fleet page: {fed.start_dashboard()} (open it in a browser: the fleet, live from the broker)")
        except ConfigError as err:          # the federation runs without it
            say(f"fleet page: not started: {err}")
        say("server: exporting the device bundle (checked against PyTorch), starting the body worker")
        for i in range(devices):
            say(f"device-{i}: {fed.enroll(i)}")
            fed.start_device(i)
        rows: list[dict] = []
        while len(rows) < rounds:
            try:
                row = fed.summaries.get(timeout=1.0)
            except queue.Empty:
                if fed.server.poll() is not None:
                    raise ConfigError(f"the server stopped early; see {out / 'server.log'}") from None
                continue
            rows.append(row)
            say(format_round(row, rounds))
        fed.server.wait(60)
        fleet = fed.fleet()
    finally:
        fed.close()
    rows.sort(key=lambda r: r["round"])
    (out / "rounds.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out / "rounds.md").write_text(rounds_table(rows))
    references = benchmark_references(alpha)
    plot(rows, out / "federation.png", references, alpha)
    say("")
    say(fleet)
    say("")
    say(rounds_table(rows))
    final = rows[-1].get("accuracy")
    say(f"final accuracy on the devices' local test data: {'-' if final is None else f'{final:.3f}'}")
    if references:
        say("for reference, from the committed benchmark (bench/results/comparison: 10 clients, 10 rounds, the central "
            "test set): " + ", ".join(f"{label} {value:.3f}" for label, value in references.items()))
    say(f"{devices} devices, {rounds} rounds in {time.time() - start:.0f} s; table, JSON and federation.png in {out}")
    return rows
