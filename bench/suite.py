"""The whole benchmark suite in one command (or a quick variant), then RESULTS.md with every target checked.

    python bench/suite.py                    # everything: bench/results/<item>/, then bench/RESULTS.md
    python bench/suite.py --quick            # a few minutes, small settings: runs/bench-quick/ and its RESULTS.md
    python bench/suite.py --only serving     # some items again; the others' results are reused from the folder
    python bench/suite.py --report-only      # RESULTS.md from the results already there

Each item is its own script (run as a subprocess, so each measures in a fresh process) writing into
<root>/<item>/; this file only runs them and assembles their tables. The full suite takes hours on a 2-core CPU
(the comparison alone trains 24 federations and ceilings); the quick one trains on a 1000-sample subset for one
or two rounds, so its accuracies say nothing: it checks that every part runs and writes its results.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPARISON_RUNS = "sfprompt,sfprompt-paper,sfprompt-no-prune,sfprompt-no-local,fl,fedprompt,sfl"
PRECISION_RUNS = "sfprompt-fp32,sfprompt-fp16,sfprompt-int8"


@dataclass(frozen=True)
class Item:
    name: str            # its folder under the results root
    title: str
    script: str
    full: tuple[str, ...]
    quick: tuple[str, ...]
    seeds: tuple[int, ...] = ()     # run once per seed, into <item>/seed<k>/
    quick_seeds: tuple[int, ...] = ()


ITEMS = (
    Item("comparison", "1. The comparison: methods, ablations, partitions, central ceilings", "bench/compare.py",
         ("--methods", COMPARISON_RUNS, "--partitions", "iid,0.5,0.1", "--central", "--rounds", "10",
          "--target", "0.5", "--resume"),
         ("--methods", "sfprompt,sfprompt-paper,fl", "--partitions", "iid,0.1", "--central", "--rounds", "2",
          "--train-samples", "1000", "--target", "0.3", "--resume")),
    Item("counting", "2. Counting at the paper's scale (ViT-B/16, ViT-L/16 at 224)", "bench/counting.py",
         (), ("--models", "vit_base_patch16_224", "--samples", "100")),
    Item("precision", "3. Smashed-token precision", "bench/compare.py",
         ("--methods", PRECISION_RUNS, "--partitions", "0.5", "--rounds", "10", "--resume"),
         ("--methods", PRECISION_RUNS, "--partitions", "0.5", "--rounds", "1", "--train-samples", "1000",
          "--resume"), seeds=(0, 1, 2), quick_seeds=(0,)),
    Item("serving", "4. The server: serving path against the bare body", "bench/serving.py",
         ("--devices", "1,8,64", "--batch", "2", "--seconds", "40"),
         ("--devices", "1,8", "--batch", "2", "--seconds", "5")),
    Item("transport", "5. The transport: protocol goodput against raw paho", "bench/transport.py",
         ("--trials", "5"), ("--trials", "1", "--sizes", "65536,1048576")),
    Item("device-step", "On-device step time and memory against PyTorch (issue 3's targets)", "bench/device_step.py",
         (), ("--models", "vit_tiny_patch16_224", "--batches", "8", "--reps", "5")),
    Item("chaos", "Chaos: faults injected at random, against the fault-free run", "bench/chaos.py",
         ("--rounds", "20", "--devices", "4"), ("--rounds", "3", "--devices", "3", "--samples", "300",
                                                "--interval", "6")),
)


def run_item(item: Item, root: Path, quick: bool) -> None:
    args = item.quick if quick else item.full
    seeds = (item.quick_seeds if quick else item.seeds) or (None,)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    for seed in seeds:
        out = root / item.name if seed is None else root / item.name / f"seed{seed}"
        cmd = [sys.executable, item.script, *args, "--out", str(out), *(() if seed is None else ("--seed", str(seed)))]
        print(f"\n=== {item.title}{'' if seed is None else f', seed {seed}'}: {' '.join(cmd[1:])}", flush=True)
        start = time.time()
        subprocess.run(cmd, cwd=ROOT, env=env, check=True)
        print(f"=== {item.name}: {time.time() - start:.0f} s", flush=True)


# ---- RESULTS.md ----

def _read(path: Path) -> str | None:
    return path.read_text() if path.exists() else None


def _demote(markdown: str) -> str:
    """An item's own headings below the item's heading."""
    return "\n".join("##" + line if line.startswith("#") else line for line in markdown.splitlines())


def _relink(markdown: str, folder: Path, page: Path) -> str:
    """Image links written relative to an item's folder, rewritten relative to RESULTS.md."""
    prefix = os.path.relpath(folder, page.parent)
    return markdown.replace("](comparison.png)", f"]({prefix}/comparison.png)")


def precision_table(folder: Path) -> str | None:
    """Final accuracy and traffic per token dtype, over the seeds that exist."""
    per_wire: dict[str, list[dict]] = {}
    for summary in sorted(folder.glob("seed*/summary.json")):
        for row in json.loads(summary.read_text())["partitions"]["dir0.5"]:
            per_wire.setdefault(row["run"], []).append(row)
    if not per_wire:
        return None
    lines = ["| tokens | seeds | final accuracy, mean (min - max) | MB per client per round |", "|---|---|---|---|"]
    for run, rows in per_wire.items():
        acc = [r["final_accuracy"] for r in rows]
        mb = sum(r["bytes_per_round"] for r in rows) / len(rows) / 1e6
        lines.append(f"| {run.rsplit('-', 1)[-1]} | {len(rows)} | {sum(acc) / len(acc):.3f} "
                     f"({min(acc):.3f} - {max(acc):.3f}) | {mb:.2f} |")
    return "\n".join(lines) + "\n"


