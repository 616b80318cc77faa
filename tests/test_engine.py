"""The reference federation: reproducible, FedAvg'd, its reported bytes equal to the shapes that crossed."""
import math

import numpy as np
import pytest
import torch

from sfp_common.split_spec import SplitSpec
from simulation.engine import Federation, SimConfig, state_of
from simulation.methods import METHODS, client_round
from sfp_common.aggregate import fedavg


def config(checkpoint, **kw) -> SimConfig:
    base = dict(method="sfprompt", dataset="digits", model=checkpoint, clients=3, rounds=2, alpha=0.5, seed=7,
                spec=SplitSpec(2), train_samples=400)
    base = {**base, **kw}
    base.setdefault("recipe", METHODS[base["method"]].recipe.but(lr=3e-3, batch_size=16, epochs=1))
    return SimConfig(**base)


def without_timing(report: dict) -> dict:
    return {**report, "rounds": [{k: v for k, v in r.items() if k != "seconds"} for r in report["rounds"]]}


def test_same_seed_same_numbers_and_another_seed_differs(digits_checkpoint):
    first = without_timing(Federation(config(digits_checkpoint)).run())
    second = without_timing(Federation(config(digits_checkpoint)).run())
    assert first == second
    other = without_timing(Federation(config(digits_checkpoint, seed=8)).run())
    assert other["rounds"] != first["rounds"]


def test_report_has_the_promised_fields(digits_checkpoint):
    report = Federation(config(digits_checkpoint, rounds=1)).run()
    for key in ("method", "model", "dataset", "clients", "seed", "rounds"):
        assert key in report
    row = report["rounds"][0]
    for key in ("round", "accuracy", "client_accuracy", "bytes_up", "bytes_down", "client_flops"):
        assert np.isfinite(row[key])
    assert report["dataset"] == "digits" and report["clients"] == 3 and report["model"] == "tiny"


def test_round_is_fedavg_of_the_clients_uploads(digits_checkpoint):
    """Replay each client's round from the global state, snapshotting the trained tensors (not the uploads): the
    engine's new global state is their FedAvg, and differs from every single client's."""
    fed = Federation(config(digits_checkpoint, clients=3, fraction=1.0))
    start = state_of(fed.client_params)
    fed.run_round(1)
    after = state_of(fed.client_params)

    replay = Federation(config(digits_checkpoint, clients=3, fraction=1.0))
    uploads, counts = [], []
    from sfp_common.batching import client_seed
    from simulation.engine import load_state
    for c in range(3):
        load_state(replay.client_params, start)
        gen = np.random.default_rng(client_seed(7, 1, c))
        client_round(replay.model, replay.method, replay.cfg.recipe, replay.clients[c], gen)
        uploads.append({k: p.detach().numpy().copy() for k, p in replay.client_params.items()})
        counts.append(replay.clients[c].num_train)
    expected = fedavg(uploads, counts)
    for name in after:
        np.testing.assert_allclose(after[name], expected[name], rtol=1e-6, atol=1e-7)
    assert any(not np.array_equal(after[n], start[n]) for n in after)
    for upload in uploads:
        assert any(not np.allclose(after[n], upload[n]) for n in after)


def test_reported_bytes_are_the_shapes_that_crossed(digits_checkpoint):
    """SFPrompt, ours: prompts + tail both ways, fp16 tokens and fp32 cls gradient up, fp16 cls and dL/dp down;
    every sample in round 1 (none is scored yet), the kept half in round 2."""
    fed = Federation(config(digits_checkpoint, clients=2, alpha=None))
    P, D, N = 2, 32, 1 + 2 + 4
    param_bytes = sum(p.numel() * 4 for p in fed.client_params.values())
    for round_index, keep in ((1, 1.0), (2, 0.5)):
        row = fed.run_round(round_index)
        ups, downs, kept_counts = [], [], []
        for c in fed.clients:
            kept = math.ceil(keep * c.num_train)
            n_batches = math.ceil(kept / 16)
            ups.append(param_bytes + kept * (N * D * 2 + D * 4))
            downs.append(param_bytes + kept * D * 2 + n_batches * P * D * 4)
            kept_counts.append(kept)
        assert row["bytes_up"] == np.mean(ups)
        assert row["bytes_down"] == np.mean(downs)
        assert row["kept_samples"] == np.mean(kept_counts)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_learns_digits(digits_checkpoint, name):
    """Two IID clients, four rounds, from a random tiny backbone: every method must beat chance (0.1) clearly.

    Prompt tuning on a random backbone is weak by nature, so its bar is 2x chance; fine-tuning gets a higher one."""
    lr = 3e-3 if name in ("fl", "sfl") else 1e-2
    cfg = config(digits_checkpoint, method=name, clients=2, alpha=None, rounds=4, train_samples=None,
                 recipe=METHODS[name].recipe.but(lr=lr, batch_size=16, epochs=2))
    accuracy = [r["accuracy"] for r in Federation(cfg).run()["rounds"]]
    assert accuracy[-1] > (0.6 if name in ("fl", "sfl") else 0.2), accuracy


def test_client_flops_order_matches_what_each_method_runs(digits_checkpoint):
    flops = {}
    for name in ("fl", "fedprompt", "sfprompt", "sfl"):
        flops[name] = Federation(config(digits_checkpoint, method=name, rounds=1)).run()["rounds"][0]["client_flops"]
    assert flops["fl"] > flops["fedprompt"] > flops["sfprompt"] > 0
    assert flops["sfl"] < flops["fedprompt"]


