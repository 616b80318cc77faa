"""Writing a client bundle: cut the model, export the client's graphs, check them against PyTorch, then publish.

The bundle is built in a temporary folder next to its destination and renamed into place only after the device
runtime has run every graph and agreed with PyTorch (`export/verify.py`), so a bundle that exists is one that
passed; a failed check leaves nothing behind.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from edge_client.parity import replay, save_cases
from edge_client.runtime import open_runtime
from export.backbone import ModelSource, create_vit, preprocessing_of
from export.onnx_graphs import OPSET, build_embed_graph, build_forward_graphs, build_portable_graphs
from export.ort_artifacts import FORWARD
from export.split import SplitViT
from sfp_common.split_spec import SplitSpec
from export.verify import check_or_refuse, reference_cases
from sfp_common.bundle import (BACKENDS, GRAPH_ROLES, MANIFEST, TRAINABLES, BundleError, Manifest, OptimizerSpec,
                               TensorSpec, write_manifest)
from sfp_common.errors import ConfigError
from sfp_common.parity import ParityReport
from sfp_common.preprocess import Preprocessing

DEFAULT_TRAINING_PYTHON = ".venv-ort-training/bin/python"   # what `make ort-training-env` builds


def client_model(source: ModelSource, num_classes: int, spec: SplitSpec, img_size: int | None = None,
                 pretrained: bool = True, seed: int = 0) -> tuple[SplitViT, Preprocessing]:
    """The SplitViT a bundle is cut from, and its input pipeline; the same seed gives the same prompts and
    classifier."""
    if img_size is not None:
        source = replace(source, kwargs={**source.kwargs, "img_size": img_size})
    torch.manual_seed(seed)
    vit = create_vit(source, num_classes=num_classes, pretrained=pretrained).eval()
    return SplitViT(vit, spec), preprocessing_of(vit)


def manifest_for(model: SplitViT, preprocessing: Preprocessing, model_id: str, optimizer: OptimizerSpec,
                 backend: str, graphs: dict[str, str]) -> Manifest:
    with torch.no_grad():
        probe = torch.zeros(1, *preprocessing.input_size)
        num_tokens = model.head(probe).shape[1]
    tail_tokens = len(range(num_tokens)[model.tail.pooled_positions(num_tokens)])
    params = dict(model.named_parameters())
    trainables = tuple(TensorSpec(name, tuple(params[name].shape), "float32",
                                  "prompts" if name == "head.prompts" else "tail")
                       for name in model.trainable_names(("prompts", "tail")))
    return Manifest(
        backend=backend, model_id=model_id, num_classes=model.tail.head.out_features,
        embed_dim=model.head.prompts.shape[1], prompts=model.spec.prompts, head_blocks=model.spec.head_blocks,
        tail_blocks=model.spec.tail_blocks, num_prefix_tokens=model.head.num_prefix_tokens, num_tokens=num_tokens,
        tail_tokens=tail_tokens, preprocessing=preprocessing, optimizer=optimizer, opset=OPSET,
        trainables=trainables, graphs=graphs)


def export_bundle(model: SplitViT, preprocessing: Preprocessing, out: str | Path, model_id: str,
                  optimizer: OptimizerSpec,
                  backend: str = "portable", batch_sizes: tuple[int, ...] = (1, 3, 8),
                  progress: Callable[[str], None] = lambda message: None,
                  training_python: str | None = None) -> tuple[Manifest, ParityReport]:
    """Export, verify and publish a bundle at `out`; raises BundleError (writing nothing) if a check fails.

    The `training` backend's artifacts are built, and its check replayed, by `training_python`: the
    interpreter of an environment with onnxruntime-training-cpu (it cannot share one with torch's onnx)."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "training":
        training_python = check_training_python(training_python)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; choose a new folder for the bundle")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        start = time.perf_counter()
        if backend == "portable":
            graphs = build_portable_graphs(model, optimizer, staging, progress)
        else:
            graphs = {role: role if role == "checkpoint" else f"{role}.onnx" for role in GRAPH_ROLES[backend]}
            build_forward_graphs(model, staging / FORWARD, progress)
        graphs.update(build_embed_graph(model, staging, progress))
        manifest = manifest_for(model, preprocessing, model_id, optimizer, backend, graphs)
        if backend == "training":
            (staging / MANIFEST).write_text(manifest.to_json())
            progress("building the ONNX Runtime training artifacts")
            _run_in(training_python, ["-m", "export.ort_artifacts", str(staging)], "building the training artifacts")
        params = dict(model.named_parameters())
        trainables = {t.name: params[t.name].detach().numpy().astype(np.float32) for t in manifest.trainables}
        np.savez(staging / TRAINABLES, **trainables)
        write_manifest(staging, manifest)
        progress(f"checking every graph against PyTorch at batch sizes {', '.join(map(str, batch_sizes))}")
        cases = reference_cases(model, manifest, batch_sizes=batch_sizes)
        if backend == "portable":
            report = replay(open_runtime(staging), cases)
        else:
            with tempfile.TemporaryDirectory() as scratch:
                save_cases(Path(scratch) / "cases.npz", cases)
                raw = json.loads(_run_in(training_python, ["-m", "edge_client.parity", str(staging),
                                                           str(Path(scratch) / "cases.npz")],
                                         "checking the training artifacts").splitlines()[-1])
            report = ParityReport(**{**raw, "batch_sizes": tuple(raw["batch_sizes"])})
        check_or_refuse(report, f"the {backend} bundle for {model_id}")
        manifest = write_manifest(staging, replace(manifest, verification={
            **report.as_dict(), "export_seconds": round(time.perf_counter() - start, 1)}))
        if out.exists():
            out.rmdir()
        staging.chmod(0o755)   # mkdtemp makes it private; a bundle is meant to be read and served
        staging.rename(out)
        return manifest, report
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_training_python(python: str | None) -> str:
    """The interpreter that has onnxruntime-training, or a clear error saying how to get one."""
    python = python or os.environ.get("SFP_ORT_TRAINING_PYTHON") or DEFAULT_TRAINING_PYTHON
    probe = "from edge_client.ort_training import training_api; training_api(); import export.ort_artifacts"
    try:
        ok = subprocess.run([python, "-c", probe], capture_output=True).returncode == 0
    except OSError:
        ok = False
    if not ok:
        raise ConfigError(f"the training backend needs a Python with onnxruntime-training-cpu and this package; "
                          f"{python} is not one (`make ort-training-env` builds {DEFAULT_TRAINING_PYTHON}; or pass "
                          f"--training-python / set SFP_ORT_TRAINING_PYTHON)")
    return python


def _run_in(python: str, args: list[str], what: str) -> str:
    done = subprocess.run([python, *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if done.returncode != 0:
        raise BundleError(f"{what} failed:\n{done.stderr.strip()[-3000:]}")
    return done.stdout
