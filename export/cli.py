"""`sfp-export bundle`: cut a model and write the client bundle a device trains with."""
from __future__ import annotations

from pathlib import Path

import click

from sfp_common.bundle import BACKENDS, OPTIMIZERS, OptimizerSpec
from sfp_common.cli import default_of, run_cli
from sfp_common.split_spec import SplitSpec


def split_options(f):
    """--prompts, --head-blocks, --tail-blocks, defaulting to SplitSpec's."""
    f = click.option("--tail-blocks", default=default_of(SplitSpec, "tail_blocks"), show_default=True,
                     help="Transformer blocks in the client tail.")(f)
    f = click.option("--head-blocks", default=default_of(SplitSpec, "head_blocks"), show_default=True,
                     help="Transformer blocks in the client head.")(f)
    f = click.option("--prompts", default=default_of(SplitSpec, "prompts"), show_default=True,
                     help="Learnable prompt tokens P.")(f)
    return f


@click.group()
def main() -> None:
    """Export the device side of a split ViT."""


@main.command(context_settings={"show_default": True})
@click.option("--model", required=True, help="A timm model name or a checkpoint file (see sfp-pretrain).")
@click.option("--classes", type=int, required=True, help="Classes of the federated task (a new classifier).")
@split_options
@click.option("--img-size", type=int, default=None, help="Input size, if not the model's own.")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=default_of(OptimizerSpec, "name"))
@click.option("--weight-decay", type=float, default=default_of(OptimizerSpec, "weight_decay"))
@click.option("--momentum", type=float, default=default_of(OptimizerSpec, "momentum"), help="SGD momentum.")
@click.option("--backend", type=click.Choice(BACKENDS), default="portable",
              help="portable: standard-ONNX train steps for plain onnxruntime; training: onnxruntime-training.")
@click.option("--training-python", envvar="SFP_ORT_TRAINING_PYTHON", default=None,
              help="training backend: a Python with onnxruntime-training-cpu and this package "
                   "[default: .venv-ort-training/bin/python, from `make ort-training-env`].")
@click.option("--random-init", is_flag=True, help="Do not load pretrained weights (pipeline checks only).")
@click.option("--seed", default=0, help="Seeds the prompts and the new classifier.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
def bundle(model, classes, prompts, head_blocks, tail_blocks, img_size, optimizer, weight_decay, momentum, backend,
           training_python, random_init, seed, out) -> None:
    """Write a client bundle, after checking every graph against PyTorch (nothing is written if one disagrees)."""
    from export.backbone import resolve_model
    from export.bundle import client_model, export_bundle

    def job() -> None:
        source = resolve_model(model)
        split, prep = client_model(source, classes, SplitSpec(prompts, head_blocks, tail_blocks), img_size,
                                   pretrained=not random_init, seed=seed)
        opt = OptimizerSpec(optimizer, weight_decay=weight_decay, momentum=momentum)
        manifest, report = export_bundle(split, prep, out, source.label, opt, backend,
                                         progress=lambda message: click.echo(message, err=True),
                                         training_python=training_python)
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        click.echo(f"bundle written to {out}: {backend}, {len(manifest.graphs)} graphs, {size / 1e6:.1f} MB, "
                   f"export {manifest.verification['export_seconds']} s")
        click.echo("checked against PyTorch (max error / limit):")
        for key, error in sorted(report.errors.items()):
            click.echo(f"  {key:<32} {error:9.2e} / {report.limits[key]:.0e}")

    run_cli(job)


if __name__ == "__main__":
    main()
