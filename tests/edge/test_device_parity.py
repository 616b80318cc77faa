"""A local-loss step, a split-training step and a tail-only step (the cached-feature local update) on the device
equal the reference federation's PyTorch steps.

Both backends; bundles with head/tail blocks 0/0 and 1/1, SGD with momentum and AdamW; batch sizes 1, 3 and 8
(exported at 4); every step starts from non-zero optimizer state. The server's answers are the tensors that
crossed the wire in the PyTorch step, so each device call is judged on the same inputs.
"""
import numpy as np
import pytest

from conftest import bundle_folder, require_backend
from edge_client.parity import replay
from edge_client.runtime import open_runtime

BACKENDS = ("portable", "training")
CASES = [(backend, name, phase, batch) for backend in BACKENDS
         for name in ("k0m0-sgd", "k0m0-adamw", "k1m1-sgd", "k1m1-adamw")
         for phase in ("local", "split", "tail") for batch in (1, 3, 8)]


@pytest.mark.parametrize("backend,name,phase,batch", CASES)
def test_step_equals_pytorch(fixtures_dir, fixture_names, fixture_backends, backend, name, phase, batch):
    require_backend(backend, fixture_backends)
    assert name in fixture_names
    runtime = open_runtime(fixtures_dir / name / bundle_folder(backend))
    assert runtime.manifest.backend == backend
    with np.load(fixtures_dir / name / f"case_{phase}_b{batch}.npz") as npz:
        case = {k: npz[k] for k in npz.files}
    report = replay(runtime, [case])
    assert not report.failures, report.failures
    checked = {"local": {"local_logits", "local_step loss", "local step update", "local step optimizer state"},
               "split": {"front tokens", "tail_step loss", "tail_step dfeatures", "split step update",
                         "split step optimizer state"},
               "tail": {"tail_only_step loss", "tail_only_step logits", "tail-only step update",
                        "tail-only step optimizer state"}}[phase]
    assert checked <= set(report.errors), sorted(report.errors)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_bundle_was_checked_at_export(fixtures_dir, fixture_names, fixture_backends, backend):
    """The exporter's own check ran at batch sizes other than the export one and stayed within its limits."""
    require_backend(backend, fixture_backends)
    for name in fixture_names:
        checked = open_runtime(fixtures_dir / name / bundle_folder(backend)).manifest.verification
        assert set(checked["batch_sizes"]) >= {1, 3, 8}
        assert all(checked["max_errors"][k] <= checked["limits"][k] for k in checked["max_errors"])
        assert {"split step update", "tail-only step update"} <= set(checked["max_errors"])
