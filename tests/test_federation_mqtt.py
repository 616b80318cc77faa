"""The federation over a real Mosquitto, as separate processes: `sfp-cloud serve`, body workers, and devices
enrolled with `sfp-edge enroll` and running `sfp-edge run`. It must give the in-process reference federation's
numbers: the same global prompts and tail after every round, and per device exactly the reference's tensor bytes
(the envelope's overhead on top, measured)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from click.testing import CliRunner

from cloud_server.broker import LocalBroker, free_port
from cloud_server.cli import main as cloud_main
from export.backbone import save_checkpoint
from sfp_common.split_spec import SplitSpec
from sfp_common.datasets import write_device_folder
from simulation.engine import Federation, SimConfig, state_of
from sfp_common.bundle import OptimizerSpec
from sfp_common.recipe import Recipe
from wire_protocol.link import BrokerAccess, Link, LinkError, wait_for
from wire_protocol.topics import Topics

import ejabberd_cluster

DEVICES = 3
ROUNDS = 2
# SFPrompt's recipe, with what the server is told below: a smaller learning rate, one split pass, weight decay.
TRAIN = Recipe(lr=3e-3, optimizer=OptimizerSpec("adamw", weight_decay=0.01), batch_size=16, epochs=1, wire="fp16")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny digits ViT checkpoint, the reference federation's run, and each client's share as a data folder."""
    root = tmp_path_factory.mktemp("federation")
    kwargs = {"img_size": 8, "patch_size": 4, "in_chans": 1, "embed_dim": 32, "depth": 3, "num_heads": 2}
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **kwargs)
    cfg_dict = {"input_size": [1, 8, 8], "mean": [0.3], "std": [0.35], "interpolation": "bilinear",
                "num_classes": 10}
    checkpoint = str(save_checkpoint(vit, root / "tiny.pth", "vit_tiny_patch16_224", kwargs, cfg_dict))
    fed = reference_federation(checkpoint, TRAIN)
    initial = state_of(fed.client_params)
    reference = [fed.run_round(r) for r in range(1, ROUNDS + 1)]
    shares = []
    for c, (train, test) in enumerate(fed.client_indices):
        shares.append(write_device_folder(root / f"data-{c}", fed.train_set.subset(train),
                                          fed.train_set.subset(test), [str(i) for i in range(10)]))
    return {"root": root, "checkpoint": checkpoint, "initial": initial, "reference": reference,
            "final": state_of(fed.client_params), "shares": shares, "classes": fed.train_set}


def reference_federation(checkpoint: str, recipe: Recipe, head_blocks: int = 0,
                         cuts: tuple[int, ...] = ()) -> Federation:
    cfg = SimConfig(method="sfprompt", dataset="digits", model=checkpoint, clients=DEVICES, rounds=ROUNDS,
                    alpha=0.5, seed=7, spec=SplitSpec(2, head_blocks, 0), recipe=recipe, train_samples=300,
                    client_head_blocks=cuts)
    return Federation(cfg)


def profile_file(folder: Path, backend: str, batch_size: int = TRAIN.batch_size, wire: str = TRAIN.wire,
                 max_head_blocks: int = 0) -> Path:
    """The devices' profile: the reference's batch size and wire dtype, a small packet limit (chunking on)."""
    path = folder / f"profile-{backend}-{batch_size}-{wire}-k{max_head_blocks}.json"
    path.write_text(json.dumps({
        "name": f"test-{backend}", "description": "test device", "match": {}, "backend": backend,
        "providers": ["CPUExecutionProvider"], "threads": 1, "batch_size": batch_size,
        "max_head_blocks": max_head_blocks, "wire": wire, "max_packet": 16384, "keepalive": 5}))
    return path


def device_python(backend: str) -> str:
    return os.environ["SFP_ORT_TRAINING_PYTHON"] if backend == "training" else sys.executable


def backends() -> list[str]:
    """Device 2 on the training backend when its environment is there (`make test` provides it)."""
    training = os.environ.get("SFP_ORT_TRAINING_PYTHON")
    return ["portable", "portable", "training" if training and Path(training).exists() else "portable"]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "SFP_LOG": "WARNING"}


