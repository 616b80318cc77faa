"""`sfp-export bundle`: a bundle is written only after every graph agreed with PyTorch."""
import json
from dataclasses import replace

import pytest
from click.testing import CliRunner

import export.bundle as bundle_module
import export.onnx_graphs as onnx_graphs
from conftest import TINY
from export.backbone import ModelSource
from export.bundle import check_training_python, client_model, export_bundle
from export.cli import main as export_main
from sfp_common.split_spec import SplitSpec
from sfp_common.bundle import GRAPH_ROLES, MANIFEST, BundleError, OptimizerSpec, read_bundle
from sfp_common.errors import ConfigError


def test_a_graph_that_disagrees_is_refused_and_nothing_is_written(tmp_path, monkeypatch):
    """A summed instead of averaged loss (the effect of ONNX's nll_loss bug: gradients B times too large) agrees
    at batch 1 and nowhere else: the check at batch sizes other than the export one refuses it."""
    right = onnx_graphs.cross_entropy
    monkeypatch.setattr(onnx_graphs, "cross_entropy", lambda logits, labels: right(logits, labels) * logits.shape[0])
    model, prep = client_model(ModelSource("vit_tiny_patch16_224", dict(TINY)), 5, SplitSpec(3), pretrained=False)
    with pytest.raises(BundleError, match="disagrees with PyTorch") as refused:
        export_bundle(model, prep, tmp_path / "bundle", "tiny", OptimizerSpec("sgd"), batch_sizes=(1, 3))
    assert "tail_step loss" in str(refused.value) and "local_step loss" in str(refused.value)
    assert list(tmp_path.iterdir()) == []     # neither the bundle nor its staging folder


def test_the_cli_writes_a_checked_bundle(digits_checkpoint, tmp_path):
    out = tmp_path / "bundle"
    result = CliRunner().invoke(export_main, ["bundle", "--model", digits_checkpoint, "--classes", "10",
                                              "--prompts", "4", "--optimizer", "sgd", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "bundle written to" in result.stdout and "tail_step dfeatures" in result.stdout
    manifest = read_bundle(out)
    assert (manifest.backend, manifest.model_id, manifest.num_classes, manifest.prompts) == ("portable", "tiny", 10, 4)
    assert manifest.preprocessing.input_size == (1, 8, 8) and manifest.preprocessing.mean == (0.3,)
    assert manifest.num_tokens == 1 + 4 + 4 and manifest.tail_tokens == 1
    assert {t.name for t in manifest.trainables} >= {"head.prompts", "tail.head.weight", "tail.norm.weight"}
    assert json.loads((out / MANIFEST).read_text())["verification"]["batch_sizes"] == [1, 3, 8]


@pytest.mark.parametrize("args,message", [
    (["--model", "no_such_model_anywhere"], "unknown model"),
    (["--backend", "training", "--training-python", "/no/such/python"], "needs a Python with onnxruntime-training"),
    (["--head-blocks", "9"], "exceed the model's 3 blocks"),
])
def test_bad_input_is_one_line(digits_checkpoint, tmp_path, args, message):
    base = ["bundle", "--model", digits_checkpoint, "--classes", "10", "--out", str(tmp_path / "b")]
    result = CliRunner().invoke(export_main, base + args)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr


def test_an_existing_folder_is_not_overwritten(digits_checkpoint, tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "precious.txt").write_text("keep me")
    result = CliRunner().invoke(export_main, ["bundle", "--model", digits_checkpoint, "--classes", "10",
                                              "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and "not empty" in result.stderr
    assert (tmp_path / "b" / "precious.txt").read_text() == "keep me"


@pytest.fixture
def training_python():
    """The onnxruntime-training environment (`make test` provides it through SFP_ORT_TRAINING_PYTHON)."""
    try:
        return check_training_python(None)
    except ConfigError as err:
        pytest.skip(str(err))


def test_the_cli_writes_a_checked_training_bundle(digits_checkpoint, tmp_path, training_python):
    out = tmp_path / "bundle"
    result = CliRunner().invoke(export_main, ["bundle", "--model", digits_checkpoint, "--classes", "10",
                                              "--prompts", "4", "--head-blocks", "1", "--backend", "training",
                                              "--out", str(out)])
    assert result.exit_code == 0, result.output
    manifest = read_bundle(out)
    assert manifest.backend == "training" and set(manifest.graphs) == set(GRAPH_ROLES["training"])
    checked = manifest.verification["max_errors"]
    assert {"split step update", "tail_step dfeatures", "local step optimizer state"} <= set(checked)
    assert not (out / "forward").exists()      # the forward graphs were only the artifacts' source


def test_a_training_bundle_that_disagrees_is_refused(tmp_path, monkeypatch, training_python):
    """The artifacts bake weight decay 0.05 in; PyTorch steps with 0.1: the replay in the training environment
    sees the updates differ, and nothing is written."""
    record = bundle_module.reference_cases

    def with_other_decay(model, manifest, **kwargs):
        return record(model, replace(manifest, optimizer=replace(manifest.optimizer, weight_decay=0.1)), **kwargs)

    monkeypatch.setattr(bundle_module, "reference_cases", with_other_decay)
    model, prep = client_model(ModelSource("vit_tiny_patch16_224", dict(TINY)), 5, SplitSpec(3), pretrained=False)
    with pytest.raises(BundleError, match="disagrees with PyTorch") as refused:
        export_bundle(model, prep, tmp_path / "bundle", "tiny", OptimizerSpec("sgd", weight_decay=0.05),
                      backend="training", batch_sizes=(3,))
    assert "split step update" in str(refused.value) and "local step update" in str(refused.value)
    assert list(tmp_path.iterdir()) == []
