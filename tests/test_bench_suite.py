"""The benchmark suite's own plumbing, end to end on a tiny model: runs, tables, targets, RESULTS.md."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.suite import targets, write_results

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def comparison(tmp_path_factory, module_digits_checkpoint):
    """bench/compare.py as the suite runs it: two methods, one of them with the paper's traffic, two partitions,
    the ceilings, one round on the digits data."""
    root = tmp_path_factory.mktemp("bench")
    checkpoint = module_digits_checkpoint
    out = root / "comparison"
    cmd = [sys.executable, "bench/compare.py", "--methods", "sfprompt,sfprompt-paper,fl", "--partitions", "iid,0.5",
           "--central", "--rounds", "2", "--dataset", "digits", "--model", checkpoint, "--clients", "3",
           "--train-samples", "300", "--target", "0.15", "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return root


def test_comparison_tables_match_the_runs_reports(comparison):
    out = comparison / "comparison"
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["partitions"]) == {"iid", "dir0.5"} and set(summary["ceilings"]) == {"prompts-tail", "full"}
    for partition, rows in summary["partitions"].items():
        for row in rows:
            report = json.loads((out / partition / f"{row['run']}.json").read_text())
            assert row["final_accuracy"] == report["rounds"][-1]["accuracy"]
            ceiling = json.loads((out / "central" / f"{row['ceiling']}.json").read_text())
            assert row["ceiling_accuracy"] == ceiling["rounds"][-1]["accuracy"]
            per_round = [r["bytes_up"] + r["bytes_down"] for r in report["rounds"]]
            assert row["bytes_per_round"] == pytest.approx(sum(per_round) / len(per_round))
            assert row["client_peak_mb"] > 0
    iid = {r["run"]: r for r in summary["partitions"]["iid"]}
    # The paper's traffic trains the same thing (fp32 instead of fp16 tokens) and moves far more bytes.
    assert iid["sfprompt-paper"]["bytes_per_round"] > 3 * iid["sfprompt"]["bytes_per_round"]
    assert iid["sfprompt"]["client_flops_per_round"] < iid["fl"]["client_flops_per_round"]
    assert (out / "comparison.png").stat().st_size > 10_000
    assert "| sfprompt-paper |" in (out / "tables.md").read_text()


def test_results_page_checks_the_targets_from_the_results(comparison):
    page = comparison / "RESULTS.md"
    text = write_results(comparison, page, "python bench/suite.py --quick")
    row = next(r for r in json.loads((comparison / "comparison" / "summary.json").read_text())["partitions"]["iid"]
               if r["run"] == "sfprompt")
    (name, measured, met), = targets(comparison)
    gap = 100 * (row["final_accuracy"] - row["ceiling_accuracy"])
    assert "central ceiling" in name and met == (gap >= -1.0) and f"{gap:+.1f} points" in measured
    assert "## 1. The comparison" in text and "](comparison/comparison.png)" in text
    assert page.read_text() == text
