"""Step grids: shapes, ordering, end points, and diffusers' integer spacings."""

import numpy as np
import pytest

from fastflow import Sampler
from fastflow.grids import GRID_NAMES, grid_times, make_points
from fastflow.schedules import EDM, VP, FlowMatching, Rescaled


@pytest.mark.parametrize("kind", ["uniform", "logsnr", "exponential", "karras"])
@pytest.mark.parametrize("schedule", [VP(), VP.cosine(), EDM(), FlowMatching()], ids=repr)
def test_continuous_grids_span_the_domain(kind, schedule):
    t_max = 0.99 if isinstance(schedule, FlowMatching) and kind != "uniform" else None  # sigma/alpha is inf at 1
    t = grid_times(schedule, 12, kind, t_max=t_max)
    assert len(t) == 12 and np.all(np.diff(t) < 0)
    assert t[0] == pytest.approx(t_max or schedule.t_max) and t[-1] == pytest.approx(schedule.t_min)


def test_karras_and_logsnr_spacing():
    s = EDM()
    sig = s.sigma_ve(grid_times(s, 10, "karras"))
    r = sig ** (1 / 7)
    np.testing.assert_allclose(np.diff(r), np.diff(r)[0], rtol=1e-9)
    lam = VP.cosine().logsnr(grid_times(VP.cosine(), 10, "logsnr"))
    np.testing.assert_allclose(np.diff(lam), np.diff(lam)[0], rtol=1e-6)


def test_karras_grid_of_a_vp_schedule_is_diffusers_karras_sigmas():
    """A schedule without its own rho (VP) takes Karras' default 7, as diffusers' use_karras_sigmas does: the EDM test
    above passes rho explicitly through EDM(), so it cannot see that default."""
    diffusers = pytest.importorskip("diffusers")
    betas = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ref = diffusers.EulerDiscreteScheduler(**betas, use_karras_sigmas=True)
    ref.set_timesteps(12)
    s = VP(**betas)
    np.testing.assert_allclose(s.sigma_ve(grid_times(s, 12, "karras")), ref.sigmas[:-1].double().numpy(), rtol=5e-5)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_integer_spacings_match_diffusers(spacing):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    sched.set_timesteps(25)
    ours = grid_times(VP(), 25, spacing, steps_offset=1 if spacing == "leading" else 0)
    np.testing.assert_array_equal(ours, sched.timesteps.numpy().astype(np.float64))


def test_final_modes():
    p = make_points(VP.cosine(), 5, "uniform", final="clean")
    assert len(p) == 6 and p.sigma[-1] == 0 and p.alpha[-1] == 1
    p = make_points(VP.cosine(), 5, "uniform", final="t_min")
    assert len(p) == 6 and p.t[-1] == pytest.approx(VP.cosine().t_min)
    p = make_points(VP(), 5, "uniform")
    assert np.isnan(p.t[-1]) and p.sigma[-1] == 0  # discrete VP has no clean time


def test_bad_grids_raise():
    with pytest.raises(ValueError, match="unknown grid"):
        grid_times(VP(), 5, "cosmic")
    with pytest.raises(ValueError, match="at least 1"):
        grid_times(VP(), 0)
    with pytest.raises(ValueError, match="t_min < t_max"):
        grid_times(VP(), 5, t_min=10, t_max=5)
    with pytest.raises(ValueError, match="high noise to low"):
        make_points(VP(), 3, np.array([10.0, 500.0, 900.0]))
    with pytest.raises(ValueError, match="unknown final"):
        make_points(VP(), 3, final="x")
    with pytest.raises(ValueError, match="finite positive noise"):
        grid_times(FlowMatching(), 5, "karras")
    with pytest.raises(ValueError, match="exceed"):
        grid_times(VP(), 2000, "leading")
    assert set(GRID_NAMES) >= {"uniform", "karras", "leading"}


OUT_OF_RANGE = [
    (VP(), {"grid": [1500.0, 500.0]}, r"grid time 1500 is outside the time range \[0, 999\] of VP"),
    (VP(), {"grid": [500.0, -200.0]}, r"grid time -200 is outside the time range \[0, 999\]"),
    (VP(), {"t_max": 5000.0}, r"t_max 5000 is outside the time range \[0, 999\]"),
    (VP(), {"t_min": -300.0}, r"t_min -300 is outside the time range \[0, 999\]"),
    (VP(num_train_timesteps=50), {"grid": [49.5, 10.0]}, r"grid time 49.5 is outside the time range \[0, 49\]"),
    (VP.cosine(), {"grid": [1.5, 0.5]}, r"grid time 1.5 is outside the time range \[0, 1\] of VP\(cosine\)"),
    (VP.cosine(), {"t_max": 1.01}, r"t_max 1.01 is outside the time range \[0, 1\]"),
    (FlowMatching(), {"grid": [1.2, 0.5]}, r"grid time 1.2 is outside the time range \[0, 1\] of FlowMatching"),
    (FlowMatching(shift=3.0), {"t_min": -0.1}, r"t_min -0.1 is outside the time range \[0, 1\]"),
    (EDM(), {"grid": [2.0, -1.0]}, r"grid time -1 is outside the time range \[0, inf\] of EDM"),
    (EDM(), {"grid": [np.inf, 1.0]}, r"grid time inf is outside"),
    (Rescaled(VP(), 2.0), {"grid": [1000.0, 3.0]}, r"grid time 1000 is outside the time range \[0, 999\]"),
]


