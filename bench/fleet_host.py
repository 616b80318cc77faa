"""The device side of bench/fleet_scale.py: one process holding many real devices (`DeviceAgent`s), and the
bench's handle on such a process. Run by the bench as `python bench/fleet_host.py SPEC.json`; it never imports
PyTorch, as a device does not.
"""
from __future__ import annotations

import ast
import json
import logging
import queue
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def host(spec_path: Path) -> None:
    """One process holding many devices: enroll them (`parallel` at a time), run each in its own thread, and
    obey JSON lines on stdin ({"op": "stop" | "start", "devices": [...]}, {"op": "traffic"}, {"op": "quit"});
    events go to stdout as JSON lines."""
    from edge_client.agent import DeviceAgent
    from edge_client.enrollment import enroll
    from edge_client.profiles import load_profile

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    log = logging.getLogger("fleet-host")

    spec = json.loads(spec_path.read_text())
    profile = load_profile(spec["profile"])
    lock = threading.Lock()
    # CPython 3.11 (3.11.7 here) can fail parsing in several threads at once ("AST constructor recursion depth
    # mismatch", python/cpython#106905); np.load parses each array's header, and here many devices load their
    # bundles at once. A real device runs one agent per process.
    parse, parsing = ast.parse, threading.Lock()

    def one_at_a_time(*args, **kwargs):
        with parsing:
            return parse(*args, **kwargs)
    ast.parse = one_at_a_time
    running: dict[str, tuple[DeviceAgent, threading.Thread]] = {}
    retired = {"sent": 0, "received": 0, "messages_sent": 0, "messages_received": 0}

    def emit(**event) -> None:
        with lock:
            print(json.dumps(event), flush=True)

    def start(device: dict) -> None:
        agent = DeviceAgent(Path(device["state"]), threading.Event(), round_timeout_s=spec["round_timeout"])

        def run() -> None:
            try:
                agent.run(heartbeat_s=spec["heartbeat"])
            except Exception as err:          # reported, not fatal to the other devices of this host
                log.exception("%s failed", device["device"])
                emit(event="error", device=device["device"], error=f"{type(err).__name__}: {err}")
        thread = threading.Thread(target=run, name=device["device"], daemon=True)
        thread.start()
        with lock:
            running[device["device"]] = (agent, thread)

    def stop(names: list[str]) -> dict[str, float]:
        """All of them told at once (each leaves its round at once), then waited for; when each was told."""
        told = {}
        with lock:
            leaving = [(name, *running.pop(name)) for name in names]
        for name, agent, _ in leaving:
            told[name] = time.time()
            agent.stop.set()
        for _, agent, thread in leaving:
            thread.join(30)
            with lock:
                for key in retired:
                    retired[key] += getattr(agent.link.traffic, key)
        return told

    def enroll_and_start(device: dict) -> None:
        began = time.time()
        try:
            enroll(spec["url"], device["token"], profile, device["data"], Path(device["state"]), device["device"],
                   spec["federation"], 600.0, spec["ca"])
        except Exception as err:
            log.exception("%s: enrollment failed", device["device"])
            emit(event="error", device=device["device"], error=f"enrollment: {type(err).__name__}: {err}")
            return
        emit(event="enrolled", device=device["device"], began=began, at=time.time())
        start(device)

    devices = {d["device"]: d for d in spec["devices"]}
    emit(event="begin", at=time.time())
    with ThreadPoolExecutor(spec["parallel"]) as pool:
        list(pool.map(enroll_and_start, devices.values()))
    emit(event="ready")
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "stop":
            emit(event="stopped", at=stop(command["devices"]))
        elif command["op"] == "start":
            for name in command["devices"]:
                start(devices[name])
            emit(event="started", devices=command["devices"])
        elif command["op"] == "traffic":
            with lock:
                totals = {k: v + sum(getattr(a.link.traffic, k) for a, _ in running.values())
                          for k, v in retired.items()}
            emit(event="traffic", **totals)
        elif command["op"] == "quit":
            break
    stop(list(running))
    emit(event="done")


class Host:
    """The bench's handle on one device host process: its events, and commands to it."""

    def __init__(self, spec: Path, log: Path, env: dict) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, str(spec)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=open(log, "a"), text=True, env=env)
        self.events: queue.Queue[dict] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue                      # a library's stray print
            if event["event"] == "error":     # as it happens, whatever the bench is waiting for
                print(f"  {event['device']}: {event['error']}", flush=True)
            self.events.put(event)

    def send(self, **command) -> None:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def wait(self, kind: str, timeout: float, on_other=None) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                event = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise SystemExit(f"a device host sent no {kind!r} within {timeout:.0f} s") from None
            if event["event"] == kind:
                return event
            if on_other is not None:
                on_other(event)


if __name__ == "__main__":
    host(Path(sys.argv[1]))
