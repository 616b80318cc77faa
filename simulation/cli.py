"""`sfp-sim` (a whole federation in one process) and `sfp-count` (a round's cost at any scale, nothing trained)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from export.backbone import resolve_model
from export.cli import split_options
from sfp_common.split_spec import SplitSpec
from sfp_common.cli import default_of, recipe_from_options, recipe_options, run_cli
from sfp_common.errors import ConfigError
from sfp_common.recipe import Recipe
from simulation.audit import AuditConfig
from simulation.engine import SimConfig
from simulation.methods import METHODS, TRAFFIC_VARIANTS, get_method

DEFAULT_MODEL = default_of(SimConfig, "model")


def recipe_of(method: str, **settings) -> Recipe:
    """The method's own recipe with the settings given on the command line (sfp_common/cli.py)."""
    return recipe_from_options(get_method(method).recipe, **settings)


def _numbers(kind: type, text: str, what: str) -> tuple:
    try:
        return tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated numbers, got {text!r}") from None


def format_row(row: dict) -> str:
    return (f"{row['round']:>5}  {row['accuracy']:>8.4f}  {row['client_accuracy']:>10.4f}  "
            f"{row['bytes_up'] / 1e6:>10.3f}  {row['bytes_down'] / 1e6:>10.3f}  {row['client_flops'] / 1e9:>12.3f}  "
            f"{row['train_loss']:>8.4f}  {row['seconds']:>6.1f}")


HEADER = (f"{'round':>5}  {'accuracy':>8}  {'client_acc':>10}  {'MB_up':>10}  {'MB_down':>10}  "
          f"{'client_GFLOPs':>12}  {'loss':>8}  {'sec':>6}")


@click.command(context_settings={"show_default": True})
@click.option("--method", type=click.Choice(list(METHODS)), default=default_of(SimConfig, "method"))
@click.option("--dataset", default=default_of(SimConfig, "dataset"),
              help="fashion-mnist, mnist5k, digits, or a folder with a subfolder per class.")
@click.option("--model", default=DEFAULT_MODEL, help="A timm model name or a checkpoint file (see sfp-pretrain).")
@click.option("--random-init", is_flag=True, help="Do not load pretrained weights (pipeline checks only).")
@click.option("--clients", default=default_of(SimConfig, "clients"))
@click.option("--rounds", default=default_of(SimConfig, "rounds"))
@click.option("--alpha", type=float, default=None, help="Dirichlet label skew; omitted: IID.")
@click.option("--fraction", type=float, default=default_of(SimConfig, "fraction"),
              help="Fraction of clients sampled each round.")
@click.option("--seed", default=default_of(SimConfig, "seed"))
@click.option("--train-samples", type=int, default=None, help="Use a seeded random subset of the training set.")
@click.option("--client-head-blocks", default="",
              help="Per-client head blocks, cycled over the clients (e.g. 0,0,1,2) [default: all --head-blocks].")
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the JSON report here.")
@click.option("--traffic", type=click.Choice(list(TRAFFIC_VARIANTS)), default=default_of(SimConfig, "traffic"),
              help="'paper': four fp32 activation-sized transfers per batch; 'ours': the exact savings.")
