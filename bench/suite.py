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
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.compare import partition_title  # noqa: E402
from sfp_common.recipe import Recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# The comparison's headline rows get three seeds; the ablations and the other baselines one (same folder, one
# report: bench/compare.py reads every run there).
HEADLINE_RUNS = "sfprompt,sfprompt-split-only,sfprompt-paper-phase1,fl"
ABLATION_RUNS = "sfprompt-no-prune,sfprompt-no-local,sfprompt-paper,fedprompt,sfl"
PRECISION_RUNS = "sfprompt-fp32,sfprompt-fp16,sfprompt-int8"
NOISE_SCALES = ("0.25", "1", "4")        # the noise defence: the audit's scales, and their accuracy cost
DEFENCE_RUNS = ",".join(["sfprompt", *(f"sfprompt-noise{s}" for s in NOISE_SCALES)])
COMPARE = ("--partitions", "iid,0.5,0.1", "--central", "--rounds", "10", "--jobs", "2", "--resume")
QUICK = ("--rounds", "2", "--train-samples", "1000", "--resume")


@dataclass(frozen=True)
class Item:
    name: str                           # its folder under the results root
    title: str
    script: str
    full: tuple[tuple[str, ...], ...]   # one invocation per argument list, in order, into the same folder
    quick: tuple[tuple[str, ...], ...]


ITEMS = (
    Item("comparison", "1. The comparison: methods, ablations, partitions, central ceilings", "bench/compare.py",
         (("--methods", HEADLINE_RUNS, "--seeds", "0,1,2", *COMPARE),
          ("--methods", ABLATION_RUNS, "--seeds", "0", *COMPARE)),
         (("--methods", "sfprompt,sfprompt-split-only,sfprompt-paper,fl", "--partitions", "iid,0.1", "--central",
           "--seeds", "0,1", *QUICK),)),
    Item("phase1", "1b. How phase 1 was chosen: pruning and local-update candidates against split-only",
         "bench/phase1.py", (("--jobs", "2", "--resume"),),
         (("--candidates", "split-only,ep2-le40", "--seeds", "0", "--rounds", "1", "--train-samples", "600",
           "--resume"),)),
    Item("split-sweep", "2. The split sweep: head and tail blocks, prompts", "bench/split_sweep.py",
         (("--rounds", "10", "--jobs", "2", "--resume"),),
         (("--configs", "0/0/10,1/1/10", "--rounds", "1", "--train-samples", "600", "--resume"),)),
    Item("counting", "3. Counting at the paper's scale (ViT-B/16, ViT-L/16 at 224)", "bench/counting.py",
         ((),), (("--models", "vit_base_patch16_224", "--samples", "100"),)),
    Item("precision", "4. Smashed-token precision", "bench/compare.py",
         (("--methods", PRECISION_RUNS, "--partitions", "0.5", "--seeds", "0,1,2", "--rounds", "10", "--jobs", "2",
           "--resume"),),
         (("--methods", PRECISION_RUNS, "--partitions", "0.5", "--rounds", "1", "--train-samples", "1000",
           "--resume"),)),
    Item("serving", "5. The server: serving path against the bare body", "bench/serving.py",
         (("--devices", "1,8,64", "--batch", "2", "--seconds", "40"),),
         (("--devices", "1,8", "--batch", "2", "--seconds", "5"),)),
    Item("transport", "6. The transport: protocol goodput against raw paho", "bench/transport.py",
         (("--latency",), ("--trials", "9")),
         (("--latency", "--sizes", "65536"), ("--trials", "1", "--sizes", "65536,1048576"))),
    Item("device-step", "On-device step time and memory against PyTorch (issue 3's targets)", "bench/device_step.py",
         (("--round-samples", "0"),),
         (("--models", "vit_tiny_patch16_224", "--batches", "8", "--reps", "5", "--round-samples", "0"),)),
    Item("device-round", "A whole device round: patch tokens embedded once per round against once per batch",
         "bench/device_step.py", (("--batches", "none", "--round-samples", "256", "--round-reps", "3"),),
         (("--models", "vit_tiny_patch16_224", "--batches", "none", "--round-samples", "32", "--round-reps", "1"),)),
    Item("audit", "7. What the server can see: inversion of the smashed tokens", "bench/audit.py",
         ((), ("--wires", "fp16", "--noise", ",".join(NOISE_SCALES))),
         (("--head-blocks", "0,1", "--wires", "fp16", "--images", "4", "--public-images", "500", "--steps", "30",
           "--restarts", "1", "--inverse-epochs", "1"),)),
    Item("defences", "7b. Defences: what the noise on the tokens costs in accuracy and buys against inversion",
         "bench/compare.py", (("--methods", DEFENCE_RUNS, "--partitions", "iid,0.5", "--seeds", "0,1,2", "--rounds",
                               "10", "--jobs", "2", "--resume"),),
         (("--methods", "sfprompt,sfprompt-noise1", "--partitions", "0.5", "--rounds", "1", "--train-samples",
           "1000", "--resume"),)),
    Item("fleet-scale", "8. The fleet at scale: one coordinator, one body worker, one Mosquitto",
         "bench/fleet_scale.py", (("--devices", "10,100,300,1000", "--rounds", "3", "--churn", "0.1", "--resume"),),
         (("--devices", "4,8", "--rounds", "2", "--churn", "0.25", "--hosts", "2"),)),
    Item("chaos", "Chaos: faults injected at random, against the fault-free run", "bench/chaos.py",
         (("--rounds", "20", "--devices", "4"),),
         (("--rounds", "3", "--devices", "3", "--samples", "300", "--interval", "6"),)),
)


