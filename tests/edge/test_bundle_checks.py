"""A device refuses a corrupt or mismatched bundle, bad tensors and bad batches with a clear error, and keeps its
state across a restart."""
import json
import shutil
import subprocess
import sys

import importlib.util

import numpy as np
import pytest

from conftest import bundle_folder, require_backend
from edge_client.runtime import open_runtime
from sfp_common.bundle import GRAPH_ROLES, MANIFEST, TRAINABLES, BundleError, read_bundle


@pytest.fixture(params=["portable", "training"])
def bundle(request, fixtures_dir, fixture_backends, tmp_path):
    require_backend(request.param, fixture_backends)
    target = tmp_path / "bundle"
    shutil.copytree(fixtures_dir / "k0m0-adamw" / bundle_folder(request.param), target)
    return target


def a_graph(bundle, index: int = 1) -> str:
    return read_bundle(bundle).graphs[GRAPH_ROLES[read_bundle(bundle).backend][index]]


def test_a_good_bundle_loads_with_its_initial_trainables(bundle):
    runtime = open_runtime(bundle)
    with np.load(bundle / TRAINABLES) as npz:
        for name in npz.files:
            np.testing.assert_array_equal(runtime.trainables()[name], npz[name])
    assert runtime.optimizer_state()[1] == 0


def test_every_file_is_hashed(bundle):
    manifest = read_bundle(bundle)
    on_disk = {p.name for p in bundle.iterdir()} - {MANIFEST}
    assert set(manifest.files) == on_disk
    assert set(manifest.graphs.values()) < on_disk


@pytest.mark.parametrize("victim", ["graph", TRAINABLES])
def test_a_changed_file_is_refused(bundle, victim):
    victim = a_graph(bundle) if victim == "graph" else victim
    data = bytearray((bundle / victim).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle / victim).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"{victim} does not match its hash"):
        open_runtime(bundle)


def test_a_missing_file_and_a_missing_manifest_are_refused(bundle):
    victim = a_graph(bundle, 0)
    (bundle / victim).unlink()
    with pytest.raises(BundleError, match=f"{victim} is missing"):
        open_runtime(bundle)
    (bundle / MANIFEST).unlink()
    with pytest.raises(BundleError, match="is not a client bundle"):
        open_runtime(bundle)


@pytest.mark.parametrize("edit,message", [
    (lambda m: m.update(format_version=99), "format version 99 is not supported"),
    (lambda m: m.update(backend="cuda-magic"), "unknown bundle backend"),
    (lambda m: m["graphs"].pop(GRAPH_ROLES[m["backend"]][-1]), "names no graph for"),
    (lambda m: m.pop("trainables"), "manifest is malformed"),
    (lambda m: m["files"].update({"../../etc/passwd": "0" * 64}), "outside itself"),
])
def test_a_bad_manifest_is_refused(bundle, edit, message):
    manifest = json.loads((bundle / MANIFEST).read_text())
    edit(manifest)
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=message):
        open_runtime(bundle)


def test_not_json_is_refused(bundle):
    (bundle / MANIFEST).write_text("{not json")
    with pytest.raises(BundleError, match="malformed"):
        read_bundle(bundle)


def test_received_trainables_are_checked(bundle):
    runtime = open_runtime(bundle)
    good = runtime.trainables()
    for bad, message in [
        ({**good, "head.prompts": good["head.prompts"][:2]}, "head.prompts is float32"),
        ({k: v for k, v in good.items() if k != "tail.head.bias"}, "missing \\['tail.head.bias'\\]"),
        ({**good, "tail.extra": good["tail.head.bias"]}, "unexpected \\['tail.extra'\\]"),
        ({**good, "tail.head.bias": np.full_like(good["tail.head.bias"], np.nan)}, "NaN or Inf"),
        ({**good, "tail.head.bias": good["tail.head.bias"].astype(np.float64)}, "float64"),
    ]:
        with pytest.raises(BundleError, match=message):
            runtime.load_trainables(bad)
    for name, value in runtime.trainables().items():
        np.testing.assert_array_equal(value, good[name])   # nothing was half-loaded


