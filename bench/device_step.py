"""On-device training cost: step time and peak memory of each backend against PyTorch doing the same step.

For each model (ViT-Tiny/16 and ViT-B/16 at 224, random weights: the cost does not depend on them; 10 classes,
10 prompts, no head or tail blocks, AdamW) a bundle per backend is exported once, then every (runner, batch) pair
runs in a fresh process with one thread, so its peak RSS is its own:
- `pytorch`: the client slice in eager PyTorch (torch + timm loaded, as a device running PyTorch would);
- `portable`: the portable bundle in plain onnxruntime, in a process that never imports torch;
- `training`: the training bundle in onnxruntime-training (its own environment, no torch).
Two steps are timed, median of `--reps` after warm-up: the local-loss step, and the client's part of a split
batch (smash + tail step + prompt update; the server's features and gradient are given).

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
    if not (bundle / "manifest.json").is_file():
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
    ap.add_argument("--batches", default="8,32")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--backends", default="portable,training")
    ap.add_argument("--training-python", default=os.environ.get("SFP_ORT_TRAINING_PYTHON",
                                                                 str(ROOT / ".venv-ort-training/bin/python")))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "device-step")
    ap.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        kind, target, batch, reps = a.worker
        result = worker_pytorch(target, int(batch), int(reps)) if kind == "pytorch" else \
            worker_device(Path(target), int(batch), int(reps))
        print(json.dumps(result))
        return
    a.out.mkdir(parents=True, exist_ok=True)
    backends = a.backends.split(",")
    python = {"portable": sys.executable, "training": a.training_python}
    rows = []
    for model_name in a.models.split(","):
        bundles = {b: export(model_name, b, ROOT / "runs" / "device-step-bundles", a.training_python)
                   for b in backends}
        for batch in map(int, a.batches.split(",")):
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
    (a.out / "results.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    lines = [f"Machine: {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}, one thread per "
             f"process. Command: `{machine['command']}`. portable = plain onnxruntime; training = "
             "onnxruntime-training; neither process imports torch. Ratios are to PyTorch in the same run.",
             "", "| model | batch | runner | local ms | ratio | split ms | ratio | peak RSS MB | ratio | bundle MB |",
             "|" + "---|" * 10]
    header = 3
    for r in rows:
        if r["runner"] == "pytorch":
            lines.append(f"| {r['model']} | {r['batch']} | PyTorch | {r['local_ms']:.1f} | 1 | {r['split_ms']:.1f} "
                         f"| 1 | {r['peak_rss_mb']:.0f} | 1 | |")
        else:
            lines.append(f"| {r['model']} | {r['batch']} | {r['runner']} | {r['local_ms']:.1f} | "
                         f"{r['local_time_ratio']:.2f} | {r['split_ms']:.1f} | {r['split_time_ratio']:.2f} | "
                         f"{r['peak_rss_mb']:.0f} | {r['rss_ratio']:.2f} | {r['bundle_mb']} |")
    (a.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[header:]))


if __name__ == "__main__":
    main()
