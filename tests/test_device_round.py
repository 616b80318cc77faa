"""Whole SFPrompt rounds run by the device runtime (ONNX, the body in PyTorch in-process) reproduce the reference
federation: same samples pruned, same batches, and the FedAvg'd prompts and tail equal to float tolerance."""
import copy

import numpy as np
import pytest
import torch

from edge_client.round import run_round
from edge_client.runtime import open_runtime
from export.bundle import export_bundle
from export.split import SplitViT
from sfp_common.split_spec import SplitSpec
from sfp_common.aggregate import fedavg
from sfp_common.bundle import OptimizerSpec
from simulation.accounting import decode, encode
from sfp_common.batching import client_seed
from simulation.engine import Federation, SimConfig, state_of
from sfp_common.pruning import SampleMemory
from simulation.methods import METHODS
from sfp_common.token_store import TokenStore
from wire_protocol.contracts import RoundPlan


class TorchBody:
    """The server's half of a split batch in PyTorch, crossing the wire as the reference's meter does; it keeps
    tokens sent with ids, as a body worker does (sfp_common/token_store.py)."""

    def __init__(self, model: SplitViT, wire: str) -> None:
        self.model, self.wire = model, wire
        self.store, self.sent = TokenStore(), {"whole": 0, "kept": 0, "missing": 0}

    def forward(self, tokens: np.ndarray, ids: np.ndarray | None = None) -> np.ndarray:
        self.sent["whole"] += 1
        decoded = decode(encode(torch.from_numpy(tokens), self.wire), self.wire)
        if ids is not None:
            self.store.put("device", ids, decoded.numpy(), self.wire)
        return self._body(decoded)

    def forward_kept(self, prompts: np.ndarray, ids: np.ndarray) -> np.ndarray | None:
        if self.store.missing("device", ids):
            self.sent["missing"] += 1
            return None
        self.sent["kept"] += 1
        prompts = decode(encode(torch.from_numpy(prompts), self.wire), self.wire).numpy()
        return self._body(torch.from_numpy(self.store.rebuild("device", ids, prompts,
                                                              self.model.head.num_prefix_tokens)))

    def _body(self, tokens: torch.Tensor) -> np.ndarray:
        self.tokens = tokens.requires_grad_(True)
        body_out = self.model.body(self.tokens)
        self.needed = body_out[:, self.model.tail.pooled_positions(body_out.shape[1])]
        return decode(encode(self.needed, self.wire), self.wire).numpy()

    def backward(self, dfeatures: np.ndarray) -> np.ndarray:
        self.needed.backward(torch.from_numpy(dfeatures))
        if self.model.spec.head_blocks == 0:
            first = self.model.head.num_prefix_tokens
            return self.tokens.grad[:, first:first + self.model.spec.prompts].sum(dim=0).numpy()
        return self.tokens.grad.numpy()


@pytest.mark.parametrize("cut,optimizer,method,noise", [((0, 0), "adamw", "sfprompt", 0.0),
                                                        ((1, 1), "sgd", "sfprompt", 0.0),
                                                        ((0, 0), "sgd", "sfprompt-paper-phase1", 0.0),
                                                        ((0, 0), "adamw", "sfprompt", 0.5),
                                                        ((1, 1), "sgd", "sfprompt", 0.5)])