@split_options
@recipe_options
def sim_main(method, dataset, model, random_init, clients, rounds, alpha, fraction, seed, train_samples,
             client_head_blocks, report, traffic, prompts, head_blocks, tail_blocks, **train_kw) -> None:
    """Run one federated method with N simulated clients for R rounds and print a per-round table."""
    from simulation.engine import Federation

    def job() -> None:
        cfg = SimConfig(method=method, dataset=dataset, model=model, clients=clients, rounds=rounds, alpha=alpha,
                        seed=seed, fraction=fraction, spec=SplitSpec(prompts, head_blocks, tail_blocks),
                        recipe=recipe_of(method, **train_kw), traffic=traffic, pretrained=not random_init,
                        train_samples=train_samples,
                        client_head_blocks=_numbers(int, client_head_blocks, "--client-head-blocks"))
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
@recipe_options
def count_main(model, classes, samples, methods, json_out, prompts, head_blocks, tail_blocks, **train_kw) -> None:
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
                meter = count_client_round(name, source, classes, spec, recipe_of(name, **train_kw), samples,
                                           traffic=variant)
                rows.append({"method": name, "traffic": variant if get_method(name).split else "-",
                             "client_flops": meter.flops, "bytes_up": meter.bytes_up, "bytes_down": meter.bytes_down})
        fl = next((r for r in rows if r["method"] == "fl"), None)
        click.echo(f"{model}, {classes} classes, {samples} samples per client, keep "
                   f"{recipe_of('sfprompt', **train_kw).keep}, "
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


@click.command(context_settings={"show_default": True})
@click.option("--model", default=default_of(AuditConfig, "model"), help="The backbone the federation uses.")
@click.option("--dataset", default=default_of(AuditConfig, "dataset"), help="The devices' task (its test images).")
@click.option("--public", default=default_of(AuditConfig, "public"),
              help="The server's public images of the same kind, for the learned inverse.")
@click.option("--images", default=default_of(AuditConfig, "images"), help="Test images attacked.")
@click.option("--public-images", default=default_of(AuditConfig, "public_images"))
@click.option("--head-blocks", default=",".join(map(str, default_of(AuditConfig, "head_blocks"))),
              help="Comma-separated splits k.")
@click.option("--wires", default=",".join(default_of(AuditConfig, "wires")))
@click.option("--noise", default=",".join(f"{n:g}" for n in default_of(AuditConfig, "noise")),
              help="Comma-separated defence scales: Gaussian noise on the tokens, std x their RMS.")
@click.option("--prompts", default=default_of(AuditConfig, "prompts"))
@click.option("--steps", default=default_of(AuditConfig, "steps"), help="The optimised inverse's steps per restart.")
@click.option("--restarts", default=default_of(AuditConfig, "restarts"))
@click.option("--inverse-epochs", default=default_of(AuditConfig, "inverse_epochs"))
@click.option("--seed", default=default_of(AuditConfig, "seed"))
@click.option("--checkpoint", type=click.Path(dir_okay=False, exists=True), default=None,
              help="A server's checkpoint.npz: attack with its current prompts [default: the initial ones].")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/audit"))
def audit_main(model, dataset, public, images, public_images, head_blocks, wires, noise, prompts, steps, restarts,
               inverse_epochs, seed, checkpoint, out) -> None:
    """How well the server rebuilds the devices' images from the smashed tokens: per split, wire precision and
    defence, PSNR and SSIM, with a picture of each."""
    from simulation.audit import run_audit

    def job() -> None:
        cfg = AuditConfig(model=model, dataset=dataset, public=public, images=images, public_images=public_images,
                          head_blocks=_numbers(int, head_blocks, "--head-blocks"),
                          wires=tuple(w.strip() for w in wires.split(",") if w.strip()),
                          noise=_numbers(float, noise, "--noise"), prompts=prompts, steps=steps, restarts=restarts,
                          inverse_epochs=inverse_epochs, seed=seed, checkpoint=checkpoint)
        if model == DEFAULT_MODEL and not Path(model).exists():
            raise ConfigError(f"{model} does not exist: run `sfp-pretrain` (or `make backbone`) first, "
                              "or name another model with --model")
        script = sys.argv[0]
        command = " ".join([f"python {os.path.relpath(script)}" if script.endswith(".py") else "sfp-audit",
                            *sys.argv[1:]])
        rows = run_audit(cfg, out, progress=lambda message: click.echo(message, err=True), command=command)
        for row in rows:
            best = row["attacks"][row["best"]]
            click.echo(f"{row['setting']:<22} best {row['best']:<9} {best['psnr']:6.1f} dB  SSIM {best['ssim']:.2f}"
                       f"  {'fails' if row['fails'] else 'RECONSTRUCTS'}")
        click.echo(f"table, grids and plot in {out}/")

    run_cli(job)