def run_item(item: Item, root: Path, quick: bool) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    for args in item.quick if quick else item.full:
        out = root.resolve() / item.name      # relative inside the checkout: the results record their command
        out = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
        cmd = [sys.executable, item.script, *args, "--out", str(out)]
        print(f"\n=== {item.title}: {' '.join(cmd[1:])}", flush=True)
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
    return re.sub(r"\]\(([\w.-]+(?:/[\w.-]+)*\.png)\)", lambda m: f"]({prefix}/{m.group(1)})", markdown)


# The settings of SFPrompt's phase 1 and split training; a run of `sfprompt` made before the default changed
# says so beside its item (the other settings, wire and noise, are what the items vary on purpose).
PHASE1_SETTINGS = ("epochs", "prune", "keep", "select", "local_update", "local_epochs")


def earlier_default_note(folder: Path) -> str | None:
    """A line for an item whose `sfprompt` runs used another default recipe than today's, naming the settings."""
    today = Recipe().as_dict()
    earlier: dict[str, set] = {}
    for path in folder.rglob("seed*.json"):
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        federated = isinstance(report, dict) and report.get("method") == "sfprompt" and not report.get("central")
        train = report.get("train") if federated else None     # a central ceiling runs no phase 1
        for name in PHASE1_SETTINGS if isinstance(train, dict) else ():
            if name in train and train[name] != today[name]:
                earlier.setdefault(name, set()).add(train[name])
    if not earlier:
        return None
    was = ", ".join(f"{n} = {'/'.join(map(str, sorted(v)))} (now {today[n]})" for n, v in sorted(earlier.items()))
    return (f"Measured with SFPrompt's earlier default recipe: {was}. Section 1 has today's default's accuracy; "
            "these rows compare settings with each other under the earlier one.")


def precision_table(folder: Path) -> str | None:
    """Final accuracy and traffic per token dtype, over the seeds run."""
    summary = folder / "summary.json"
    if not summary.exists():
        return None
    rows = json.loads(summary.read_text())["partitions"].get("dir0.5", [])
    lines = ["| tokens | seeds | final accuracy, mean ± sd (min - max) | MB per client per round |", "|---|---|---|---|"]
    for row in rows:
        acc = row["final_spread"]
        lines.append(f"| {row['run'].rsplit('-', 1)[-1]} | {acc['n']} | {acc['mean']:.3f} ± {acc['sd']:.3f} "
                     f"({acc['min']:.3f} - {acc['max']:.3f}) | {row['bytes_per_round'] / 1e6:.2f} |")
    return "\n".join(lines) + "\n"


