"""Where to cut: SFPrompt at each split (head blocks, tail blocks, prompts), beside its own central ceiling, against
what the split costs a client in compute and traffic; a table, a Pareto plot and a recommended split per profile.

    python bench/split_sweep.py --rounds 10 --jobs 2 --out bench/results/split-sweep
    python bench/split_sweep.py --configs 0/0/10,1/1/10 --rounds 1 --train-samples 600 --out runs/sweep-quick

A configuration is head_blocks/tail_blocks/prompts. Each runs the default recipe (sfp_common/recipe.py) on the
offline task (IID, 10 clients, one seed) and its central ceiling, through bench/compare.py's own runs into
<out>/k<h>m<t>p<P>/; client FLOPs are also counted at ViT-B/16 scale (224x224, 500 samples per client, nothing
trained), since the in-house backbone's patch embedding is a much smaller share of its compute than ViT-B/16's.
A profile (firmware_profiles/) may run a split whose head fits its max_head_blocks; the recommendation is the
cheapest such split (ViT-B/16 client FLOPs) within RECOMMEND_WITHIN of the best one it may run: one seed per
configuration, and differences under about 3 points are inside the noise, so a split is not paid for a lead the
noise can give.
"""
from __future__ import annotations

import json
import multiprocessing
import sys
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.compare import Run, run_one, run_path  # noqa: E402
from bench.comparison_report import load_results, summary_rows  # noqa: E402
from bench.device_step import machine_facts  # noqa: E402
from export.backbone import resolve_model  # noqa: E402
from sfp_common.split_spec import SplitSpec  # noqa: E402
from edge_client.profiles import available, load_profile  # noqa: E402
from sfp_common.cli import run_cli  # noqa: E402
from sfp_common.errors import ConfigError  # noqa: E402
from simulation.cli import DEFAULT_MODEL  # noqa: E402
from simulation.counting import count_client_round  # noqa: E402
from simulation.methods import get_method  # noqa: E402

CONFIGS = tuple(f"{h}/{t}/{p}" for h in (0, 1) for t in (0, 1, 2) for p in (10, 50))
SCALE_MODEL, SCALE_SAMPLES = "vit_base_patch16_224", 500
RECOMMEND_WITHIN = 0.03          # one seed's noise on this task


def parse_config(text: str) -> tuple[int, int, int]:
    try:
        head, tail, prompts = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"a configuration is head_blocks/tail_blocks/prompts, e.g. 0/0/10, got {text!r}") from None
    if min(head, tail) < 0 or prompts < 1:
        raise ConfigError(f"head and tail blocks must be >= 0 and prompts >= 1, got {text!r}")
    return head, tail, prompts


def folder_name(config: tuple[int, int, int]) -> str:
    return "k{}m{}p{}".format(*config)


def scale_flops(config: tuple[int, int, int], cache: dict) -> dict:
    """SFPrompt's and FL's client FLOPs per round at ViT-B/16 scale (meta tensors: nothing computed)."""
    key = folder_name(config)
    if key not in cache:
        source = resolve_model(SCALE_MODEL)
        head, tail, prompts = config
        spec = SplitSpec(prompts, head, tail)
        ours = count_client_round("sfprompt", source, 10, spec, get_method("sfprompt").recipe, SCALE_SAMPLES)
        fl = count_client_round("fl", source, 10, spec, get_method("fl").recipe.but(epochs=3), SCALE_SAMPLES)
        cache[key] = {"flops": ours.flops, "fl_flops": fl.flops,
                      "mb": (ours.bytes_up + ours.bytes_down) / 1e6}
    return cache[key]


def runs_for(config: tuple[int, int, int]) -> list[Run]:
    return [Run("prompts-tail", "sfprompt", partition="central"), Run("sfprompt", "sfprompt", partition="iid")]


def settings_for(config: tuple[int, int, int], a: dict) -> dict:
    head, tail, prompts = config
    return {"dataset": "mnist5k", "model": a["model"], "clients": 10, "rounds": a["rounds"], "prompts": prompts,
            "head_blocks": head, "tail_blocks": tail, "keep": None, "wire": "fp16", "lr": None,
            "train_samples": a["train_samples"]}


def profiles() -> dict[str, int]:
    return {name: load_profile(name).max_head_blocks for name in available()}


def recommend(rows: list[dict]) -> dict[str, str]:
    """Per profile: the cheapest split (ViT-B/16 client FLOPs) within RECOMMEND_WITHIN of the best it may run."""
    out = {}
    for name, max_head in profiles().items():
        allowed = [r for r in rows if r["head_blocks"] <= max_head]
        if not allowed:
            continue
        best = max(r["accuracy"] for r in allowed)
        pick = min((r for r in allowed if r["accuracy"] >= best - RECOMMEND_WITHIN),
                   key=lambda r: (r["scale_flops_vs_fl"], r["mb_per_round"]))
        out[name] = pick["config"]
    return out


