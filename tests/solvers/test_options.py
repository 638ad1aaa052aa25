"""Solver options: invalid, unknown, mistyped or ignored options raise with the option's name, whichever solver takes
them."""

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
    ("ddim", {"eta": 1.5}, r"DDIM needs eta <= 1 .*got 1.5"),  # its noise would exceed the next sigma
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


TYPED = [
    ("ddim", {"eta": "0.5"}, TypeError, r"eta must be a real number, got '0.5' \(str\)"),
    ("euler", {"s_churn": "x"}, TypeError, "s_churn must be a real number"),
    ("euler", {"s_tmax": "1"}, TypeError, "s_tmax must be a real number"),
    ("euler-ancestral", {"s_noise": True}, TypeError, "s_noise must be a real number"),
    ("unipc", {"disable_corrector": 3}, TypeError, "disable_corrector must be a sequence of step indices"),
    ("unipc", {"lower_order_final": "no"}, TypeError, "lower_order_final must be bool, got 'no'"),
    ("unipc", {"order": True}, TypeError, "order must be int, got True"),
    ("unipc", {"order": 2.0}, TypeError, "order must be int, got 2.0"),
    ("unipc", {"variant": 2}, TypeError, "variant must be str"),
    ("sde-dpm++2m", {"lower_order_final": 1}, TypeError, "lower_order_final must be bool, got 1"),
    ("dpm++2m", {"solver_type": None}, TypeError, "solver_type must be str"),
    ("unipc", {"disable_corrector": [1.0]}, TypeError, "disable_corrector must hold int step indices"),
    ("dpm++2m", {"order": 3}, TypeError, r"does not take option\(s\) \['order'\]; it takes: sde, solver_type"),
    ("heun", {"eta": 1.0}, TypeError, r"'heun' does not take option\(s\) \['eta'\]; it takes: none"),
    ("dpm++2m", {"diffusers_3m": True}, ValueError, "diffusers_3m halves the third-order term, which order 2"),
    ("dpm++1", {"diffusers_3m": True}, ValueError, "which order 1 does not have"),
]


@pytest.mark.parametrize("solver,options,error,match", TYPED, ids=[f"{b[0]}-{b[1]}" for b in TYPED])
def test_mistyped_unknown_and_ignored_options_say_which(solver, options, error, match):
    """A wrong type for an option the solver takes is reported as such, not as an option it does not take; an
    option that would change nothing (the 3M term on a lower order) raises."""
    with pytest.raises(error, match=match):
        ff.Sampler(ff.VP(), solver, steps=5, **options)


@pytest.mark.parametrize("indices", [[-1], [4], [100]])
def test_unipc_disable_corrector_outside_the_loop_raises(indices):
    """Step j's corrector runs at step j + 1, so a 5-step loop has correctors 0..3 to disable; another index (the
    last step, a negative one meant from the end) changed nothing."""
    with pytest.raises(ValueError, match=r"outside the correctable steps 0\.\.3 of a 5-step loop"):
        ff.Sampler(ff.VP(), "unipc", steps=5, disable_corrector=indices)
    plain = ff.Sampler(ff.VP(), "unipc", steps=5).plan.coefs
    assert not np.array_equal(ff.Sampler(ff.VP(), "unipc", steps=5, disable_corrector=[2]).plan.coefs, plain)
    ff.Sampler(ff.VP(), "unipc", steps=5, disable_corrector=[3])  # in range (its step to sigma 0 scales it by 0)
