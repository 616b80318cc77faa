"""The fleet-scale benchmark, small: real devices in two host processes, each enrolled with its own token over a
secured Mosquitto, then a run where a quarter of them leave after each round and come back. No update may be lost,
none refused, each counted once by the server, and the broker's own byte counters must cover what the devices
counted."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_small_fleet_loses_no_update_with_or_without_churn(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    done = subprocess.run(
        [sys.executable, "bench/fleet_scale.py", "--devices", "4", "--rounds", "2", "--churn", "0.25", "--hosts", "2",
         "--out", str(out), "--work", str(work)],
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())["results"]
    assert [(r["devices"], r["churn"]) for r in results] == [(4, 0.0), (4, 0.25)]
    for result in results:
        context = json.dumps(result)[:3000]
        assert result["enrollment"]["devices"] == 4 and not result["errors"], context
        assert result["refused"] == 0 and result["each_once"], context
        rows = result["rounds"]
        assert all(row["lost"] == [] and row["participants"] >= 3 for row in rows), context
        # the broker's own counters cover what the devices counted (TLS and MQTT framing on top; summed: rounds of
        # a tenth of a second run into each other)
        total = {key: sum(row[key] for row in rows) for key in rows[0] if key.endswith("_MB")}
        assert total["broker_read_MB"] >= total["device_sent_MB"] > 0
        assert total["broker_written_MB"] >= total["device_received_MB"] > 0
    steady, churned = results
    assert all(r["participants"] == 4 for r in steady["rounds"])
    first = churned["rounds"][0]
    assert len(first["left"]) == 1 and churned["rounds"][1]["back"] == first["left"]
    assert (out / "fleet_scale.png").stat().st_size > 10_000
    assert "| 4 | 0.25 |" in (out / "results.md").read_text()