@pytest.mark.parametrize("schedule,options,match", OUT_OF_RANGE, ids=[f"{o[0]!r}-{o[1]}" for o in OUT_OF_RANGE])
def test_times_outside_the_schedule_raise_naming_its_range(schedule, options, match):
    """A time outside the schedule's range would be clamped (discrete VP) or have no alpha and sigma."""
    with pytest.raises(ValueError, match=match):
        Sampler(schedule, "ddim", prediction="x0", steps=2, **options)


@pytest.mark.parametrize("schedule", [VP(), VP.cosine(), FlowMatching(), EDM()], ids=repr)
def test_times_inside_the_range_are_used_as_given(schedule):
    """Ends included, the model is called at the times whose coefficients the plan holds."""
    lo, hi = schedule.time_range()
    hi = min(hi, 100.0)
    rng = np.random.default_rng()
    t = np.r_[hi, np.sort(rng.uniform(lo, hi, 3))[::-1], lo]
    s = Sampler(schedule, "ddim", prediction="x0", steps=5, grid=t)
    np.testing.assert_array_equal(s.timesteps.numpy(), t)
    np.testing.assert_allclose(s.stage_sigma / s.stage_alpha, schedule.sigma_ve(t), rtol=1e-12)


@pytest.mark.parametrize("grid", ["logsnr", "exponential", "karras", "trailing", np.array([0.9, 0.5, 0.2])])
@pytest.mark.parametrize("schedule", [FlowMatching(shift=3.0), FlowMatching(mu=1.2)], ids=repr)
def test_a_flow_shift_is_refused_by_a_grid_that_would_ignore_it(schedule, grid):
    """shift and mu warp the uniform grid; any other grid lays its times out without them, so the option would
    silently change nothing."""
    with pytest.raises(ValueError, match=r"warps the 'uniform' grid only"):
        make_points(schedule, 3, grid)
    assert make_points(schedule, 3, "uniform").t[1] > make_points(FlowMatching(), 3, "uniform").t[1]


@pytest.mark.parametrize("rho", [0.0, -2.0, np.inf, np.nan])
def test_a_karras_exponent_must_be_positive_and_finite(rho):
    """rho = 0 divided by zero; a negative rho gave a grid of another shape without a word."""
    with pytest.raises(ValueError, match="rho must be a positive finite number"):
        Sampler(EDM(), "euler", prediction="x0", steps=4, rho=rho)


@pytest.mark.parametrize(("total", "n"), [(1000, 61), (1000, 103), (1000, 25), (37, 5)])
def test_trailing_spacing_has_the_steps_asked_for(total, n):
    """Trailing spacing is diffusers' ``round(arange(T, 0, -T / n)) - 1``; where that float ``arange`` overshoots
    by one element (T = 1000 with 61 or 103 steps; diffusers' own list then ends at -1) the grid keeps its ``n``."""
    t = grid_times(VP(alphas_cumprod=np.linspace(0.999, 0.01, total)), n, "trailing")
    assert len(t) == n and t[-1] >= 0
    np.testing.assert_array_equal(t, (np.round(np.arange(total, 0, -total / n)) - 1)[:n])


@pytest.mark.parametrize("schedule", [VP.cosine(), EDM(), FlowMatching(), Rescaled(VP.cosine(), 2.0)], ids=repr)
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_integer_spacings_need_a_discrete_schedule(schedule, spacing):
    """diffusers' integer spacings on a continuous time (cosine's [0, 1], EDM's sigma) gave times 1.0 and 0.0."""
    with pytest.raises(ValueError, match=f"{spacing} spacing .*needs a discrete schedule"):
        grid_times(schedule, 2, spacing)
    assert len(grid_times(Rescaled(VP(), 2.0), 4, spacing)) == 4


