"""Each method's client round against plain PyTorch autograd, and its wire bytes against the tensor shapes."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_vit
from export.split import SplitSpec, SplitViT
from simulation.accounting import ClientMeter
from simulation.methods import (METHODS, ClientData, TrainConfig, client_round, el2n_keep, local_step,
                                make_optimizer, named_params, split_step)


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
    cfg = TrainConfig(lr=1e-2, optimizer=optimizer, traffic=traffic, wire=wire, weight_decay=0.01)
    method = METHODS["sfprompt"]
    split = make("sfprompt", SplitSpec(3, *cut))
    reference = copy.deepcopy(split)
    params = named_params(split, method.client_parts)
    ref_params = named_params(reference, method.client_parts)
    opt, ref_opt = make_optimizer(list(params.values()), cfg), make_optimizer(list(ref_params.values()), cfg)
    for step in range(3):
        x, y = batch(4 + step, seed=step)
        split_step(split, method, cfg, x, y, ClientMeter(), opt, None)
        ref_opt.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        ref_opt.step()
    for name in params:
        torch.testing.assert_close(params[name], ref_params[name], rtol=1e-5, atol=1e-6)
    assert not torch.equal(params["head.prompts"], make("sfprompt", SplitSpec(3, *cut)).head.prompts)


def test_sfl_trains_client_and_server_parts_like_autograd():
    cfg = TrainConfig(lr=1e-3, traffic="paper", wire="fp32")
    method = METHODS["sfl"]
    split = make("sfl", SplitSpec(0, 1, 1))
    reference = copy.deepcopy(split)
    client, server = named_params(split, method.client_parts), named_params(split, method.server_parts)
    opt, server_opt = make_optimizer(list(client.values()), cfg), make_optimizer(list(server.values()), cfg)
    ref_all = named_params(reference, method.client_parts + method.server_parts)
    ref_opt = make_optimizer(list(ref_all.values()), cfg)
    for step in range(2):
        x, y = batch(5, seed=step)
        split_step(split, method, cfg, x, y, ClientMeter(), opt, server_opt)
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
        cfg = TrainConfig(lr=1e-2, wire=wire)
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
        cfg = TrainConfig(lr=1e-2, traffic=traffic)
        meter = ClientMeter()
        opt = make_optimizer(list(named_params(model, method.client_parts).values()), cfg)
        split_step(model, method, cfg, *batch(B), meter, opt, None)
        assert (meter.bytes_up, meter.bytes_down) == (expected_up, expected_down)


def test_local_step_equals_autograd_of_the_local_path():
    cfg = TrainConfig(lr=1e-2)
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


def test_el2n_keeps_the_hardest_samples():
    model = make("sfprompt", SplitSpec(2))
    x, y = batch(10)
    kept = el2n_keep(model, ClientData(x, y, x[:0], y[:0]), TrainConfig(lr=1e-2, keep=0.3, batch_size=4),
                     ClientMeter())
    with torch.no_grad():
        probs = torch.softmax(model.forward_local(x), dim=1)
    scores = (probs - F.one_hot(y, 5)).norm(dim=1)
    assert sorted(kept.tolist()) == sorted(scores.topk(3).indices.tolist())


@pytest.mark.parametrize("name", list(METHODS))
def test_client_round_sends_its_trainables_both_ways(name):
    method = METHODS[name]
    model = make(name, SplitSpec(2))
    x, y = batch(9)
    data = ClientData(x, y, x[:0], y[:0])
    before = {k: v.detach().clone() for k, v in named_params(model, method.client_parts).items()}
    result = client_round(model, method, TrainConfig(lr=1e-2, batch_size=4, epochs=1), data,
                          np.random.default_rng(0))
    param_bytes = sum(v.numel() * 4 for v in before.values())
    assert result.meter.bytes_down >= param_bytes and result.meter.bytes_up >= param_bytes
    assert set(result.upload) == set(before)
    assert any(not torch.equal(result.upload[k], before[k]) for k in before)
    assert result.kept == (math.ceil(0.5 * 9) if method.prune else 9)
    if not method.split:
        assert (result.meter.bytes_up, result.meter.bytes_down) == (param_bytes, param_bytes)
    assert result.meter.flops > 0 and np.isfinite(float(result.loss_sum))
