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
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..grids import Points
from ..schedules import Schedule
from .base import Lin, Solver, Stage, UndefinedStepError, X, Z, noise, stages_on_points

SOLVER_TYPES = ("midpoint", "heun")


def multistep_order(
    i: int,
    n: int,
    order: int,
    lower_order_final: bool,
    *,
    start: int = 0,
    lower_below: float = 15,
    final_first_order: bool = False,
) -> int:
    """Order used at step ``i`` of ``n``: warm-up from 1, and with ``lower_order_final`` no more than the steps
    left at the end of loops shorter than ``lower_below`` steps (DPM-Solver: 15; UniPC: any length).

    The diffusers drop-ins reuse this rule with their differences as parameters:
    warm-up counted from step ``start`` (the first step a loop takes) and a first-order
    last step (``final_first_order``: diffusers' ``euler_at_final`` or a final step to
    sigma = 0).
    """
    p = min(order, i - start + 1)
    if lower_order_final and n < lower_below:
        p = min(p, n - i)
    if final_first_order and i == n - 1:
        p = 1
    return p


def repeated_point(j: int, k: int, order: int) -> str:
    """Why a multistep step cannot use points ``j`` and ``k``: its differences divide by their log-SNR distance."""
    return (
        f"points {j} and {k} have the same log-SNR (a repeated time or sigma), and an order-{order} step divides "
        "by their distance; use distinct times or sigmas, or order 1"
    )


def dpmpp_differences(
    lam: np.ndarray, i: int, order: int, pred: Callable[[int], Lin] = X, diffusers_3m: bool = False
) -> tuple[Lin, Lin | None, Lin | None]:
    """``(D0, D1, D2)`` of the step from point ``i`` at ``order``: the prediction and its scaled differences.

    ``pred(j)`` is the stored prediction of point ``j``; ``diffusers_3m`` halves ``D2``
    as diffusers and k-diffusion do (see the module docstring).
    """
    d0, d1, d2 = pred(i), None, None
    if order >= 2:
        h = lam[i + 1] - lam[i]
        r0 = (lam[i] - lam[i - 1]) / h
        if r0 == 0:
            raise UndefinedStepError(repeated_point(i - 1, i, order))
        d1_0 = (pred(i) - pred(i - 1)) / r0
        d1 = d1_0
        if order == 3:
            r1 = (lam[i - 1] - lam[i - 2]) / h
            if r1 == 0:
                raise UndefinedStepError(repeated_point(i - 2, i - 1, order))
            d1_1 = (pred(i - 1) - pred(i - 2)) / r1
            d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
            d2 = (d1_0 - d1_1) * ((1.0 if diffusers_3m else 2.0) / (r0 + r1))
    return d0, d1, d2


def dpmpp_update(
    z: Lin,
    h: float,
    a_s: float,
    s_s: float,
    s_t: float,
    d0: Lin,
    d1: Lin | None,
    d2: Lin | None,
    *,
    sde: bool,
    solver_type: str,
) -> Lin:
    """DPM-Solver++ (ODE or SDE) from state ``z`` at ``sigma = s_t`` to ``(alpha, sigma) = (a_s, s_s)``, step ``h``.

    ``d0, d1, d2`` from :func:`dpmpp_differences`; ``noise`` is the SDE's draw.
    """
    if sde:
        em2 = -math.expm1(-2 * h)  # 1 - e^-2h
        out = z * (s_s / s_t * math.exp(-h)) + d0 * (a_s * em2) + noise(s_s * math.sqrt(em2))
        if d1 is not None:
            midpoint = solver_type == "midpoint" and d2 is None
            out = out + d1 * (0.5 * a_s * em2 if midpoint else a_s * (em2 / (-2 * h) + 1))
        if d2 is not None:
            out = out + d2 * (a_s * ((em2 - 2.0 * h) / (2.0 * h) ** 2 - 0.5))
        return out
    em1 = math.expm1(-h)  # e^-h - 1
    out = z * (s_s / s_t) - d0 * (a_s * em1)
    if d1 is not None:
        midpoint = solver_type == "midpoint" and d2 is None
        out = out + d1 * (-0.5 * a_s * em1 if midpoint else a_s * (em1 / h + 1))
    if d2 is not None:
        out = out - d2 * (a_s * ((em1 + h) / h**2 - 0.5))
    return out


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
        if self.diffusers_3m and self.order != 3:
            raise ValueError(f"diffusers_3m halves the third-order term, which order {self.order} does not have")
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
            d0, d1, d2 = dpmpp_differences(lam, i, p, diffusers_3m=self.diffusers_3m)
            ups.append(
                dpmpp_update(Z(i), h, a[i + 1], s[i + 1], s[i], d0, d1, d2, sde=self.sde, solver_type=self.solver_type)
            )
        return stages_on_points(points, ups)
