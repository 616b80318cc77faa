"""The command-line tools: a one-line error for bad input, a usable report for good input."""
import json

import pytest
from click.testing import CliRunner

from simulation.cli import count_main, sim_main


def run(command, args):
    return CliRunner().invoke(command, args)


@pytest.mark.parametrize("args,message", [
    (["--model", "no_such_model_anywhere"], "unknown model"),
    (["--dataset", "/no/such/folder"], "does not exist"),
    (["--alpha", "0"], "alpha must be > 0"),
    (["--alpha", "-1"], "alpha must be > 0"),
    (["--keep", "0"], "keep fraction"),
    (["--keep", "1.5"], "keep fraction"),
    (["--clients", "2000"], "more clients (2000) than training samples"),
    (["--model", "missing-checkpoint.pth"], "does not exist"),
])
def test_bad_input_is_one_line_not_a_traceback(digits_checkpoint, args, message):
    base = ["--dataset", "digits", "--model", digits_checkpoint, "--rounds", "1"]
    result = run(sim_main, base + args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.output


def test_count_refuses_an_unknown_model():
    result = run(count_main, ["--model", "vit_nonexistent"])
    assert result.exit_code == 2 and result.stderr.startswith("error: unknown model")


def test_sim_writes_the_report(digits_checkpoint, tmp_path):
    report = tmp_path / "out" / "report.json"
    result = run(sim_main, ["--dataset", "digits", "--model", digits_checkpoint, "--clients", "2", "--rounds", "2",
                            "--train-samples", "200", "--alpha", "0.5", "--report", str(report)])
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert [r["round"] for r in data["rounds"]] == [1, 2]
    assert data["method"] == "sfprompt" and data["alpha"] == 0.5 and data["clients"] == 2
    printed = [line for line in result.stdout.splitlines() if line.strip().startswith(("1 ", "2 "))]
    assert len(printed) == 2


def test_count_prints_ratios_to_fl(tmp_path):
    out = tmp_path / "count.json"
    result = run(count_main, ["--model", "vit_tiny_patch16_224", "--samples", "8", "--method", "sfprompt",
                              "--method", "fl", "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = {(r["method"], r["traffic"]): r for r in json.loads(out.read_text())["rows"]}
    assert rows[("fl", "-")]["flops_vs_fl"] == 1.0
    assert 0 < rows[("sfprompt", "ours")]["flops_vs_fl"] < 0.05
    assert rows[("sfprompt", "ours")]["bytes_vs_fl"] < rows[("sfprompt", "paper")]["bytes_vs_fl"]