class Run:
    """One federation: the server (with `workers` body workers in all), the devices; everything torn down.

    `tls`: its own broker, secured the way `sfp-cloud secure` sets one up (TLS, accounts, ACLs) instead of the
    session's open one. Either way each device enrolls with its own single-use token from `sfp-cloud token`."""

    def __init__(self, setup: dict, broker: str, name: str, workers: int = 1, rounds: int = ROUNDS,
                 batch_sizes: tuple[int, ...] = (TRAIN.batch_size,) * DEVICES, tls: bool = False,
                 own_broker: bool = False, wire: str = TRAIN.wire, head_blocks: int = 0,
                 device_cuts: tuple[int, ...] = (0,) * DEVICES, keep_tokens: bool = False,
                 device_broker: str | None = None, login: bool = False) -> None:
        """`device_broker`: where the devices connect, if not where the server does (another node of a cluster).
        `login`: the server and its workers log in as sfp-server (a broker that takes no anonymous clients)."""
        self.setup, self.name = setup, name
        self.folder = setup["root"] / name
        self.folder.mkdir()
        self.procs: list[subprocess.Popen] = []
        state, security = self.folder / "server", self.folder / "server" / "security"
        cli = [sys.executable, "-m", "cloud_server.cli"]
        self.own_broker, reload, ca = None, [], []
        if own_broker and not tls:
            self.own_broker = LocalBroker(log=self.folder / "broker.log")
            broker = self.own_broker.start()
        if tls:
            port = free_port()
            made = subprocess.run([*cli, "secure", "--state", str(state), "--federation", name, "--hostname",
                                   "127.0.0.1", "--port", str(port)], env=ENV, capture_output=True, text=True)
            assert made.returncode == 0, made.stderr
            self.own_broker = LocalBroker(port=port, security=security, log=self.folder / "broker.log")
            broker = self.own_broker.start()
            reload = ["--broker-reload", f"kill -HUP {self.own_broker.process.pid}"]
            ca = ["--ca", str(security / "ca.crt")]
        self.broker = broker
        service = []
        if login:
            (self.folder / "server.password").write_text("service secret\n")
            service = ["--password-file", str(self.folder / "server.password")]
        model = ["--model", setup["checkpoint"], "--classes", "10", "--prompts", "2", "--seed", "7",
                 "--head-blocks", str(head_blocks), "--federation", name, "--broker", broker]
        self.server_args = [*cli, "serve", *model, *reload, *service, "--state", str(state),
                            "--rounds", str(rounds), "--optimizer", "adamw", "--lr", str(TRAIN.lr),
                            "--weight-decay", str(TRAIN.optimizer.weight_decay), "--epochs", "1",
                            "--keep", str(TRAIN.keep), "--min-devices", str(DEVICES),
                            "--deadline", "60", "--max-packet", "16384",
                            "--backends", ",".join(sorted(set(backends()))),
                            *(["--server-keeps-tokens"] if keep_tokens else [])]
        self.server = self.spawn("server", self.server_args)
        service = [*ca, "--password-file", str(security / "server.password")] if tls else service
        for w in range(workers - 1):
            self.spawn(f"worker{w}", [*cli, "worker", *model, *service, "--worker-id", f"extra{w}",
                                      "--max-packet", "16384"])
        self.devices, self.enrollments = [], []
        for c, backend in enumerate(backends()):
            device_state = self.folder / f"device-{c}"
            token = subprocess.run([*cli, "token", "--state", str(state), "--federation", name, "--device",
                                    f"dev-{c}", *reload], env=ENV, capture_output=True, text=True)
            assert token.returncode == 0, token.stderr
            enrolled = subprocess.run(
                [device_python(backend), "-m", "edge_client.cli", "enroll", "--broker", device_broker or broker, *ca,
                 "--token", token.stdout.strip(),
                 "--profile", str(profile_file(self.folder, backend, batch_sizes[c], wire, device_cuts[c])),
                 "--data", str(setup["shares"][c]), "--federation", name, "--device-id", f"dev-{c}",
                 "--state", str(device_state),     # the default wait: the server may still be exporting
                 *(["--let-server-keep-tokens"] if keep_tokens else [])],
                env={**ENV, "SFP_LOG": "INFO"}, capture_output=True, text=True, timeout=420)
            assert enrolled.returncode == 0, enrolled.stderr
            self.enrollments.append(enrolled.stderr)
            self.devices.append(self.spawn(f"device{c}", [device_python(backend), "-m", "edge_client.cli", "run",
                                                          "--state", str(device_state), "--round-timeout", "20"]))

    def spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "w")
        proc = subprocess.Popen(args, env=ENV, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def restart_server(self) -> None:
        self.server = self.spawn("server-restarted", self.server_args)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.folder.glob("*.log")))

    def finish(self, timeout: float = 300) -> list[dict]:
        try:
            self.server.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the server did not finish its rounds:\n{self.logs()}")
        assert self.server.returncode == 0, self.logs()
        return [json.loads(line) for line in (self.folder / "server" / "rounds.jsonl").read_text().splitlines()]

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if self.own_broker is not None:
            self.own_broker.stop()


