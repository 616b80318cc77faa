"""The comparison's report, from every run report in a folder: the summary rows (final accuracy over seeds, the
points to each run's own central ceiling and to split-only, MB to 95% of the ceiling, FLOPs and bytes against
FL), the tables, the per-round plot and the client memory column. bench/compare.py runs the federations and
calls `write_report`; bench/split_sweep.py and bench/phase1.py read runs through it too."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.client_memory import measure_in_fresh_process  # noqa: E402
from bench.compare import parse_run, partition_title  # noqa: E402
from simulation.central import adaptation_of  # noqa: E402
from simulation.methods import METHODS  # noqa: E402

REFERENCE = "sfprompt-split-only"     # what SFPrompt's phase 1 is measured against
TO_CEILING = 0.95                     # "MB to 95% of the ceiling"


def cumulative_mb(report: dict) -> list[float]:
    total, out = 0.0, []
    for r in report["rounds"]:
        total += r["bytes_up"] + r["bytes_down"]
        out.append(total / 1e6)
    return out


def to_target(report: dict, target: float) -> tuple[int | None, float | None]:
    """The first round whose accuracy reaches `target`, and the MB per client moved up to and including it."""
    for r, mb in zip(report["rounds"], cumulative_mb(report)):
        if r["accuracy"] >= target:
            return r["round"], mb
    return None, None


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), min and max."""
    mean = sum(values) / len(values)
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return {"mean": mean, "sd": sd, "min": min(values), "max": max(values), "n": len(values)}


def final_accuracy(report: dict) -> float:
    return report["rounds"][-1]["accuracy"]


def load_results(out: Path) -> tuple[dict[str, dict[str, dict[int, dict]]], dict[str, dict[int, dict]]]:
    """Every report in the folder: grid[partition][run][seed] and ceilings[adaptation][seed]."""
    grid: dict[str, dict[str, dict[int, dict]]] = {}
    ceilings: dict[str, dict[int, dict]] = {}
    for path in sorted(out.glob("*/*/seed*.json")):
        partition, name, seed = path.parts[-3], path.parts[-2], int(path.stem[4:])
        report = json.loads(path.read_text())
        if partition == "central":
            ceilings.setdefault(name, {})[seed] = report
        else:
            grid.setdefault(partition, {}).setdefault(name, {})[seed] = report
    return grid, ceilings


def summary_rows(reports: dict[str, dict[int, dict]], ceilings: dict[str, dict[int, dict]],
                 memory: dict[str, float]) -> list[dict]:
    """One row per run over its seeds; gaps are between means (the ceiling's over its own seeds)."""
    rows = []
    reference = reports.get(REFERENCE)
    reference_final = spread([final_accuracy(r) for r in reference.values()])["mean"] if reference else None
    for name, by_seed in reports.items():
        method = parse_run(name)[0]
        ceiling_runs = ceilings.get(adaptation_of(method), {})
        ceiling = spread([final_accuracy(r) for r in ceiling_runs.values()])["mean"] if ceiling_runs else None
        runs = list(by_seed.values())
        reach = [to_target(r, TO_CEILING * ceiling) for r in runs] if ceiling else []
        reached = [mb for _, mb in reach if mb is not None]
        rounds = [x for r in runs for x in r["rounds"]]
        final = spread([final_accuracy(r) for r in runs])
        rows.append({
            "run": name,
            "seeds": sorted(by_seed),
            "final_accuracy": final["mean"], "final_spread": final,
            "best_accuracy": spread([max(x["accuracy"] for x in r["rounds"]) for r in runs])["mean"],
            "client_accuracy": spread([r["rounds"][-1]["client_accuracy"] for r in runs])["mean"],
            "ceiling": adaptation_of(method),
            "ceiling_accuracy": ceiling,
            "vs_ceiling": None if ceiling is None else final["mean"] - ceiling,
            "vs_reference": None if reference_final is None else final["mean"] - reference_final,
            "mb_to_ceiling": sum(reached) / len(reached) if reached else None,
            "reached_ceiling": f"{len(reached)}/{len(reach)}" if reach else None,
            "bytes_per_round": sum(x["bytes_up"] + x["bytes_down"] for x in rounds) / len(rounds),
            "bytes_up_per_round": sum(x["bytes_up"] for x in rounds) / len(rounds),
            "client_flops_per_round": sum(x["client_flops"] for x in rounds) / len(rounds),
            "client_peak_mb": memory.get(name),
            "seconds": sum(x["seconds"] for x in rounds) / len(runs),
        })
    return rows


def _points(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.1f}"


