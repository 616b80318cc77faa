"""Federated methods side by side, on one or several data partitions, each beside its central ceiling.

    python bench/compare.py --methods sfprompt,fl --rounds 5 --partitions 0.5 --out runs/demo
    python bench/compare.py --methods sfprompt,sfprompt-paper,fl,fedprompt,sfl --partitions iid,0.5,0.1 \\
        --central --out bench/results/comparison

A run name is a method (simulation/methods.py) or a method with `-paper` appended: the same training with the
paper's traffic (four fp32 activation-sized transfers per batch) instead of ours. Every run uses the same data
split per partition, seed and backbone, and each method its own default learning rate unless --lr is given.
`--central` adds each adaptation's central ceiling (simulation/central.py: the pooled training shares of the IID
split, no federation; one per set of trained tensors). Runs go one after another, ceilings first, or to a pool of
`--jobs` processes of one thread each (on a 2-core machine two single-thread runs side by side were slower than
one after the other); a run whose JSON exists is reused with --resume.

Output: <out>/<partition>/<run>.json (sfp-sim's report), <out>/central/<adaptation>.json, <out>/tables.md (the
tables), <out>/summary.json, <out>/comparison.png (accuracy per round and against traffic, ceilings dashed).
"""
from __future__ import annotations

import json
import multiprocessing
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.client_memory import measure_in_fresh_process  # noqa: E402
from export.split import SplitSpec  # noqa: E402
from sfp_common.cli import run_cli  # noqa: E402
from sfp_common.errors import ConfigError  # noqa: E402
from simulation.central import adaptation_of  # noqa: E402
from simulation.cli import DEFAULT_MODEL, HEADER, format_row, train_config  # noqa: E402
from simulation.accounting import WIRE_DTYPES  # noqa: E402
from simulation.methods import METHODS  # noqa: E402

PAPER_SUFFIX = "-paper"


@dataclass(frozen=True)
class Run:
    name: str              # the run's file name and label
    method: str
    traffic: str = "ours"
    wire: str | None = None  # None: the comparison's --wire
    partition: str = "iid"  # "iid" or "dir<alpha>"; "central" for a ceiling

    @property
    def alpha(self) -> float | None:
        return None if self.partition in ("iid", "central") else float(self.partition[3:])


def parse_run(name: str) -> tuple[str, str, str | None]:
    """A run name -> (method, traffic, wire): 'sfprompt-paper' -> ('sfprompt', 'paper', None), 'sfprompt-int8' ->
    ('sfprompt', 'ours', 'int8'); a plain method name -> (name, 'ours', None): the run takes --wire."""
    method, traffic, wire = name, "ours", None
    if method.endswith(PAPER_SUFFIX):
        method, traffic = method[:-len(PAPER_SUFFIX)], "paper"
    elif method.rsplit("-", 1)[-1] in WIRE_DTYPES:
        method, wire = method.rsplit("-", 1)
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose from {', '.join(METHODS)}, optionally + '-paper' or "
                          f"+ '-<wire dtype>' ({', '.join(WIRE_DTYPES)})")
    if (traffic == "paper" or wire) and not METHODS[method].split:
        raise ConfigError(f"{method} runs the whole model on the device: it has no split traffic to vary")
    return method, traffic, wire


def parse_partition(text: str) -> str:
    if text == "iid":
        return "iid"
    try:
        alpha = float(text)
    except ValueError:
        raise ConfigError(f"a partition is 'iid' or a Dirichlet alpha such as 0.5, got {text!r}") from None
    if not alpha > 0:
        raise ConfigError(f"a Dirichlet alpha must be > 0, got {text}")
    return f"dir{alpha:g}"


def partition_title(partition: str) -> str:
    return "IID" if partition == "iid" else f"Dirichlet {partition[3:]}"