def global_state(folder: Path) -> dict[str, np.ndarray]:
    with np.load(folder / "server" / "checkpoint.npz") as npz:
        return {k: npz[k] for k in npz.files if k != "__round__"}


def worst_error(got: dict, want: dict) -> float:
    assert set(got) == set(want)
    return max(float(np.abs(got[k] - v).max() / np.abs(v).max()) for k, v in want.items())


def retained(broker: str, topic: str) -> dict:
    seen = {}
    link = Link(broker, f"probe-{time.time_ns()}").connect()
    link.subscribe_json(topic, lambda t, v: seen.__setitem__(t, v))
    wait_for(lambda: bool(seen), 3)
    time.sleep(0.3)                   # the rest of the retained burst
    link.close()
    return seen


@pytest.mark.parametrize("workers", [1, 2])
def test_the_mqtt_federation_reproduces_the_reference(setup, broker, workers):
    run = Run(setup, broker, f"fed-w{workers}", workers)
    try:
        summaries = run.finish()
        final = global_state(run.folder)
        error = worst_error(final, setup["final"])
        print(f"{workers} body worker(s), devices on {backends()}: worst relative error of the global prompts and "
              f"tail after {ROUNDS} rounds {error:.1e}")
        assert error <= 1e-4, run.logs()
        assert worst_error(setup["initial"], setup["final"]) > 1e-3       # training did move them
        for summary, ref in zip(summaries, setup["reference"]):
            assert summary["participants"] == [f"dev-{c}" for c in range(DEVICES)]
            assert summary["kept_samples"] == ref["kept_samples"]
            # the tensors' bytes: exactly the reference meter's (mean per device), up and down
            assert summary["payload_up"] == ref["bytes_up"] and summary["payload_down"] == ref["bytes_down"]
            assert summary["accuracy"] is not None and summary["evaluated_on"] > 0
        fleet = CliRunner().invoke(cloud_main, ["fleet", "--broker", broker, "--federation", run.name])
        assert fleet.exit_code == 0 and all(f"dev-{c}" in fleet.output for c in range(DEVICES)), fleet.output
        assert f"round {ROUNDS}/{ROUNDS}" in fleet.output and "participants" in fleet.output
        served = retained(broker, Topics(run.name).worker_status("+"))
        assert len(served) == workers and all(w["forward"] > 0 and w["backward"] > 0 for w in served.values())
        statuses = retained(broker, Topics(run.name).all_status())
        last = [s["last_round"] for s in statuses.values()]
        assert len(last) == DEVICES and all(r["round"] == ROUNDS for r in last)
        # each device's own count, averaged as the reference averages its clients' meters
        assert np.mean([r["payload_up"] for r in last]) == setup["reference"][-1]["bytes_up"]
        assert np.mean([r["payload_down"] for r in last]) == setup["reference"][-1]["bytes_down"]
        overhead = max(r["mqtt_up"] / r["payload_up"] - 1 for r in last)
        print(f"round {ROUNDS}, tensor bytes up per device {sorted(r['payload_up'] for r in last)} (mean = the "
              f"reference meter's), down {sorted(r['payload_down'] for r in last)}; envelopes and chunk headers "
              f"add at most {overhead:.1%} to what goes up")
        assert 0 < overhead < 0.5
    finally:
        run.close()
    presences = retained(broker, Topics(run.name).all_presence())
    assert len(presences) == DEVICES
    assert {(p["state"], p["cause"]) for p in presences.values()} == {("offline", "stopped")}  # a clean stop says so
    assert {s["activity"] for s in retained(broker, Topics(run.name).all_status()).values()} == {"stopped"}


