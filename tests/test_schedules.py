"""Schedules: values, derivatives, inverses, diffusers' beta schedules, validation."""

import math

import numpy as np
import pytest

from fastflow.schedules import EDM, VP, FlowMatching, Rescaled

SCHEDULES = [
    FlowMatching(),
    VP(),
    VP(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
    VP(beta_schedule="squaredcos_cap_v2"),
    VP(rescale_betas_zero_snr=True),
    VP.cosine(),
    EDM(),
    Rescaled(VP(), 2.5),
    Rescaled(VP.cosine(), lambda t: 1 + t, lambda t: np.ones_like(t)),
]


def _interior(s, n=9):
    return np.linspace(s.t_min, s.t_max, n + 2)[1:-1] + 0.123  # off the integer knots


@pytest.mark.parametrize("s", SCHEDULES, ids=repr)
def test_derivatives_match_finite_differences(s):
    t = np.clip(_interior(s), s.t_min + 1e-3, s.t_max - 1e-3)
    h = 1e-6 * max(1.0, s.t_max)
    for f, df in ((s.alpha, s.d_alpha), (s.sigma, s.d_sigma)):
        np.testing.assert_allclose(df(t), (f(t + h) - f(t - h)) / (2 * h), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("s", SCHEDULES, ids=repr)
def test_sigma_ve_inverse_and_monotone_logsnr(s):
    t = _interior(s)
    t = t[t < s.t_max]
    np.testing.assert_allclose(s.t_from_sigma_ve(s.sigma_ve(t)), t, rtol=1e-7, atol=1e-7 * s.t_max)
    s.validate()
    assert np.all(np.diff(s.logsnr(t)) < 0)


def test_vp_is_variance_preserving_and_matches_diffusers_alphas():
    diffusers = pytest.importorskip("diffusers")
    for kw in (
        dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
        dict(beta_schedule="squaredcos_cap_v2"),
        dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True),
    ):
        ours = VP(**kw)
        theirs = diffusers.DDIMScheduler(**kw).alphas_cumprod.double().numpy()
        if kw.get("rescale_betas_zero_snr"):
            theirs = theirs.copy()
            theirs[-1] = ours.alphas_cumprod[-1]  # both keep the last step finite; values differ by design
        np.testing.assert_allclose(ours.alphas_cumprod, theirs, rtol=1e-5, atol=1e-7)
        t = np.arange(1000.0)
        np.testing.assert_allclose(ours.alpha(t) ** 2 + ours.sigma(t) ** 2, 1.0, atol=1e-12)
        np.testing.assert_allclose(ours.alpha(t) ** 2, ours.alphas_cumprod, rtol=1e-12)


def test_zero_terminal_snr_rescale_reaches_near_zero():
    s = VP(rescale_betas_zero_snr=True)
    assert s.alphas_cumprod[-1] < 1e-6
    assert s.alphas_cumprod[0] == pytest.approx(VP().alphas_cumprod[0], rel=1e-12)


def test_squaredcos_tail_matches_diffusers_in_log_space():
    """The comparison above is absolute (atol 1e-7), and the cosine schedule's last alphas_cumprod lie far below that:
    its last beta is capped at 0.999, which only the final timestep (trailing spacing's first) sees. In log space the
    tail is as visible as the head."""
    diffusers = pytest.importorskip("diffusers")
    theirs = diffusers.DDIMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod.double().numpy()
    ours = VP(beta_schedule="squaredcos_cap_v2").alphas_cumprod
    np.testing.assert_allclose(np.log(ours), np.log(theirs), rtol=0, atol=1e-4)


def test_zero_terminal_snr_keeps_the_last_sigma_diffusers_euler_steps_from():
    """The rescaled last alphas_cumprod (0) is replaced by a finite value; diffusers' Euler uses 2**-24, so a
    trailing loop's first sigma (sigma_ve at the last training step, 4096) is the same in both."""
    diffusers = pytest.importorskip("diffusers")
    betas = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True)
    ref = diffusers.EulerDiscreteScheduler(**betas, timestep_spacing="trailing")
    ref.set_timesteps(10)
    ours = VP(**betas)
    assert float(ours.sigma_ve(ours.t_max)) == pytest.approx(float(ref.sigmas[0]), rel=1e-6)


