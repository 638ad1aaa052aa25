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


def unipc_weights(order: int, h: float, variant: str) -> tuple[float, float, np.ndarray]:
    """``(h_phi_1, B_h, b)`` of an ``order``-point interval of half-log-SNR step ``h``."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if variant == "bh1" else math.expm1(hh)
    b = np.empty(order)
    factorial = 1
    for k in range(1, order + 1):
        b[k - 1] = h_phi_k * factorial / b_h
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return h_phi_1, b_h, b


def solve_ratios(rks: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``rho`` with ``sum_k rks[k]**p rho_k = b[p]`` for ``p < len(rks)`` (UniPC's ``R rho = b``).

    A ratio at -inf (a point at alpha = 0, log-SNR -inf, as t = 1 of flow matching) takes the
    limit: by Cramer's rule the determinant grows as ``r^(m-1)`` times the minor without that
    column and the highest power's row, so the other weights solve that smaller system and the
    point's own weight vanishes (its scaled difference, divided by ``r``, vanishes too).
    """
    finite = np.isfinite(rks)
    if finite.all():
        return np.linalg.solve(np.stack([rks**p for p in range(len(rks))]), b)
    rho = np.zeros(len(rks))
    rho[finite] = solve_ratios(rks[finite], b[: int(finite.sum())])
    return rho


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


def predictor_rhos(rks: np.ndarray, b: np.ndarray) -> np.ndarray:
    """UniP's weights of the scaled differences (none at order 1, 1/2 at order 2)."""
    if len(rks) == 1:
        return np.zeros(0)
    if len(rks) == 2:
        return np.array([0.5])
    return solve_ratios(rks[:-1], b[:-1])


def predictor_update(
    z: Lin, m: Lin, rks: np.ndarray, d1s: list[Lin], h: float, variant: str, ratio: float, scale: float
) -> Lin:
    """UniP: ``z * ratio - m * scale * h_phi_1 - sum_k d_k * scale * B_h * rho_k`` on an interval of step ``h``.

    Data prediction: ``ratio = sigma'/sigma``, ``scale = alpha'`` (the drop-in's noise
    form passes ``alpha'/alpha``, ``sigma'`` and ``-h``).
    """
    h_phi_1, b_h, b = unipc_weights(len(rks), h, variant)
    out = z * ratio - m * (scale * h_phi_1)
    for rho, d in zip(predictor_rhos(rks, b), d1s, strict=True):
        out = out - d * (scale * b_h * rho)
    return out


def correction(
    m_new: Lin, m_old: Lin, rks: np.ndarray, d1s: list[Lin], h: float, variant: str, scale: float
) -> Lin:
    """UniC's change to the state, ``C - P``, for the interval of step ``h`` that ended where ``m_new`` was predicted.

    ``rks``, ``d1s`` are that interval's :func:`differences` at the previous step's order;
    ``scale`` is ``alpha`` at the interval's end (``sigma`` in the noise form).
    """
    _, b_h, b = unipc_weights(len(rks), h, variant)
    if not math.isfinite(b_h):
        raise UndefinedStepError(
            f"UniPC's {variant} corrector scales the step from alpha = 0 (log-SNR -inf, t = 1 of FlowMatching) by "
            "an infinite B(h) (bh1: B(h) = h); use variant 'bh2', a grid that starts below alpha = 0 (t_max < 1), "
            "or disable_corrector=(0,)"
        )
    rhos_p = predictor_rhos(rks, b)
    rhos_c = np.array([0.5]) if len(rks) == 1 else solve_ratios(rks, b)
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
        if isinstance(self.disable_corrector, (str, bytes)) or not hasattr(self.disable_corrector, "__iter__"):
            raise TypeError(f"disable_corrector must be a sequence of step indices, got {self.disable_corrector!r}")
        self.disable_corrector = tuple(self.disable_corrector)
        if not all(isinstance(j, (int, np.integer)) and not isinstance(j, bool) for j in self.disable_corrector):
            raise TypeError(f"disable_corrector must hold int step indices, got {self.disable_corrector!r}")

    def build(self, schedule: Schedule, points: Points) -> list[Stage]:
        lam, a, s = points.half_logsnr, points.alpha, points.sigma
        n = len(points) - 1
        outside = [j for j in self.disable_corrector if not 0 <= j < n - 1]
        if outside:  # step j's corrector runs at step j + 1: the last step's has none
            raise ValueError(
                f"disable_corrector {outside} outside the correctable steps 0..{n - 2} of a {n}-step loop"
            )
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