def test_bad_batches_get_clear_errors(bundle):
    runtime = open_runtime(bundle)
    m = runtime.manifest
    c, h, w = m.preprocessing.input_size
    images = np.zeros((2, c, h, w), np.float32)
    with pytest.raises(BundleError, match="images must be a non-empty batch"):
        runtime.smash(np.zeros((2, c, h + 1, w), np.float32))
    with pytest.raises(BundleError, match="images must be a non-empty batch"):
        runtime.local_step(images[:0], np.zeros(0, np.int64), 0.1)
    with pytest.raises(BundleError, match="labels must be in"):
        runtime.local_step(images, np.array([0, m.num_classes]), 0.1)
    with pytest.raises(BundleError, match="labels must be 2 integers"):
        runtime.local_step(images, np.array([0.0, 1.0]), 0.1)
    with pytest.raises(BundleError, match="features must be"):
        runtime.tail_step(np.zeros((2, m.tail_tokens + 1, m.embed_dim), np.float32), np.array([0, 1]), 0.1)
    with pytest.raises(BundleError, match="prompt gradient must be"):
        runtime.prompt_step(np.zeros((m.prompts + 1, m.embed_dim), np.float32), 0.1)


def test_state_survives_a_restart(bundle, tmp_path):
    """Save mid-training, reload in a fresh runtime: the next step is bit-identical to not having stopped."""
    rng = np.random.default_rng(0)
    runtime = open_runtime(bundle)
    m = runtime.manifest
    images = rng.standard_normal((4, *m.preprocessing.input_size)).astype(np.float32)
    labels = rng.integers(0, m.num_classes, 4)
    runtime.local_step(images, labels, 0.05)
    runtime.save_state(tmp_path / "state.npz")
    runtime.local_step(images, labels, 0.05)
    restarted = open_runtime(bundle)
    restarted.load_state(tmp_path / "state.npz")
    restarted.local_step(images, labels, 0.05)
    for name, value in runtime.trainables().items():
        np.testing.assert_array_equal(restarted.trainables()[name], value)
    assert restarted.optimizer_state()[1] == runtime.optimizer_state()[1] == 2
    (tmp_path / "state.npz").write_bytes(b"garbage")
    with pytest.raises(BundleError, match="cannot be read"):
        restarted.load_state(tmp_path / "state.npz")


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime.training") is not None,
                    reason="needs an environment without onnxruntime-training")
def test_plain_onnxruntime_refuses_a_training_bundle_clearly(fixtures_dir, fixture_backends):
    if "training" not in fixture_backends:
        pytest.skip("no training fixtures were built here")
    with pytest.raises(BundleError, match="needs the onnxruntime-training-cpu package"):
        open_runtime(fixtures_dir / "k0m0-adamw" / bundle_folder("training"))


def test_a_split_batch_is_smash_tail_then_prompt(fixtures_dir, fixture_backends):
    """The training backend applies a split batch's update in prompt_step, so it refuses calls out of order."""
    require_backend("training", fixture_backends)
    runtime = open_runtime(fixtures_dir / "k0m0-sgd" / bundle_folder("training"))
    m = runtime.manifest
    features = np.zeros((2, m.tail_tokens, m.embed_dim), np.float32)
    grad = np.zeros((m.prompts, m.embed_dim), np.float32)
    with pytest.raises(BundleError, match="prompt_step without a tail_step"):
        runtime.prompt_step(grad, 0.1)
    runtime.tail_step(features, np.array([0, 1]), 0.1)
    with pytest.raises(BundleError, match="tail_step twice"):
        runtime.tail_step(features, np.array([0, 1]), 0.1)
    with pytest.raises(BundleError, match="one learning rate"):
        runtime.prompt_step(grad, 0.2)
    runtime.prompt_step(grad, 0.1)
    assert runtime.optimizer_state()[1] == 1


def test_the_device_code_never_imports_torch():
    code = ("import sys, edge_client.runtime, edge_client.portable, edge_client.ort_training, edge_client.round, "
            "edge_client.parity, sfp_common.bundle; "
            "bad = [m for m in ('torch', 'timm', 'torchvision') if m in sys.modules]; "
            "assert not bad, bad; print('device modules loaded without torch')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "without torch" in out.stdout
