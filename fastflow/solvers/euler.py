"""Euler-type solvers: flow-matching Euler, EDM Euler with churn, Euler ancestral, EDM Heun.

EDM-style solvers work on ``x = z / alpha`` at noise level ``sigma_ve = sigma / alpha``
(Karras et al. 2022), so they serve any schedule; their results map back by
``z = alpha x``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..grids import Points, points_at
from ..schedules import Schedule
from .base import (
    Lin,
    Solver,
    Stage,
    UndefinedStepError,
    X,
    Z,
    check_real,
    check_scale,
    eps_of,
    noise,
    stages_on_points,
    ve,
)


@dataclass
class FlowEuler(Solver):
    """Euler on the probability-flow ODE in the schedule's own ``(t, z)``: ``z' = z + (t' - t) u``.

    ``u = alpha' x_hat + sigma' eps_hat`` is the flow velocity. Under the
    flow-matching schedule this is exactly DDIM; elsewhere it depends on the
    parameterization (the textbook example of a non-invariant solver). A step to
    sigma = 0 is ``z' = alpha' x_hat``, as in every solver here: under flow matching
    that is the Euler step itself, elsewhere (VP, whose clean point may have no time)
    it keeps a loop's end at the data prediction rather than at an Euler extrapolation.
    """

    def __post_init__(self) -> None:
        self.name = "flow-euler"

    def build(self, schedule: Schedule, points: Points) -> list[Stage]:
        t = points.t
        if np.any(np.isnan(t[:-1])):
            raise ValueError("flow-euler needs a schedule time at every evaluation point")
        ups = []
        for i in range(len(points) - 1):
            if points.sigma[i + 1] == 0:
                ups.append(X(i) * points.alpha[i + 1])
                continue
            velocity = X(i) * points.d_alpha[i] + eps_of(i, points.alpha[i], points.sigma[i]) * points.d_sigma[i]
            ups.append(Z(i) + velocity * (t[i + 1] - t[i]))
        return stages_on_points(points, ups)


def euler_update(i: int, a_t: float, s_t: float, ve_next: float, a_next: float) -> Lin:
    """Euler's step of stage ``i`` at ``(alpha, sigma) = (a_t, s_t)`` to the noise level ``ve_next``, times ``a_next``.

    In ``x = z / alpha`` at ``ve = s_t / a_t`` it is ``x' = x + (x - x_hat) (ve_next / ve - 1)``;
    written in ``z`` it keeps its limits: from ``alpha = 0`` (``ve`` infinite, t = 1 of flow
    matching) it is DDIM's ``(sigma'/sigma) z + alpha' x_hat``, and a step to ``ve_next = 0``
    is ``x_hat``, even from ``sigma = 0``.
    """
    if ve_next == 0:
        return X(i) * a_next
    return Z(i) * (a_next * ve_next / s_t) + X(i) * (a_next * (1.0 - ve_next * a_t / s_t))


def ancestral_levels(s: float, s_next: float, eta: float) -> tuple[float, float]:
    """``(sigma_up, sigma_down)`` of an ancestral step from noise level ``s`` (infinite at alpha = 0) to ``s_next``."""
    if s_next == 0:
        return 0.0, 0.0
    q = s_next / s
    up = min(s_next, eta * s_next * math.sqrt(max(0.0, 1.0 - q * q)))
    return up, math.sqrt(max(0.0, s_next**2 - up**2))


def _stage_point(schedule: Schedule, points: Points, i: int, s_ve: float) -> Points:
    """The point at noise level ``s_ve``: point ``i`` itself unless churn raised it."""
    if s_ve == ve(points)[i]:
        return points[i]
    t = schedule.t_from_sigma_ve(np.array([s_ve]))
    if not np.isclose(float(schedule.sigma_ve(t)[0]), s_ve, rtol=1e-9):
        raise ValueError(
            f"churn raises sigma_ve to {s_ve:.4g}, beyond what {schedule!r} reaches; lower s_churn or s_tmax"
        )
    return points_at(schedule, t)


@dataclass
class Euler(Solver):
    """EDM Euler with stochastic churn (``s_churn = 0``: deterministic, equal to DDIM).

    Before a stage whose noise level is in ``[s_tmin, s_tmax]``, noise is added to
    raise it by ``gamma = min(s_churn / N, sqrt(2) - 1)``; that noise is drawn in the
    previous stage's fused step, and the first stage starts at the raised level.
    """

    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    s_noise: float = 1.0

    def __post_init__(self) -> None:
        for k in ("s_churn", "s_tmin", "s_noise"):
            check_scale(k, getattr(self, k))
        check_real("s_tmax", self.s_tmax)
        if not self.s_tmax >= self.s_tmin:
            raise ValueError(
                f"s_tmax must be a number at least s_tmin (churn applies where s_tmin <= sigma <= s_tmax), got "
                f"s_tmin={self.s_tmin}, s_tmax={self.s_tmax}"
            )
        self.name = "euler"
        self.stochastic = self.s_churn > 0

    def build(self, schedule: Schedule, points: Points) -> list[Stage]:
        n = len(points) - 1
        s = ve(points)
        gamma = np.array(
            [min(self.s_churn / n, math.sqrt(2) - 1) if self.s_tmin <= s[i] <= self.s_tmax else 0.0 for i in range(n)]
        )
        s_hat = s[:n] * (1 + gamma)
        pts = [_stage_point(schedule, points, i, s_hat[i]) for i in range(n)]
        stages = []
        for i in range(n):
            a_next = float(pts[i + 1].alpha[0] if i + 1 < n else points.alpha[n])
            update = euler_update(i, float(pts[i].alpha[0]), float(pts[i].sigma[0]), s[i + 1], a_next)
            if i + 1 < n and gamma[i + 1] > 0:
                update = update + noise(self.s_noise * math.sqrt(s_hat[i + 1] ** 2 - s[i + 1] ** 2) * a_next)
            stages.append(Stage(pts[i], update))
        return stages


@dataclass
class EulerAncestral(Solver):
    """Euler ancestral: a deterministic Euler step to ``sigma_down`` plus fresh noise ``sigma_up``."""

    eta: float = 1.0
    s_noise: float = 1.0

    def __post_init__(self) -> None:
        check_scale("eta", self.eta)
        check_scale("s_noise", self.s_noise)
        self.name = "euler-ancestral"
        self.stochastic = self.eta > 0

    def build(self, schedule: Schedule, points: Points) -> list[Stage]:
        s, a, sig = ve(points), points.alpha, points.sigma
        ups = []
        for i in range(len(points) - 1):
            s_up, s_down = ancestral_levels(s[i], s[i + 1], self.eta)
            update = euler_update(i, a[i], sig[i], s_down, a[i + 1])
            ups.append(update + noise(self.s_noise * s_up * a[i + 1]) if s_up > 0 else update)
        return stages_on_points(points, ups)


@dataclass
class Heun(Solver):
    """EDM's second-order Heun: an Euler predictor, then a trapezoidal corrector at the next point.

    Two model evaluations per step, except the step to sigma = 0 (Euler alone).
    """

    def __post_init__(self) -> None:
        self.name = "heun"
        self.order = 2

    def build(self, schedule: Schedule, points: Points) -> list[Stage]:
        s, a, sig = ve(points), points.alpha, points.sigma
        stages: list[Stage] = []
        for i in range(len(points) - 1):
            k = len(stages)  # index of the predictor stage
            stages.append(Stage(points[i], euler_update(k, a[i], sig[i], s[i + 1], a[i + 1])))
            if s[i + 1] == 0:
                continue
            if a[i] == 0:
                raise UndefinedStepError(
                    "heun's corrector averages the slopes at both ends of a step in sigma / alpha, which is infinite "
                    "from alpha = 0 (t = 1 of FlowMatching): the corrected state has no finite limit; use a grid "
                    "that starts below alpha = 0 (t_max < 1) or a solver without that corrector (euler, flow-euler, "
                    "dpm++2m, unipc)"
                )
            x = Z(k) / a[i]
            d = (x - X(k)) / s[i]
            d_next = (Z(k + 1) / a[i + 1] - X(k + 1)) / s[i + 1]
            x_next = x + (d + d_next) * (0.5 * (s[i + 1] - s[i]))
            stages.append(Stage(points[i + 1], x_next * a[i + 1]))
        return stages
