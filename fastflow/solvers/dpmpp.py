"""DPM-Solver++ multistep (Lu et al. 2022): orders 1, 2M, 3M, and the SDE variant of 2M.

In the half-log-SNR ``l = log(alpha / sigma)`` with ``h = l_next - l``, the
first-order step is ``z' = (sigma'/sigma) z - alpha' (e^-h - 1) x_hat`` and higher
orders replace ``x_hat`` with finite differences of stored predictions. The SDE
variant is ``z' = (sigma'/sigma) e^-h z + alpha' (1 - e^-2h) D + sigma' sqrt(1 - e^-2h) xi``.
A step to sigma = 0 is always first order (its ``h`` is infinite).

3M's second difference ``D2`` estimates ``h^2 x''``. The form diffusers and
k-diffusion use weights it half as much as the Taylor expansion of the exponential
integrator requires, which makes their 3M second order overall (measured in
``tests/solvers/test_convergence.py``); ``diffusers_3m=True`` reproduces it for parity.
Multistep warm-up (first steps at lower order) also bounds the global order unless
the first steps are shorter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..grids import Points
from ..schedules import Schedule
from .base import Lin, Solver, Stage, X, Z, noise, stages_on_points

SOLVER_TYPES = ("midpoint", "heun")


def multistep_order(i: int, n: int, order: int, lower_order_final: bool) -> int:
    """Order used at step ``i`` of ``n``: warm-up from 1, and lower at the end of short loops (< 15 steps)."""
    p = min(order, i + 1)
    if lower_order_final and n < 15:
        p = min(p, n - i)
    return p


@dataclass
class DPMSolverPP(Solver):
    order: int = 2
    sde: bool = False
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    diffusers_3m: bool = False

    def __post_init__(self) -> None:
        if self.order not in (1, 2, 3):
            raise ValueError(f"DPM-Solver++ order must be 1, 2 or 3, got {self.order}")
        if self.sde and self.order == 3:
            raise ValueError("SDE-DPM-Solver++ supports orders 1 and 2")
        if self.solver_type not in SOLVER_TYPES:
            raise ValueError(f"unknown solver_type {self.solver_type!r}; valid: {', '.join(SOLVER_TYPES)}")
        self.name = ("sde-" if self.sde else "") + f"dpm++{self.order}{'m' if self.order > 1 else ''}"
        self.stochastic = self.sde

    def build(self, schedule: Schedule, points: Points) -> list[Stage]:
        lam, a, s = points.half_logsnr, points.alpha, points.sigma
        n = len(points) - 1
        ups = []
        for i in range(n):
            if s[i + 1] == 0:
                ups.append(X(i) * a[i + 1])
                continue
            p = multistep_order(i, n, self.order, self.lower_order_final)
            h = lam[i + 1] - lam[i]
            d0, d1, d2 = X(i), None, None
            if p >= 2:
                r0 = (lam[i] - lam[i - 1]) / h
                d1_0 = (X(i) - X(i - 1)) / r0
                d1 = d1_0
                if p == 3:
                    r1 = (lam[i - 1] - lam[i - 2]) / h
                    d1_1 = (X(i - 1) - X(i - 2)) / r1
                    d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                    d2 = (d1_0 - d1_1) * ((1.0 if self.diffusers_3m else 2.0) / (r0 + r1))
            ups.append(self._update(i, h, a[i + 1], s[i + 1], s[i], d0, d1, d2))
        return stages_on_points(points, ups)

    def _update(self, i: int, h: float, a_s: float, s_s: float, s_t: float, d0: Lin, d1, d2) -> Lin:
        if self.sde:
            em2 = -math.expm1(-2 * h)  # 1 - e^-2h
            out = Z(i) * (s_s / s_t * math.exp(-h)) + d0 * (a_s * em2) + noise(s_s * math.sqrt(em2))
            if d1 is not None:
                w = 0.5 * a_s * em2 if self.solver_type == "midpoint" else a_s * (em2 / (-2 * h) + 1)
                out = out + d1 * w
            return out
        em1 = math.expm1(-h)  # e^-h - 1
        out = Z(i) * (s_s / s_t) - d0 * (a_s * em1)
        if d1 is not None:
            midpoint = self.solver_type == "midpoint" and d2 is None
            out = out + d1 * (-0.5 * a_s * em1 if midpoint else a_s * (em1 / h + 1))
        if d2 is not None:
            out = out - d2 * (a_s * ((em1 + h) / h**2 - 0.5))
        return out
