"""On-device training cost: step time and peak memory of each backend against PyTorch doing the same step.

For each model (ViT-Tiny/16 and ViT-B/16 at 224, random weights: the cost does not depend on them; 10 classes,
10 prompts, no head or tail blocks, AdamW) a bundle per backend is exported once, then every (runner, batch) pair
runs in a fresh process with one thread, so its peak RSS is its own:
- `pytorch`: the client slice in eager PyTorch (torch + timm loaded, as a device running PyTorch would);
- `portable`: the portable bundle in plain onnxruntime, in a process that never imports torch;
- `training`: the training bundle in onnxruntime-training (its own environment, no torch).
Two steps are timed, median of `--reps` after warm-up: the local-loss step, and the client's part of a split
batch (smash + tail step + prompt update; the server's features and gradient are given).

Then a whole round as the device runs it (`edge_client/round.py`, the default recipe: split EL2N keeps half, two
split passes, five tail passes on cached features), a round after the first, on `--round-samples` images, the
server answering at once (its time is not the device's): with the patch tokens embedded once per round (the
profile's cache) and with them embedded again for every split batch (no cache, as before the embed graph), the
two interleaved in one process, median of `--round-reps`.

    python bench/device_step.py [--models vit_tiny_patch16_224,vit_base_patch16_224] [--batches 8,32]
                                [--reps 20] [--backends portable,training] [--training-python PY]
                                [--out bench/results/device-step]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CLASSES, PROMPTS = 10, 10


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def inputs(batch: int, size: tuple[int, ...], tail_tokens: int, dim: int, grad_shape: tuple[int, ...]):
    rng = np.random.default_rng(0)
    return (rng.standard_normal((batch, *size)).astype(np.float32), rng.integers(0, CLASSES, batch),
            rng.standard_normal((batch, tail_tokens, dim)).astype(np.float32),
            (1e-3 * rng.standard_normal(grad_shape)).astype(np.float32))


def worker_device(bundle: Path, batch: int, reps: int) -> dict:
    from edge_client.runtime import open_runtime
    runtime = open_runtime(bundle, threads=1)
    m = runtime.manifest
    x, y, feats, grad = inputs(batch, m.preprocessing.input_size, m.tail_tokens, m.embed_dim, (m.prompts, m.embed_dim))

    def split() -> None:
        runtime.smash(x)
        runtime.tail_step(feats, y, 1e-3)
        runtime.prompt_step(grad, 1e-3)

    result = {"local_ms": timed(lambda: runtime.local_step(x, y, 1e-3), reps), "split_ms": timed(split, reps)}
    assert "torch" not in sys.modules
    return {**result, "peak_rss_mb": peak_rss_mb()}


class InstantServer:
    """The server's half of split training, answering at once: only the device's own time is measured."""

    def __init__(self, tail_tokens: int, dim: int, prompts: int) -> None:
        rng = np.random.default_rng(1)
        self.features = rng.standard_normal((4096, tail_tokens, dim)).astype(np.float32)
        self.grad = (1e-3 * rng.standard_normal((prompts, dim))).astype(np.float32)

    def forward(self, tokens: np.ndarray, ids: np.ndarray | None = None) -> np.ndarray:
        return self.features[:len(tokens)]

    def forward_kept(self, prompts: np.ndarray, ids: np.ndarray) -> np.ndarray | None:
        return self.features[:len(ids)]

    def backward(self, dfeatures: np.ndarray) -> np.ndarray:
        return self.grad


def worker_round(bundle: Path, samples: int, reps: int) -> dict:
    """Seconds per device round, embedded tokens cached for the round vs embedded again per batch."""
    from edge_client.round import run_round
    from edge_client.runtime import open_runtime
    from sfp_common.pruning import SampleMemory
    from sfp_common.recipe import Recipe
    from wire_protocol.contracts import RoundPlan
    runtime = open_runtime(bundle, threads=1)
    m = runtime.manifest
    x, y, feats, _ = inputs(samples, m.preprocessing.input_size, m.tail_tokens, m.embed_dim, (1,))
    server = InstantServer(m.tail_tokens, m.embed_dim, m.prompts)
    start = runtime.trainables()
    times: dict[str, list[float]] = {"cached": [], "per_batch": []}
    for rep in range(reps + 1):                   # the first of each is a warm-up
        for kind, budget in (("cached", None), ("per_batch", 0)):
            memory = SampleMemory.empty(samples)  # a round after the first: every sample scored and cached
            memory.record(np.arange(samples), np.random.default_rng(rep).standard_normal((samples, CLASSES)), y,
                          feats, "fp16")
            runtime.load_trainables(start)
            began = time.perf_counter()
            run_round(runtime, x, y, RoundPlan(Recipe(), rep), server, memory, embed_cache_bytes=budget)
            if rep:
                times[kind].append(time.perf_counter() - began)
    assert "torch" not in sys.modules
    return {f"{kind}_s": float(np.median(t)) for kind, t in times.items()}


def worker_pytorch(model_name: str, batch: int, reps: int) -> dict:
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(1)
    from export.backbone import ModelSource
    from export.bundle import client_model
    from sfp_common.split_spec import SplitSpec
    model, prep = client_model(ModelSource(model_name), CLASSES, SplitSpec(PROMPTS), pretrained=False)
    model.set_trainable(("prompts", "tail"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    dim = model.head.prompts.shape[1]
    x, y, feats, grad = inputs(batch, prep.input_size, 1, dim, (PROMPTS, dim))
    x, y, feats, grad = map(torch.from_numpy, (x, y, feats, grad))

    def local() -> None:
        opt.zero_grad()
        F.cross_entropy(model.forward_local(x), y).backward()
        opt.step()

    def split() -> None:
        opt.zero_grad()
        with torch.no_grad():
            model.head(x)                      # the smashed tokens sent to the server
        F.cross_entropy(model.tail(feats), y).backward()
        model.head.prompts.grad = grad
        opt.step()

    return {"local_ms": timed(local, reps), "split_ms": timed(split, reps), "peak_rss_mb": peak_rss_mb()}


def run_worker(args: list[str], python: str = sys.executable) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([python, __file__, "--worker", *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def export(model_name: str, backend: str, folder: Path, training_python: str) -> Path:
    bundle = folder / f"bundle-{model_name}-{backend}"
    manifest = bundle / "manifest.json"
    if manifest.is_file() and "embed" not in json.loads(manifest.read_text())["graphs"]:
        shutil.rmtree(bundle)           # exported before bundles had the embed graph
    if not manifest.is_file():
        print(f"exporting {model_name} ({backend}, checked against PyTorch)...", flush=True)
        subprocess.run([sys.executable, "-m", "export.cli", "bundle", "--model", model_name, "--classes",
                        str(CLASSES), "--prompts", str(PROMPTS), "--random-init", "--backend", backend,
                        "--training-python", training_python, "--out", str(bundle)],
                       check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                                                  "PYTHONPATH": str(ROOT)})
    return bundle


def public_args(args: list[str]) -> list[str]:
    """The command line as written down: without the local interpreter path of --training-python."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--training-python":
            skip = True
        elif not arg.startswith("--training-python="):
            out.append(arg)
    return out