def test_device_rounds_reproduce_the_reference_federation(digits_checkpoint, tmp_path, cut, optimizer, method,
                                                          noise):
    """Three rounds: the default recipe prunes by the scores the first round recorded and trains the tail on the
    features it cached; the paper's phase 1 runs the body-skipped local path; the noise defence (sfp-audit) draws
    the same noise on the device as in the reference."""
    # The default's 40 tail passes in the default setting, 5 in the others: over 40 passes the runtimes' float
    # differences (ONNX Runtime against PyTorch) grow, to 7e-5 with noise and to 3e-2 by round 2 with SGD on a
    # tail block, past any tolerance that would still catch a wrong step; 5 passes stay near 1e-5.
    passes = METHODS[method].recipe.local_epochs
    default = cut == (0, 0) and method == "sfprompt" and not noise
    train = METHODS[method].recipe.but(lr=3e-3 if optimizer == "adamw" else 3e-2, batch_size=16, epochs=1,
                                       optimizer=OptimizerSpec(optimizer, weight_decay=0.01), wire="fp16",
                                       token_noise=noise or None, local_epochs=passes if default else min(passes, 5))
    cfg = SimConfig(method=method, dataset="digits", model=digits_checkpoint, clients=3, rounds=3, alpha=0.5,
                    seed=7, spec=SplitSpec(2, *cut), recipe=train, train_samples=300)
    fed = Federation(cfg)
    device_side = copy.deepcopy(fed.model)
    export_bundle(device_side, fed.preprocessing, tmp_path / "bundle", "digits", train.optimizer)
    runtime = open_runtime(tmp_path / "bundle")
    server = TorchBody(device_side, train.wire)
    global_state = state_of(fed.client_params)
    memories = [SampleMemory.empty(c.num_train) for c in fed.clients]
    for r in range(1, cfg.rounds + 1):
        reference = fed.run_round(r)
        uploads, counts, kept = [], [], []
        for c in reference["participants"]:
            runtime.load_trainables(global_state)
            data = fed.clients[c]
            plan = RoundPlan(train, client_seed(cfg.seed, r, c))
            result = run_round(runtime, data.x_train.numpy(), data.y_train.numpy(), plan, server, memories[c])
            uploads.append(result.upload)
            counts.append(result.num_samples)
            kept.append(result.kept)
            np.testing.assert_array_equal(memories[c].has_features, fed.memories[c].has_features)
            # scores only rank the samples: a different ranking would show in the global state checked below
            np.testing.assert_allclose(memories[c].scores, fed.memories[c].scores, rtol=1e-3, atol=1e-5)
        assert np.mean(kept) == reference["kept_samples"]
        global_state = fedavg(uploads, counts)
        expected = state_of(fed.client_params)
        worst = max(float(np.abs(global_state[n] - v).max() / np.abs(v).max()) for n, v in expected.items())
        print(f"round {r}: worst max relative error of the global prompts and tail {worst:.1e}")
        assert worst <= 1e-4, r
    start = Federation(cfg)
    assert any(not np.allclose(global_state[n], v) for n, v in state_of(start.client_params).items())


def test_with_no_head_blocks_a_device_embeds_each_kept_sample_once_per_round(digits_checkpoint, tmp_path):
    """Two split passes over the kept half: the embed graph sees each kept image once, and the round equals the
    one that embeds every batch again (a device whose profile leaves no memory for the cache)."""
    train = METHODS["sfprompt"].recipe.but(lr=3e-3, batch_size=16, epochs=2, wire="fp16")
    cfg = SimConfig(method="sfprompt", dataset="digits", model=digits_checkpoint, clients=1, rounds=1,
                    seed=7, spec=SplitSpec(2, 0, 0), recipe=train, train_samples=200)
    fed = Federation(cfg)
    export_bundle(copy.deepcopy(fed.model), fed.preprocessing, tmp_path / "bundle", "digits", train.optimizer)
    data, plan = fed.clients[0], RoundPlan(train, client_seed(cfg.seed, 1, 0))
    embedded, uploads = {}, {}
    for budget in (None, 0):
        runtime = open_runtime(tmp_path / "bundle")
        assert runtime.manifest.embeds
        runtime.load_trainables(state_of(fed.client_params))
        calls, embed = embedded.setdefault(budget, []), runtime.embed
        runtime.embed = lambda images, calls=calls, embed=embed: calls.append(len(images)) or embed(images)
        memory = SampleMemory.empty(data.num_train)
        memory.scores[:] = np.arange(data.num_train, dtype=np.float32)      # all scored: the round keeps half
        result = run_round(runtime, data.x_train.numpy(), data.y_train.numpy(), plan,
                           TorchBody(copy.deepcopy(fed.model), train.wire), memory, embed_cache_bytes=budget)
        assert result.kept == data.num_train // 2
        uploads[budget] = result.upload
    assert sum(embedded[None]) == result.kept                       # once each
    assert sum(embedded[0]) == result.kept * train.epochs           # every pass
    for name, value in uploads[None].items():
        np.testing.assert_allclose(uploads[0][name], value, rtol=1e-6, atol=1e-7)


