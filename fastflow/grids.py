"""Step grids: the times a sampler evaluates the model at, and the points it steps through.

A grid of ``N`` steps gives ``N + 1`` points from high noise to low. With
``final="clean"`` (the default) the ``N`` model evaluations span
``[t_min, t_max]`` and the last point is the clean sample (``alpha=1, sigma=0``);
with ``final="t_min"`` the ``N + 1`` points span ``[t_min, t_max]`` and sampling
stops at ``t_min``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .schedules import FlowMatching, Schedule, check_real, root_schedule

GRID_NAMES = ("uniform", "logsnr", "exponential", "karras", "linspace", "leading", "trailing")
FINAL_NAMES = ("clean", "t_min")

__all__ = ["GRID_NAMES", "Points", "grid_times", "points_at", "make_points"]


@dataclass(frozen=True)
class Points:
    """Float64 arrays over the points of a loop: schedule time and ``alpha, sigma`` with derivatives."""

    t: np.ndarray
    alpha: np.ndarray
    sigma: np.ndarray
    d_alpha: np.ndarray
    d_sigma: np.ndarray

    def __len__(self) -> int:
        return len(self.t)

    def __getitem__(self, i: int) -> Points:
        return Points(*(np.atleast_1d(a[i]) for a in (self.t, self.alpha, self.sigma, self.d_alpha, self.d_sigma)))

    @property
    def half_logsnr(self) -> np.ndarray:
        """``log(alpha / sigma)``: the variable of the exponential integrators (+inf when clean)."""
        with np.errstate(divide="ignore"):
            return np.log(self.alpha) - np.log(self.sigma)

    def concat(self, other: Points) -> Points:
        return Points(*(np.concatenate([a, b]) for a, b in zip(self.astuple(), other.astuple(), strict=True)))

    def astuple(self) -> tuple[np.ndarray, ...]:
        return (self.t, self.alpha, self.sigma, self.d_alpha, self.d_sigma)


def points_at(schedule: Schedule, t: np.ndarray) -> Points:
    t = np.asarray(t, dtype=np.float64)
    return Points(t, schedule.alpha(t), schedule.sigma(t), schedule.d_alpha(t), schedule.d_sigma(t))


def clean_point(schedule: Schedule) -> Points:
    """The clean end point ``sigma=0``; its time is the schedule's clean time if it has one, else NaN (then its
    ``alpha`` is :meth:`~fastflow.schedules.Schedule.clean_alpha`, 1 unless the schedule is rescaled)."""
    if float(schedule.sigma(0.0)) == 0.0 and float(schedule.alpha(0.0)) > 0:
        return points_at(schedule, np.array([0.0]))  # a rescaled schedule's clean state is alpha(0) * x
    alpha = np.array([schedule.clean_alpha()])
    return Points(np.array([np.nan]), alpha, np.array([0.0]), np.array([np.nan]), np.array([np.nan]))


def grid_times(
    schedule: Schedule,
    n: int,
    kind: str = "uniform",
    *,
    t_min: float | None = None,
    t_max: float | None = None,
    rho: float | None = None,
    steps_offset: int = 0,
) -> np.ndarray:
    """``n`` decreasing times from ``t_max`` to ``t_min`` laid out by ``kind``.

    ``uniform``: uniform in t, then warped by a flow-matching shift/mu, ends included (so from ``warp(t_max)`` to
    ``warp(t_min)``, as diffusers shifts its sigmas). ``logsnr`` and its
    alias ``exponential``: uniform in log-SNR (equivalently in log sigma_ve).
    ``karras``: uniform in ``sigma_ve^(1/rho)``. ``linspace``, ``leading``,
    ``trailing``: diffusers' integer spacings for discrete schedules (``n`` of them,
    ``t_max + 1`` training steps).
    """
    if kind not in GRID_NAMES:
        raise ValueError(f"unknown grid {kind!r}; valid: {', '.join(GRID_NAMES)}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"steps must be an int, got {n!r} ({type(n).__name__})")
    if n < 1:
        raise ValueError(f"steps must be at least 1, got {n}")
    for name, value in (("t_min", t_min), ("t_max", t_max), ("rho", rho)):
        if value is not None:
            check_real(name, value)
    if isinstance(steps_offset, bool) or not isinstance(steps_offset, (int, np.integer)) or steps_offset < 0:
        raise ValueError(f"steps_offset must be a non-negative int, got {steps_offset!r}")
    lo = schedule.t_min if t_min is None else float(t_min)
    hi = schedule.t_max if t_max is None else float(t_max)
    schedule.check_times(lo, "t_min")
    schedule.check_times(hi, "t_max")
    if not lo < hi:
        raise ValueError(f"need t_min < t_max, got {lo}, {hi}")
    if kind == "uniform":
        t = np.linspace(hi, lo, n)
        root = root_schedule(schedule)
        if isinstance(root, FlowMatching):
            t = root.warp(t)
        return t
    if kind in ("logsnr", "exponential", "karras"):
        s_hi, s_lo = float(schedule.sigma_ve(hi)), float(schedule.sigma_ve(lo))
        if not (0 < s_lo < s_hi < np.inf):
            raise ValueError(f"{kind} grid needs finite positive noise levels at t_min and t_max, got {s_lo}, {s_hi}")
        if kind == "karras":
            r = rho if rho is not None else getattr(schedule, "rho", 7.0)
            if not (r > 0 and math.isfinite(r)):
                raise ValueError(f"rho must be a positive finite number, got {r}")
            try:
                s = (s_hi ** (1 / r) + np.linspace(0, 1, n) * (s_lo ** (1 / r) - s_hi ** (1 / r))) ** r
            except OverflowError:  # a bare "(34, 'Numerical result out of range')" otherwise
                raise ValueError(
                    f"rho {r:g} is too small for noise levels {s_lo:g} to {s_hi:g}: sigma ** (1 / rho) overflows"
                ) from None
        else:
            s = np.exp(np.linspace(np.log(s_hi), np.log(s_lo), n))
        t = schedule.t_from_sigma_ve(s)
        t[0], t[-1] = (hi, lo) if n > 1 else (hi, hi)
        return t
    if not schedule.discrete:
        raise ValueError(
            f"{kind} spacing lays out diffusers' integer training timesteps, so it needs a discrete schedule (VP "
            f"with betas or alphas_cumprod), not {schedule!r}; use 'uniform', 'logsnr' or 'karras'"
        )
    total = int(round(hi)) + 1
    if n > total:
        raise ValueError(f"{kind} spacing: {n} steps exceed the {total} training steps")
    if kind == "linspace":
        t = np.linspace(0, total - 1, n).round()[::-1]
    elif kind == "leading":
        t = (np.arange(0, n) * (total // n)).round()[::-1] + steps_offset
    else:  # n terms of arange(total, 0, -total / n), whose float stop can add an n + 1-th (diffusers' does)
        t = np.round(total - np.arange(n) * (total / n)) - 1
    return np.ascontiguousarray(t, dtype=np.float64)


def make_points(
    schedule: Schedule,
    steps: int,
    grid: str | np.ndarray = "uniform",
    final: str = "clean",
    **grid_options,
) -> Points:
    """The ``steps + 1`` points of a loop: ``steps`` evaluation points then the end point."""
    if final not in FINAL_NAMES:
        raise ValueError(f"unknown final {final!r}; valid: {', '.join(FINAL_NAMES)}")
    root = root_schedule(schedule)
    warped = isinstance(root, FlowMatching) and (root.shift != 1.0 or root.mu is not None)
    if warped and not (isinstance(grid, str) and grid == "uniform"):
        which = f"the {grid!r} grid" if isinstance(grid, str) else "an explicit grid"
        raise ValueError(
            f"{schedule!r} warps the 'uniform' grid only, and {which} would ignore it: use grid='uniform', "
            "or FlowMatching() without shift and mu"
        )
    if isinstance(grid, str):
        if final == "clean":
            t = grid_times(schedule, steps, grid, **grid_options)
        else:
            t = grid_times(schedule, steps + 1, grid, **grid_options)
    else:
        t = np.asarray(grid, dtype=np.float64)
        if t.ndim != 1 or len(t) != steps + (final == "t_min"):
            raise ValueError(f"explicit grid must have {steps + (final == 't_min')} times for {steps} steps")
    schedule.check_times(t)
    pts = points_at(schedule, t)
    lam = pts.half_logsnr
    # "not all > 0" rather than "any <= 0": two points at alpha = 0 (t = 1 of flow matching) both have log-SNR
    # -inf, whose difference is NaN, and NaN <= 0 is False: such a repeated time slipped through.
    with np.errstate(invalid="ignore"):
        increasing = bool(np.all(np.diff(lam) > 0))
    if np.any(np.isnan(lam)) or not increasing:
        raise ValueError("grid times must go strictly from high noise to low noise")
    if final == "clean":
        pts = pts.concat(clean_point(schedule))
    return pts
