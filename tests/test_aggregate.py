"""FedAvg against a hand computation."""
import numpy as np
import pytest

from sfp_common.aggregate import fedavg, fedavg_weights, weighted_average
from sfp_common.errors import ConfigError


def test_weights_are_sample_shares():
    np.testing.assert_allclose(fedavg_weights([10, 30, 60]), [0.1, 0.3, 0.6])


def test_fedavg_by_hand():
    a = {"p": np.array([[1.0, 2.0]], dtype=np.float32), "b": np.array([0.0], dtype=np.float32)}
    b = {"p": np.array([[3.0, 6.0]], dtype=np.float32), "b": np.array([4.0], dtype=np.float32)}
    out = fedavg([a, b], [1, 3])
    np.testing.assert_allclose(out["p"], [[2.5, 5.0]])
    np.testing.assert_allclose(out["b"], [3.0])
    assert out["p"].dtype == np.float32


def test_one_client_is_returned_unchanged():
    rng = np.random.default_rng(0)
    a = {"w": rng.standard_normal((3, 4)).astype(np.float32)}
    np.testing.assert_array_equal(fedavg([a], [7])["w"], a["w"])


def test_equal_weights_is_the_mean_computed_in_float64():
    rng = np.random.default_rng(1)
    ups = [{"w": rng.standard_normal(5).astype(np.float32)} for _ in range(4)]
    expected = np.mean([u["w"].astype(np.float64) for u in ups], axis=0).astype(np.float32)
    np.testing.assert_array_equal(weighted_average(ups, np.full(4, 0.25))["w"], expected)


@pytest.mark.parametrize("updates,counts,message", [
    ([{"w": np.zeros(2)}], [0], "positive sample count"),
    ([{"w": np.zeros(2)}, {"w": np.zeros(2)}], [1, -1], "positive sample count"),
    ([{"w": np.zeros(2)}, {"v": np.zeros(2)}], [1, 1], "different tensors"),
    ([{"w": np.zeros(2)}, {"w": np.zeros(3)}], [1, 1], "shape"),
    ([], [], "positive sample count"),
])
def test_mismatched_updates_are_refused(updates, counts, message):
    with pytest.raises(ConfigError, match=message):
        fedavg(updates, counts)
