"""The federation's policy on its own: the reference federation and the server construct the same
FedAvgStrategy, so what is checked here holds for both."""
import numpy as np
import pytest

from sfp_common.errors import ConfigError
from sfp_common.recipe import Recipe
from sfp_common.strategy import FedAvgStrategy


def test_selection_draws_the_fraction_from_the_rounds_own_seed():
    strategy = FedAvgStrategy(seed=3, fraction=0.5)
    picks = [strategy.select(range(6), r) for r in range(1, 6)]
    assert all(len(p) == 3 and len(set(p)) == 3 and p == sorted(p) for p in picks)
    assert len({tuple(p) for p in picks}) > 1                              # rounds differ
    assert strategy.select(range(6), 2) == picks[1]                        # a restarted server draws the same
    # the server selects device ids, the reference client indices: the same choice when ids sort like indices
    names = [f"dev-{i}" for i in range(6)]
    assert strategy.select(names[::-1], 4) == [names[i] for i in picks[3]]
    assert FedAvgStrategy(fraction=1.0).select([2, 0, 1], 1) == [0, 1, 2]
    assert FedAvgStrategy(fraction=0.01).select(range(6), 1).__len__() == 1   # at least one
    assert FedAvgStrategy().select([], 1) == []
    with pytest.raises(ConfigError, match="fraction"):
        FedAvgStrategy(fraction=0.0)


def test_plans_carry_the_recipe_with_the_devices_batch_and_wire_and_the_clients_seed():
    recipe = Recipe()
    plan = FedAvgStrategy(recipe, seed=7).plan(3, 2, batch_size=4, wire="int8")
    assert plan.recipe == recipe.but(batch_size=4, wire="int8")
    assert plan.seed == int(np.random.SeedSequence([7, 3, 2]).generate_state(1)[0])
    assert FedAvgStrategy(recipe, seed=7).plan(3, 2).recipe == recipe


def test_aggregation_is_the_sample_weighted_mean_and_evaluation_sample_weighted():
    updates = [{"w": np.array([1.0, 2.0], np.float32)}, {"w": np.array([4.0, 8.0], np.float32)}]
    merged = FedAvgStrategy().aggregate(updates, [1, 3])
    np.testing.assert_allclose(merged["w"], [(1 + 12) / 4, (2 + 24) / 4])
    assert merged["w"].dtype == np.float32
    assert FedAvgStrategy.evaluation([{"correct": 3, "samples": 4}, {"correct": 1, "samples": 6}]) == {
        "accuracy": 0.4, "evaluated_on": 10}
    assert FedAvgStrategy.evaluation([])["accuracy"] is None
