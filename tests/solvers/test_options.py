"""Solver options: invalid noise and churn settings raise with the option's name, whichever solver takes them."""

import math

import numpy as np
import pytest

import fastflow as ff

BAD = [
    ("euler-ancestral", {"s_noise": -1.0}, "s_noise must be finite and non-negative, got -1.0"),
    ("euler-ancestral", {"s_noise": math.nan}, "s_noise must be finite and non-negative, got nan"),
    ("euler-ancestral", {"eta": -0.5}, "eta must be finite and non-negative"),
    ("euler", {"s_churn": 1.0, "s_noise": -1.0}, "s_noise must be finite and non-negative, got -1.0"),
    ("euler", {"s_churn": math.inf}, "s_churn must be finite"),
    ("euler", {"s_churn": 40.0, "s_tmin": -1.0}, "s_tmin must be finite and non-negative"),
    ("euler", {"s_churn": 40.0, "s_tmax": math.nan}, r"s_tmax must be a number at least s_tmin .*s_tmax=nan"),
    ("euler", {"s_churn": 40.0, "s_tmin": 5.0, "s_tmax": 1.0}, r"s_tmax must be .*s_tmin=5.0, s_tmax=1.0"),
]


@pytest.mark.parametrize("solver,options,match", BAD, ids=[f"{b[0]}-{b[1]}" for b in BAD])
def test_bad_noise_options_raise(solver, options, match):
    with pytest.raises(ValueError, match=match):
        ff.Sampler(ff.EDM(), solver, steps=10, **options)


def test_churn_window_with_equal_ends_churns_that_level_only():
    """s_tmin = s_tmax is a valid window: one noise level, so one stage is raised (its noise drawn one stage
    earlier, the first stage's raise being its starting level)."""
    rng = np.random.default_rng()
    k = int(rng.integers(1, 9))
    plain = ff.Sampler(ff.EDM(), "euler", steps=10)
    level = float(plain.stage_sigma[k])
    s = ff.Sampler(ff.EDM(), "euler", steps=10, s_churn=float(rng.uniform(1.0, 40.0)), s_tmin=level, s_tmax=level)
    assert [i for i, n in enumerate(s.plan.noise) if n] == [k - 1]
    assert s.stage_sigma[k] > level and np.array_equal(np.delete(s.stage_sigma, k), np.delete(plain.stage_sigma, k))