@pytest.mark.parametrize("base", [VP(), VP.cosine(), EDM(rho=5.0), FlowMatching(shift=3.0)], ids=repr)
def test_a_rescaled_schedule_is_its_base_times_c_throughout(base):
    """Rescaled(base, c) takes the base's default grid (Karras with the base's rho for EDM, the shift warp for flow
    matching), and every point, the clean end one included, is c times the base's (discrete VP ended at alpha 1)."""
    import fastflow as ff

    c = float(np.random.default_rng().uniform(0.5, 3.0))
    plain = ff.Sampler(base, "ddim", prediction="x0", steps=6)
    scaled = ff.Sampler(Rescaled(base, c), "ddim", prediction="x0", steps=6)
    np.testing.assert_allclose(scaled.timesteps.numpy(), plain.timesteps.numpy(), rtol=1e-12)
    grid = "karras" if isinstance(base, EDM) else "uniform"
    ends = [make_points(s, 6, grid) for s in (base, Rescaled(base, c))]
    assert ends[0].sigma[-1] == ends[1].sigma[-1] == 0.0
    np.testing.assert_allclose(ends[1].alpha, c * ends[0].alpha, rtol=1e-12)
    np.testing.assert_allclose(ends[1].sigma, c * ends[0].sigma, rtol=1e-12)


def test_sampler_takes_diffusers_steps_offset_on_the_leading_grid():
    """Stable Diffusion's configs set ``steps_offset=1`` with leading spacing; the Sampler passes it to the grid
    (it was refused as a solver option), and refuses it on a grid that would ignore it."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(timestep_spacing="leading", steps_offset=1)
    sched.set_timesteps(20)
    sampler = Sampler(VP(), grid="leading", steps=20, steps_offset=1)
    np.testing.assert_array_equal(sampler.timesteps.numpy(), sched.timesteps.numpy())
    with pytest.raises(ValueError, match="'trailing' grid ignores steps_offset"):
        Sampler(VP(), grid="trailing", steps=20, steps_offset=1)
    with pytest.raises(ValueError, match="steps_offset must be a non-negative int"):
        Sampler(VP(), grid="leading", steps=20, steps_offset=0.5)


@pytest.mark.parametrize(
    "schedule, grid, final",
    [
        (FlowMatching(), [1.0, 1.0, 0.5], "clean"),  # two points at alpha = 0: log-SNR -inf twice
        (VP.cosine(t_max=1.0), [1.0, 1.0, 0.5], "clean"),
        (FlowMatching(t_min=0.0), [0.5, 0.0, 0.0], "t_min"),  # two points at sigma = 0: log-SNR +inf twice
    ],
)
@pytest.mark.parametrize("solver", ["ddim", "dpm++2m", "unipc", "euler"])
def test_a_time_repeated_at_an_infinite_log_snr_is_refused(schedule, grid, final, solver):
    """The grid check compared log-SNR differences with ``<= 0``; at a repeated alpha = 0 (or sigma = 0) point the
    difference is NaN, which passed: DDIM then evaluated the model twice at t = 1, and other solvers failed later
    with a misleading 'non-finite plan coefficient' (UniPC's even told a bh2 user to use bh2)."""
    steps = len(grid) - (final == "t_min")
    with pytest.raises(ValueError, match="grid times must go strictly from high noise to low noise"):
        Sampler(schedule, solver, "flow", steps=steps, grid=grid, final=final)


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: Sampler(VP(), grid="karras", rho="7"), "rho"),  # failed with "'>' not supported between ..."
        (lambda: Sampler(VP(), t_max="999"), "t_max"),  # float("999") took it silently
        (lambda: grid_times(VP(), 4, t_min="1"), "t_min"),
        (lambda: grid_times(VP(), True), "steps"),  # True was one step
    ],
)
def test_a_grid_option_given_as_another_type_is_refused_naming_it(make, name):
    with pytest.raises(TypeError, match=rf"^{name} must be"):
        make()


def test_grid_times_refuses_a_fractional_steps_offset():
    """grid_times is public: a float steps_offset gave fractional 'integer' training steps (668.5, 335.5, 2.5)."""
    with pytest.raises(ValueError, match="steps_offset must be a non-negative int"):
        grid_times(VP(), 3, "leading", steps_offset=2.5)


def test_a_flow_shift_warps_the_ends_of_the_span_too():
    """Pins what the t_min/t_max docs say: shift/mu warp the whole uniform grid, its ends included, so the first
    time is warp(t_max), not t_max."""
    schedule = FlowMatching(shift=3.0)
    t = grid_times(schedule, 4, t_min=0.1, t_max=0.5)
    np.testing.assert_allclose(t, schedule.warp(np.linspace(0.5, 0.1, 4)))
    assert t[0] == pytest.approx(0.75) and t[-1] == pytest.approx(0.25)


def test_karras_rho_so_small_that_sigma_overflows_is_a_value_error_naming_rho():
    """sigma_max ** (1 / rho) raised a bare OverflowError (34, 'Numerical result out of range')."""
    with pytest.raises(ValueError, match="rho 1e-300 is too small"):
        Sampler(EDM(), steps=3, solver="euler", rho=1e-300)
