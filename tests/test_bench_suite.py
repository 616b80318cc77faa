"""The benchmark suite's own plumbing, end to end on a tiny model: runs over seeds, tables, targets, RESULTS.md."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.suite import earlier_default_note, targets, write_results
from sfp_common.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]
RUNS = ("sfprompt", "sfprompt-split-only", "sfprompt-paper", "fl")


@pytest.fixture(scope="module")
def comparison(tmp_path_factory, module_digits_checkpoint):
    """bench/compare.py as the suite runs it: SFPrompt, split-only, the paper's traffic and FL, two partitions, two
    seeds, the ceilings, two rounds on the digits data; then one more run added to the same folder."""
    root = tmp_path_factory.mktemp("bench")
    out = root / "comparison"
    common = ["--partitions", "iid,0.5", "--central", "--rounds", "2", "--dataset", "digits", "--model",
              module_digits_checkpoint, "--clients", "3", "--train-samples", "300", "--out", str(out), "--resume"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for methods, seeds in ((",".join(RUNS), "0,1"), ("sfprompt-no-local", "0")):
        done = subprocess.run([sys.executable, "bench/compare.py", "--methods", methods, "--seeds", seeds, *common],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
    return root


def finals(folder: Path) -> list[float]:
    return [json.loads(p.read_text())["rounds"][-1]["accuracy"] for p in sorted(folder.glob("seed*.json"))]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_comparison_tables_match_the_runs_reports(comparison):
    out = comparison / "comparison"
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["partitions"]) == {"iid", "dir0.5"} and set(summary["ceilings"]) == {"prompts-tail", "full"}
    for partition, rows in summary["partitions"].items():
        # in the order simulation/methods.py lists the methods, whichever invocation ran them
        assert [r["run"] for r in rows] == ["sfprompt", "sfprompt-paper", "sfprompt-split-only", "sfprompt-no-local",
                                            "fl"]
        reference = mean(finals(out / partition / "sfprompt-split-only"))
        for row in rows:
            accuracy = finals(out / partition / row["run"])
            assert len(accuracy) == (1 if row["run"] == "sfprompt-no-local" else 2) == len(row["seeds"])
            assert row["final_accuracy"] == pytest.approx(mean(accuracy))
            assert row["final_spread"]["min"] == min(accuracy) and row["final_spread"]["max"] == max(accuracy)
            ceiling = mean(finals(out / "central" / row["ceiling"]))
            assert row["ceiling_accuracy"] == pytest.approx(ceiling)
            assert row["vs_ceiling"] == pytest.approx(mean(accuracy) - ceiling)
            assert row["vs_reference"] == pytest.approx(mean(accuracy) - reference)
            reports = [json.loads(p.read_text()) for p in sorted((out / partition / row["run"]).glob("seed*.json"))]
            per_round = [r["bytes_up"] + r["bytes_down"] for rep in reports for r in rep["rounds"]]
            assert row["bytes_per_round"] == pytest.approx(sum(per_round) / len(per_round))
            assert row["client_peak_mb"] > 0
    iid = {r["run"]: r for r in summary["partitions"]["iid"]}
    # The paper's traffic trains the same thing (fp32 instead of fp16 tokens) and moves far more bytes.
    assert iid["sfprompt-paper"]["bytes_per_round"] > 3 * iid["sfprompt"]["bytes_per_round"]
    assert iid["sfprompt"]["client_flops_per_round"] < iid["fl"]["client_flops_per_round"]
    assert (out / "comparison.png").stat().st_size > 10_000
    assert "| sfprompt-paper | 2 |" in (out / "tables.md").read_text()


def test_results_page_checks_the_targets_from_the_results(comparison):
    page = comparison / "RESULTS.md"
    text = write_results(comparison, page, "python bench/suite.py --quick")
    rows = {p: {r["run"]: r for r in rs}
            for p, rs in json.loads((comparison / "comparison" / "summary.json").read_text())["partitions"].items()}
    found = {name: met for name, _, met in targets(comparison)}
    for partition, title in (("iid", "IID"), ("dir0.5", "Dirichlet 0.5")):
        ours, ref = rows[partition]["sfprompt"], rows[partition]["sfprompt-split-only"]
        name = f"sfprompt within 1 point of sfprompt-split-only, {title} (mean of 2 seeds)"
        assert found[name] == (ours["final_accuracy"] - ref["final_accuracy"] >= -0.01)
        name = f"sfprompt within 2 points of its central ceiling, {title} (mean of 2 seeds)"
        assert found[name] == (ours["final_accuracy"] - ours["ceiling_accuracy"] >= -0.02)
    ratio = rows["iid"]["sfprompt"]["bytes_per_round"] / rows["iid"]["sfprompt-split-only"]["bytes_per_round"]
    assert found["sfprompt bytes per client per round <= 0.6x sfprompt-split-only's, IID"] == (ratio <= 0.6)
    assert "## 1. The comparison" in text and "](comparison/comparison.png)" in text
    assert page.read_text() == text


def test_an_item_measured_with_an_earlier_default_recipe_says_so(comparison):
    """Runs of today's recipe give no note, nor do the ceilings (they run no phase 1, whatever recipe they
    record); a run of `sfprompt` with other phase-1 settings names them."""
    out = comparison / "comparison"
    assert earlier_default_note(out) is None
    ceiling = json.loads((out / "central" / "prompts-tail" / "seed0.json").read_text())
    ceiling["train"]["local_epochs"] += 1
    (out / "central" / "prompts-tail" / "seed8.json").write_text(json.dumps(ceiling))
    try:
        assert earlier_default_note(out) is None
    finally:
        (out / "central" / "prompts-tail" / "seed8.json").unlink()
    report = json.loads((out / "iid" / "sfprompt" / "seed0.json").read_text())
    report["train"] = {**report["train"], "local_epochs": Recipe().local_epochs + 3, "wire": "int8"}
    (out / "iid" / "sfprompt" / "seed9.json").write_text(json.dumps(report))
    try:
        note = earlier_default_note(out)
    finally:
        (out / "iid" / "sfprompt" / "seed9.json").unlink()
    assert note is not None and f"local_epochs = {Recipe().local_epochs + 3} (now {Recipe().local_epochs})" in note
    assert "wire" not in note     # what the items vary on purpose is not an earlier default
