"""What a device remembers of its samples between rounds (edge_client/memory.py): kept across restarts, and a round
the server runs again starts from the memory its first attempt started from."""
import numpy as np

from edge_client.memory import FILE, DeviceMemory


def trained(memory, rows, score):
    """A round's effect on a working copy: scores and features recorded for `rows`."""
    logits = np.tile([[score, 0.0]], (len(rows), 1))
    memory.record(np.array(rows), logits, np.zeros(len(rows), int), np.ones((len(rows), 1, 2), np.float32), "fp16")
    return memory


def test_a_round_run_again_starts_from_what_its_first_attempt_started_from(tmp_path):
    store = DeviceMemory(tmp_path, 4)
    assert np.isnan(store.begin(1).scores).all()
    first = trained(store.begin(1), [0, 1], 5.0)
    store.commit(1, first)
    second = trained(store.begin(2), [2], 1.0)
    store.commit(2, second)
    rerun = store.begin(2)                       # the server crashed before its checkpoint and runs round 2 again
    np.testing.assert_array_equal(rerun.has_features, first.has_features)
    np.testing.assert_array_equal(rerun.scores, first.scores)
    np.testing.assert_array_equal(store.begin(3).has_features, second.has_features)
    store.commit(2, trained(rerun, [3], 2.0))    # the re-run's result replaces the first attempt's
    np.testing.assert_array_equal(store.begin(3).has_features, [True, True, False, True])
    np.testing.assert_array_equal(store.begin(2).has_features, first.has_features)


def test_an_aborted_round_leaves_no_trace_and_a_restart_continues(tmp_path):
    store = DeviceMemory(tmp_path, 4)
    store.commit(1, trained(store.begin(1), [0, 1, 2], 3.0))
    trained(store.begin(2), [3], 9.0)            # aborted: never committed
    restarted = DeviceMemory(tmp_path, 4)
    np.testing.assert_array_equal(restarted.begin(2).has_features, [True, True, True, False])
    assert restarted.begin(2).features.dtype == np.float16


def test_a_memory_for_other_data_or_unreadable_is_dropped(tmp_path):
    store = DeviceMemory(tmp_path, 4)
    store.commit(1, trained(store.begin(1), [0], 3.0))
    assert not DeviceMemory(tmp_path, 5).begin(2).has_features.any()        # the data folder changed
    (tmp_path / FILE).write_bytes(b"not an npz")
    assert not DeviceMemory(tmp_path, 4).begin(2).has_features.any()


def test_which_samples_the_server_keeps_survives_a_restart_and_older_files_read_as_none(tmp_path):
    store = DeviceMemory(tmp_path, 4)
    memory = trained(store.begin(1), [0, 1], 3.0)
    memory.on_server[[0, 1]] = True
    store.commit(1, memory)
    np.testing.assert_array_equal(DeviceMemory(tmp_path, 4).begin(2).on_server, [True, True, False, False])
    with np.load(tmp_path / FILE) as npz:                    # a memory written before the opt-in existed
        older = {k: npz[k] for k in npz.files if not k.endswith("on_server")}
    np.savez(tmp_path / FILE, **older)
    restarted = DeviceMemory(tmp_path, 4).begin(2)
    assert not restarted.on_server.any() and restarted.has_features[:2].all()