def test_flow_matching_shift_and_mu_warp_the_grid():
    t = np.linspace(0, 1, 11)
    np.testing.assert_allclose(FlowMatching().warp(t), t)
    shifted = FlowMatching(shift=3.0).warp(t)
    np.testing.assert_allclose(shifted, 3 * t / (1 + 2 * t))
    mu = FlowMatching(mu=np.log(3.0)).warp(t)
    np.testing.assert_allclose(mu, shifted, atol=1e-12)  # exp(mu) = shift is the same warp


def test_rescaled_scales_alpha_and_sigma():
    base = VP.cosine()
    s = Rescaled(base, 3.0)
    t = np.array([0.2, 0.7])
    np.testing.assert_allclose(s.alpha(t), 3 * base.alpha(t))
    np.testing.assert_allclose(s.logsnr(t), base.logsnr(t))


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: FlowMatching(shift=0), "shift"),
        (lambda: FlowMatching(shift=float("nan")), "shift"),
        (lambda: EDM(sigma_min=1.0, sigma_max=0.5), "sigma_min"),
        (lambda: EDM(rho=float("nan")), "rho"),
        (lambda: VP(alphas_cumprod=np.array([0.9, 0.95, 0.5])), "decreasing"),
        (lambda: VP(alphas_cumprod=np.array([0.9, np.nan, 0.5])), "alphas_cumprod"),
        (lambda: VP(beta_schedule="cosine-ish"), "unknown beta schedule"),
        (lambda: Rescaled(VP(), -1.0), "scale"),
        (lambda: Rescaled(VP(), lambda t: t), "derivative"),
    ],
)
def test_bad_schedule_parameters_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("n", [2.5, True, "1000"])
def test_num_train_timesteps_must_be_an_int(n):
    with pytest.raises(TypeError, match="num_train_timesteps must be an int"):
        VP(num_train_timesteps=n)


def test_nan_time_raises():
    with pytest.raises(ValueError, match="NaN"):
        VP().alpha(np.nan)


@pytest.mark.parametrize("s", SCHEDULES, ids=repr)
def test_time_range_is_where_the_schedule_is_defined(s):
    """The default grid lies inside the time range; at its ends alpha and sigma are finite and non-negative,
    and a time just outside it is refused."""
    lo, hi = s.time_range()
    assert lo <= s.t_min < s.t_max <= hi
    ends = np.array([lo, min(hi, 1e4)])
    assert np.all(np.isfinite(s.alpha(ends))) and np.all(s.alpha(ends) >= 0) and np.all(s.sigma(ends) >= 0)
    s.check_times(ends)
    eps = np.random.default_rng().uniform(1e-9, 1e-3)
    for t in (lo - eps, hi + eps if np.isfinite(hi) else np.inf):
        with pytest.raises(ValueError, match=r"is outside the time range \["):
            s.check_times(t)


def test_cosine_alpha_is_zero_at_t_one():
    """alpha(1) is exactly 0 (cos(pi / 2) is 6e-17), so an eps model's step from t = 1 is refused as at
    FlowMatching's t = 1 instead of dividing by 6e-17."""
    import fastflow as ff

    vp = VP.cosine(t_max=1.0)
    assert vp.alpha(1.0) == 0.0 and vp.sigma(1.0) == 1.0 and vp.d_sigma(1.0) == 0.0
    t = np.random.default_rng().uniform(0, 1, 64)
    np.testing.assert_allclose(vp.alpha(t), np.cos(np.pi * t / 2), rtol=0, atol=1e-15)
    np.testing.assert_allclose(vp.d_sigma(t), np.pi / 2 * np.cos(np.pi * t / 2), rtol=0, atol=1e-15)
    with pytest.raises(ff.UndefinedStepError, match="no data prediction where alpha = 0"):
        ff.Sampler(vp, "dpm++2m", prediction="eps", steps=3)


