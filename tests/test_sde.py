"""SDE <-> flow-matching parameter conversions round-trip."""

import numpy as np
import pytest

from fastflow.schedules import VP, FlowMatching
from fastflow.sde import flow_to_sde, schedule_to_sde, sde_to_flow


@pytest.mark.parametrize("schedule,t0,t1", [(VP.cosine(), 0.0, 0.9), (FlowMatching(), 0.0, 0.9)], ids=repr)
def test_round_trip(schedule, t0, t1):
    t = np.linspace(t0, t1, 20001)
    eta = 0.5 + 0.5 * t  # a time-dependent sampler noise
    f, g, eps = schedule_to_sde(schedule, t, eta)
    alpha, sigma, eps_back = sde_to_flow(t, f, g, eta)
    np.testing.assert_allclose(alpha, schedule.alpha(t), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(sigma, schedule.sigma(t), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(eps_back, eps)
    # and back to SDE coefficients from the integrated interpolant
    f2, g2, eta2 = flow_to_sde(alpha, sigma, schedule.d_alpha(t), schedule.d_sigma(t), eps_back)
    np.testing.assert_allclose(f2, f, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g2, g, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(eta2[1:], eta[1:], rtol=1e-4)


def test_known_values():
    # Flow matching: f = -1/(1-t), g^2 = 2t/(1-t)
    t = np.array([0.25, 0.5])
    f, g, _ = schedule_to_sde(FlowMatching(), t)
    np.testing.assert_allclose(f, -1 / (1 - t))
    np.testing.assert_allclose(g**2, 2 * t / (1 - t))


def test_bad_input():
    with pytest.raises(ValueError, match="increasing"):
        sde_to_flow(np.array([0.0, 0.0]), np.zeros(2), np.ones(2))
    with pytest.raises(ValueError, match="decrease"):
        flow_to_sde(1.0, 0.5, 0.0, -1.0)


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        ({"alpha0": 0.0}, ValueError, "alpha0 > 0"),  # was a bare ZeroDivisionError
        ({"alpha0": -1.0}, ValueError, "alpha0 > 0"),  # was arrays of NaN
        ({"sigma0": -0.5}, ValueError, "sigma0 >= 0"),
        ({"alpha0": "1"}, TypeError, "alpha0 must be a real number"),
    ],
)
def test_sde_to_flow_refuses_a_bad_start(kw, error, match):
    t = np.linspace(0.0, 1.0, 5)
    with pytest.raises(error, match=match):
        sde_to_flow(t, np.zeros(5), np.ones(5), **kw)


def test_sde_to_flow_refuses_coefficients_off_the_grid():
    t = np.linspace(0.0, 1.0, 5)
    with pytest.raises(ValueError, match="g must be sampled on the grid t"):
        sde_to_flow(t, np.zeros(5), np.ones(4))


def test_schedule_to_sde_refuses_times_outside_the_schedule():
    """VP clamps t to its range: t = 5000 gave t = 999's coefficients silently; FlowMatching's t = 2 a misleading
    'sigma/alpha must not decrease'."""
    with pytest.raises(ValueError, match="time 5000 is outside the time range"):
        schedule_to_sde(VP(), np.array([500.0, 5000.0]))
    with pytest.raises(ValueError, match="time 2 is outside the time range"):
        schedule_to_sde(FlowMatching(), np.array([0.5, 2.0]))


@pytest.mark.parametrize("which", ["t", "f", "g"])
def test_sde_to_flow_refuses_non_finite_coefficients(which):
    """NaN passes every comparison: a NaN in t, f or g returned arrays of NaN without an error."""
    args = {"t": np.linspace(0.0, 1.0, 5), "f": np.zeros(5), "g": np.ones(5)}
    args[which] = args[which].copy()
    args[which][2] = np.nan
    with pytest.raises(ValueError, match=rf"{which} must be finite, got nan at index 2"):
        sde_to_flow(args["t"], args["f"], args["g"])