def _accuracy(row: dict) -> str:
    s = row["final_spread"]
    return f"{s['mean']:.3f} ± {s['sd']:.3f}" if s["n"] > 1 else f"{s['mean']:.3f}"


def grid_table(summary: dict[str, list[dict]], fl: str = "fl") -> str:
    """Runs down, partitions across: final accuracy (mean ± sd over seeds) with the points to the run's central
    ceiling and to split-only; then what a round costs a client."""
    partitions = list(summary)
    names = list(dict.fromkeys(r["run"] for rows in summary.values() for r in rows))
    by = {p: {r["run"]: r for r in rows} for p, rows in summary.items()}
    head = " | ".join(f"{partition_title(p)}: final (vs ceiling, vs split-only)" for p in partitions)
    lines = [f"| run | seeds | {head} | MB/client/round | MB to {TO_CEILING:.0%} of ceiling ({partition_title(partitions[0])}) "
             "| client MFLOPs/round | bytes vs FL | FLOPs vs FL | client peak MB |",
             "|---|---|" + "---|" * len(partitions) + "---|---|---|---|---|---|"]
    first = by[partitions[0]]
    ref = first.get(fl)
    for name in names:
        cells = []
        for p in partitions:
            r = by[p].get(name)
            cells.append("-" if r is None else f"{_accuracy(r)} ({_points(r['vs_ceiling'])}, {_points(r['vs_reference'])})")
        r = first.get(name) or next(by[p][name] for p in partitions if name in by[p])
        reach = "-" if r["reached_ceiling"] is None else (
            f"{r['mb_to_ceiling']:.1f} ({r['reached_ceiling']} seeds)" if r["mb_to_ceiling"] is not None
            else f"not reached (0/{r['reached_ceiling'].split('/')[1]})")
        bytes_ratio = f"{r['bytes_per_round'] / ref['bytes_per_round']:.3f}" if ref else "-"
        flops_ratio = f"{r['client_flops_per_round'] / ref['client_flops_per_round']:.3%}" if ref else "-"
        memory = "-" if r["client_peak_mb"] is None else f"{r['client_peak_mb']:.0f}"
        lines.append(f"| {name} | {len(r['seeds'])} | {' | '.join(cells)} | {r['bytes_per_round'] / 1e6:.2f} | {reach} | "
                     f"{r['client_flops_per_round'] / 1e6:.1f} | {bytes_ratio} | {flops_ratio} | {memory} |")
    return "\n".join(lines) + "\n"


def ceiling_table(ceilings: dict[str, dict[int, dict]], users: dict[str, list[str]]) -> str:
    lines = ["| adaptation | trained by | seeds | final acc. | best | accuracy per round-equivalent (mean over seeds) |",
             "|---|---|---|---|---|---|"]
    for name, by_seed in ceilings.items():
        runs = list(by_seed.values())
        final = spread([final_accuracy(r) for r in runs])
        curve = " ".join(f"{sum(r['rounds'][i]['accuracy'] for r in runs) / len(runs):.3f}"
                         for i in range(len(runs[0]["rounds"])))
        accuracy = f"{final['mean']:.3f} ± {final['sd']:.3f}" if final["n"] > 1 else f"{final['mean']:.3f}"
        lines.append(f"| {name} | {', '.join(users.get(name, []))} | {len(runs)} | {accuracy} | "
                     f"{spread([max(x['accuracy'] for x in r['rounds']) for r in runs])['mean']:.3f} | {curve} |")
    return "\n".join(lines) + "\n"