@pytest.mark.parametrize("ac", [np.full((2, 5), 0.5), np.array([0.5]), np.array(0.5)], ids=["2-D", "one", "0-d"])
def test_alphas_cumprod_must_be_a_1d_schedule(ac):
    with pytest.raises(ValueError, match="alphas_cumprod must be 1-D with at least 2 entries"):
        VP(alphas_cumprod=ac)


def test_flow_matching_takes_shift_or_mu_not_both():
    """Flux's diffusers config has shift=3.0 and dynamic shifting, which applies mu alone: composing both warps gave
    another grid silently. mu alone is diffusers' grid."""
    with pytest.raises(ValueError, match="pass shift or mu, not both"):
        FlowMatching(shift=3.0, mu=1.15)
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    ref.set_timesteps(6, mu=1.15)
    from fastflow.grids import grid_times

    np.testing.assert_allclose(grid_times(FlowMatching(mu=1.15), 6), ref.sigmas[:-1].numpy(), rtol=1e-6)


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: FlowMatching(shift="3"), "shift"),
        (lambda: FlowMatching(mu="1.2"), "mu"),
        (lambda: FlowMatching(t_max="1"), "t_max"),
        (lambda: VP.cosine(t_min="0"), "t_min"),
        (lambda: EDM(sigma_min="0.1"), "sigma_min"),
        (lambda: EDM(sigma_max="80"), "sigma_max"),
    ],
)
def test_a_number_parameter_given_as_another_type_is_refused_naming_it(make, name):
    """A string number failed in a comparison with "'>' not supported between instances of 'str' and 'int'" (which
    parameter?); it is refused as the solvers' options are, naming the parameter."""
    with pytest.raises(TypeError, match=rf"^{name} must be a real number"):
        make()


def test_vp_from_alphas_cumprod_does_not_name_a_beta_schedule():
    """With alphas_cumprod given, repr named the unused default beta schedule: VP(scaled_linear, T=3)."""
    s = VP(alphas_cumprod=np.array([0.9, 0.5, 0.1]))
    assert repr(s) == "VP(alphas_cumprod, T=3)"
    assert repr(VP(beta_schedule="linear", num_train_timesteps=10)) == "VP(linear, T=10)"


@pytest.mark.parametrize("mu", [800.0, -800.0, math.inf, math.nan])
def test_flow_mu_beyond_exp_s_range_is_refused(mu):
    """e^mu overflows float64 past 709: mu=800 built a schedule whose Sampler then raised OverflowError, and -800
    gave NaN grid times."""
    with pytest.raises(ValueError, match=r"mu must be finite and within \[-700, 700\]"):
        FlowMatching(mu=mu)


@pytest.mark.parametrize("beta_start", [-1.0, math.nan, 1.0])
def test_vp_beta_outside_0_1_is_refused(beta_start):
    """scaled_linear takes sqrt(beta_start): a negative one's root is complex, numpy kept its real part 0, and
    VP(beta_start=-1.0) was silently VP(beta_start=0.0)."""
    with pytest.raises(ValueError, match=r"beta_start must lie in \[0, 1\)"):
        VP(beta_start=beta_start)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: VP(beta_end="0.012"), TypeError, "beta_end must be a real number"),
        (lambda: VP(rescale_betas_zero_snr="no"), TypeError, "rescale_betas_zero_snr must be a bool"),
        (lambda: Rescaled(VP(), "2"), TypeError, "scale must be a real number"),
        (lambda: Rescaled(VP(), True), TypeError, "scale must be a real number"),
        (lambda: Rescaled("VP", 2.0), TypeError, "base must be a fastflow Schedule"),
    ],
)
def test_schedule_options_of_the_wrong_type_are_refused_naming_them(make, error, match):
    """A string beta failed in '**' naming neither; the string "no" zero-SNR-rescaled; Rescaled took "2" and True
    through float(), and a non-schedule base failed on its t_min."""
    with pytest.raises(error, match=match):
        make()
