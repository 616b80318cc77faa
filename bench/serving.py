"""Server throughput: samples per second through the whole serving path against the bare body, same run.

- `ceiling`: the body alone (`BodyCompute`) doing what serving a split batch costs (a forward without autograd,
  then the backward's recomputed forward and backward), on batches as large as all devices' requests together,
  tensors already in memory: nothing decoded, nothing sent.
- `serving`: a body worker process (`sfp-cloud worker`: the shared subscription, decoding, batching across
  devices, the body, encoding) fed by D simulated devices over a local Mosquitto; each device loops
  forward (fp16 tokens) -> features -> backward (fp32 dL/dfeatures) -> gradient with `--batch` samples.
Ratio = serving samples/s / ceiling samples/s. On a GPU use ViT-B/16 in bf16: `--model vit_base_patch16_224
--body-dtype bf16`.

    python bench/serving.py [--model vit_tiny_patch16_224] [--devices 1,8,64] [--batch 8] [--seconds 20]
                            [--body-dtype fp32] [--out bench/results/serving]
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.device_step import machine_facts  # noqa: E402
from cloud_server.broker import LocalBroker  # noqa: E402
from wire_protocol.envelope import Message  # noqa: E402
from wire_protocol.link import Link  # noqa: E402
from wire_protocol.topics import Topics  # noqa: E402

CLASSES, PROMPTS, FEDERATION = 10, 10, "bench"


def body(model_name: str, body_dtype: str):
    import torch

    from cloud_server.body import BodyCompute
    from export.backbone import ModelSource
    from export.bundle import client_model
    from export.onnx_graphs import image_shape
    from sfp_common.split_spec import SplitSpec
    model, _ = client_model(ModelSource(model_name), CLASSES, SplitSpec(PROMPTS), pretrained=False)
    compute = BodyCompute(model, dtype=torch.bfloat16 if body_dtype == "bf16" else torch.float32)
    with torch.no_grad():
        tokens = model.head(torch.zeros(1, *image_shape(model))).shape[1:]
    return compute, tuple(tokens)


def ceiling(model_name: str, body_dtype: str, samples: int, seconds: float) -> dict:
    """Samples/s of the body alone on batches of `samples` (capped at 512)."""
    compute, (n, d) = body(model_name, body_dtype)
    batch = min(samples, 512)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, n, d)).astype(np.float32)
    features = compute.forward([x])[0]
    df = rng.standard_normal(features.shape).astype(np.float32)
    step = lambda: (compute.forward([x]), compute.backward([x], [df]))   # noqa: E731
    step()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or done == 0:
        step()
        done += batch
    return {"samples_per_s": done / (time.perf_counter() - start), "batch": batch, "device": str(compute.device)}


class SimulatedDevice(threading.Thread):
    def __init__(self, url: str, name: str, tokens: np.ndarray, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.topics, self.name, self.tokens, self.stop = Topics(FEDERATION), name, tokens, stop
        self.replies: queue.Queue[Message] = queue.Queue()
        self.link = Link(url, name).connect()
        self.link.subscribe(self.topics.device_down(name), lambda topic, m: self.replies.put(m))
        self.completed: list[float] = []      # times of finished split batches

    def run(self) -> None:
        seq = 0
        while not self.stop.is_set():
            seq += 1
            self.link.send(self.topics.forward(self.name), Message("forward", self.name, 1, seq, {},
                                                                   {"tokens": self.tokens}, {"tokens": "fp16"}))
            features = self.replies.get(timeout=600)
            dfeatures = np.full(features.tensors["features"].shape, 1e-3, np.float32)
            self.link.send(self.topics.backward(features.meta["worker"], self.name),
                           Message("backward", self.name, 1, seq, {}, {"dfeatures": dfeatures}))
            self.replies.get(timeout=600)
            self.completed.append(time.perf_counter())


def serving(url: str, model_name: str, body_dtype: str, devices: int, batch: int, seconds: float,
            tokens_shape: tuple[int, int]) -> dict:
    worker_id = f"w{devices}"          # a fresh retained status per run: "online" means this worker is up
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count())),
           "HF_HUB_OFFLINE": "1", "SFP_LOG": "WARNING", "PYTHONPATH": str(ROOT)}
    worker = subprocess.Popen([sys.executable, "-m", "cloud_server.cli", "worker", "--broker", url, "--federation",
                               FEDERATION, "--model", model_name, "--classes", str(CLASSES), "--prompts",
                               str(PROMPTS), "--random-init", "--body-dtype", body_dtype, "--worker-id", worker_id,
                               "--max-packet", str(64 << 20)], env=env)
    try:
        status: dict = {}
        watcher = Link(url, "watcher").connect()
        watcher.subscribe_json(Topics(FEDERATION).worker_status(worker_id), lambda t, v: status.update(v))
        deadline = time.time() + 300
        while status.get("state") != "online" and time.time() < deadline:
            time.sleep(0.2)
        watcher.close()
        stop = threading.Event()
        tokens = np.random.default_rng(0).standard_normal((batch, *tokens_shape)).astype(np.float32)
        sims = [SimulatedDevice(url, f"sim-{i}", tokens, stop) for i in range(devices)]
        for s in sims:
            s.start()
        time.sleep(min(10.0, seconds / 2))                 # warm-up: every device busy
        start = time.perf_counter()
        time.sleep(seconds)
        end = time.perf_counter()
        stop.set()
        done = sum(sum(1 for t in s.completed if start <= t < end) for s in sims) * batch
        for s in sims:
            s.join(600)
            s.link.close()
        return {"samples_per_s": done / (end - start)}
    finally:
        worker.terminate()
        worker.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vit_tiny_patch16_224")
    ap.add_argument("--devices", default="1,8,64")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--body-dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serving")
    ap.add_argument("--ceiling-worker", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.ceiling_worker:      # in its own process, so its threads and memory are its own
        print(json.dumps(ceiling(a.model, a.body_dtype, int(a.ceiling_worker[0]), float(a.ceiling_worker[1]))))
        return
    a.out.mkdir(parents=True, exist_ok=True)
    _, tokens_shape = body(a.model, a.body_dtype)
    rows = []
    with LocalBroker() as url:
        for devices in map(int, a.devices.split(",")):
            got = subprocess.run([sys.executable, __file__, "--model", a.model, "--body-dtype", a.body_dtype,
                                  "--ceiling-worker", str(devices * a.batch), str(a.seconds)],
                                 capture_output=True, text=True, check=True,
                                 env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
            bare = json.loads(got.stdout.strip().splitlines()[-1])
            served = serving(url, a.model, a.body_dtype, devices, a.batch, a.seconds, tokens_shape)
            row = {"devices": devices, "batch_per_device": a.batch, "ceiling": bare, "serving": served,
                   "ratio": served["samples_per_s"] / bare["samples_per_s"]}
            rows.append(row)
            print(f"{devices:>3} devices x {a.batch}: ceiling {bare['samples_per_s']:.1f} samples/s "
                  f"(batch {bare['batch']}, {bare['device']}), serving {served['samples_per_s']:.1f} samples/s, "
                  f"ratio {row['ratio']:.2f}", flush=True)
    machine = machine_facts("bench/serving.py", sys.argv[1:])
    (a.out / "results.json").write_text(json.dumps({"machine": machine, "model": a.model,
                                                    "body_dtype": a.body_dtype, "rows": rows}, indent=2) + "\n")
    lines = [f"Machine: {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}; body "
             f"{a.model}, {a.body_dtype}, on {rows[0]['ceiling']['device']}; Mosquitto on loopback; the simulated "
             f"devices run in the benchmark's process. Command: `{machine['command']}`.", "",
             "| devices | samples per request | bare body samples/s | serving path samples/s | ratio |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['devices']} | {r['batch_per_device']} | {r['ceiling']['samples_per_s']:.1f} | "
              f"{r['serving']['samples_per_s']:.1f} | {r['ratio']:.2f} |" for r in rows]
    (a.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[2:]))


if __name__ == "__main__":
    main()
