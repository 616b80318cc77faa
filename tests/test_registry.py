"""The server's record of completed rounds survives a crash at any point: a round is done exactly when its
checkpoint landed, never recorded without its model, never twice."""
import json

import numpy as np

from cloud_server.registry import Registry


def state(value: float) -> dict[str, np.ndarray]:
    return {"head.prompts": np.full((2, 3), value, np.float32)}


def test_a_summary_whose_checkpoint_never_landed_is_dropped_on_restart(tmp_path):
    registry = Registry(tmp_path)
    registry.save_checkpoint(1, state(1.0), {"round": 1})
    registry.save_checkpoint(2, state(2.0), {"round": 2})
    with open(tmp_path / "rounds.jsonl", "a") as f:           # killed after round 3's summary, before its checkpoint
        f.write(json.dumps({"round": 3}) + "\n")
        f.write('{"round": 4, "acc')                           # and a line cut short
    done, loaded = Registry(tmp_path).load_checkpoint()
    assert done == 2 and float(loaded["head.prompts"][0, 0]) == 2.0
    assert [s["round"] for s in Registry(tmp_path).summaries()] == [1, 2]
    assert (tmp_path / "rounds.jsonl").read_text().count("\n") == 2
    registry.save_checkpoint(3, state(3.0), {"round": 3})     # round 3 again, recorded once
    assert [s["round"] for s in Registry(tmp_path).summaries()] == [1, 2, 3]


def test_no_checkpoint_means_no_completed_rounds(tmp_path):
    (tmp_path / "rounds.jsonl").write_text(json.dumps({"round": 1}) + "\n")
    assert Registry(tmp_path).load_checkpoint() is None
    assert Registry(tmp_path).summaries() == []
