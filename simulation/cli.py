"""`sfp-sim` (a whole federation in one process) and `sfp-count` (a round's cost at any scale, nothing trained)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from export.backbone import resolve_model
from export.cli import split_options
from export.split import SplitSpec
from sfp_common.cli import run_cli
from sfp_common.errors import ConfigError
from simulation.accounting import WIRE_DTYPES
from simulation.methods import METHODS, TRAFFIC_VARIANTS, TrainConfig, get_method

DEFAULT_MODEL = "models/vit-fmnist.pth"


def train_options(f):
    options = [
        click.option("--lr", type=float, default=None, help="Learning rate [default: the method's own]."),
        click.option("--optimizer", type=click.Choice(["adamw", "sgd"]), default="adamw", show_default=True),
        click.option("--batch-size", default=16, show_default=True),
        click.option("--epochs", default=3, show_default=True,
                     help="Passes over the local data per round (split training, or the whole model on-device)."),
        click.option("--local-loss-epochs", default=1, show_default=True,
                     help="SFPrompt's phase-1 local-loss update, in passes over the local data."),
        click.option("--keep", type=float, default=0.5, show_default=True, help="EL2N keep fraction, in (0, 1]."),
        click.option("--wire", type=click.Choice(list(WIRE_DTYPES)), default="fp16", show_default=True,
                     help="Smashed-activation dtype (traffic 'ours')."),
        click.option("--traffic", type=click.Choice(list(TRAFFIC_VARIANTS)), default="ours", show_default=True,
                     help="'paper': four fp32 activation-sized transfers per batch; 'ours': the exact savings."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def train_config(method: str, lr: float | None, **kw) -> TrainConfig:
    return TrainConfig(lr=lr if lr is not None else get_method(method).default_lr, **kw)


def format_row(row: dict) -> str:
    return (f"{row['round']:>5}  {row['accuracy']:>8.4f}  {row['client_accuracy']:>10.4f}  "
            f"{row['bytes_up'] / 1e6:>10.3f}  {row['bytes_down'] / 1e6:>10.3f}  {row['client_flops'] / 1e9:>12.3f}  "
            f"{row['train_loss']:>8.4f}  {row['seconds']:>6.1f}")


HEADER = (f"{'round':>5}  {'accuracy':>8}  {'client_acc':>10}  {'MB_up':>10}  {'MB_down':>10}  "
          f"{'client_GFLOPs':>12}  {'loss':>8}  {'sec':>6}")


@click.command(context_settings={"show_default": True})
@click.option("--method", type=click.Choice(list(METHODS)), default="sfprompt")
@click.option("--dataset", default="mnist5k", help="fashion-mnist, mnist5k, digits, or a folder with a subfolder per class.")
@click.option("--model", default=DEFAULT_MODEL, help="A timm model name or a checkpoint file (see sfp-pretrain).")
@click.option("--random-init", is_flag=True, help="Do not load pretrained weights (pipeline checks only).")
@click.option("--clients", default=10)
@click.option("--rounds", default=5)
@click.option("--alpha", type=float, default=None, help="Dirichlet label skew; omitted: IID.")
@click.option("--fraction", type=float, default=1.0, help="Fraction of clients sampled each round.")
@click.option("--seed", default=0)
@click.option("--train-samples", type=int, default=None, help="Use a seeded random subset of the training set.")
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the JSON report here.")
@split_options
@train_options
def sim_main(method, dataset, model, random_init, clients, rounds, alpha, fraction, seed, train_samples, report, prompts,
             head_blocks, tail_blocks, lr, **train_kw) -> None:
    """Run one federated method with N simulated clients for R rounds and print a per-round table."""
    from simulation.engine import Federation, SimConfig

    def job() -> None:
        cfg = SimConfig(method=method, dataset=dataset, model=model, clients=clients, rounds=rounds, alpha=alpha,
                        seed=seed, fraction=fraction, spec=SplitSpec(prompts, head_blocks, tail_blocks),
                        train=train_config(method, lr, **train_kw), pretrained=not random_init,
                        train_samples=train_samples)
        cfg.check()
        if model == DEFAULT_MODEL and not Path(model).exists():
            raise ConfigError(f"{model} does not exist: run `sfp-pretrain` (or `make backbone`) first, "
                              "or name another model with --model")
        federation = Federation(cfg)
        click.echo(f"{method} on {federation.dataset_name}, {clients} clients "
                   f"({'IID' if alpha is None else f'Dirichlet {alpha}'}), model {federation.model_label}, seed {seed}")
        click.echo(HEADER)
        result = federation.run(on_round=lambda row: click.echo(format_row(row)), progress=True)
        if report:
            report.parent.mkdir(parents=True, exist_ok=True)
            report.write_text(json.dumps(result, indent=2) + "\n")
            click.echo(f"report written to {report}")

    run_cli(job)


@click.command(context_settings={"show_default": True})
@click.option("--model", default="vit_base_patch16_224", help="A timm model name or a checkpoint file.")
@click.option("--classes", default=10)
@click.option("--samples", default=500, help="Local training samples per client.")
@click.option("--method", "methods", multiple=True, type=click.Choice(list(METHODS)),
              help="Methods to count [default: all].")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None)
@split_options
@train_options
def count_main(model, classes, samples, methods, json_out, prompts, head_blocks, tail_blocks, lr, traffic,
               **train_kw) -> None:
    """Count one client's round (FLOPs, bytes each way) for each method at any model scale, without training."""
    from simulation.counting import count_client_round

    def job() -> None:
        if samples < 1:
            raise ConfigError(f"samples must be >= 1, got {samples}")
        source = resolve_model(model)
        spec = SplitSpec(prompts, head_blocks, tail_blocks)
        rows = []
        for name in methods or tuple(METHODS):
            variants = TRAFFIC_VARIANTS if get_method(name).split else ("ours",)
            for variant in variants:
                meter = count_client_round(name, source, classes, spec,
                                           train_config(name, lr, traffic=variant, **train_kw), samples)
                rows.append({"method": name, "traffic": variant if get_method(name).split else "-",
                             "client_flops": meter.flops, "bytes_up": meter.bytes_up, "bytes_down": meter.bytes_down})
        fl = next((r for r in rows if r["method"] == "fl"), None)
        click.echo(f"{model}, {classes} classes, {samples} samples per client, keep {train_kw['keep']}, "
                   f"P={prompts}, head_blocks={head_blocks}, tail_blocks={tail_blocks}")
        click.echo(f"{'method':<18} {'traffic':<7} {'client_GFLOPs':>14} {'MB_up':>10} {'MB_down':>10} "
                   f"{'FLOPs/FL':>9} {'bytes/FL':>9}")
        for r in rows:
            if fl:
                r["flops_vs_fl"] = r["client_flops"] / fl["client_flops"]
                r["bytes_vs_fl"] = (r["bytes_up"] + r["bytes_down"]) / (fl["bytes_up"] + fl["bytes_down"])
            click.echo(f"{r['method']:<18} {r['traffic']:<7} {r['client_flops'] / 1e9:>14.2f} "
                       f"{r['bytes_up'] / 1e6:>10.2f} {r['bytes_down'] / 1e6:>10.2f} "
                       f"{r.get('flops_vs_fl', float('nan')):>9.3%} {r.get('bytes_vs_fl', float('nan')):>9.4f}")
        if json_out:
            json_out.write_text(json.dumps({"model": model, "classes": classes, "samples": samples,
                                            "rows": rows}, indent=2) + "\n")

    run_cli(job)