def defence_table(folder: Path, audit: Path) -> str | None:
    """Each noise scale's accuracy (mean ± sd over seeds) and its cost against no noise, beside what the audit's
    best attack rebuilds at that scale (no head blocks, fp16 tokens): the trade a user chooses from."""
    summary = folder / "summary.json"
    if not summary.exists():
        return None
    parts = json.loads(summary.read_text())["partitions"]
    rows = {p: {r["run"]: r for r in rs} for p, rs in parts.items()}
    attacks = {}
    for path in (audit / "rows").glob("k0-fp16-noise*.json") if (audit / "rows").exists() else []:
        row = json.loads(path.read_text())
        attacks[row["noise"]] = row
    runs = list(dict.fromkeys(r for p in rows.values() for r in p))
    lines = ["Noise on the smashed patch tokens (std x their RMS; `--token-noise`, sfp_common/defence.py), no head "
             "blocks, fp16 tokens; accuracy mean ± sd over the seeds (the evaluation's tokens noised too, as a "
             "defended device sends them), cost in points against no noise (between means, single-seed swings are "
             "3-7 points); reconstruction: the audit's strongest attack on the same setting.", "",
             "| noise | " + " | ".join(f"{partition_title(p)}: final (cost)" for p in rows) +
             " | MB/client/round | client MFLOPs/round | reconstruction: best PSNR, SSIM (attack) | fails |",
             "|---|" + "---|" * len(rows) + "---|---|---|---|"]
    for run in runs:
        scale = float(run.rsplit("-noise", 1)[1]) if "-noise" in run else 0.0
        cells = []
        for p, by_run in rows.items():
            r, base = by_run.get(run), by_run.get("sfprompt")
            if r is None:
                cells.append("-")
                continue
            s = r["final_spread"]
            cost = "" if base is None or run == "sfprompt" else (
                f" ({100 * (r['final_accuracy'] - base['final_accuracy']):+.1f})")
            cells.append(f"{s['mean']:.3f} ± {s['sd']:.3f} ({s['n']}){cost}")
        any_row = next(by_run[run] for by_run in rows.values() if run in by_run)
        attack = attacks.get(scale)
        if attack:
            best = max(attack["attacks"].items(), key=lambda kv: kv[1]["psnr"])
            seen = (f"{best[1]['psnr']:.1f} dB, {max(a['ssim'] for a in attack['attacks'].values()):.2f} "
                    f"({best[0]})")
        lines.append(f"| {scale:g} | {' | '.join(cells)} | {any_row['bytes_per_round'] / 1e6:.2f} | "
                     f"{any_row['client_flops_per_round'] / 1e6:.1f} | {seen if attack else '-'} | "
                     f"{('yes' if attack['fails'] else 'no') if attack else '-'} |")
    return "\n".join(lines) + "\n"


def comparison_targets(summary: dict) -> list[tuple[str, str, bool | None]]:
    """Issue 12's: SFPrompt's phase 1 pays (as accurate as split-only, near its ceiling, fewer bytes); and issue 5's
    original ceiling target."""
    out: list[tuple[str, str, bool | None]] = []
    rows = {p: {r["run"]: r for r in rs} for p, rs in summary["partitions"].items()}
    for partition, title in (("iid", "IID"), ("dir0.5", "Dirichlet 0.5")):
        ours, ref = rows.get(partition, {}).get("sfprompt"), rows.get(partition, {}).get("sfprompt-split-only")
        if not ours:
            continue
        seeds = f"mean of {ours['final_spread']['n']} seeds"
        if ref:
            out.append((f"sfprompt within 1 point of sfprompt-split-only, {title} ({seeds})",
                        f"{ours['final_accuracy']:.3f} vs {ref['final_accuracy']:.3f} "
                        f"({100 * ours['vs_reference']:+.1f} points)", ours["vs_reference"] >= -0.01))
        if ours["ceiling_accuracy"] is not None:
            out.append((f"sfprompt within 2 points of its central ceiling, {title} ({seeds})",
                        f"{ours['final_accuracy']:.3f} vs {ours['ceiling_accuracy']:.3f} "
                        f"({100 * ours['vs_ceiling']:+.1f} points)", ours["vs_ceiling"] >= -0.02))
        if partition == "iid" and ref:
            ratio = ours["bytes_per_round"] / ref["bytes_per_round"]
            out.append(("sfprompt bytes per client per round <= 0.6x sfprompt-split-only's, IID", f"{ratio:.2f}x",
                        ratio <= 0.6))
            mb, ref_mb = ours["mb_to_ceiling"], ref["mb_to_ceiling"]
            out.append((f"sfprompt reaches {summary['to_ceiling']:.0%} of its ceiling with fewer MB per client than "
                        "sfprompt-split-only, IID",
                        f"{'not reached' if mb is None else f'{mb:.1f} MB'} vs "
                        f"{'not reached' if ref_mb is None else f'{ref_mb:.1f} MB'}",
                        mb is not None and (ref_mb is None or mb < ref_mb)))
        if partition == "iid" and ours["ceiling_accuracy"] is not None:
            out.append(("federated SFPrompt within 1 point of its central ceiling, IID (issue 5)",
                        f"{ours['final_accuracy']:.3f} vs {ours['ceiling_accuracy']:.3f} "
                        f"({100 * ours['vs_ceiling']:+.1f} points)", ours["vs_ceiling"] >= -0.01))
    return out


