"""Central ceilings and the comparison's bookkeeping: checked against the federation they stand beside."""
import numpy as np
import pytest
import torch

from bench.compare import parse_partition, parse_run, plan_runs
from bench.comparison_report import to_target
from sfp_common.split_spec import SplitSpec
from sfp_common.errors import ConfigError
from simulation.central import adaptation_of, train_central
from simulation.engine import Federation, SimConfig, state_of
from simulation.methods import METHODS


def config(checkpoint, **kw) -> SimConfig:
    base = dict(method="fl", dataset="digits", model=checkpoint, clients=1, rounds=1, alpha=None, seed=3,
                spec=SplitSpec(2), train_samples=200)
    base = {**base, **kw}
    base.setdefault("recipe", METHODS[base["method"]].recipe.but(lr=1e-3, batch_size=16, epochs=2))
    return SimConfig(**base)


def test_one_client_one_round_ceiling_is_that_federation(digits_checkpoint):
    cfg = config(digits_checkpoint)
    federation, pooled = Federation(cfg), Federation(cfg)
    federated = federation.run()
    central = train_central(pooled, passes_per_round=cfg.recipe.epochs)
    assert central["central"] and central["adaptation"] == "full"
    got, want = state_of(pooled.client_params), state_of(federation.client_params)
    assert got.keys() == want.keys() and len(got) > 10
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert central["rounds"][0]["accuracy"] == pytest.approx(federated["rounds"][0]["accuracy"])
    initial = state_of(Federation(cfg).client_params)
    assert any(not np.allclose(initial[n], got[n]) for n in got)   # it trained


def test_ceiling_trains_only_the_adaptation_on_all_clients_data(digits_checkpoint):
    cfg = config(digits_checkpoint, method="sfprompt", clients=3, rounds=2, alpha=0.5,
                 recipe=METHODS["sfprompt"].recipe.but(lr=3e-2, batch_size=16, epochs=1))
    pooled = Federation(cfg)
    frozen = {n: p.detach().clone() for n, p in pooled.model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in pooled.client_params.items()}
    report = train_central(pooled)
    assert report["adaptation"] == "prompts-tail" and len(report["rounds"]) == 2
    assert all(r["bytes_up"] == 0 and r["bytes_down"] == 0 for r in report["rounds"])
    assert report["rounds"][0]["kept_samples"] == sum(c.num_train for c in pooled.clients)
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in report["rounds"])
    params = dict(pooled.model.named_parameters())
    assert frozen and all(torch.equal(params[n], v) for n, v in frozen.items())   # body, embedding untouched
    assert set(trained) == set(pooled.model.trainable_names(("prompts", "tail")))
    assert all(not torch.equal(params[n], v) for n, v in trained.items())
    assert report["rounds"][-1]["train_loss"] < np.log(10)


def test_methods_that_train_the_same_tensors_share_a_ceiling():
    assert {adaptation_of(m) for m in ("sfprompt", "sfprompt-no-prune", "sfprompt-no-local",
                                     "sfprompt-split-only", "sfprompt-paper-phase1")} == {"prompts-tail"}
    assert adaptation_of("fl") == adaptation_of("sfl") == "full"
    assert adaptation_of("fedprompt") == "classifier-prompts"


def test_run_names_partitions_and_plan():
    assert parse_run("sfprompt") == ("sfprompt", "ours", None, None)
    assert parse_run("sfprompt-paper") == ("sfprompt", "paper", None, None)
    assert parse_run("sfprompt-no-prune-int8") == ("sfprompt-no-prune", "ours", "int8", None)
    assert parse_run("sfprompt-int8-noise0.5") == ("sfprompt", "ours", "int8", 0.5)
    for bad in ("fl-paper", "fedprompt-int8", "nope", "fl-noise1", "sfprompt-noisex"):
        with pytest.raises(ConfigError):
            parse_run(bad)
    assert parse_partition("iid") == "iid" and parse_partition("0.50") == "dir0.5"
    for bad in ("-1", "dirichlet"):
        with pytest.raises(ConfigError):
            parse_partition(bad)
    runs = plan_runs(["sfprompt", "sfprompt-paper", "fl", "sfl"], ["iid", "dir0.1"], central=True)
    assert [(r.partition, r.name) for r in runs[:2]] == [("central", "prompts-tail"), ("central", "full")]
    assert len(runs) == 2 + 2 * 4 and {r.alpha for r in runs[2:]} == {None, 0.1}


def test_rounds_and_bytes_to_target():
    report = {"rounds": [{"round": 1, "accuracy": 0.2, "bytes_up": 3e6, "bytes_down": 1e6},
                         {"round": 2, "accuracy": 0.6, "bytes_up": 3e6, "bytes_down": 1e6},
                         {"round": 3, "accuracy": 0.5, "bytes_up": 3e6, "bytes_down": 1e6}]}
    assert to_target(report, 0.5) == (2, pytest.approx(8.0))
    assert to_target(report, 0.7) == (None, None)
