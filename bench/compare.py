"""Run several federated methods side by side on one task; write their reports, a table and a plot.

    python bench/compare.py --methods sfprompt,fl --rounds 5 --out runs/demo

Every method uses the same data split, seed and backbone; each gets its own default learning rate unless --lr
is given. Output: <out>/<method>.json (sfp-sim's report), <out>/summary.md, <out>/comparison.png.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import click

from export.split import SplitSpec
from sfp_common.cli import run_cli
from simulation.cli import DEFAULT_MODEL, HEADER, format_row, train_config
from simulation.engine import Federation, SimConfig
from simulation.methods import METHODS


def summary_rows(reports: dict[str, dict]) -> list[dict]:
    rows = []
    for name, report in reports.items():
        rounds = report["rounds"]
        rows.append({
            "method": name,
            "final_accuracy": rounds[-1]["accuracy"],
            "best_accuracy": max(r["accuracy"] for r in rounds),
            "final_client_accuracy": rounds[-1]["client_accuracy"],
            "bytes_per_round": sum(r["bytes_up"] + r["bytes_down"] for r in rounds) / len(rounds),
            "bytes_up_per_round": sum(r["bytes_up"] for r in rounds) / len(rounds),
            "bytes_down_per_round": sum(r["bytes_down"] for r in rounds) / len(rounds),
            "client_flops_per_round": sum(r["client_flops"] for r in rounds) / len(rounds),
            "seconds": sum(r["seconds"] for r in rounds),
        })
    return rows


def markdown_table(rows: list[dict], reference: str = "fl") -> str:
    ref = next((r for r in rows if r["method"] == reference), None)
    lines = ["| method | final acc. | best acc. | client-local acc. | MB/client/round (up + down) | "
             "client GFLOPs/round | bytes vs FL | FLOPs vs FL |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        bytes_ratio = f"{r['bytes_per_round'] / ref['bytes_per_round']:.4f}" if ref else "-"
        flops_ratio = f"{r['client_flops_per_round'] / ref['client_flops_per_round']:.3%}" if ref else "-"
        lines.append(f"| {r['method']} | {r['final_accuracy']:.4f} | {r['best_accuracy']:.4f} | "
                     f"{r['final_client_accuracy']:.4f} | {r['bytes_per_round'] / 1e6:.3f} "
                     f"({r['bytes_up_per_round'] / 1e6:.3f} + {r['bytes_down_per_round'] / 1e6:.3f}) | "
                     f"{r['client_flops_per_round'] / 1e9:.3f} | {bytes_ratio} | {flops_ratio} |")
    return "\n".join(lines) + "\n"


def plot(reports: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_round, by_bytes) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, report in reports.items():
        rounds = [r["round"] for r in report["rounds"]]
        accuracy = [100 * r["accuracy"] for r in report["rounds"]]
        total, cumulative = 0.0, []
        for r in report["rounds"]:
            total += r["bytes_up"] + r["bytes_down"]
            cumulative.append(total / 1e6)
        by_round.plot(rounds, accuracy, marker="o", label=name)
        by_bytes.plot(cumulative, accuracy, marker="o", label=name)
    by_round.set(xlabel="round", ylabel="central test accuracy (%)", title="accuracy per round")
    by_bytes.set(xlabel="cumulative MB per client (up + down)", ylabel="central test accuracy (%)",
                 title="accuracy against traffic", xscale="log")
    for ax in (by_round, by_bytes):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@click.command(context_settings={"show_default": True})
@click.option("--methods", default="sfprompt,fl", help=f"Comma-separated, from: {', '.join(METHODS)}.")
@click.option("--dataset", default="mnist5k")
@click.option("--model", default=DEFAULT_MODEL)
@click.option("--clients", default=10)
@click.option("--rounds", default=5)
@click.option("--alpha", type=float, default=None, help="Dirichlet label skew; omitted: IID.")
@click.option("--seed", default=0)
@click.option("--prompts", default=10)
@click.option("--keep", default=0.5)
@click.option("--traffic", type=click.Choice(["ours", "paper"]), default="ours")
@click.option("--wire", default="fp16")
@click.option("--lr", type=float, default=None, help="One learning rate for all [default: each method's own].")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/compare"))
@click.option("--resume", is_flag=True, help="Reuse <out>/<method>.json where it exists (same settings assumed).")
def main(methods, dataset, model, clients, rounds, alpha, seed, prompts, keep, traffic, wire, lr, out,
         resume) -> None:
    """Compare federated methods on one task, printing each round as it finishes."""

    def job() -> None:
        out.mkdir(parents=True, exist_ok=True)
        reports = {}
        for name in methods.split(","):
            done = out / f"{name}.json"
            if resume and done.exists():
                reports[name] = json.loads(done.read_text())
                click.echo(f"{name}: reusing {done}")
                continue
            cfg = SimConfig(method=name, dataset=dataset, model=model, clients=clients, rounds=rounds, alpha=alpha,
                            seed=seed, spec=SplitSpec(prompts),
                            train=train_config(name, lr, keep=keep, traffic=traffic, wire=wire))
            start = time.time()
            federation = Federation(cfg)
            click.echo(f"\n== {name} ({dataset}, {clients} clients, "
                       f"{'IID' if alpha is None else f'Dirichlet {alpha}'}, lr {cfg.train.lr})")
            click.echo(HEADER)
            reports[name] = federation.run(on_round=lambda row: click.echo(format_row(row)), progress=True)
            (out / f"{name}.json").write_text(json.dumps(reports[name], indent=2) + "\n")
            click.echo(f"{name}: {time.time() - start:.0f} s")
        rows = summary_rows(reports)
        title = (f"{dataset}, {clients} clients, {'IID' if alpha is None else f'Dirichlet {alpha}'}, "
                 f"{rounds} rounds, backbone {Path(model).stem}")
        table = markdown_table(rows)
        (out / "summary.md").write_text(f"# {title}\n\n{table}")
        (out / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
        plot(reports, out / "comparison.png", title)
        click.echo(f"\n{table}\nwritten: {out / 'summary.md'}, {out / 'comparison.png'}")

    run_cli(job)


if __name__ == "__main__":
    main()
