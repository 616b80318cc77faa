"""EL2N scores against the definition, and the keep rule."""
import math

import numpy as np
import pytest

from sfp_common.errors import ConfigError
from sfp_common.pruning import el2n_scores, keep_count, select_hardest


def test_el2n_matches_the_definition():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 4)) * 3
    labels = rng.integers(0, 4, 6)
    expected = []
    for row, label in zip(logits, labels):
        p = np.exp(row) / np.exp(row).sum()
        onehot = np.eye(4)[label]
        expected.append(math.sqrt(((p - onehot) ** 2).sum()))
    np.testing.assert_allclose(el2n_scores(logits, labels), expected, rtol=1e-12)


def test_el2n_is_stable_for_huge_logits_and_bounded():
    scores = el2n_scores(np.array([[1000.0, 0.0], [0.0, 1000.0]]), np.array([0, 0]))
    np.testing.assert_allclose(scores, [0.0, math.sqrt(2)], atol=1e-12)


@pytest.mark.parametrize("n,keep,expected", [(10, 0.5, 5), (9, 0.5, 5), (3, 0.01, 1), (7, 1.0, 7), (10, 0.3, 3)])
def test_keep_count(n, keep, expected):
    assert keep_count(n, keep) == expected


def test_select_hardest_keeps_the_highest_scores_and_breaks_ties_by_index():
    scores = np.array([0.1, 0.9, 0.5, 0.9, 0.2])
    np.testing.assert_array_equal(select_hardest(scores, 0.4), [1, 3])
    np.testing.assert_array_equal(select_hardest(np.ones(5), 0.4), [0, 1])


@pytest.mark.parametrize("keep", [0.0, -0.1, 1.01, float("nan")])
def test_keep_fraction_outside_the_interval_is_refused(keep):
    with pytest.raises(ConfigError, match="keep fraction"):
        keep_count(10, keep)
