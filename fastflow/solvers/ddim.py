"""DDIM with ``eta`` (stochastic DDIM; ``eta = 1`` is DDPM's ancestral step).

From ``t`` to ``s``: ``z_s = alpha_s x + sqrt(sigma_s^2 - c^2) eps + c xi`` with
``c = eta sigma_s sqrt(1 - exp(lambda_t - lambda_s))`` (Song et al. 2021). This is
also the exact step of the probability-flow ODE in the variance-exploding
parameterization, so it is Euler for EDM and Euler for flow matching.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..grids import Points
from ..schedules import Schedule
from .base import Lin, Solver, Stage, X, check_scale, eps_of, noise, stages_on_points


def ddim_update(i: int, a_t: float, s_t: float, a_s: float, s_s: float, eta: float) -> Lin:
    """The DDIM update of stage ``i`` from ``(a_t, s_t)`` to ``(a_s, s_s)``."""
    if s_s == 0.0:
        return X(i) * a_s
    c = 0.0
    if eta:
        ratio = (a_t * s_s) ** 2 / (s_t * a_s) ** 2  # exp(lambda_t - lambda_s)
        c = eta * s_s * math.sqrt(max(0.0, 1.0 - ratio))
    out = X(i) * a_s + eps_of(i, a_t, s_t) * math.sqrt(max(0.0, s_s * s_s - c * c))
    return out + noise(c) if c else out


@dataclass
class DDIM(Solver):
    eta: float = 0.0

    def __post_init__(self) -> None:
        check_scale("eta", self.eta)
        if self.eta > 1:  # c = eta sigma_s sqrt(1 - e^{lambda_t - lambda_s}) would exceed the next sigma
            raise ValueError(f"DDIM needs eta <= 1 (eta = 1 is DDPM's ancestral step), got {self.eta}")
        self.name = "ddim"
        self.stochastic = self.eta > 0

    def build(self, schedule: Schedule, points: Points) -> list[Stage]:
        a, s = points.alpha, points.sigma
        ups = [ddim_update(i, a[i], s[i], a[i + 1], s[i + 1], self.eta) for i in range(len(points) - 1)]
        return stages_on_points(points, ups)


def DDPM(eta: float = 1.0) -> DDIM:
    """DDPM's ancestral sampler: DDIM with ``eta = 1``."""
    solver = DDIM(eta=eta)
    solver.name = "ddpm"
    return solver
