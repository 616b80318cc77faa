"""The noise defence (sfp_common/defence.py): noise only on the patch tokens, at the asked scale, drawn from the
round's own stream, and really in what the reference federation sends."""
import numpy as np
import pytest

from sfp_common.defence import noise_generator, token_noise
from sfp_common.errors import ConfigError
from sfp_common.recipe import Recipe
from sfp_common.split_spec import SplitSpec
from simulation.engine import Federation, SimConfig


def test_noise_covers_the_patch_tokens_at_the_scale_asked_and_nothing_else():
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((64, 20, 16)).astype(np.float32) * 3.0
    noise = token_noise(tokens, 4, 0.5, np.random.default_rng(1))
    assert noise.dtype == np.float32 and noise.shape == tokens.shape
    assert not noise[:, :4].any()
    rms = np.sqrt(np.mean(tokens[:, 4:].astype(np.float64) ** 2))
    assert noise[:, 4:].std() == pytest.approx(0.5 * rms, rel=0.02)
    np.testing.assert_array_equal(noise, token_noise(tokens, 4, 0.5, np.random.default_rng(1)))
    assert noise_generator(np.random.default_rng(0), 0.0) is None            # off: the round's stream untouched
    with pytest.raises(ConfigError, match="token noise"):
        Recipe(token_noise=-1.0)


def test_the_reference_federation_sends_noisy_tokens_when_the_recipe_says_so(digits_checkpoint):
    def first_round(noise):
        cfg = SimConfig(dataset="digits", model=digits_checkpoint, clients=2, rounds=1, seed=3, spec=SplitSpec(2),
                        recipe=Recipe(batch_size=16, token_noise=noise), train_samples=120)
        fed = Federation(cfg)
        return fed, fed.run_round(1)
    clean_fed, clean = first_round(0.0)
    noisy_fed, noisy = first_round(2.0)
    assert noisy["bytes_up"] == clean["bytes_up"]                    # the same traffic, other values
    assert any(not np.allclose(p.detach(), q.detach()) for p, q in zip(clean_fed.client_params.values(),
                                                                       noisy_fed.client_params.values()))
    assert noisy_fed.evaluate(1) == noisy_fed.evaluate(1)           # defended evaluation: seeded per round