def targets(root: Path) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for each target whose results exist."""
    out: list[tuple[str, str, bool | None]] = []
    counting = root / "counting" / "results.json"
    if counting.exists():
        rows = json.loads(counting.read_text())["rows"]
        for r in rows:
            if r["model"] == "vit_base_patch16_224" and r["variant"].startswith("ours"):
                goal = 0.01 if "kept by the server" in r["variant"] else 0.10     # issue 15's opt-in traffic
                out.append((f"ViT-B/16 bytes per client per round <= {goal:.2f}x FL ({r['variant']})",
                            f"{r['bytes_vs_fl']:.3f}x", r["bytes_vs_fl"] <= goal))
        for model in dict.fromkeys(r["model"] for r in rows):
            r = next(r for r in rows if r["model"] == model and r["method"] == "sfprompt")
            out.append((f"{model} client FLOPs <= 0.46% of FL", f"{r['flops_vs_fl']:.3%}", r["flops_vs_fl"] <= 0.0046))
    comparison = root / "comparison" / "summary.json"
    if comparison.exists():
        out += comparison_targets(json.loads(comparison.read_text()))
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
        nodelay = (f" ({min(r['ratio_nodelay'] for r in rows):.2f}x against raw paho with TCP_NODELAY, as the "
                   "protocol's sockets)" if all("ratio_nodelay" in r for r in rows) else "")
        out.append(("protocol goodput >= 0.8x raw paho, every message size",
                    f"lowest {worst['ratio']:.2f}x at {worst['bytes']:,} B{nodelay}", worst["ratio"] >= 0.8))
    audit = root / "audit" / "results.json"
    if audit.exists():
        rows = json.loads(audit.read_text())["rows"]
        failing = [r["setting"] for r in rows if r["fails"]]
        worst = min(rows, key=lambda r: r["attacks"][r["best"]]["psnr"])
        best = worst["attacks"][worst["best"]]
        out.append(("every inversion fails (PSNR <= 15 dB, SSIM <= 0.3) at a cost of at most 1 accuracy point "
                    "(issue 15)",
                    (f"fails only at {', '.join(failing)} of {len(rows)} settings; its accuracy cost not measured yet"
                     if failing else f"fails at none of {len(rows)} settings; lowest {best['psnr']:.1f} dB, SSIM "
                     f"{best['ssim']:.2f} ({worst['setting']}, {worst['best']})"), None if failing else False))
    fleet = root / "fleet-scale" / "results.json"
    if fleet.exists():
        results = json.loads(fleet.read_text())["results"]
        lost = sum(len(r["lost"]) for x in results for r in x["rounds"])
        refused = sum(x["refused"] for x in results)
        sizes = ", ".join(f"{x['devices']}{' with churn' if x['churn'] else ''}" for x in results)
        out.append(("no update lost, none refused, each counted once, at every fleet size (issue 16)",
                    f"{lost} lost, {refused} refused at {sizes} devices",
                    lost == 0 and refused == 0 and all(x["each_once"] for x in results)))
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
        if item.name in ("precision", "defences"):
            body = precision_table(folder) if item.name == "precision" else defence_table(folder, root / "audit")
            if body and (folder / "comparison.png").exists():
                body += f"\n![{item.name}](comparison.png)"
        else:
            body = _read(folder / "tables.md") or _read(folder / "results.md")
        if body is None:
            continue
        note = None if item.name == "phase1" else earlier_default_note(folder)
        lines += ["", f"## {item.title}", "", f"Folder: `{os.path.relpath(folder, page.parent)}/`.", "",
                  *([note, ""] if note else []), _relink(_demote(body), folder, page).strip()]
        for png in ("goodput.png", "timeline.png", "fleet_scale.png"):
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
