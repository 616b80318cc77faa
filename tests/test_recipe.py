"""One definition of the method: the simulation, the server and the device read the same recipe and defaults,
and a recipe crosses the wire whole or is refused."""
import json
from pathlib import Path

import click
import pytest

from cloud_server.cli import federation_config, serve
from cloud_server.config import FederationConfig
from sfp_common.bundle import OptimizerSpec
from sfp_common.cli import RECIPE_OPTIONS, recipe_from_options
from sfp_common.errors import ConfigError
from sfp_common.recipe import Recipe
from sfp_common.split_spec import SplitSpec
from simulation.cli import recipe_of, sim_main
from simulation.engine import SimConfig
from simulation.methods import METHODS
from wire_protocol.contracts import RoundPlan


def defaults_of(command: click.Command) -> dict:
    """The recipe options a command gets when none is given on its command line."""
    ctx = command.make_context(command.name, ["--broker", "mqtt://x", "--model", "m", "--classes", "3", "--state",
                                              "s"] if command is serve else [])
    return {k: ctx.params[k] for k in RECIPE_OPTIONS}


def test_the_simulation_the_server_and_their_command_lines_run_one_recipe():
    sfprompt = METHODS["sfprompt"].recipe
    assert sfprompt == Recipe()
    assert SimConfig().recipe == sfprompt
    assert FederationConfig("f", "m", ("0", "1"), state_dir=None).recipe == sfprompt
    assert recipe_from_options(Recipe(), **defaults_of(serve)) == sfprompt
    assert recipe_of("sfprompt", **defaults_of(sim_main)) == sfprompt


def test_command_line_settings_change_only_what_they_name():
    recipe = recipe_from_options(Recipe(), lr=0.5, optimizer="sgd", momentum=0.8, prune="random", local_epochs=2)
    assert (recipe.lr, recipe.optimizer, recipe.prune, recipe.local_epochs) == (
        0.5, OptimizerSpec("sgd", momentum=0.8), "random", 2)
    assert recipe.but(lr=None) == recipe and recipe.keep == Recipe().keep


def test_a_plan_crosses_the_wire_whole():
    plan = RoundPlan(Recipe(optimizer=OptimizerSpec("sgd", weight_decay=0.1), wire="int8", select="easiest"), 2**63)
    assert RoundPlan.from_dict(json.loads(json.dumps(plan.as_dict()))) == plan


@pytest.mark.parametrize("mangle", [
    lambda p: {**p, "extra": 1},
    lambda p: {"recipe": p["recipe"]},
    lambda p: {**p, "seed": -1},
    lambda p: {**p, "seed": "7"},
    lambda p: {**p, "recipe": {**p["recipe"], "lr": -1}},
    lambda p: {**p, "recipe": {**p["recipe"], "lr": float("nan")}},
    lambda p: {**p, "recipe": {**p["recipe"], "epochs": 0}},
    lambda p: {**p, "recipe": {**p["recipe"], "batch_size": 2.5}},
    lambda p: {**p, "recipe": {**p["recipe"], "keep": 0}},
    lambda p: {**p, "recipe": {**p["recipe"], "prune": "magic"}},
    lambda p: {**p, "recipe": {**p["recipe"], "local_update": None}},
    lambda p: {**p, "recipe": {**p["recipe"], "wire": "fp8"}},
    lambda p: {**p, "recipe": {**p["recipe"], "server_keeps_tokens": "yes"}},
    lambda p: {**p, "recipe": {**p["recipe"], "server_keeps_tokens": True, "token_noise": 0.5}},
    lambda p: {**p, "recipe": {**p["recipe"], "optimizer": {"name": "lion"}}},
    lambda p: {**p, "recipe": {**p["recipe"], "optimizer": "adamw"}},
    lambda p: {**p, "recipe": [1, 2]},
    lambda p: {k: v for k, v in p.items() if k != "seed"},
])
def test_a_malformed_plan_is_refused_with_a_reason(mangle):
    plan = RoundPlan(Recipe(), 3).as_dict()
    with pytest.raises(ConfigError):
        RoundPlan.from_dict(json.loads(json.dumps(mangle(plan))))


def serve_config(*args: str) -> FederationConfig:
    """The FederationConfig `sfp-cloud serve` would run with these arguments."""
    ctx = serve.make_context("serve", list(args))
    params = {k: v for k, v in ctx.params.items() if k not in (
        "broker", "torch_device", "body_dtype", "ca", "username", "password_file", "broker_reload", "workers",
        "max_packet", "metrics_port", "token_store_mb")}
    return federation_config(**params)


def test_serve_defaults_are_the_federation_configs_and_a_toml_file_sets_them(tmp_path, monkeypatch):
    monkeypatch.delenv("SFP_ORT_TRAINING_PYTHON", raising=False)      # --training-python's environment default
    required = ["--broker", "mqtt://x", "--model", "m", "--classes", "3", "--state", "s"]
    assert serve_config(*required) == FederationConfig("demo", "m", ("0", "1", "2"), state_dir=Path("s"))
    toml = tmp_path / "federation.toml"
    toml.write_text('broker = "mqtt://broker:1883"\nmodel = "models/vit-fmnist.pth"\nclasses = "cat,dog"\n'
                    'state = "/var/lib/sfp"\nrounds = 20\nmin-devices = 5\nlr = 0.01\nprompts = 4\n'
                    'local_epochs = 2\n')
    cfg = serve_config("--config", str(toml), "--rounds", "7")          # the command line wins
    assert cfg == FederationConfig("demo", "models/vit-fmnist.pth", ("cat", "dog"), state_dir=Path("/var/lib/sfp"),
                                   split=SplitSpec(prompts=4), recipe=Recipe().but(lr=0.01, local_epochs=2),
                                   rounds=7, min_devices=5)
    toml.write_text("rounds = 3\nround = 4\n")
    with pytest.raises(click.BadParameter, match="names no such setting: round"):
        serve_config("--config", str(toml))
    toml.write_text("rounds = [")
    with pytest.raises(click.BadParameter, match="cannot read"):
        serve_config("--config", str(toml))


def test_tokens_kept_by_the_server_are_an_opt_in_that_noise_rules_out():
    assert Recipe().server_keeps_tokens is False
    assert recipe_from_options(Recipe(), server_keeps_tokens=True).server_keeps_tokens is True
    with pytest.raises(ConfigError, match="do not go together"):
        Recipe(server_keeps_tokens=True, token_noise=0.25)
