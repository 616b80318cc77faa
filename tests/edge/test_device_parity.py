"""One local-loss step and one split-training step on the device equal the reference federation's PyTorch steps.

Bundles: head/tail blocks 0/0 and 1/1, SGD with momentum and AdamW; batch sizes 1, 3 and 8 (exported at 4);
every step starts from non-zero optimizer state. The server's answers are the tensors that crossed the wire in the
PyTorch step, so each device call is judged on the same inputs.
"""
import numpy as np
import pytest

from edge_client.runtime import open_runtime
from sfp_common.bundle import state_key
from sfp_common.parity import OUTPUT_TOL, adamw_well_scaled, max_rel, update_error

CASES = [(name, phase, batch) for name in ("k0m0-sgd", "k0m0-adamw", "k1m1-sgd", "k1m1-adamw")
         for phase in ("local", "split") for batch in (1, 3, 8)]


def start(runtime, case):
    runtime.load_trainables({k[len("before/param/"):]: case[k] for k in case if k.startswith("before/param/")})
    runtime.load_optimizer_state({k[len("before/state/"):]: case[k] for k in case if k.startswith("before/state/")},
                                 int(case["step"]))


def check_updates(runtime, case):
    spec = runtime.manifest.optimizer
    params = runtime.trainables()
    state, step = runtime.optimizer_state()
    assert step == int(case["step"]) + 1
    for name, value in params.items():
        for slot in spec.slots:
            key = state_key(slot, name)
            assert max_rel(state[key], case[f"after/state/{key}"]) <= OUTPUT_TOL, key
        well_scaled = None
        if spec.name == "adamw":
            well_scaled = adamw_well_scaled(case[f"after/state/{state_key('exp_avg_sq', name)}"], step,
                                            spec.betas[1], spec.eps)
        error, limit = update_error(spec.name, value, case[f"after/param/{name}"], case[f"before/param/{name}"],
                                    well_scaled)
        assert error <= limit, (name, error)
        assert not np.array_equal(value, case[f"before/param/{name}"]), f"{name} did not change"


@pytest.mark.parametrize("name,phase,batch", CASES)
def test_step_equals_pytorch(fixtures_dir, fixture_names, name, phase, batch):
    assert name in fixture_names
    runtime = open_runtime(fixtures_dir / name / "bundle")
    with np.load(fixtures_dir / name / f"case_{phase}_b{batch}.npz") as npz:
        case = {k: npz[k] for k in npz.files}
    start(runtime, case)
    lr = float(case["lr"])
    if phase == "local":
        assert max_rel(runtime.local_logits(case["images"]), case["logits"]) <= OUTPUT_TOL
        start(runtime, case)
        loss, logits = runtime.local_step(case["images"], case["labels"], lr)
        assert max_rel(logits, case["logits"]) <= OUTPUT_TOL
    else:
        assert max_rel(runtime.smash(case["images"]), case["tokens"]) <= OUTPUT_TOL
        step = runtime.tail_step(case["features"], case["labels"], lr)
        assert max_rel(step.dfeatures, case["dfeatures"]) <= OUTPUT_TOL
        runtime.prompt_step(case["server_grad"], lr, images=case["images"])
        loss = step.loss
    assert max_rel(loss, case["loss"]) <= OUTPUT_TOL
    check_updates(runtime, case)


def test_a_whole_bundle_was_checked_at_export(fixtures_dir, fixture_names):
    """The exporter's own check ran at batch sizes other than the export one and stayed within its limits."""
    for name in fixture_names:
        runtime = open_runtime(fixtures_dir / name / "bundle")
        checked = runtime.manifest.verification
        assert set(checked["batch_sizes"]) >= {1, 3, 8}
        assert all(checked["max_errors"][k] <= checked["limits"][k] for k in checked["max_errors"])