def targets(root: Path) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for each of issue 5's targets whose results exist."""
    out: list[tuple[str, str, bool | None]] = []
    counting = root / "counting" / "results.json"
    if counting.exists():
        rows = json.loads(counting.read_text())["rows"]
        for r in rows:
            if r["model"] == "vit_base_patch16_224" and r["variant"].startswith("ours"):
                out.append((f"ViT-B/16 bytes per client per round <= 0.10x FL ({r['variant']})",
                            f"{r['bytes_vs_fl']:.3f}x", r["bytes_vs_fl"] <= 0.10))
        for model in dict.fromkeys(r["model"] for r in rows):
            r = next(r for r in rows if r["model"] == model and r["method"] == "sfprompt")
            out.append((f"{model} client FLOPs <= 0.46% of FL", f"{r['flops_vs_fl']:.3%}", r["flops_vs_fl"] <= 0.0046))
    comparison = root / "comparison" / "summary.json"
    if comparison.exists():
        summary = json.loads(comparison.read_text())
        for row in summary["partitions"].get("iid", []):
            if row["run"] == "sfprompt" and row["ceiling_accuracy"] is not None:
                gap = 100 * (row["final_accuracy"] - row["ceiling_accuracy"])
                out.append(("federated SFPrompt within 1 point of its central ceiling, IID",
                            f"{row['final_accuracy']:.3f} vs {row['ceiling_accuracy']:.3f} ({gap:+.1f} points)",
                            gap >= -1.0))
    serving = root / "serving" / "results.json"
    if serving.exists():
        data = json.loads(serving.read_text())
        last = data["rows"][-1]
        out.append((f"serving path >= 0.7x the bare body with 64 devices ({data['model']}, {data['body_dtype']}, "
                    f"{last['ceiling']['device']})", f"{last['ratio']:.2f}x at {last['devices']} devices",
                    last["ratio"] >= 0.7 if last["devices"] >= 64 else None))
    transport = root / "transport" / "results.json"
    if transport.exists():
        rows = json.loads(transport.read_text())["rows"]
        worst = min(rows, key=lambda r: r["ratio"])
        out.append(("protocol goodput >= 0.8x raw paho, every message size",
                    f"lowest {worst['ratio']:.2f}x at {worst['bytes']:,} B", worst["ratio"] >= 0.8))
    return out


def write_results(root: Path, page: Path, command: str) -> str:
    lines = ["# Benchmark results", "",
             "The accuracy items run the offline transfer task: a small ViT (28x28 input, patch 7, width 128, "
             "6 blocks) pretrained in-house on Fashion-MNIST (`make backbone`), fine-tuned federatedly on MNIST 5k "
             "(4000 images over 10 clients, each keeping a fifth of its share as its local test split; accuracy on the "
             "1000-image test set). It is not the paper's "
             "ImageNet-21k ViT-B/16; the counting item uses the paper's models at their size.", "",
             f"Made by `{command}` on {time.strftime('%Y-%m-%d')}; each item's folder records its machine and command.",
             "", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for name, measured, met in targets(root):
        lines.append(f"| {name} | {measured} | {'-' if met is None else 'yes' if met else '**no**'} |")
    for item in ITEMS:
        folder = root / item.name
        if item.name == "precision":
            body = precision_table(folder)
            plots = sorted(folder.glob("seed*/comparison.png"))
            if body and plots:
                body += "\n" + "\n".join(f"![{p.parent.name}]({os.path.relpath(p, page.parent)})" for p in plots)
        else:
            body = _read(folder / "tables.md") or _read(folder / "results.md")
        if body is None:
            continue
        lines += ["", f"## {item.title}", "", f"Folder: `{os.path.relpath(folder, page.parent)}/`.", "",
                  _relink(_demote(body), folder, page).strip()]
        for png in ("goodput.png", "timeline.png"):
            if (folder / png).exists():
                lines += ["", f"![{png}]({os.path.relpath(folder / png, page.parent)})"]
    text = "\n".join(lines) + "\n"
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="Small settings (minutes); results in runs/bench-quick.")
    ap.add_argument("--only", help=f"Comma-separated items: {', '.join(i.name for i in ITEMS)}.")
    ap.add_argument("--report-only", action="store_true", help="Only rebuild RESULTS.md.")
    ap.add_argument("--root", type=Path, help="Results folder [bench/results, or runs/bench-quick with --quick].")
    a = ap.parse_args()
    root = a.root or (ROOT / "runs" / "bench-quick" if a.quick else ROOT / "bench" / "results")
    page = root / "RESULTS.md" if a.quick or a.root else ROOT / "bench" / "RESULTS.md"
    wanted = set(a.only.split(",")) if a.only else {i.name for i in ITEMS}
    unknown = wanted - {i.name for i in ITEMS}
    if unknown:
        raise SystemExit(f"error: unknown item(s) {', '.join(sorted(unknown))}; choose from "
                         f"{', '.join(i.name for i in ITEMS)}")
    if not a.report_only:
        start = time.time()
        for item in ITEMS:
            if item.name in wanted:
                run_item(item, root, a.quick)
        print(f"\nsuite: {time.time() - start:.0f} s", flush=True)
    command = "python bench/suite.py" + (" --quick" if a.quick else "")
    print(write_results(root, page, command))
    print(f"written: {os.path.relpath(page, ROOT)}")


if __name__ == "__main__":
    main()
