"""Replay PyTorch's recorded training steps on a device runtime and measure how far it strays.

A case is one step PyTorch took: the trainables and optimizer state it started from, the batch, the learning
rate, what it computed (logits and loss; for a split batch also the smashed tokens, the server's features and
gradient, dL/dfeatures; for a tail-only step the features it trained on) and the trainables and state it ended
with. The runtime starts from the same tensors, takes the same step (the server's part played by the recorded
answers) and every output, state and update is compared within the limits of sfp_common/parity.py. The exporter refuses a bundle whose replay fails
(export/verify.py records the cases); the device tests replay the reference federation's own steps.

Torch-free, so a backend is checked in its own environment: `python -m edge_client.parity BUNDLE CASES.npz`
prints the report (full-precision errors) as JSON.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from edge_client.runtime import ClientRuntime, open_runtime
from sfp_common.bundle import BundleError, state_key
from sfp_common.parity import OUTPUT_TOL, ParityReport, adamw_well_scaled, max_rel, update_error

Case = dict[str, np.ndarray]


def save_cases(path: str | Path, cases: list[Case]) -> None:
    np.savez(path, **{f"{i}/{key}": value for i, case in enumerate(cases) for key, value in case.items()})


def load_cases(path: str | Path) -> list[Case]:
    cases: dict[int, Case] = {}
    with np.load(path, allow_pickle=False) as npz:
        for name in npz.files:
            index, key = name.split("/", 1)
            cases.setdefault(int(index), {})[key] = npz[name]
    return [cases[i] for i in sorted(cases)]


def _part(case: Case, prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in case.items() if k.startswith(prefix)}


def replay_step(runtime: ClientRuntime, case: Case, report: ParityReport) -> None:
    """One recorded step from the recorded start: tail-only (features but no tokens), local (no features), or
    split."""
    runtime.load_trainables(_part(case, "before/param/"))
    runtime.load_optimizer_state(_part(case, "before/state/"), int(case["step"]))
    x, y, lr = case["images"], case["labels"], float(case["lr"])
    if "features" in case and "tokens" not in case:
        tag = "tail-only step"
        step = runtime.tail_only_step(case["features"], y, lr)
        report.note("tail_only_step loss", max_rel(step.loss, case["loss"]), OUTPUT_TOL)
        report.note("tail_only_step logits", max_rel(step.logits, case["tail_logits"]), OUTPUT_TOL)
    elif "features" not in case:
        tag = "local step"
        report.note("local_logits", max_rel(runtime.local_logits(x), case["logits"]), OUTPUT_TOL)
        loss, logits = runtime.local_step(x, y, lr)
        report.note("local_step loss", max_rel(loss, case["loss"]), OUTPUT_TOL)
        report.note("local_step logits", max_rel(logits, case["logits"]), OUTPUT_TOL)
    else:
        tag = "split step"
        report.note("front tokens", max_rel(runtime.front_tokens(x), case["tokens"]), OUTPUT_TOL)
        if runtime.manifest.embeds:     # what the device sends: the embed graph's tokens, prompts put in
            report.note("embedded tokens + prompts", max_rel(runtime.smash(x), case["tokens"]), OUTPUT_TOL)
        if "tail_logits" in case:
            report.note("tail_logits", max_rel(runtime.tail_logits(case["features"]), case["tail_logits"]),
                        OUTPUT_TOL)
        step = runtime.tail_step(case["features"], y, lr)
        report.note("tail_step loss", max_rel(step.loss, case["loss"]), OUTPUT_TOL)
        report.note("tail_step dfeatures", max_rel(step.dfeatures, case["dfeatures"]), OUTPUT_TOL)
        if "tail_logits" in case:
            report.note("tail_step logits", max_rel(step.logits, case["tail_logits"]), OUTPUT_TOL)
        runtime.prompt_step(case["server_grad"], lr, images=x)
    _compare_after(runtime, case, report, tag)


def _compare_after(runtime: ClientRuntime, case: Case, report: ParityReport, tag: str) -> None:
    spec = runtime.manifest.optimizer
    params = runtime.trainables()
    state, step = runtime.optimizer_state()
    report.note(f"{tag} step counter", 0.0 if step == int(case["step"]) + 1 else float("inf"), 0.0)
    for name, value in params.items():
        for slot in spec.slots:
            key = state_key(slot, name)
            report.note(f"{tag} optimizer state", max_rel(state[key], case[f"after/state/{key}"]), OUTPUT_TOL)
        well_scaled = None
        if spec.name == "adamw":
            well_scaled = adamw_well_scaled(case[f"after/state/{state_key('exp_avg_sq', name)}"], step,
                                            spec.betas[1], spec.eps)
        error, limit = update_error(spec.name, value, case[f"after/param/{name}"], case[f"before/param/{name}"],
                                    well_scaled)
        report.note(f"{tag} update", error, limit)


def replay(runtime: ClientRuntime, cases: list[Case]) -> ParityReport:
    batches = tuple(sorted({len(case["images"]) for case in cases}))
    phases = len({("tokens" in c, "features" in c) for c in cases})
    report = ParityReport(batch_sizes=batches, steps=len(cases) // max(1, phases * len(batches)))
    for case in cases:
        replay_step(runtime, case, report)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description="Replay recorded PyTorch steps on a bundle; print the report.")
    ap.add_argument("bundle", type=Path)
    ap.add_argument("cases", type=Path)
    a = ap.parse_args()
    try:
        report = replay(open_runtime(a.bundle), load_cases(a.cases))
    except BundleError as err:
        raise SystemExit(f"error: {err}") from None
    print(json.dumps(asdict(report)))


if __name__ == "__main__":
    main()
