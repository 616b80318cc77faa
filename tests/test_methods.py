"""Each method's client round against plain PyTorch autograd, and its wire bytes against the tensor shapes."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_vit
from export.split import SplitViT
from sfp_common.split_spec import SplitSpec
from simulation.accounting import ClientMeter
from sfp_common.bundle import OptimizerSpec
from sfp_common.pruning import SampleMemory, el2n_scores
from sfp_common.recipe import Recipe
from simulation.methods import (METHODS, ClientData, client_round, local_path_scores, local_step, make_optimizer,
                                named_params, split_step)


def make(method: str, spec: SplitSpec, seed: int = 0) -> SplitViT:
    vit = tiny_vit(num_classes=5)
    torch.manual_seed(seed)
    model = SplitViT(vit, spec if METHODS[method].uses_prompts else SplitSpec(0, spec.head_blocks, spec.tail_blocks))
    m = METHODS[method]
    model.set_trainable(m.client_parts + m.server_parts)
    return model


def batch(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 5, (n,), generator=g)


@pytest.mark.parametrize("traffic,wire", [("paper", "fp32"), ("ours", "fp32")])
@pytest.mark.parametrize("cut", [(0, 0), (1, 1), (0, 1)])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_split_steps_equal_autograd_on_the_whole_model(traffic, wire, cut, optimizer):
    cfg = Recipe(lr=1e-2, optimizer=OptimizerSpec(optimizer, weight_decay=0.01), wire=wire)
    method = METHODS["sfprompt"]
    split = make("sfprompt", SplitSpec(3, *cut))
    reference = copy.deepcopy(split)
    params = named_params(split, method.client_parts)
    ref_params = named_params(reference, method.client_parts)
    opt, ref_opt = make_optimizer(list(params.values()), cfg), make_optimizer(list(ref_params.values()), cfg)
    for step in range(3):
        x, y = batch(4 + step, seed=step)
        split_step(split, method, cfg, x, y, ClientMeter(), opt, None, traffic)
        ref_opt.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        ref_opt.step()
    for name in params:
        torch.testing.assert_close(params[name], ref_params[name], rtol=1e-5, atol=1e-6)
    assert not torch.equal(params["head.prompts"], make("sfprompt", SplitSpec(3, *cut)).head.prompts)


def test_sfl_trains_client_and_server_parts_like_autograd():
    cfg = Recipe(lr=1e-3, wire="fp32")
    method = METHODS["sfl"]
    split = make("sfl", SplitSpec(0, 1, 1))
    reference = copy.deepcopy(split)
    client, server = named_params(split, method.client_parts), named_params(split, method.server_parts)
    opt, server_opt = make_optimizer(list(client.values()), cfg), make_optimizer(list(server.values()), cfg)
    ref_all = named_params(reference, method.client_parts + method.server_parts)
    ref_opt = make_optimizer(list(ref_all.values()), cfg)
    for step in range(2):
        x, y = batch(5, seed=step)
        split_step(split, method, cfg, x, y, ClientMeter(), opt, server_opt, "paper")
        ref_opt.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        ref_opt.step()
    for name, value in {**client, **server}.items():
        torch.testing.assert_close(value, ref_all[name], rtol=1e-5, atol=1e-6)


def test_fp16_wire_changes_little():
    method = METHODS["sfprompt"]
    exact, halved = make("sfprompt", SplitSpec(3)), make("sfprompt", SplitSpec(3))
    x, y = batch(6)
    for model, wire in ((exact, "fp32"), (halved, "fp16")):
        cfg = Recipe(lr=1e-2, wire=wire)
        params = list(named_params(model, method.client_parts).values())
        split_step(model, method, cfg, x, y, ClientMeter(), make_optimizer(params, cfg), None)
    difference = (exact.head.prompts - halved.head.prompts).abs().max()
    assert 0 < difference < 1e-3


def test_split_step_bytes_are_the_shapes_that_cross():
    method = METHODS["sfprompt"]
    B, P, N, D = 6, 3, 1 + 3 + 16, 32
    for traffic, expected_up, expected_down in (
            ("ours", B * N * D * 2 + B * D * 4, B * D * 2 + P * D * 4),   # fp16 tokens, cls only, dL/dp summed
            ("paper", 2 * B * N * D * 4, 2 * B * N * D * 4)):
        model = make("sfprompt", SplitSpec(P))
        cfg = Recipe(lr=1e-2)
        meter = ClientMeter()
        opt = make_optimizer(list(named_params(model, method.client_parts).values()), cfg)
        split_step(model, method, cfg, *batch(B), meter, opt, None, traffic)
        assert (meter.bytes_up, meter.bytes_down) == (expected_up, expected_down)


def test_local_step_equals_autograd_of_the_local_path():
    cfg = Recipe(lr=1e-2)
    model = make("sfprompt", SplitSpec(2))
    reference = copy.deepcopy(model)
    params = list(named_params(model, ("prompts", "tail")).values())
    ref_params = list(named_params(reference, ("prompts", "tail")).values())
    x, y = batch(7)
    local_step(model, x, y, ClientMeter(), make_optimizer(params, cfg), model.forward_local)
    ref_opt = make_optimizer(ref_params, cfg)
    F.cross_entropy(reference.tail(reference.head(x).mean(1, keepdim=True), pool_type="token"), y).backward()
    ref_opt.step()
    for a, b in zip(params, ref_params):
        torch.testing.assert_close(a, b)


def test_local_path_el2n_is_the_definition_on_the_local_path():
    model = make("sfprompt", SplitSpec(2))
    x, y = batch(10)
    scores = local_path_scores(model, ClientData(x, y, x[:0], y[:0]), Recipe(lr=1e-2, batch_size=4), ClientMeter())
    with torch.no_grad():
        probs = torch.softmax(model.forward_local(x), dim=1)
    np.testing.assert_allclose(scores, (probs - F.one_hot(y, 5)).norm(dim=1).numpy(), rtol=1e-5)


@pytest.mark.parametrize("name", list(METHODS))
def test_client_round_sends_its_trainables_both_ways(name):
    method = METHODS[name]
    model = make(name, SplitSpec(2))
    x, y = batch(9)
    data = ClientData(x, y, x[:0], y[:0])
    before = {k: v.detach().clone() for k, v in named_params(model, method.client_parts).items()}
    result = client_round(model, method, method.recipe.but(lr=1e-2, batch_size=4, epochs=1), data,
                          np.random.default_rng(0))
    param_bytes = sum(v.numel() * 4 for v in before.values())
    assert result.meter.bytes_down >= param_bytes and result.meter.bytes_up >= param_bytes
    assert set(result.upload) == set(before)
    assert any(not torch.equal(result.upload[k], before[k]) for k in before)
    pruned_in_round_1 = method.recipe.prune in ("local-el2n", "random")   # split-el2n: nothing scored yet
    assert result.kept == (math.ceil(0.5 * 9) if method.split and pruned_in_round_1 else 9)
    if not method.split:
        assert (result.meter.bytes_up, result.meter.bytes_down) == (param_bytes, param_bytes)
    assert result.meter.flops > 0 and np.isfinite(float(result.loss_sum))


def test_split_el2n_scores_every_sample_from_the_split_logits_then_keeps_the_hardest():
    """Round 1 trains on everything (nothing is scored yet) and records, per sample, the EL2N of the tail's own
    logits and the body features received; round 2 keeps the hardest half by those scores. With a vanishing
    learning rate the recorded values are the split model's at the start, computed here in one piece."""
    method = METHODS["sfprompt"]
    recipe = method.recipe.but(lr=1e-12, batch_size=4, epochs=1, wire="fp32")
    model = make("sfprompt", SplitSpec(2))
    x, y = batch(10)
    data = ClientData(x, y, x[:0], y[:0])
    with torch.no_grad():
        expected_scores = el2n_scores(model(x).numpy(), y.numpy())
        expected_features = model.body(model.head(x))[:, :1].numpy()
    memory = SampleMemory.empty(10)
    first = client_round(model, method, recipe, data, np.random.default_rng(0), memory)
    assert first.kept == 10 and memory.has_features.all()
    np.testing.assert_allclose(memory.scores, expected_scores, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(memory.features, expected_features, rtol=1e-4, atol=1e-5)
    for select, order in (("hardest", -memory.scores), ("easiest", memory.scores)):
        # features forgotten, scores kept: what round 2 trains on is what it records features for
        again = SampleMemory(memory.scores.copy(), None, np.zeros(10, bool))
        second = client_round(model, method, recipe.but(select=select, local_update="none"), data,
                              np.random.default_rng(1), again)
        assert second.kept == 5
        np.testing.assert_array_equal(np.flatnonzero(again.has_features), np.sort(np.argsort(order)[:5]))


def test_the_cached_feature_update_trains_the_tail_alone_after_split_training():
    """Same seed, with and without the cached-feature update: the prompts end equal (it runs after split training
    and never touches them); the tail moves, and its loss on the cached features goes down."""
    method = METHODS["sfprompt"]
    x, y = batch(12)
    data = ClientData(x, y, x[:0], y[:0])
    ends = {}
    for update in ("none", "cached-features"):
        model = make("sfprompt", SplitSpec(2))
        memory = SampleMemory.empty(12)
        recipe = method.recipe.but(lr=1e-2, batch_size=4, epochs=1, local_update=update, local_epochs=3)
        client_round(model, method, recipe, data, np.random.default_rng(0), memory)
        ends[update] = (named_params(model, method.client_parts), memory, model)
    (plain, memory, plain_model), (cached, _, cached_model) = ends["none"], ends["cached-features"]
    torch.testing.assert_close(plain["head.prompts"], cached["head.prompts"], rtol=0, atol=0)
    assert any(not torch.equal(plain[n], cached[n]) for n in plain if n.startswith("tail."))
    features = torch.from_numpy(memory.features.astype(np.float32))
    with torch.no_grad():
        losses = [float(F.cross_entropy(m.tail(features), y)) for m in (plain_model, cached_model)]
    assert losses[1] < losses[0]
