"""Solver options: invalid, unknown, mistyped or ignored options raise with the option's name, whichever solver takes
them."""

import math

import numpy as np
import pytest
import torch

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


@pytest.mark.parametrize(("s_churn", "s_noise"), [(2.0, 0.7), (40.0, 1.0)], ids=["gamma-below-cap", "gamma-capped"])
def test_euler_churn_is_karras_algorithm_2(s_churn, s_noise):
    """EDM Euler with churn against Karras et al.'s Algorithm 2 in float64: raise sigma by gamma = min(S / N, sqrt(2)
    - 1) with noise of variance s_noise^2 (t_hat^2 - t^2), then an Euler step from t_hat. The plan draws stage
    i + 1's churn noise in stage i, and the first stage starts at its raised level."""
    n = 6
    s = ff.Sampler(ff.EDM(), "euler", prediction="x0", steps=n, s_churn=s_churn, s_noise=s_noise, backend="torch")
    sig = ff.Sampler(ff.EDM(), "euler", prediction="x0", steps=n).stage_sigma
    sig_next = np.append(sig[1:], 0.0)
    gamma = min(s_churn / n, math.sqrt(2) - 1)
    gen = torch.Generator().manual_seed(0)
    xi = [torch.randn(4, 3, dtype=torch.float64, generator=gen) for _ in range(n)]
    x_hat = torch.randn(4, 3, dtype=torch.float64, generator=gen) * sig[0] * (1 + gamma)
    z = x_hat.clone()
    for i in range(n):
        t_hat = sig[i] * (1 + gamma)
        assert s.stage_sigma[i] == pytest.approx(t_hat, rel=1e-12)
        denoised = torch.tanh(x_hat / t_hat)  # the model, called at the raised level
        x_next = x_hat + (sig_next[i] - t_hat) * (x_hat - denoised) / t_hat
        if i + 1 < n:
            x_next = x_next + s_noise * math.sqrt((sig[i + 1] * (1 + gamma)) ** 2 - sig[i + 1] ** 2) * xi[i + 1]
        z = s.step(torch.tanh(z / t_hat), z, i, noise=xi[i + 1] if i + 1 < n else None)
        torch.testing.assert_close(z, x_next, rtol=1e-10, atol=1e-10)
        x_hat = x_next


@pytest.mark.parametrize(("eta", "s_noise"), [(0.5, 0.7), (2.0, 1.0)], ids=["eta-0.5", "eta-2-capped"])
def test_euler_ancestral_eta_is_k_diffusions_ancestral_step(eta, s_noise):
    """Euler ancestral against k-diffusion's definition in float64: sigma_up = min(s', eta s' sqrt(1 - s'^2 / s^2)),
    sigma_down = sqrt(s'^2 - sigma_up^2), an Euler step to sigma_down, then s_noise sigma_up of fresh noise. diffusers'
    scheduler has eta = 1 only, which the comparison with it cannot tell from eta^2 (nor the cap at s')."""
    n = 6
    s = ff.Sampler(ff.EDM(), "euler-ancestral", prediction="x0", steps=n, eta=eta, s_noise=s_noise, backend="torch")
    sig = np.append(s.stage_sigma, 0.0)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(4, 3, dtype=torch.float64, generator=gen) * sig[0]
    for i in range(n):
        xi = torch.randn(4, 3, dtype=torch.float64, generator=gen)
        up = min(sig[i + 1], eta * sig[i + 1] * math.sqrt(1 - sig[i + 1] ** 2 / sig[i] ** 2))
        down = math.sqrt(sig[i + 1] ** 2 - up**2)
        denoised = torch.tanh(z / sig[i])
        want = z + (down - sig[i]) * (z - denoised) / sig[i] + s_noise * up * xi
        z = s.step(denoised, z, i, noise=xi if s.plan.noise[i] else None)
        torch.testing.assert_close(z, want, rtol=1e-10, atol=1e-10)


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