def test_a_device_whose_tokens_the_server_keeps_reproduces_the_reference(digits_checkpoint, tmp_path):
    """Recipe.server_keeps_tokens with the owner's consent: round 1 sends every batch whole (with ids), later
    rounds only ids and prompts, and the federation equals the reference (which keeps them the same way). A server
    that lost the tokens (restarted before round 3) says so, and the device sends those batches whole again."""
    # 5 tail passes, not 40: Adam turns the runtimes' float differences in near-zero gradients into steps of the
    # learning rate's size, and 40 passes of them reach the tolerance (1.1e-4) with nothing wrong
    train = METHODS["sfprompt"].recipe.but(lr=3e-3, batch_size=16, epochs=2, wire="fp16", server_keeps_tokens=True,
                                           local_epochs=5)
    cfg = SimConfig(method="sfprompt", dataset="digits", model=digits_checkpoint, clients=2, rounds=3, alpha=0.5,
                    seed=7, spec=SplitSpec(2, 0, 0), recipe=train, train_samples=200)
    fed = Federation(cfg)
    export_bundle(copy.deepcopy(fed.model), fed.preprocessing, tmp_path / "bundle", "digits", train.optimizer)
    runtime = open_runtime(tmp_path / "bundle")
    servers = [TorchBody(copy.deepcopy(fed.model), train.wire) for _ in fed.clients]
    memories = [SampleMemory.empty(c.num_train) for c in fed.clients]
    global_state = state_of(fed.client_params)
    for r in range(1, cfg.rounds + 1):
        reference = fed.run_round(r)
        if r == 3:
            servers[0].store = TokenStore()                  # client 0's worker restarted: it holds nothing
        uploads, counts = [], []
        for c in reference["participants"]:
            before = dict(servers[c].sent)
            runtime.load_trainables(global_state)
            data = fed.clients[c]
            result = run_round(runtime, data.x_train.numpy(), data.y_train.numpy(),
                               RoundPlan(train, client_seed(cfg.seed, r, c)), servers[c], memories[c],
                               owner_agrees=True)
            uploads.append(result.upload)
            counts.append(result.num_samples)
            sent = {k: servers[c].sent[k] - before[k] for k in before}
            batches = train.epochs * -(-result.kept // train.batch_size)
            if r == 1:     # everything is new: the first pass goes whole, the second finds it kept
                assert sent == {"whole": batches // 2, "kept": batches // 2, "missing": 0}, sent
            elif r == 3 and c == 0:
                assert sent["missing"] > 0 and sent["whole"] == sent["missing"], sent
            else:
                assert sent == {"whole": 0, "kept": batches, "missing": 0}, sent
            np.testing.assert_array_equal(memories[c].on_server, fed.memories[c].on_server)
        global_state = fedavg(uploads, counts)
        expected = state_of(fed.client_params)
        worst = max(float(np.abs(global_state[n] - v).max() / np.abs(v).max()) for n, v in expected.items())
        print(f"round {r}: worst max relative error of the global prompts and tail {worst:.1e}")
        assert worst <= 1e-4, r


def test_a_device_whose_owner_did_not_agree_sends_its_tokens_every_round(digits_checkpoint, tmp_path):
    train = METHODS["sfprompt"].recipe.but(lr=3e-3, batch_size=16, epochs=2, wire="fp16", server_keeps_tokens=True)
    cfg = SimConfig(method="sfprompt", dataset="digits", model=digits_checkpoint, clients=1, rounds=1,
                    seed=7, spec=SplitSpec(2, 0, 0), recipe=train, train_samples=100)
    fed = Federation(cfg)
    export_bundle(copy.deepcopy(fed.model), fed.preprocessing, tmp_path / "bundle", "digits", train.optimizer)
    runtime = open_runtime(tmp_path / "bundle")
    runtime.load_trainables(state_of(fed.client_params))
    server, data = TorchBody(copy.deepcopy(fed.model), train.wire), fed.clients[0]
    memory = SampleMemory.empty(data.num_train)
    memory.on_server[:] = True                              # even so: no consent, no ids
    run_round(runtime, data.x_train.numpy(), data.y_train.numpy(), RoundPlan(train, 1), server, memory)
    assert server.sent["kept"] == 0 and server.sent["whole"] > 0 and not server.store.bytes
    assert not memory.on_server.any()