def test_devices_cut_where_their_profiles_afford_give_the_reference_numbers(setup, broker):
    """One federation, three cuts (issue 15): the split allows two head blocks, and devices whose profiles run 0, 1
    and 2 each get a bundle cut there; the body serves each request from its device's cut. The global tensors and
    every round's bytes equal the reference federation run with the same per-client cuts."""
    fed = reference_federation(setup["checkpoint"], TRAIN, head_blocks=2, cuts=(0, 1, 2))
    reference = [fed.run_round(r) for r in range(1, ROUNDS + 1)]
    run = Run(setup, broker, "fed-cuts", head_blocks=2, device_cuts=(0, 1, 2))
    try:
        summaries = run.finish()
        error = worst_error(global_state(run.folder), state_of(fed.client_params))
        print(f"devices cut after 0, 1 and 2 head blocks: worst relative error of the global prompts and tail after "
              f"{ROUNDS} rounds {error:.1e}")
        assert error <= 1e-4, run.logs()
        for summary, ref in zip(summaries, reference):
            assert summary["kept_samples"] == ref["kept_samples"]
            assert summary["payload_up"] == ref["bytes_up"] and summary["payload_down"] == ref["bytes_down"]
        assert reference[-1]["bytes_down"] > setup["reference"][-1]["bytes_down"]   # dL/dtokens for cuts 1 and 2
        registry = json.loads((run.folder / "server" / "registry.json").read_text())["devices"]
        assert [d["head_blocks"] for d in registry] == [0, 1, 2]
        # the cuts other than the federation's were exported at enrollment, and their devices told so
        told = ["exporting the portable bundle cut after" in e for e in run.enrollments]
        assert told == [True, True, False], run.enrollments
    finally:
        run.close()


def test_int8_tokens_through_the_mqtt_federation_give_the_reference_numbers(setup, broker):
    """Devices whose profile sends int8 smashed tokens (and receives int8 gradients): the global tensors and
    every round's bytes equal the reference federation's at int8, so its measured accuracy cost (three seeds,
    bench/results/precision/) is the MQTT federation's."""
    fed = reference_federation(setup["checkpoint"], TRAIN.but(wire="int8"))
    reference = [fed.run_round(r) for r in range(1, ROUNDS + 1)]
    run = Run(setup, broker, "fed-int8", wire="int8")
    try:
        summaries = run.finish()
        error = worst_error(global_state(run.folder), state_of(fed.client_params))
        print(f"int8 tokens: worst relative error of the global prompts and tail after {ROUNDS} rounds {error:.1e}")
        assert error <= 1e-4, run.logs()
        for summary, ref in zip(summaries, reference):
            assert summary["kept_samples"] == ref["kept_samples"]
            assert summary["payload_up"] == ref["bytes_up"] and summary["payload_down"] == ref["bytes_down"]
        fp16 = setup["reference"][-1]
        assert reference[-1]["bytes_up"] < fp16["bytes_up"]        # int8 tokens went up, not fp16 ones
    finally:
        run.close()