def plan_runs(names: list[str], partitions: list[str], central: bool) -> list[Run]:
    """Ceilings first, then partition by partition, so a run cut short still leaves whole tables."""
    ceilings: dict[str, Run] = {}
    if central:
        for name in names:
            method = parse_run(name)[0]
            ceilings.setdefault(adaptation_of(method), Run(adaptation_of(method), method, partition="central"))
    return [*ceilings.values(), *(Run(name, *parse_run(name), partition=p) for p in partitions for name in names)]


def run_one(run: Run, settings: dict, path: Path, threads: int | None = None) -> str:
    """One federation or ceiling, printed round by round; its report written to `path`."""
    import torch

    from simulation.central import train_central
    from simulation.engine import Federation, SimConfig

    if threads is not None:           # a pool worker: one thread, so workers do not fight over the cores
        torch.set_num_threads(threads)
    cfg = SimConfig(method=run.method, dataset=settings["dataset"], model=settings["model"],
                    clients=settings["clients"], rounds=settings["rounds"], alpha=run.alpha, seed=settings["seed"],
                    spec=SplitSpec(settings["prompts"]), train_samples=settings["train_samples"],
                    train=train_config(run.method, settings["lr"], keep=settings["keep"], traffic=run.traffic,
                                       wire=run.wire or settings["wire"]))
    label = f"{run.partition}/{run.name}"
    start = time.time()
    print(f"== {label}: {run.method}, traffic {run.traffic}, lr {cfg.train.lr}\n{label:<28} {HEADER}", flush=True)

    def show(row: dict) -> None:
        print(f"{label:<28} {format_row(row)}", flush=True)

    if run.partition == "central":
        report = train_central(Federation(cfg), on_round=show)
    else:
        report = Federation(cfg).run(on_round=show)
    report["traffic"] = run.traffic
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"== {label}: done in {time.time() - start:.0f} s", flush=True)
    return label


def run_path(out: Path, run: Run) -> Path:
    return out / run.partition / f"{run.name}.json"


# ---- the tables and the plot, from the reports ----

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


def summary_rows(reports: dict[str, dict], ceilings: dict[str, dict], memory: dict[str, float],
                 target: float) -> list[dict]:
    rows = []
    for name, report in reports.items():
        rounds = report["rounds"]
        method = parse_run(name)[0]
        ceiling = ceilings.get(adaptation_of(method))
        reach_round, reach_mb = to_target(report, target)
        rows.append({
            "run": name,
            "final_accuracy": rounds[-1]["accuracy"],
            "best_accuracy": max(r["accuracy"] for r in rounds),
            "client_accuracy": rounds[-1]["client_accuracy"],
            "ceiling": adaptation_of(method),
            "ceiling_accuracy": ceiling["rounds"][-1]["accuracy"] if ceiling else None,
            "rounds_to_target": reach_round,
            "mb_to_target": reach_mb,
            "bytes_per_round": sum(r["bytes_up"] + r["bytes_down"] for r in rounds) / len(rounds),
            "bytes_up_per_round": sum(r["bytes_up"] for r in rounds) / len(rounds),
            "client_flops_per_round": sum(r["client_flops"] for r in rounds) / len(rounds),
            "client_peak_mb": memory.get(name),
            "seconds": sum(r["seconds"] for r in rounds),
        })
    return rows


def _points(value: float | None, ref: float | None) -> str:
    return "-" if value is None or ref is None else f"{100 * (value - ref):+.1f}"


