"""EL2N scores against the definition, and the keep rule."""
import math

import numpy as np
import pytest

from sfp_common.errors import ConfigError
from sfp_common.pruning import (SampleMemory, choose_samples, el2n_scores, keep_count, select_by_score,
                                samples_supported, select_hardest, select_random)
from sfp_common.recipe import Recipe


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


def test_a_sample_never_scored_is_always_kept_and_the_rest_fill_up_by_score():
    scores = np.array([np.nan, 0.9, 0.1, 0.5, np.nan, 0.7])
    np.testing.assert_array_equal(select_by_score(scores, 0.5), [0, 1, 4])              # 3 slots: 2 unscored
    np.testing.assert_array_equal(select_by_score(scores, 0.5, "easiest"), [0, 2, 4])
    np.testing.assert_array_equal(select_by_score(np.full(4, np.nan), 0.25), [0, 1, 2, 3])   # round 1: all
    np.testing.assert_array_equal(select_by_score(scores, 1.0), np.arange(6))


def test_random_selection_is_the_keep_fraction_and_follows_the_generator():
    a = select_random(10, 0.3, np.random.default_rng(5))
    assert len(a) == 3 and len(set(a.tolist())) == 3 and list(a) == sorted(a)
    np.testing.assert_array_equal(a, select_random(10, 0.3, np.random.default_rng(5)))


@pytest.mark.parametrize("prune,expected", [("none", [0, 1, 2, 3]), ("split-el2n", [1, 3]),
                                            ("local-el2n", [0, 2])])
def test_choose_samples_follows_the_recipe(prune, expected):
    memory = SampleMemory(np.array([0.1, 0.9, 0.2, 0.8]), None, np.zeros(4, bool))
    local = lambda: np.array([0.9, 0.1, 0.8, 0.2])                         # noqa: E731
    got = choose_samples(Recipe(prune=prune, keep=0.5), memory, np.random.default_rng(0), local)
    np.testing.assert_array_equal(got, expected)


def test_memory_records_the_el2n_of_the_logits_and_the_features_in_wire_precision():
    memory = SampleMemory.empty(5)
    logits, labels = np.array([[3.0, 0.0], [0.0, 2.0]]), np.array([0, 0])
    features = np.array([[[1.0, 2.0]], [[3.0, 4.0]]], np.float32)
    memory.record(np.array([1, 3]), logits, labels, features, "fp16")
    np.testing.assert_allclose(memory.scores[[1, 3]], el2n_scores(logits, labels))
    assert np.isnan(memory.scores[[0, 2, 4]]).all()
    assert memory.features.dtype == np.float16 and memory.features.shape == (5, 1, 2)
    np.testing.assert_array_equal(memory.cached(), [1, 3])
    np.testing.assert_array_equal(memory.features[3], features[1])
    restored = SampleMemory.from_arrays(memory.arrays("m/"), 5, "m/")
    np.testing.assert_array_equal(restored.features, memory.features)
    np.testing.assert_array_equal(restored.scores, memory.scores)
    assert SampleMemory.from_arrays(memory.arrays("m/"), 6, "m/") is None        # other data: not used


@pytest.mark.parametrize("prune,keep", [("split-el2n", 0.5), ("split-el2n", 0.3), ("random", 0.85), ("none", 0.5)])
def test_the_samples_a_round_trained_bound_the_fedavg_weight_honestly_and_tightly(prune, keep):
    """An honest device (the kept samples of choose_samples, every split pass) is never bounded below its count;
    one batch less than its kept samples need, and its count is out of reach."""
    recipe, rng = Recipe(prune=prune, keep=keep, epochs=2), np.random.default_rng(0)
    for n in range(1, 300):
        memory = SampleMemory.empty(n)
        scored = rng.random(n) < 0.8                                 # some samples scored, some never
        memory.scores[scored] = rng.random(scored.sum())
        trained = recipe.epochs * len(choose_samples(recipe, memory, rng, lambda: None))
        assert samples_supported(recipe, trained) >= n
        least = n if prune == "none" else keep_count(n, keep)
        assert samples_supported(recipe, recipe.epochs * least - 1) < n
