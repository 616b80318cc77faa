"""`sfp-export bundle`: a bundle is written only after every graph agreed with PyTorch."""
import json

import pytest
from click.testing import CliRunner

import export.onnx_graphs as onnx_graphs
from conftest import TINY
from export.backbone import ModelSource
from export.bundle import client_model, export_bundle
from export.cli import main as export_main
from export.split import SplitSpec
from sfp_common.bundle import MANIFEST, BundleError, OptimizerSpec, read_bundle


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
    (["--backend", "training"], "not built yet"),
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