def markdown_table(rows: list[dict], target: float, reference: str = "fl") -> str:
    ref = next((r for r in rows if r["run"] == reference), None)
    lines = ["| run | final acc. | best | central ceiling | vs ceiling (pts) | vs FL (pts) | "
             f"rounds to {target:.0%} | MB to {target:.0%} | MB/client/round | client MFLOPs/round | bytes vs FL | "
             "FLOPs vs FL | client peak MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ceiling = "-" if r["ceiling_accuracy"] is None else f"{r['ceiling_accuracy']:.3f} ({r['ceiling']})"
        reach = "not reached" if r["rounds_to_target"] is None else str(r["rounds_to_target"])
        reach_mb = "-" if r["mb_to_target"] is None else f"{r['mb_to_target']:.2f}"
        bytes_ratio = f"{r['bytes_per_round'] / ref['bytes_per_round']:.3f}" if ref else "-"
        flops_ratio = f"{r['client_flops_per_round'] / ref['client_flops_per_round']:.3%}" if ref else "-"
        memory = "-" if r["client_peak_mb"] is None else f"{r['client_peak_mb']:.0f}"
        lines.append(f"| {r['run']} | {r['final_accuracy']:.3f} | {r['best_accuracy']:.3f} | {ceiling} | "
                     f"{_points(r['final_accuracy'], r['ceiling_accuracy'])} | "
                     f"{_points(r['final_accuracy'], ref['final_accuracy'] if ref else None)} | {reach} | "
                     f"{reach_mb} | {r['bytes_per_round'] / 1e6:.3f} | {r['client_flops_per_round'] / 1e6:.1f} | "
                     f"{bytes_ratio} | {flops_ratio} | {memory} |")
    return "\n".join(lines) + "\n"


def ceiling_table(ceilings: dict[str, dict], users: dict[str, list[str]]) -> str:
    lines = ["| adaptation | trained by | final acc. | best | accuracy per round-equivalent |", "|---|---|---|---|---|"]
    for name, report in ceilings.items():
        curve = " ".join(f"{r['accuracy']:.3f}" for r in report["rounds"])
        lines.append(f"| {name} | {', '.join(users.get(name, []))} | {report['rounds'][-1]['accuracy']:.3f} | "
                     f"{max(r['accuracy'] for r in report['rounds']):.3f} | {curve} |")
    return "\n".join(lines) + "\n"


def plot(grid: dict[str, dict[str, dict]], ceilings: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    partitions = list(grid)
    fig, axes = plt.subplots(2, len(partitions), figsize=(6 * len(partitions), 9), squeeze=False)
    names = sorted({name for reports in grid.values() for name in reports})
    colors = {name: f"C{i}" for i, name in enumerate(names)}
    styles = {name: s for name, s in zip(ceilings, ("--", ":", "-."))}
    for col, partition in enumerate(partitions):
        by_round, by_bytes = axes[0][col], axes[1][col]
        for name, report in grid[partition].items():
            accuracy = [100 * r["accuracy"] for r in report["rounds"]]
            by_round.plot([r["round"] for r in report["rounds"]], accuracy, marker="o", ms=3, color=colors[name],
                          label=name)
            if report["rounds"][-1]["bytes_up"] > 0:
                by_bytes.plot(cumulative_mb(report), accuracy, marker="o", ms=3, color=colors[name], label=name)
        for name, report in ceilings.items():
            by_round.axhline(100 * report["rounds"][-1]["accuracy"], color="gray", ls=styles.get(name, "--"),
                             lw=1, label=f"ceiling: {name}")
        by_round.set(xlabel="round", ylabel="central test accuracy (%)",
                     title=f"{partition_title(partition)}: accuracy per round")
        by_bytes.set(xlabel="cumulative MB per client (up + down)", ylabel="central test accuracy (%)",
                     title=f"{partition_title(partition)}: accuracy against traffic", xscale="log")
        for ax in (by_round, by_bytes):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
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
            method, traffic, _ = parse_run(name)
            known[name] = measure_in_fresh_process(method, model, batch, traffic)["peak_mb"]
    cache.write_text(json.dumps(known, indent=2) + "\n")
    return known


def write_report(out: Path, runs: list[Run], settings: dict, target: float) -> str:
    names = list(dict.fromkeys(r.name for r in runs if r.partition != "central"))
    partitions = list(dict.fromkeys(r.partition for r in runs if r.partition != "central"))
    grid = {p: {n: json.loads(run_path(out, Run(n, *parse_run(n), partition=p)).read_text()) for n in names}
            for p in partitions}
    ceilings = {r.name: json.loads(run_path(out, r).read_text()) for r in runs if r.partition == "central"}
    users: dict[str, list[str]] = {}
    for n in names:
        users.setdefault(adaptation_of(parse_run(n)[0]), []).append(n)
    memory = client_memory(out, names, settings["model"], 16)
    title = (f"{settings['dataset']}, {settings['clients']} clients, {settings['rounds']} rounds, "
             f"backbone {Path(settings['model']).stem}, seed {settings['seed']}")
    sections, summary = [f"# {title}\n"], {}
    for p in partitions:
        rows = summary_rows(grid[p], ceilings, memory, target)
        summary[p] = rows
        sections.append(f"## {partition_title(p)}\n\n{markdown_table(rows, target)}")
    if ceilings:
        sections.append(f"## Central ceilings (pooled training shares, no federation)\n\n"
                        f"{ceiling_table(ceilings, users)}")
    sections.append("![accuracy per round and against traffic](comparison.png)\n")
    text = "\n".join(sections)
    (out / "tables.md").write_text(text)
    (out / "summary.json").write_text(json.dumps({"settings": settings, "target": target, "partitions": summary,
                                                  "ceilings": {k: v["rounds"] for k, v in ceilings.items()}},
                                                 indent=2) + "\n")
    plot(grid, ceilings, out / "comparison.png", title)
    return text


@click.command(context_settings={"show_default": True})
@click.option("--methods", default="sfprompt,fl",
              help=f"Comma-separated run names: {', '.join(METHODS)}, or a split method + '-paper'.")
@click.option("--partitions", default="0.5", help="Comma-separated: 'iid' and/or Dirichlet alphas.")
@click.option("--central", is_flag=True, help="Also train each adaptation's central ceiling.")
@click.option("--dataset", default="mnist5k")
@click.option("--model", default=DEFAULT_MODEL)
@click.option("--clients", default=10)
@click.option("--rounds", default=5)
@click.option("--seed", default=0)
@click.option("--prompts", default=10)
@click.option("--keep", default=0.5)
@click.option("--wire", default="fp16")
@click.option("--lr", type=float, default=None, help="One learning rate for all [default: each method's own].")
@click.option("--train-samples", type=int, default=None, help="A seeded subset of the training set (quick runs).")
@click.option("--target", default=0.5, help="Accuracy whose rounds and bytes to reach are reported.")
@click.option("--jobs", default=1, help="Runs at once, one thread each (1: one run, torch's default threads).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/compare"))
@click.option("--resume", is_flag=True, help="Reuse the reports that exist in <out> (same settings assumed).")
def main(methods, partitions, central, dataset, model, clients, rounds, seed, prompts, keep, wire, lr, train_samples,
         target, jobs, out, resume) -> None:
    """Compare federated methods on one task, printing each round as it finishes."""

    def job() -> None:
        if not Path(model).exists() and model.endswith(".pth"):
            raise ConfigError(f"{model} does not exist: run `make backbone` first, or name another with --model")
        runs = plan_runs(methods.split(","), [parse_partition(p) for p in partitions.split(",")], central)
        settings = {"dataset": dataset, "model": model, "clients": clients, "rounds": rounds, "seed": seed,
                    "prompts": prompts, "keep": keep, "wire": wire, "lr": lr, "train_samples": train_samples}
        todo = [r for r in runs if not (resume and run_path(out, r).exists())]
        click.echo(f"{len(runs)} runs, {len(runs) - len(todo)} reused, {len(todo)} to do, {jobs} at a time")
        start = time.time()
        if jobs > 1:
            with multiprocessing.get_context("spawn").Pool(jobs) as pool:
                waiting = [pool.apply_async(run_one, (r, settings, run_path(out, r), 1)) for r in todo]
                for w in waiting:
                    w.get()
        else:
            for r in todo:
                run_one(r, settings, run_path(out, r))
        click.echo(f"all runs done in {time.time() - start:.0f} s")
        click.echo(write_report(out, runs, settings, target))
        click.echo(f"written: {out / 'tables.md'}, {out / 'comparison.png'}")

    run_cli(job)


if __name__ == "__main__":
    main()