def test_tokens_kept_by_the_server_give_the_reference_numbers_with_ids_and_prompts_up(setup, broker):
    """The opt-in traffic (issue 15): `serve --server-keeps-tokens` and devices enrolled with
    `--let-server-keep-tokens`. Round 1 sends every batch whole with its ids and the worker keeps the tokens;
    round 2 sends ids and prompts only. The global tensors equal the plain federation's reference (the same numbers
    are trained), and every round's bytes equal the reference run with the same opt-in."""
    fed = reference_federation(setup["checkpoint"], TRAIN.but(server_keeps_tokens=True))
    reference = [fed.run_round(r) for r in range(1, ROUNDS + 1)]
    run = Run(setup, broker, "fed-kept", keep_tokens=True)
    try:
        summaries = run.finish()
        error = worst_error(global_state(run.folder), setup["final"])
        print(f"tokens kept by the server: worst relative error of the global prompts and tail after {ROUNDS} "
              f"rounds {error:.1e}; tensor bytes up per device {[s['payload_up'] for s in summaries]} against "
              f"{[r['bytes_up'] for r in setup['reference']]} without")
        assert error <= 1e-4, run.logs()
        for summary, ref in zip(summaries, reference):
            assert summary["payload_up"] == ref["bytes_up"] and summary["payload_down"] == ref["bytes_down"]
        assert summaries[-1]["payload_up"] < 0.5 * setup["reference"][-1]["bytes_up"]
        # round 2's batches (one pass over the kept half), each rebuilt by the one worker
        rebuilt = sum(-(-int(np.ceil(TRAIN.keep * c.num_train)) // TRAIN.batch_size) for c in fed.clients)
        assert [w["rebuilt"] for w in retained(broker, Topics(run.name).worker_status("+")).values()] == [rebuilt]
    finally:
        run.close()


def test_a_clustered_broker_carries_the_federation_between_its_nodes(setup):
    """Issue 16: a real clustered broker, two ejabberd nodes on loopback (tests/ejabberd_cluster.py). The server and
    its body worker on node b, the three devices on node a: every enrollment, round plan, split batch, update and
    evaluation crosses the cluster, and the federation ends where the reference does, byte for byte. ejabberd has
    no shared subscriptions: the worker reads that from the broker's CONNACK and takes the forwards on a plain
    subscription (one worker per federation there)."""
    why = ejabberd_cluster.available()
    if why:
        pytest.skip(why)
    cluster = ejabberd_cluster.EjabberdCluster().start()
    run = None
    try:
        run = Run(setup, cluster.urls["b"], "fed-cluster", device_broker=cluster.urls["a"], login=True)
        summaries = run.finish()
        error = worst_error(global_state(run.folder), setup["final"])
        print(f"ejabberd cluster, devices on node a, server on node b: worst relative error of the global prompts and "
              f"tail after {ROUNDS} rounds {error:.1e}")
        assert error <= 1e-4, run.logs()
        for summary, ref in zip(summaries, setup["reference"]):
            assert summary["participants"] == [f"dev-{c}" for c in range(DEVICES)]
            assert summary["payload_up"] == ref["bytes_up"] and summary["payload_down"] == ref["bytes_down"]
            assert summary["evaluated_on"] > 0
        assert "offers no shared subscriptions" in run.logs()
    finally:
        if run is not None:
            run.close()
        cluster.stop()


def watch(broker: str, name: str) -> tuple[Link, dict]:
    """The devices' retained status and presence as they change, by device id (presence as `presence`, `cause`)."""
    seen: dict = {}
    watcher = Link(broker, f"watch-{name}").connect()
    watcher.subscribe_json(Topics(name).all_status(),
                           lambda topic, value: seen.setdefault(value["device"], {}).update(value))
    watcher.subscribe_json(Topics(name).all_presence(), lambda topic, value: seen.setdefault(
        value["device"], {}).update(presence=value["state"], cause=value.get("cause")))
    return watcher, seen


def completed_rounds(run: Run) -> list[int]:
    path = run.folder / "server" / "rounds.jsonl"
    return [json.loads(line)["round"] for line in path.read_text().splitlines()] if path.exists() else []


def test_a_device_killed_mid_split_training_is_left_out_and_rejoins_after_a_restart(setup, broker):
    """Killed during split training, a device shows offline (its Last Will replaces its presence only: the
    dashboard keeps its round and what it was doing) and the round completes with the others; started again from
    its state folder it takes part in the next round."""
    name = "fed-kill"
    watcher, seen = watch(broker, name)
    run = Run(setup, broker, name, rounds=2, batch_sizes=(16, 2, 16))     # dev-1's round takes a while
    try:
        assert wait_for(lambda: seen.get("dev-1", {}).get("activity") == "split training", 120), run.logs()
        killed_during = seen["dev-1"]["activity"]
        run.devices[1].kill()                 # SIGKILL: no goodbye; the broker publishes its Last Will
        assert wait_for(lambda: seen["dev-1"]["presence"] == "offline", 10), seen["dev-1"]
        assert seen["dev-1"]["cause"] == "lost" and seen["dev-1"]["activity"] == "split training"
        assert seen["dev-1"]["round"] == 1 and seen["dev-1"]["bytes_received"] > 0, seen["dev-1"]   # the round plan
        fleet = CliRunner().invoke(cloud_main, ["fleet", "--broker", broker, "--federation", name])
        line = next(row for row in fleet.output.splitlines() if row.startswith("dev-1 "))
        assert line.split()[1:4] == ["lost", "split", "training"], fleet.output
        rounds_file = run.folder / "server" / "rounds.jsonl"
        assert wait_for(lambda: rounds_file.exists(), 60), run.logs()
        first = json.loads(rounds_file.read_text().splitlines()[0])
        assert first["selected"] == ["dev-0", "dev-1", "dev-2"] and first["participants"] == ["dev-0", "dev-2"]
        # round 2 waits for all three (--min-devices 3): the restarted device rejoins
        run.spawn("device1-restarted", [device_python(backends()[1]), "-m", "edge_client.cli", "run",
                                        "--state", str(run.folder / "device-1")])
        _, second = run.finish(120)
        assert second["participants"] == ["dev-0", "dev-1", "dev-2"], second
        print(f"dev-1 killed during '{killed_during}': presence offline (lost), its status kept; round 1 "
              f"aggregated from {first['participants']} in {first['seconds']} s; restarted, it took part in round 2")
    finally:
        run.close()
        watcher.close()


def test_the_federation_over_tls_with_per_device_accounts_reproduces_the_reference(setup, broker):
    """The same federation on a secured broker: TLS against the federation's CA, each device on the account it
    was issued at enrollment (its ACLs confine it to its own topics); same numbers as the reference."""
    run = Run(setup, broker, "fed-tls", tls=True)
    try:
        run.finish()
        error = worst_error(global_state(run.folder), setup["final"])
        print(f"over TLS with per-device accounts: worst relative error after {ROUNDS} rounds {error:.1e}")
        assert error <= 1e-4, run.logs()
        security = run.folder / "server" / "security"
        accounts = json.loads((security / "accounts.json").read_text())
        assert {f"dev-{c}" for c in range(DEVICES)} <= {u for u, a in accounts.items() if a["kind"] == "device"}
        for c in range(DEVICES):
            credentials = run.folder / f"device-{c}" / "credentials.json"
            assert oct(credentials.stat().st_mode)[-3:] == "600"
            assert json.loads(credentials.read_text())["username"] == f"dev-{c}"
        with pytest.raises(LinkError):          # nobody gets in without an account
            Link(run.broker, "anonymous", access=BrokerAccess(ca_file=str(security / "ca.crt"))).connect(timeout=5)
        fleet = CliRunner().invoke(cloud_main, ["fleet", "--broker", run.broker, "--federation", run.name, "--ca",
                                                str(security / "ca.crt"), "--password-file",
                                                str(security / "server.password")])
        assert fleet.exit_code == 0 and f"round {ROUNDS}/{ROUNDS}" in fleet.output, fleet.output
    finally:
        run.close()


def test_a_silent_device_is_left_out_and_comes_back(setup, broker):
    """SIGSTOP: the device neither answers nor disconnects. The broker gives up on it after 1.5 keepalives (5 s in
    the test profile) and publishes its Will; the round completes without it. Resumed, it reconnects, drops the
    round it was in, says it is online and takes part in the next round."""
    name = "fed-silent"
    watcher, seen = watch(broker, name)
    run = Run(setup, broker, name, rounds=2, batch_sizes=(16, 2, 16))
    try:
        assert wait_for(lambda: seen.get("dev-1", {}).get("activity") == "split training", 120), run.logs()
        run.devices[1].send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        assert wait_for(lambda: seen["dev-1"]["presence"] == "offline", 30), seen["dev-1"]
        silent = time.monotonic() - stopped
        assert wait_for(lambda: completed_rounds(run) == [1], 60), run.logs()
        first = json.loads((run.folder / "server" / "rounds.jsonl").read_text().splitlines()[0])
        assert first["participants"] == ["dev-0", "dev-2"]
        run.devices[1].send_signal(signal.SIGCONT)
        _, second = run.finish(180)
        assert second["participants"] == ["dev-0", "dev-1", "dev-2"], second
        print(f"silent dev-1 declared offline after {silent:.1f} s; round 1 from {first['participants']}; resumed, "
              f"it took part in round 2")
    finally:
        run.devices[1].send_signal(signal.SIGCONT)
        run.close()
        watcher.close()


def test_the_server_killed_mid_round_resumes_from_its_checkpoint(setup, broker):
    """SIGKILL during round 2: the devices see the server offline (its Will) and drop the round; started again,
    the server resumes after round 1 (its checkpoint) and runs round 2 again. Nothing completed is lost or
    repeated, and the federation ends exactly where the uninterrupted reference does."""
    name = "fed-server-kill"
    watcher, seen = watch(broker, name)
    run = Run(setup, broker, name)
    try:
        assert wait_for(lambda: any(s.get("round") == 2 and s.get("activity") == "split training"
                                    for s in seen.values()), 120), run.logs()
        run.server.kill()
        run.server.wait(10)
        assert completed_rounds(run) == [1]
        assert wait_for(lambda: all(s.get("activity") == "idle" for s in seen.values()), 30), seen
        run.restart_server()
        summaries = run.finish()
        assert [s["round"] for s in summaries] == [1, 2]
        assert all(s["participants"] == [f"dev-{c}" for c in range(DEVICES)] for s in summaries)
        error = worst_error(global_state(run.folder), setup["final"])
        print(f"server killed in round 2 and restarted: rounds {[s['round'] for s in summaries]}, worst relative "
              f"error against the reference {error:.1e}")
        assert error <= 1e-4, run.logs()
    finally:
        run.close()
        watcher.close()


def test_a_broker_restart_mid_round_is_survived(setup, broker):
    """The broker stopped during round 1's split training and started again (no persistence: sessions and
    retained messages gone). Everyone reconnects; devices drop the round they were in and announce themselves
    again; the server runs the round again; the federation ends where the reference does."""
    name = "fed-broker-restart"
    run = Run(setup, broker, name, own_broker=True)
    watcher, seen = watch(run.broker, name)
    try:
        assert wait_for(lambda: any(s.get("activity") == "split training" for s in seen.values()), 120), run.logs()
        run.own_broker.stop()
        time.sleep(1.0)
        run.own_broker.start()                # the same port
        summaries = run.finish(300)
        assert [s["round"] for s in summaries] == [1, 2]
        assert all(s["participants"] == [f"dev-{c}" for c in range(DEVICES)] for s in summaries)
        error = worst_error(global_state(run.folder), setup["final"])
        assert "round 1: the broker connection was lost; it will be run again" in run.logs()
        print(f"broker restarted in round 1: rounds {[s['round'] for s in summaries]}, worst relative error "
              f"against the reference {error:.1e}")
        assert error <= 1e-4, run.logs()
        assert all(p["state"] == "online" for p in retained(run.broker, Topics(name).all_presence()).values())
    finally:
        watcher.close()
        run.close()
