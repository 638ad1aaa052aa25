"""Diffusion SDE parameters and flow-matching (stochastic interpolant) parameters, both ways.

Forward SDE ``dz = f z dt + g dW``, reverse-time sampler noise ``eta``. The same
process as an interpolant ``z = alpha x + sigma eps`` sampled with diffusion
coefficient ``eps_t = eta g``:

* ``alpha_t = exp(int_0^t f)``,  ``sigma_t^2 = alpha_t^2 int_0^t g^2 / alpha^2``;
* ``f = alpha' / alpha``,  ``g^2 = 2 alpha sigma d/dt(sigma / alpha) = -sigma^2 dlambda/dt``,
  ``eta = eps / g``.

Functions take float64 arrays on a time grid; integration is trapezoidal on
that grid, so use a fine grid for accurate schedules.
"""

from __future__ import annotations

import math

import numpy as np

from .schedules import Schedule, check_real

__all__ = ["flow_to_sde", "schedule_to_sde", "sde_to_flow"]


def flow_to_sde(alpha, sigma, d_alpha, d_sigma, eps=None):
    """``(f, g, eta)`` from an interpolant and its derivatives (and optional diffusion ``eps``)."""
    a, s = np.asarray(alpha, np.float64), np.asarray(sigma, np.float64)
    da, ds = np.asarray(d_alpha, np.float64), np.asarray(d_sigma, np.float64)
    f = da / a
    g2 = 2.0 * s * (ds - s * da / a)
    if np.any(g2 < -1e-12):
        raise ValueError("sigma/alpha must not decrease in time (g^2 would be negative)")
    g = np.sqrt(np.maximum(g2, 0.0))
    eta = None
    if eps is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            eta = np.where(g > 0, np.asarray(eps, np.float64) / g, 0.0)
    return f, g, eta


def sde_to_flow(t, f, g, eta=None, alpha0: float = 1.0, sigma0: float = 0.0):
    """``(alpha, sigma, eps)`` on grid ``t`` from SDE coefficients sampled on the same grid.

    ``alpha0 > 0`` and ``sigma0 >= 0`` are the interpolant at ``t[0]`` (a zero or negative ``alpha0`` has no
    logarithm: it gave a bare ZeroDivisionError or arrays of NaN).
    """
    t = np.asarray(t, np.float64)
    f, g = np.asarray(f, np.float64), np.asarray(g, np.float64)
    if t.ndim != 1 or len(t) < 2 or np.any(np.diff(t) <= 0):
        raise ValueError("t must be an increasing 1-D grid with at least two points")
    for name, value in (("t", t), ("f", f), ("g", g)):
        if value.shape != t.shape:
            raise ValueError(f"{name} must be sampled on the grid t: shape {value.shape}, t has {t.shape}")
        if not np.all(np.isfinite(value)):  # NaN passes the comparisons above and below and fills the result
            k = int(np.argmin(np.isfinite(value)))
            raise ValueError(f"{name} must be finite, got {value[k]} at index {k}")
    check_real("alpha0", alpha0)
    check_real("sigma0", sigma0)
    if not (0.0 < alpha0 < math.inf and 0.0 <= sigma0 < math.inf):
        raise ValueError(f"need alpha0 > 0 and sigma0 >= 0, both finite; got alpha0={alpha0}, sigma0={sigma0}")
    dt = np.diff(t)
    log_alpha = np.log(alpha0) + np.concatenate([[0.0], np.cumsum(0.5 * (f[1:] + f[:-1]) * dt)])
    alpha = np.exp(log_alpha)
    rate = g**2 / alpha**2
    ratio2 = (sigma0 / alpha0) ** 2 + np.concatenate([[0.0], np.cumsum(0.5 * (rate[1:] + rate[:-1]) * dt)])
    sigma = alpha * np.sqrt(ratio2)
    eps = None if eta is None else np.asarray(eta, np.float64) * g
    return alpha, sigma, eps


def schedule_to_sde(schedule: Schedule, t, eta=0.0):
    """``(f, g, eps)`` of a schedule at times ``t`` for sampler noise ``eta`` (scalar or array)."""
    t = np.asarray(t, np.float64)
    schedule.check_times(t, "time")  # outside its range a schedule gives its nearest end's values, not an error
    f, g, _ = flow_to_sde(schedule.alpha(t), schedule.sigma(t), schedule.d_alpha(t), schedule.d_sigma(t))
    return f, g, np.asarray(eta, np.float64) * g