def test_splitfed_with_exact_traffic_is_federated_full_fine_tuning(digits_checkpoint):
    """SplitFed V1 (per-client server bodies, averaged) computes what FL computes; with fp32 on the wire and the
    full activations, the two federations must agree tensor for tensor."""
    runs = {}
    for name in ("fl", "sfl"):
        fed = Federation(config(digits_checkpoint, method=name, rounds=2, traffic="paper",
                                recipe=METHODS[name].recipe.but(lr=1e-3, batch_size=16, epochs=1, wire="fp32")))
        report = fed.run()
        runs[name] = ({**state_of(fed.client_params), **state_of(fed.server_params)},
                      [r["accuracy"] for r in report["rounds"]])
    (fl_state, fl_acc), (sfl_state, sfl_acc) = runs["fl"], runs["sfl"]
    assert fl_acc == sfl_acc
    for name, value in fl_state.items():
        np.testing.assert_allclose(sfl_state[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_devices_cut_at_different_depths_train_the_same_function(digits_checkpoint):
    """Mixed splits (issue 15): the cut moves where the device stops and the server starts, not what is computed,
    so with fp32 tokens a federation whose clients run 0, 1 and 2 head blocks trains the global prompts and tail
    a uniform k = 0 federation trains, to float tolerance; its devices pay in FLOPs and in the dL/dtokens they
    receive instead of dL/dprompts."""
    from sfp_common.recipe import Recipe

    def federation(cuts):
        cfg = SimConfig(dataset="digits", model=digits_checkpoint, clients=3, rounds=2, seed=5, spec=SplitSpec(2),
                        recipe=Recipe(batch_size=16, wire="fp32"), train_samples=150, client_head_blocks=cuts)
        fed = Federation(cfg)
        return fed, fed.run(), [fed.client_flops(fed.memories[c], fed.client_cut[c]) for c in range(3)]
    uniform, uniform_report, uniform_flops = federation(())
    mixed, mixed_report, mixed_flops = federation((0, 1, 2))
    assert mixed_report["client_head_blocks"] == [0, 1, 2] and uniform_report["client_head_blocks"] == [0, 0, 0]
    for name, value in state_of(uniform.client_params).items():
        np.testing.assert_allclose(state_of(mixed.client_params)[name], value, rtol=1e-4, atol=1e-6)
    assert mixed_flops[0] == uniform_flops[0] < mixed_flops[1] < mixed_flops[2]
    assert mixed_report["rounds"][-1]["bytes_down"] > uniform_report["rounds"][-1]["bytes_down"]
    assert mixed.model.head.prompts is mixed.cuts[2].head.prompts           # one tensor, trained by every cut


@pytest.mark.parametrize("wire", ["fp16", "int8"])
def test_tokens_kept_by_the_server_train_the_same_numbers_with_ids_and_prompts_up(digits_checkpoint, wire):
    """Recipe.server_keeps_tokens: every wire encodes per element or per token, so the tokens the server rebuilds
    from those it kept and the batch's prompts are exactly what the device would have sent. The federation trains
    the same numbers, bit for bit; round 1 sends each sample's tokens once (first pass) with its id, and from then
    on a batch costs its ids (4 B each) and the prompts in the wire's precision instead of its tokens."""
    runs = {}
    for keeps in (False, True):
        cfg = config(digits_checkpoint, clients=2, alpha=None, rounds=3,
                     recipe=METHODS["sfprompt"].recipe.but(lr=3e-3, batch_size=16, epochs=2, wire=wire,
                                                           server_keeps_tokens=keeps))
        fed = Federation(cfg)
        runs[keeps] = fed, fed.run()
    (plain, plain_report), (kept, kept_report) = runs[False], runs[True]
    for name, value in state_of(plain.client_params).items():
        np.testing.assert_array_equal(state_of(kept.client_params)[name], value, err_msg=name)
    assert [r["accuracy"] for r in kept_report["rounds"]] == [r["accuracy"] for r in plain_report["rounds"]]
    P, D, N = 2, 32, 1 + 2 + 4
    token_bytes = N * D * 2 if wire == "fp16" else N * (D + 4)
    prompt_bytes = P * D * 2 if wire == "fp16" else P * (D + 4)
    for r, (a, b) in enumerate(zip(plain_report["rounds"], kept_report["rounds"]), 1):
        assert b["bytes_down"] == a["bytes_down"]
        saved = []
        for c in kept.clients:
            kept_samples = c.num_train if r == 1 else math.ceil(0.5 * c.num_train)
            batches = math.ceil(kept_samples / 16)
            whole = c.num_train if r == 1 else 0           # first pass of round 1: every sample, once
            rebuilt_batches = batches if r == 1 else 2 * batches
            sent = whole * token_bytes + 2 * kept_samples * 4 + rebuilt_batches * prompt_bytes
            saved.append(2 * kept_samples * token_bytes - sent)
        assert a["bytes_up"] - b["bytes_up"] == np.mean(saved), r
    assert kept_report["rounds"][-1]["bytes_up"] < 0.5 * plain_report["rounds"][-1]["bytes_up"]
    assert kept_report["rounds"][-1]["client_flops"] < plain_report["rounds"][-1]["client_flops"]