def mean_curve(by_seed: dict[int, dict], key) -> tuple[list[float], list[float], list[float]]:
    """Per round: mean, min and max over seeds of key(round row, report)."""
    runs = list(by_seed.values())
    values = [[key(r["rounds"][i], r, i) for r in runs] for i in range(min(len(r["rounds"]) for r in runs))]
    return [sum(v) / len(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def plot(grid: dict[str, dict[str, dict[int, dict]]], ceilings: dict[str, dict[int, dict]], path: Path,
         title: str) -> None:
    """Accuracy per round and against cumulative traffic: the mean over seeds, the band from min to max; the
    central ceilings dashed; the accuracy axis from 0."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    partitions = list(grid)
    fig, axes = plt.subplots(2, len(partitions), figsize=(6 * len(partitions), 9), squeeze=False)
    names = list(dict.fromkeys(name for reports in grid.values() for name in reports))
    colors = {name: f"C{i % 10}" for i, name in enumerate(names)}
    styles = {name: s for name, s in zip(ceilings, ("--", ":", "-."))}
    for col, partition in enumerate(partitions):
        by_round, by_bytes = axes[0][col], axes[1][col]
        for name, by_seed in grid[partition].items():
            mean, low, high = mean_curve(by_seed, lambda row, report, i: 100 * row["accuracy"])
            rounds = list(range(1, len(mean) + 1))
            by_round.plot(rounds, mean, marker="o", ms=3, color=colors[name], label=name)
            if len(by_seed) > 1:
                by_round.fill_between(rounds, low, high, color=colors[name], alpha=0.12, lw=0)
            mb, _, _ = mean_curve(by_seed, lambda row, report, i: cumulative_mb(report)[i])
            if mb[-1] > 0:
                by_bytes.plot(mb, mean, marker="o", ms=3, color=colors[name], label=name)
        for name, by_seed in ceilings.items():
            level = 100 * sum(final_accuracy(r) for r in by_seed.values()) / len(by_seed)
            for ax in (by_round, by_bytes):
                ax.axhline(level, color="gray", ls=styles.get(name, "--"), lw=1, label=f"central ceiling: {name}")
        seeds = sorted({s for by_seed in grid[partition].values() for s in by_seed})
        by_round.set(xlabel="round", ylabel="central test accuracy (%)", ylim=(0, 100),
                     title=f"{partition_title(partition)}: accuracy per round (seeds {', '.join(map(str, seeds))})")
        by_bytes.set(xlabel="cumulative MB per client (up + down)", ylabel="central test accuracy (%)",
                     title=f"{partition_title(partition)}: accuracy against traffic", xscale="log", ylim=(0, 100))
        for ax in (by_round, by_bytes):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def client_memory(out: Path, names: list[str], model: str, batch: int) -> dict[str, float]:
    """Peak client memory per run name, each in a fresh process; cached in <out>/client_memory.json."""
    cache = out / "client_memory.json"
    known = json.loads(cache.read_text()) if cache.exists() else {}
    for name in names:
        if name not in known:
            method, traffic, _, _ = parse_run(name)
            known[name] = measure_in_fresh_process(method, model, batch, traffic)["peak_mb"]
    cache.write_text(json.dumps(known, indent=2) + "\n")
    return known


def run_order(name: str) -> tuple[int, bool, str, float]:
    """Runs in the order simulation/methods.py lists the methods, each method's traffic, wire and noise variants
    after it."""
    method, traffic, wire, noise = parse_run(name)
    return list(METHODS).index(method), traffic != "ours", wire or "", noise or 0.0


def write_report(out: Path, settings: dict) -> str:
    """Tables, summary.json and the plot from every report in `out` (runs of earlier invocations included, so
    the suite can add seeds or ablations in steps)."""
    grid, ceilings = load_results(out)
    partitions = sorted(grid, key=lambda p: -float("inf") if p == "iid" else -float(p[3:]))   # IID, then more skew
    grid = {p: dict(sorted(grid[p].items(), key=lambda kv: run_order(kv[0]))) for p in partitions}
    names = list(dict.fromkeys(n for reports in grid.values() for n in reports))
    users: dict[str, list[str]] = {}
    for n in names:
        users.setdefault(adaptation_of(parse_run(n)[0]), []).append(n)
    memory = client_memory(out, names, settings["model"], 16)
    title = (f"{settings['dataset']}, {settings['clients']} clients, {settings['rounds']} rounds, "
             f"backbone {Path(settings['model']).stem}")
    summary = {p: summary_rows(grid[p], ceilings, memory) for p in partitions}
    sections = [f"# {title}\n", "Final accuracy on the central test set: mean ± sample standard deviation over the "
                "seeds; in brackets the points to the run's own central ceiling (the same trained tensors on the "
                f"pooled data) and to {REFERENCE}, both between means. MB to {TO_CEILING:.0%} of the ceiling: "
                "per client, up to the first round at or above it, mean over the seeds that got there.\n",
                grid_table(summary)]
    if ceilings:
        sections.append(f"## Central ceilings (pooled training shares, no federation)\n\n"
                        f"{ceiling_table(ceilings, users)}")
    sections.append("![accuracy per round and against traffic](comparison.png)\n")
    text = "\n".join(sections)
    (out / "tables.md").write_text(text)
    (out / "summary.json").write_text(json.dumps(
        {"settings": settings, "to_ceiling": TO_CEILING, "reference": REFERENCE, "partitions": summary,
         "ceilings": {k: {str(s): r["rounds"] for s, r in v.items()} for k, v in ceilings.items()}},
        indent=2) + "\n")
    plot(grid, ceilings, out / "comparison.png", title)
    return text
