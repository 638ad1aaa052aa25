"""UniPC (Zhao et al. 2023), data-prediction form, variants bh1 and bh2, orders 1 to 3.

Each step corrects the current state with the new prediction (UniC), then
predicts the next one (UniP). The corrector only changes the state by a
combination of predictions: ``z_c = z + C - P``, where ``P`` is the previous
predictor's finite-difference term and ``C`` the corrector's, both over the same
interval, so the whole step stays linear in ``(z, x_hat, stored x_hats)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..grids import Points
from ..schedules import Schedule
from .base import Lin, Solver, Stage, UndefinedStepError, X, Z, stages_on_points
from .dpmpp import multistep_order, repeated_point

VARIANTS = ("bh1", "bh2")


def unipc_weights(rks: np.ndarray, h: float, variant: str) -> tuple[float, float, np.ndarray, np.ndarray]:
    """``(h_phi_1, B_h, R, b)`` for ratios ``rks`` (ending in 1) on an interval of half-log-SNR step ``h``."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if variant == "bh1" else math.expm1(hh)
    order = len(rks)
    R = np.stack([rks ** (k - 1) for k in range(1, order + 1)])
    b = np.empty(order)
    factorial = 1
    for k in range(1, order + 1):
        b[k - 1] = h_phi_k * factorial / b_h
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return h_phi_1, b_h, R, b


def differences(
    lam: np.ndarray, i: int, order: int, pred: Callable[[int], Lin] = X
) -> tuple[np.ndarray, list[Lin]]:
    """Ratios ``r_k`` (ending in 1) and scaled differences ``(m_{i-k} - m_i) / r_k`` for the step from point ``i``.

    ``pred(j)`` is the stored prediction of point ``j`` (``X(j)`` here; the diffusers
    drop-in passes its own, e.g. noise predictions).
    """
    h = lam[i + 1] - lam[i]
    rks, d1s = [], []
    for k in range(1, order):
        rk = (lam[i - k] - lam[i]) / h
        if rk == 0:
            raise UndefinedStepError(repeated_point(i - k, i, order))
        rks.append(rk)
        d1s.append((pred(i - k) - pred(i)) / rk)
    return np.array(rks + [1.0]), d1s


def predictor_rhos(R: np.ndarray, b: np.ndarray, order: int) -> np.ndarray:
    """UniP's weights of the scaled differences (none at order 1, 1/2 at order 2)."""
    if order == 1:
        return np.zeros(0)
    if order == 2:
        return np.array([0.5])
    return np.linalg.solve(R[:-1, :-1], b[:-1])


def predictor_update(
    z: Lin, m: Lin, rks: np.ndarray, d1s: list[Lin], h: float, variant: str, ratio: float, scale: float
) -> Lin:
    """UniP: ``z * ratio - m * scale * h_phi_1 - sum_k d_k * scale * B_h * rho_k`` on an interval of step ``h``.

    Data prediction: ``ratio = sigma'/sigma``, ``scale = alpha'`` (the drop-in's noise
    form passes ``alpha'/alpha``, ``sigma'`` and ``-h``).
    """
    h_phi_1, b_h, R, b = unipc_weights(rks, h, variant)
    out = z * ratio - m * (scale * h_phi_1)
    for rho, d in zip(predictor_rhos(R, b, len(rks)), d1s, strict=True):
        out = out - d * (scale * b_h * rho)
    return out


def correction(
    m_new: Lin, m_old: Lin, rks: np.ndarray, d1s: list[Lin], h: float, variant: str, scale: float
) -> Lin:
    """UniC's change to the state, ``C - P``, for the interval of step ``h`` that ended where ``m_new`` was predicted.

    ``rks``, ``d1s`` are that interval's :func:`differences` at the previous step's order;
    ``scale`` is ``alpha`` at the interval's end (``sigma`` in the noise form).
    """
    order = len(rks)
    _, b_h, R, b = unipc_weights(rks, h, variant)
    rhos_p = predictor_rhos(R, b, order)
    rhos_c = np.array([0.5]) if order == 1 else np.linalg.solve(R, b)
    out = (m_new - m_old) * rhos_c[-1]
    for rc, rp, d in zip(rhos_c[:-1], rhos_p, d1s, strict=True):
        out = out + d * (rc - rp)
    return out * (-scale * b_h)


@dataclass
class UniPC(Solver):
    """UniPC of ``order`` 1-3 (``variant`` bh1 or bh2). With ``lower_order_final`` its last steps use no more
    points than steps are left, at any loop length, as UniPC's reference and diffusers do; ``disable_corrector``
    lists the steps whose result is left uncorrected (as in diffusers)."""

    order: int = 2
    variant: str = "bh2"
    lower_order_final: bool = True
    use_corrector: bool = True
    disable_corrector: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.order not in (1, 2, 3):
            raise ValueError(f"UniPC order must be 1, 2 or 3, got {self.order}")
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown UniPC variant {self.variant!r}; valid: {', '.join(VARIANTS)}")
        self.name = "unipc"
        self.disable_corrector = tuple(self.disable_corrector)

    def build(self, schedule: Schedule, points: Points) -> list[Stage]:
        lam, a, s = points.half_logsnr, points.alpha, points.sigma
        n = len(points) - 1
        orders = [
            multistep_order(i, n, self.order, self.lower_order_final, lower_below=math.inf) for i in range(n)
        ]
        ups = []
        for i in range(n):
            if s[i + 1] == 0:
                ups.append(X(i) * a[i + 1])
                continue
            z = Z(i)
            if i > 0 and self.use_corrector and (i - 1) not in self.disable_corrector:
                z = z + self._correction(lam, a, i, orders[i - 1])
            h = lam[i + 1] - lam[i]
            rks, d1s = differences(lam, i, orders[i])
            ups.append(predictor_update(z, X(i), rks, d1s, h, self.variant, s[i + 1] / s[i], a[i + 1]))
        return stages_on_points(points, ups)

    def _correction(self, lam: np.ndarray, a: np.ndarray, i: int, order: int) -> Lin:
        """``C - P`` for the interval from point ``i-1`` to ``i``, at the previous step's order."""
        rks, d1s = differences(lam, i - 1, order)
        return correction(X(i), X(i - 1), rks, d1s, lam[i] - lam[i - 1], self.variant, a[i])
