"""Federated methods side by side, on one or several data partitions and seeds, each beside its central ceiling.

    python bench/compare.py --methods sfprompt,fl --rounds 5 --partitions 0.5 --out runs/demo
    python bench/compare.py --methods sfprompt,sfprompt-split-only,fl --partitions iid,0.5,0.1 --seeds 0,1,2 \\
        --central --out bench/results/comparison

A run name is a method (simulation/methods.py) or a method with `-paper` appended (the same training with the
paper's traffic: four fp32 activation-sized transfers per batch) or `-<wire>` (another token precision) or
`-noise<scale>` (the noise defence on the smashed tokens, sfp_common/defence.py; last if combined). Every
run uses the same data split per partition and seed, the same backbone, and each method its own recipe
(sfp_common/recipe.py) unless --lr or --keep is given. `--central` adds each adaptation's central ceiling per
seed (simulation/central.py: the pooled training shares, no federation; one per set of trained tensors). Runs
go one after another, ceilings first, or to a pool of `--jobs` processes of one thread each; a run whose JSON
exists is reused with --resume.

Output: <out>/<partition>/<run>/seed<k>.json (sfp-sim's report), <out>/central/<adaptation>/seed<k>.json,
<out>/tables.md, <out>/summary.json and <out>/comparison.png (mean over seeds with the min-max band, ceilings
dashed; bench/comparison_report.py), all made from every report in <out>, so later invocations can add seeds
or runs.
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

from sfp_common.split_spec import SplitSpec  # noqa: E402
from sfp_common.cli import run_cli  # noqa: E402
from sfp_common.errors import ConfigError  # noqa: E402
from simulation.central import adaptation_of  # noqa: E402
from simulation.cli import DEFAULT_MODEL, HEADER, format_row, recipe_of  # noqa: E402
from simulation.accounting import WIRE_DTYPES  # noqa: E402
from simulation.methods import METHODS  # noqa: E402

PAPER_SUFFIX = "-paper"
NOISE_SUFFIX = "-noise"


@dataclass(frozen=True)
class Run:
    name: str              # the run's folder name and label
    method: str
    traffic: str = "ours"
    wire: str | None = None  # None: the comparison's --wire
    token_noise: float | None = None   # None: the method's recipe's (none)
    partition: str = "iid"  # "iid" or "dir<alpha>"; "central" for a ceiling
    seed: int = 0

    @property
    def alpha(self) -> float | None:
        return None if self.partition in ("iid", "central") else float(self.partition[3:])


def parse_run(name: str) -> tuple[str, str, str | None, float | None]:
    """A run name -> (method, traffic, wire, token noise): 'sfprompt-paper' -> ('sfprompt', 'paper', None, None),
    'sfprompt-int8' -> ('sfprompt', 'ours', 'int8', None), 'sfprompt-noise0.5' -> ('sfprompt', 'ours', None, 0.5);
    a plain method name -> (name, 'ours', None, None): the run takes --wire."""
    method, traffic, wire, noise = name, "ours", None, None
    head, _, scale = method.rpartition(NOISE_SUFFIX)
    if head and scale:
        try:
            method, noise = head, float(scale)
        except ValueError:
            raise ConfigError(f"{name!r}: a noise scale is a number, e.g. sfprompt-noise0.5") from None
    if method.endswith(PAPER_SUFFIX):
        method, traffic = method[:-len(PAPER_SUFFIX)], "paper"
    elif method.rsplit("-", 1)[-1] in WIRE_DTYPES:
        method, wire = method.rsplit("-", 1)
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose from {', '.join(METHODS)}, optionally + '-paper' or "
                          f"+ '-<wire dtype>' ({', '.join(WIRE_DTYPES)})")
    if (traffic == "paper" or wire or noise is not None) and not METHODS[method].split:
        raise ConfigError(f"{method} runs the whole model on the device: it has no split traffic to vary")
    return method, traffic, wire, noise


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


def plan_runs(names: list[str], partitions: list[str], central: bool, seeds: list[int] = (0,)) -> list[Run]:
    """Ceilings first, then partition by partition and seed by seed, so a run cut short still leaves whole
    tables."""
    ceilings: dict[tuple[str, int], Run] = {}
    if central:
        for seed in seeds:
            for name in names:
                method = parse_run(name)[0]
                ceilings.setdefault((adaptation_of(method), seed),
                                    Run(adaptation_of(method), method, partition="central", seed=seed))
    return [*ceilings.values(), *(Run(name, *parse_run(name), partition=p, seed=seed)
                                  for p in partitions for seed in seeds for name in names)]


def run_one(run: Run, settings: dict, path: Path, threads: int | None = None) -> str:
    """One federation or ceiling, printed round by round; its report written to `path`."""
    import torch

    from simulation.central import train_central
    from simulation.engine import Federation, SimConfig

    if threads is not None:           # a pool worker: one thread, so workers do not fight over the cores
        torch.set_num_threads(threads)
    cfg = SimConfig(method=run.method, dataset=settings["dataset"], model=settings["model"],
                    clients=settings["clients"], rounds=settings["rounds"], alpha=run.alpha, seed=run.seed,
                    spec=SplitSpec(settings["prompts"], settings["head_blocks"], settings["tail_blocks"]),
                    train_samples=settings["train_samples"],
                    recipe=recipe_of(run.method, lr=settings["lr"], keep=settings["keep"],
                                     wire=run.wire or settings["wire"], token_noise=run.token_noise),
                    traffic=run.traffic)
    label = f"{run.partition}/{run.name}/seed{run.seed}"
    start = time.time()
    print(f"== {label}: {run.method}, traffic {run.traffic}, lr {cfg.recipe.lr}\n{label:<34} {HEADER}", flush=True)

    def show(row: dict) -> None:
        print(f"{label:<34} {format_row(row)}", flush=True)

    if run.partition == "central":
        report = train_central(Federation(cfg), on_round=show)
    else:
        report = Federation(cfg).run(on_round=show)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"== {label}: done in {time.time() - start:.0f} s", flush=True)
    return label


def run_path(out: Path, run: Run) -> Path:
    return out / run.partition / run.name / f"seed{run.seed}.json"


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds takes comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds needs at least one seed and no repeats, got {text!r}")
    return seeds


@click.command(context_settings={"show_default": True})
@click.option("--methods", default="sfprompt,fl",
              help=f"Comma-separated run names: {', '.join(METHODS)}, or a split method + '-paper', '-<wire>' or "
                   "'-noise<scale>'.")
@click.option("--partitions", default="0.5", help="Comma-separated: 'iid' and/or Dirichlet alphas.")
@click.option("--central", is_flag=True, help="Also train each adaptation's central ceiling (per seed).")
@click.option("--seeds", default="0", help="Comma-separated seeds; every run and ceiling once per seed.")
@click.option("--dataset", default="mnist5k")
@click.option("--model", default=DEFAULT_MODEL)
@click.option("--clients", default=10)
@click.option("--rounds", default=5)
@click.option("--prompts", default=10)
@click.option("--head-blocks", default=0)
@click.option("--tail-blocks", default=0)
@click.option("--keep", type=float, default=None, help="Pruning's keep fraction [default: each method's own].")
@click.option("--wire", default="fp16")
@click.option("--lr", type=float, default=None, help="One learning rate for all [default: each method's own].")
@click.option("--train-samples", type=int, default=None, help="A seeded subset of the training set (quick runs).")
@click.option("--jobs", default=1, help="Runs at once, one thread each (1: one run, torch's default threads).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/compare"))
@click.option("--resume", is_flag=True, help="Reuse the reports that exist in <out> (same settings assumed).")
def main(methods, partitions, central, seeds, dataset, model, clients, rounds, prompts, head_blocks, tail_blocks,
         keep, wire, lr, train_samples, jobs, out, resume) -> None:
    """Compare federated methods on one task, printing each round as it finishes."""

    def job() -> None:
        if not Path(model).exists() and model.endswith(".pth"):
            raise ConfigError(f"{model} does not exist: run `make backbone` first, or name another with --model")
        names = methods.split(",")
        runs = plan_runs(names, [parse_partition(p) for p in partitions.split(",")], central, parse_seeds(seeds))
        settings = {"dataset": dataset, "model": model, "clients": clients, "rounds": rounds, "prompts": prompts,
                    "head_blocks": head_blocks, "tail_blocks": tail_blocks, "keep": keep, "wire": wire, "lr": lr,
                    "train_samples": train_samples}
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
        from bench.comparison_report import write_report   # it imports this module: not at the top
        click.echo(write_report(out, settings))
        click.echo(f"written: {out / 'tables.md'}, {out / 'comparison.png'}")

    run_cli(job)


if __name__ == "__main__":
    main()