def machine_facts(script: str, args: list[str], **extra) -> dict:
    """The machine and the command line a result was measured with, as the results files record them."""
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
            "command": " ".join(["python", script, *public_args(args)]), **extra}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="vit_tiny_patch16_224,vit_base_patch16_224")
    ap.add_argument("--batches", default="8,32", help="step batches; none: no step rows")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--backends", default="portable,training")
    ap.add_argument("--round-samples", type=int, default=256, help="images in the whole-round measurement; 0: none")
    ap.add_argument("--round-reps", type=int, default=3)
    ap.add_argument("--training-python", default=os.environ.get("SFP_ORT_TRAINING_PYTHON",
                                                                 str(ROOT / ".venv-ort-training/bin/python")))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "device-step")
    ap.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        kind, target, batch, reps = a.worker
        workers = {"pytorch": lambda: worker_pytorch(target, int(batch), int(reps)),
                   "round": lambda: worker_round(Path(target), int(batch), int(reps))}
        result = workers.get(kind, lambda: worker_device(Path(target), int(batch), int(reps)))()
        print(json.dumps(result))
        return
    a.out.mkdir(parents=True, exist_ok=True)
    backends = a.backends.split(",")
    python = {"portable": sys.executable, "training": a.training_python}
    rows, rounds = [], []
    for model_name in a.models.split(","):
        bundles = {b: export(model_name, b, ROOT / "runs" / "device-step-bundles", a.training_python)
                   for b in backends}
        for backend, bundle in bundles.items() if a.round_samples else ():
            got = run_worker(["round", str(bundle), str(a.round_samples), str(a.round_reps)], python[backend])
            rounds.append({"model": model_name, "runner": backend, "samples": a.round_samples, **got,
                           "speedup": got["per_batch_s"] / got["cached_s"]})
            print(f"{model_name} {backend} round of {a.round_samples}: {got['per_batch_s']:.2f} s embedding per "
                  f"batch, {got['cached_s']:.2f} s once per round", flush=True)
        for batch in [int(b) for b in a.batches.split(",") if b not in ("", "none")]:
            ref = run_worker(["pytorch", model_name, str(batch), str(a.reps)])
            rows.append({"model": model_name, "batch": batch, "runner": "pytorch", **ref})
            for backend, bundle in bundles.items():
                got = run_worker([backend, str(bundle), str(batch), str(a.reps)], python[backend])
                size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
                rows.append({"model": model_name, "batch": batch, "runner": backend, **got,
                             "bundle_mb": round(size / 1e6, 2),
                             "local_time_ratio": got["local_ms"] / ref["local_ms"],
                             "split_time_ratio": got["split_ms"] / ref["split_ms"],
                             "rss_ratio": got["peak_rss_mb"] / ref["peak_rss_mb"]})
                print(f"{model_name} B={batch} {backend}: local {ref['local_ms']:.1f} -> {got['local_ms']:.1f} ms, "
                      f"split {ref['split_ms']:.1f} -> {got['split_ms']:.1f} ms, RSS {ref['peak_rss_mb']:.0f} -> "
                      f"{got['peak_rss_mb']:.0f} MB", flush=True)
    machine = machine_facts("bench/device_step.py", sys.argv[1:], threads=1)
    (a.out / "results.json").write_text(json.dumps({"machine": machine, "rows": rows, "rounds": rounds},
                                                   indent=2) + "\n")
    lines = [f"Machine: {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}, one thread per "
             f"process. Command: `{machine['command']}`. portable = plain onnxruntime; training = "
             "onnxruntime-training; neither process imports torch." + (" Ratios are to PyTorch in the same run."
                                                                        if rows else "")]
    if rows:
        lines += ["", "| model | batch | runner | local ms | ratio | split ms | ratio | peak RSS MB | ratio "
                  "| bundle MB |", "|" + "---|" * 10]
    header = 1
    for r in rows:
        if r["runner"] == "pytorch":
            lines.append(f"| {r['model']} | {r['batch']} | PyTorch | {r['local_ms']:.1f} | 1 | {r['split_ms']:.1f} "
                         f"| 1 | {r['peak_rss_mb']:.0f} | 1 | |")
        else:
            lines.append(f"| {r['model']} | {r['batch']} | {r['runner']} | {r['local_ms']:.1f} | "
                         f"{r['local_time_ratio']:.2f} | {r['split_ms']:.1f} | {r['split_time_ratio']:.2f} | "
                         f"{r['peak_rss_mb']:.0f} | {r['rss_ratio']:.2f} | {r['bundle_mb']} |")
    if rounds:
        lines += ["", f"A whole device round (default recipe, a round after the first, {a.round_samples} images, the "
                  "server answering at once), seconds, median of the repetitions:", "",
                  "| model | runner | patch tokens embedded per split batch | once per round | speed-up |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['runner']} | {r['per_batch_s']:.2f} | {r['cached_s']:.2f} | "
                  f"{r['speedup']:.2f}x |" for r in rounds]
    (a.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[header:]))


if __name__ == "__main__":
    main()
