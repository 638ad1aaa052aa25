"""Prediction types: what a network outputs, and its linear map to ``(x_hat, eps_hat)``.

Given ``z = alpha x + sigma eps`` at a point with derivatives ``(da, ds)``:

=====  ===========================  ==========================================
name   output ``o``                 ``x_hat``
=====  ===========================  ==========================================
eps    ``eps``                      ``(z - sigma o) / alpha``
x0     ``x``                        ``o``
v      ``alpha eps - sigma x``      ``(alpha z - sigma o) / (alpha^2 + sigma^2)``
flow   ``da x + ds eps``            ``(ds z - sigma o) / (alpha ds - sigma da)``
score  ``-eps / sigma``             ``(z + sigma^2 o) / alpha``
=====  ===========================  ==========================================

Every conversion is linear in ``(z, o)``; this module returns the coefficients.
"""

from __future__ import annotations

import numpy as np

PREDICTION_NAMES = ("eps", "x0", "v", "flow", "score")
_ALIASES = {
    "epsilon": "eps", "sample": "x0", "x": "x0", "v_prediction": "v", "velocity": "flow", "flow_prediction": "flow",
}

__all__ = ["PREDICTION_NAMES", "canonical_prediction", "to_x_eps", "from_x_eps"]


def canonical_prediction(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"prediction must be a name ({', '.join(PREDICTION_NAMES)}), got {type(name).__name__}")
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in PREDICTION_NAMES:
        raise ValueError(f"unknown prediction type {name!r}; valid: {', '.join(PREDICTION_NAMES)}")
    return key


def to_x_eps(name: str, alpha, sigma, d_alpha=None, d_sigma=None):
    """Coefficients ``((xz, xo), (ez, eo))`` with ``x_hat = xz z + xo o`` and ``eps_hat = ez z + eo o``."""
    name = canonical_prediction(name)
    a, s = np.asarray(alpha, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        if name == "eps":
            return (1 / a, -s / a), (0 * a, 1 + 0 * a)
        if name == "x0":
            return (0 * a, 1 + 0 * a), (1 / s, -a / s)
        if name == "v":
            n = a * a + s * s
            return (a / n, -s / n), (s / n, a / n)
        if name == "score":
            return (1 / a, s * s / a), (0 * a, -s)
        if d_alpha is None or d_sigma is None:
            raise ValueError("flow prediction needs the schedule's derivatives")
        da, ds = np.asarray(d_alpha, dtype=np.float64), np.asarray(d_sigma, dtype=np.float64)
        det = a * ds - s * da
        return (ds / det, -s / det), (-da / det, a / det)


def from_x_eps(name: str, alpha, sigma, d_alpha=None, d_sigma=None):
    """Coefficients ``(ox, oe)`` with ``o = ox x + oe eps``: what a perfect model of this type outputs."""
    name = canonical_prediction(name)
    a, s = np.asarray(alpha, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
    if name == "eps":
        return 0 * a, 1 + 0 * a
    if name == "x0":
        return 1 + 0 * a, 0 * a
    if name == "v":
        return -s, a
    if name == "score":
        with np.errstate(divide="ignore"):
            return 0 * a, -1 / s
    if d_alpha is None or d_sigma is None:
        raise ValueError("flow prediction needs the schedule's derivatives")
    return np.asarray(d_alpha, dtype=np.float64), np.asarray(d_sigma, dtype=np.float64)
