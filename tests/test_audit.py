"""The inversion audit on a tiny ViT and 8x8 digits: each attack scored against the original pixels."""
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from export.backbone import create_vit, preprocessing_of, resolve_model
from export.split import SplitViT
from sfp_common.datasets import load_dataset
from sfp_common.errors import ConfigError
from sfp_common.preprocess import preprocess
from sfp_common.split_spec import SplitSpec
from simulation.audit import AuditConfig, image_scores, run_audit, to_pixels
from simulation.cli import audit_main
from simulation.inversion import analytic_inverse, on_the_wire, optimised_inverse
from simulation.methods import defended


@pytest.fixture(scope="module")
def digits(module_digits_checkpoint):
    vit = create_vit(resolve_model(module_digits_checkpoint), num_classes=10, pretrained=True)
    prep = preprocessing_of(vit)
    images = torch.from_numpy(preprocess(load_dataset("digits").test.images[:8], prep))
    return vit, prep, images


def psnr(prep, images, rebuilt) -> float:
    return float(image_scores(to_pixels(images, prep), to_pixels(rebuilt, prep))[0].mean())


def test_with_no_head_blocks_the_server_rebuilds_the_pixels_from_the_tokens(digits):
    vit, prep, images = digits
    model = SplitViT(vit, SplitSpec(3, 0, 0)).eval()
    with torch.no_grad():
        tokens = model.head(images)
    exact = {wire: psnr(prep, images, analytic_inverse(model, on_the_wire(tokens, wire)))
             for wire in ("fp32", "fp16", "int8")}
    assert exact["fp32"] >= 90 and exact["fp16"] >= 50 and exact["int8"] >= 30, exact     # 100: an exact copy
    noisy = defended(model, 1.0, tokens, np.random.default_rng(0))
    assert torch.equal(noisy[:, :4], tokens[:, :4])                  # the cls token and the prompts are left alone
    assert psnr(prep, images, analytic_inverse(model, noisy)) < exact["int8"] - 10
    with pytest.raises(ConfigError, match="no head blocks"):
        analytic_inverse(SplitViT(vit, SplitSpec(3, 1, 0)), tokens)


def test_the_white_box_attack_rebuilds_through_a_head_block_better_than_guessing_the_mean(digits):
    vit, prep, images = digits
    model = SplitViT(vit, SplitSpec(3, 1, 0)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        tokens = model.head(images)
    bounds = ((0 - prep.mean[0]) / prep.std[0], (1 - prep.mean[0]) / prep.std[0])
    rebuilt = optimised_inverse(model, tokens, tuple(prep.input_size), bounds, steps=150, restarts=2)
    with torch.no_grad():
        assert ((model.head(rebuilt) - tokens) ** 2).mean() < 0.1 * ((model.head(images.mean(0, keepdim=True)
                                                                                  .expand_as(images)) - tokens) ** 2).mean()
    guess = psnr(prep, images, images.mean(0, keepdim=True).expand_as(images))
    assert psnr(prep, images, rebuilt) > guess + 3


def test_the_audit_writes_its_table_grids_and_plot_and_resumes(module_digits_checkpoint, tmp_path):
    cfg = AuditConfig(model=module_digits_checkpoint, dataset="digits", public="digits", images=4, public_images=200,
                      head_blocks=(0, 1), wires=("fp32",), noise=(0.0,), prompts=3, steps=20, restarts=1,
                      inverse_epochs=1)
    said = []
    rows = run_audit(cfg, tmp_path, progress=said.append)
    assert [r["setting"] for r in rows] == ["k0-fp32-noise0", "k1-fp32-noise0"]
    assert set(rows[0]["attacks"]) == {"analytic", "optimised", "learned"} and "analytic" not in rows[1]["attacks"]
    assert rows[0]["best"] == "analytic" and rows[0]["attacks"]["analytic"]["psnr"] >= 90 and not rows[0]["fails"]
    assert rows[0]["token_bytes_per_image"] == (1 + 3 + 4) * 32 * 4 and rows[0]["image_bytes"] == 64
    table = (tmp_path / "results.md").read_text()
    assert "| 0 | fp32 | 0 | 1,024 / 64 |" in table and "grids/k1-fp32-noise0.png" in table
    assert all((tmp_path / "grids" / f"{r['setting']}.png").stat().st_size > 1000 for r in rows)
    assert (tmp_path / "audit.png").exists()
    said.clear()
    again = run_audit(cfg, tmp_path, progress=said.append)       # resumed: nothing attacked again
    assert said == [] and again == rows
    more = run_audit(AuditConfig(**{**cfg.__dict__, "head_blocks": (0,), "noise": (2.0,)}), tmp_path,
                     progress=said.append)
    assert [r["setting"] for r in more] == ["k0-fp32-noise0", "k1-fp32-noise0", "k0-fp32-noise2"]
    assert more[2]["attacks"]["analytic"]["psnr"] < rows[0]["attacks"]["analytic"]["psnr"] - 30


@pytest.mark.parametrize("args,why", [(["--wires", "fp64"], "unknown wire"), (["--noise", "a"], "comma-separated"),
                                      (["--head-blocks", "9"], "leave no body")])
def test_sfp_audit_refuses_bad_settings_in_one_line(module_digits_checkpoint, tmp_path, args, why):
    result = CliRunner().invoke(audit_main, ["--model", module_digits_checkpoint, "--dataset", "digits", "--public",
                                             "digits", "--images", "2", "--public-images", "20", "--out",
                                             str(tmp_path), *args])
    assert result.exit_code == 2 and why in result.stderr and "Traceback" not in result.output, result.output