def table(rows: list[dict], picks: dict[str, str]) -> str:
    lines = ["| split (head/tail/prompts) | final acc. | central ceiling | vs ceiling (pts) | MB/client/round | "
             "client MFLOPs/round | ViT-B/16 client FLOPs vs FL | ViT-B/16 MB/client/round | recommended for |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        users = ", ".join(p for p, c in picks.items() if c == r["config"]) or "-"
        lines.append(f"| {r['config']} | {r['accuracy']:.3f} | {r['ceiling']:.3f} | "
                     f"{100 * (r['accuracy'] - r['ceiling']):+.1f} | {r['mb_per_round']:.2f} | "
                     f"{r['mflops_per_round']:.1f} | {r['scale_flops_vs_fl']:.3%} | {r['scale_mb']:.1f} | {users} |")
    return "\n".join(lines) + "\n"


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats in both cost (lower) and accuracy (higher), by cost."""
    front = [i for i, (c, a) in enumerate(points)
             if not any((c2 <= c and a2 >= a) and (c2 < c or a2 > a) for c2, a2 in points)]
    return sorted(front, key=lambda i: points[i][0])


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
    for ax, key, label in ((axes[0], "mflops_per_round", "client MFLOPs per round (in-house backbone)"),
                           (axes[1], "scale_flops_vs_fl", "client FLOPs vs FL at ViT-B/16 scale"),
                           (axes[2], "mb_per_round", "MB per client per round (in-house backbone)")):
        xs = [r[key] * (100 if key == "scale_flops_vs_fl" else 1) for r in rows]
        ys = [100 * r["accuracy"] for r in rows]
        ax.scatter(xs, ys, c=["C0" if r["head_blocks"] == 0 else "C1" for r in rows], zorder=3)
        ax.scatter(xs, [100 * r["ceiling"] for r in rows], marker="_", s=200, c="gray", zorder=2,
                   label="its central ceiling")
        for x, y, r in zip(xs, ys, rows):
            ax.annotate(r["config"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        front = pareto(list(zip(xs, ys)))
        ax.plot([xs[i] for i in front], [ys[i] for i in front], color="C2", lw=1, label="Pareto front")
        ax.set(xlabel=label + (" (%)" if key == "scale_flops_vs_fl" else ""), ylabel="central test accuracy (%)",
               xscale="log", ylim=(0, 100))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right", title="blue: head blocks 0, orange: 1", title_fontsize=7)
    fig.suptitle("SFPrompt per split (head/tail/prompts), IID, one seed: accuracy against cost")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, configs: list[tuple[int, int, int]], a: dict) -> str:
    cache_path = out / "scale_flops.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    rows = []
    for config in configs:
        grid, ceilings = load_results(out / folder_name(config))
        row = summary_rows(grid["iid"], ceilings, {})[0]
        scale = scale_flops(config, cache)
        rows.append({"config": "{}/{}/{}".format(*config), "head_blocks": config[0], "tail_blocks": config[1],
                     "prompts": config[2], "accuracy": row["final_accuracy"], "ceiling": row["ceiling_accuracy"],
                     "mb_per_round": row["bytes_per_round"] / 1e6, "mflops_per_round": row["client_flops_per_round"] / 1e6,
                     "scale_flops_vs_fl": scale["flops"] / scale["fl_flops"], "scale_mb": scale["mb"]})
        cache_path.write_text(json.dumps(cache, indent=2) + "\n")
    picks = recommend(rows)
    text = (f"# The split sweep: mnist5k, 10 clients, IID, {a['rounds']} rounds, seed 0, default recipe\n\n"
            f"One seed per split: differences under about 3 points are inside the noise. ViT-B/16 columns: one "
            f"client's round at 224x224 with {SCALE_SAMPLES} samples, counted on meta tensors. Recommended: per "
            f"profile (its max_head_blocks), the cheapest split at ViT-B/16 scale within "
            f"{100 * RECOMMEND_WITHIN:.0f} points of the best it may run.\n\n" + table(rows, picks) +
            "\n![accuracy against client compute and traffic](pareto.png)\n")
    (out / "tables.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"rows": rows, "recommended": picks,
                                                  "machine": machine_facts("bench/split_sweep.py", sys.argv[1:])},
                                                 indent=2) + "\n")
    plot(rows, out / "pareto.png")
    return text


@click.command(context_settings={"show_default": True})
@click.option("--configs", default=",".join(CONFIGS), help="Comma-separated head_blocks/tail_blocks/prompts.")
@click.option("--model", default=DEFAULT_MODEL)
@click.option("--rounds", default=10)
@click.option("--train-samples", type=int, default=None, help="A seeded subset of the training set (quick runs).")
@click.option("--jobs", default=1, help="Runs at once, one thread each.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/split-sweep"))
@click.option("--resume", is_flag=True, help="Reuse the reports that exist in <out>.")
def main(configs, model, rounds, train_samples, jobs, out, resume) -> None:
    """Run SFPrompt and its ceiling at each split; table, Pareto plot and a split per profile."""
    def job() -> None:
        wanted = [parse_config(c) for c in configs.split(",")]
        a = {"model": model, "rounds": rounds, "train_samples": train_samples}
        todo = [(r, settings_for(c, a), run_path(out / folder_name(c), r)) for c in wanted for r in runs_for(c)]
        todo = [t for t in todo if not (resume and t[2].exists())]
        click.echo(f"{len(wanted)} splits, {len(todo)} runs to do, {jobs} at a time")
        start = time.time()
        if jobs > 1:
            with multiprocessing.get_context("spawn").Pool(jobs) as pool:
                for w in [pool.apply_async(run_one, (*t, 1)) for t in todo]:
                    w.get()
        else:
            for t in todo:
                run_one(*t)
        click.echo(f"runs done in {time.time() - start:.0f} s")
        click.echo(write_report(out, wanted, a))
    run_cli(job)


if __name__ == "__main__":
    main()
