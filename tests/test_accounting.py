"""Wire bytes and FLOPs: measured on the tensors and ops, checked against shapes and against real runs."""
import math

import numpy as np
import pytest
import torch

from conftest import tiny_vit, TINY
from export.backbone import ModelSource
from export.split import SplitViT
from sfp_common.split_spec import SplitSpec
from sfp_common.errors import ConfigError
from simulation.accounting import ClientMeter, decode, encode, wire_bytes
from simulation.counting import count_client_round
from sfp_common.pruning import SampleMemory
from simulation.methods import METHODS, ClientData, client_round


@pytest.mark.parametrize("wire,itemsize", [("fp32", 4), ("fp16", 2), ("bf16", 2)])
def test_casts_cost_their_itemsize(wire, itemsize):
    t = torch.randn(3, 7, 5)
    assert wire_bytes(encode(t, wire)) == t.numel() * itemsize


def test_int8_sends_values_and_one_scale_per_row():
    t = torch.randn(4, 6, 16) * 3
    parts = encode(t, "int8")
    assert wire_bytes(parts) == t.numel() + 4 * 6 * 4
    scale = t.abs().amax(-1, keepdim=True) / 127
    assert torch.all((decode(parts, "int8") - t).abs() <= scale / 2 + 1e-6)


def test_unknown_wire_dtype_is_refused():
    with pytest.raises(ConfigError, match="unknown wire dtype"):
        encode(torch.zeros(2), "fp8")


def test_meter_counts_both_directions_and_returns_what_arrives():
    meter = ClientMeter()
    t = torch.randn(10, 3)
    received = meter.up(t, "fp16")
    assert received.dtype == torch.float32 and torch.equal(received, t.half().float())
    meter.down(t)
    assert (meter.bytes_up, meter.bytes_down) == (60, 120)


@pytest.mark.parametrize("wire", ["fp32", "fp16", "int8"])
def test_what_was_sent_does_not_follow_the_senders_later_updates(wire):
    t = torch.randn(4, 8)
    received = ClientMeter().up(t, wire)
    before = received.clone()
    t.add_(1.0)
    assert torch.equal(received, before)


def test_flops_of_a_matmul_forward_and_backward():
    meter = ClientMeter()
    w = torch.randn(16, 8, requires_grad=True)
    x = torch.randn(5, 16)
    with meter.client_compute():
        (x @ w).sum().backward()
    assert meter.flops == 2 * 5 * 16 * 8 * 2      # forward, and the weight gradient (x needs none)
    outside = meter.flops
    x @ w                                          # not inside client_compute: not counted
    assert meter.flops == outside


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("traffic", ["ours", "paper"])
def test_counting_on_meta_equals_a_real_round(name, traffic):
    """The no-training count (meta tensors) is exactly what a real round measures: the first round (nothing
    scored or cached yet) and the next one (everything scored and cached)."""
    spec = SplitSpec(2, 1, 0)
    method = METHODS[name]
    recipe = method.recipe.but(lr=1e-2, batch_size=4)
    n = 11
    source = ModelSource("vit_tiny_patch16_224", TINY)
    vit = tiny_vit(num_classes=5)
    model = SplitViT(vit, spec if method.uses_prompts else SplitSpec(0, 1, 0))
    model.set_trainable(method.client_parts + method.server_parts)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 5, (n,), generator=g)
    memory = SampleMemory.empty(n)
    for before in ((n, n, 0), (n, 0, n)):         # (samples, unscored, cached) before the round
        counted = count_client_round(name, source, 5, spec, recipe, n, memory=SampleMemory.shaped_like(*before),
                                     traffic=traffic)
        real = client_round(model, method, recipe, ClientData(x, y, x[:0], y[:0]), np.random.default_rng(0), memory,
                            traffic).meter
        assert (counted.flops, counted.bytes_up, counted.bytes_down) == (real.flops, real.bytes_up, real.bytes_down)


@pytest.mark.parametrize("name", ["sfprompt", "sfprompt-paper-phase1"])
def test_sfprompt_client_flops_are_the_patch_embedding_and_classifier(name):
    """k = m = 0: the client runs the patch embedding (per sample: EL2N, local update, split) and the classifier,
    in a round after the first (the default recipe scores from the split logits and caches features)."""
    n, keep, batch = 10, 0.5, 4
    src = ModelSource("vit_tiny_patch16_224", TINY)
    recipe = METHODS[name].recipe.but(lr=1e-2, batch_size=batch, keep=keep, epochs=1)
    counted = count_client_round(name, src, 5, SplitSpec(2), recipe, n)
    patches, d, patch_in = 16, 32, 3 * 4 * 4
    embed = 2 * patches * patch_in * d                 # conv as a matmul, per sample, forward only
    head_fwd = 2 * d * 5                               # classifier, per sample
    kept = math.ceil(keep * n)
    split = kept * (embed + 3 * head_fwd)              # split: head forward; tail forward, weight grad, and
                                                       # the input grad the client sends up to the server
    if name == "sfprompt":
        # the tail on cached features, each pass: forward, weight grad, and the grad into the final norm (it trains)
        expected = split + recipe.local_epochs * n * 3 * head_fwd
    else:
        expected = (n * (embed + head_fwd)             # EL2N scoring on the local path
                    + n * (embed + 3 * head_fwd)       # local update: forward, weight grad, input grad
                    + split)
    assert counted.flops == expected
