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
from .base import Solver, Stage, X, Z, eps_of, noise, stages_on_points, ve


@dataclass
class FlowEuler(Solver):
    """Euler on the probability-flow ODE in the schedule's own ``(t, z)``: ``z' = z + (t' - t) u``.

    ``u = alpha' x_hat + sigma' eps_hat`` is the flow velocity. Under the
    flow-matching schedule this is exactly DDIM; elsewhere it depends on the
    parameterization (the textbook example of a non-invariant solver). A clean end
    point without a schedule time (discrete VP) is reached with ``z' = x_hat``, the
    limit every solver here takes at sigma = 0.
    """

    def __post_init__(self) -> None:
        self.name = "flow-euler"

    def build(self, schedule: Schedule, points: Points) -> list[Stage]:
        t = points.t
        if np.any(np.isnan(t[:-1])):
            raise ValueError("flow-euler needs a schedule time at every evaluation point")
        ups = []
        for i in range(len(points) - 1):
            if np.isnan(t[i + 1]):
                ups.append(X(i) * points.alpha[i + 1])
                continue
            velocity = X(i) * points.d_alpha[i] + eps_of(i, points.alpha[i], points.sigma[i]) * points.d_sigma[i]
            ups.append(Z(i) + velocity * (t[i + 1] - t[i]))
        return stages_on_points(points, ups)


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
            v = getattr(self, k)
            if not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"{k} must be finite and non-negative, got {v}")
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
            a_hat = float(pts[i].alpha[0])
            x = Z(i) / a_hat
            x_next = x + (x - X(i)) * ((s[i + 1] - s_hat[i]) / s_hat[i])
            if i + 1 < n:
                a_next = float(pts[i + 1].alpha[0])
                if gamma[i + 1] > 0:
                    x_next = x_next + noise(self.s_noise * math.sqrt(s_hat[i + 1] ** 2 - s[i + 1] ** 2))
            else:
                a_next = float(points.alpha[n])
            stages.append(Stage(pts[i], x_next * a_next))
        return stages


@dataclass
class EulerAncestral(Solver):
    """Euler ancestral: a deterministic Euler step to ``sigma_down`` plus fresh noise ``sigma_up``."""

    eta: float = 1.0
    s_noise: float = 1.0

    def __post_init__(self) -> None:
        if not (self.eta >= 0 and math.isfinite(self.eta)):
            raise ValueError(f"eta must be finite and non-negative, got {self.eta}")
        self.name = "euler-ancestral"
        self.stochastic = self.eta > 0

    def build(self, schedule: Schedule, points: Points) -> list[Stage]:
        s, a = ve(points), points.alpha
        ups = []
        for i in range(len(points) - 1):
            ancestral = s[i + 1] ** 2 * (s[i] ** 2 - s[i + 1] ** 2) / s[i] ** 2
            s_up = min(s[i + 1], self.eta * math.sqrt(max(0.0, ancestral)))
            s_down = math.sqrt(max(0.0, s[i + 1] ** 2 - s_up**2))
            x = Z(i) / a[i]
            x_next = x + (x - X(i)) * ((s_down - s[i]) / s[i])
            if s_up > 0:
                x_next = x_next + noise(self.s_noise * s_up)
            ups.append(x_next * a[i + 1])
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
        s, a = ve(points), points.alpha
        stages: list[Stage] = []
        for i in range(len(points) - 1):
            k = len(stages)  # index of the predictor stage
            x = Z(k) / a[i]
            d = (x - X(k)) / s[i]
            x_pred = x + d * (s[i + 1] - s[i])
            stages.append(Stage(points[i], x_pred * a[i + 1]))
            if s[i + 1] == 0:
                continue
            d_next = (Z(k + 1) / a[i + 1] - X(k + 1)) / s[i + 1]
            x_next = x + (d + d_next) * (0.5 * (s[i + 1] - s[i]))
            stages.append(Stage(points[i + 1], x_next * a[i + 1]))
        return stages


