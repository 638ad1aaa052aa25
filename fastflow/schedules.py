"""Noise schedules: ``z_t = alpha(t) * x + sigma(t) * eps``, evaluated in float64 on the host.

Time ``t`` is each schedule's own: it grows with noise, and it is what a model is
called with. Every schedule gives ``alpha``, ``sigma``, their time derivatives and
the log-SNR ``lambda = log(alpha^2 / sigma^2)``, and inverts ``sigma / alpha``
(the variance-exploding sigma) back to ``t``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

ArrayLike = float | np.ndarray

__all__ = ["Schedule", "FlowMatching", "VP", "EDM", "Rescaled", "root_schedule"]


def check_real(name: str, value: object) -> None:
    """A number option (of a schedule, grid or solver): a string or a tensor would fail later, far from the option,
    with an error that does not name it (``'>' not supported between 'str' and 'int'``), or be converted silently."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")


def _arr(t: ArrayLike) -> np.ndarray:
    a = np.asarray(t, dtype=np.float64)
    if np.any(np.isnan(a)):
        raise ValueError("time is NaN")
    return a


class Schedule:
    """Base class. Subclasses define ``alpha``, ``sigma``, ``d_alpha``, ``d_sigma`` and the time domain."""

    t_min: float
    t_max: float
    # True where time is a training-step index (diffusers' discrete schedules): the integer grid spacings apply.
    discrete: bool = False

    def alpha(self, t: ArrayLike) -> np.ndarray:
        raise NotImplementedError

    def sigma(self, t: ArrayLike) -> np.ndarray:
        raise NotImplementedError

    def d_alpha(self, t: ArrayLike) -> np.ndarray:
        raise NotImplementedError

    def d_sigma(self, t: ArrayLike) -> np.ndarray:
        raise NotImplementedError

    def clean_alpha(self) -> float:
        """``alpha`` of the clean end state where the schedule has no clean time (1: the data itself)."""
        return 1.0

    def logsnr(self, t: ArrayLike) -> np.ndarray:
        """``log(alpha^2 / sigma^2)``; +inf where sigma is 0."""
        with np.errstate(divide="ignore"):
            return 2.0 * (np.log(self.alpha(t)) - np.log(self.sigma(t)))

    def sigma_ve(self, t: ArrayLike) -> np.ndarray:
        """``sigma / alpha``: the noise level of the equivalent variance-exploding model."""
        with np.errstate(divide="ignore"):
            return self.sigma(t) / self.alpha(t)

    def t_from_sigma_ve(self, s: ArrayLike) -> np.ndarray:
        """Inverse of :meth:`sigma_ve` on ``[t_min, t_max]`` (bisection unless a subclass knows better)."""
        s = np.asarray(s, dtype=np.float64)
        lo = np.full_like(s, self.t_min)
        hi = np.full_like(s, self.t_max)
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            up = self.sigma_ve(mid) < s
            lo = np.where(up, mid, lo)
            hi = np.where(up, hi, mid)
        return 0.5 * (lo + hi)

    def t_from_logsnr(self, lam: ArrayLike) -> np.ndarray:
        return self.t_from_sigma_ve(np.exp(-0.5 * np.asarray(lam, dtype=np.float64)))

    def time_range(self) -> tuple[float, float]:
        """The closed interval of times where the schedule is defined (``t_min``, ``t_max`` bound the default grid,
        which may be narrower)."""
        return self.t_min, self.t_max

    def check_times(self, t: ArrayLike, what: str = "grid time") -> None:
        """Raise ValueError naming the valid range if a time lies outside :meth:`time_range` (or is not finite):
        outside it the schedule has no values, or would give those of its nearest end."""
        lo, hi = self.time_range()
        t = np.atleast_1d(np.asarray(t, dtype=np.float64))
        bad = ~(np.isfinite(t) & (t >= lo) & (t <= hi))
        if np.any(bad):
            raise ValueError(f"{what} {t[bad][0]:g} is outside the time range [{lo:g}, {hi:g}] of {self!r}")

    def validate(self, ts: np.ndarray | None = None) -> None:
        """Raise ValueError for NaN, negative, or non-monotone log-SNR on a probe grid."""
        if ts is None:
            ts = np.linspace(self.t_min, self.t_max, 257)
        a, s = self.alpha(ts), self.sigma(ts)
        if not (np.all(np.isfinite(a)) and np.all(np.isfinite(s))):
            raise ValueError(f"{self!r}: alpha or sigma is not finite")
        if np.any(a < 0) or np.any(s < 0):
            raise ValueError(f"{self!r}: alpha and sigma must be non-negative")
        lam = self.logsnr(ts)
        if np.any(np.diff(lam) > 1e-12 * np.maximum(1.0, np.abs(lam[1:]))):
            raise ValueError(f"{self!r}: log-SNR must decrease as t grows (noise must increase)")

    def __repr__(self) -> str:
        return type(self).__name__


class FlowMatching(Schedule):
    """Rectified flow: ``alpha = 1 - t``, ``sigma = t`` on ``[0, 1]``.

    ``shift`` (constant, SD3-style) or ``mu`` (resolution-dependent, Flux-style), one
    of them, warps the ``uniform`` step grid (the default) toward high noise:
    ``t' = shift*t / (1 + (shift-1)*t)`` or ``t' = e^mu / (e^mu + 1/t - 1)``; another grid
    refuses them. The schedule itself is unchanged, so a model is always called with
    ``t = sigma``.
    """

    def __init__(self, shift: float = 1.0, mu: float | None = None, t_min: float = 1e-3, t_max: float = 1.0):
        for name, value in (("shift", shift), ("mu", mu), ("t_min", t_min), ("t_max", t_max)):
            if value is not None:
                check_real(name, value)
        if not (shift > 0 and math.isfinite(shift)):
            raise ValueError(f"shift must be a positive finite number, got {shift}")
        if mu is not None and not abs(mu) <= 700.0:  # e^mu overflows float64 past 709; real models use 0.5-3
            raise ValueError(f"mu must be finite and within [-700, 700], got {mu}")
        if mu is not None and shift != 1.0:
            raise ValueError(
                f"pass shift or mu, not both (got shift={shift}, mu={mu}): diffusers' dynamic shifting applies mu "
                "alone, ignoring the config's shift"
            )
        if not 0.0 <= t_min < t_max <= 1.0:
            raise ValueError(f"need 0 <= t_min < t_max <= 1, got {t_min}, {t_max}")
        self.shift, self.mu, self.t_min, self.t_max = float(shift), mu, float(t_min), float(t_max)

    def alpha(self, t):
        return 1.0 - _arr(t)

    def sigma(self, t):
        return _arr(t) + 0.0

    def d_alpha(self, t):
        return np.full_like(_arr(t), -1.0)

    def d_sigma(self, t):
        return np.full_like(_arr(t), 1.0)

    def t_from_sigma_ve(self, s):
        s = np.asarray(s, dtype=np.float64)
        return s / (1.0 + s)

    def time_range(self) -> tuple[float, float]:
        return 0.0, 1.0

    def warp(self, t: np.ndarray) -> np.ndarray:
        """Apply ``mu`` or ``shift`` to grid times in [0, 1]."""
        t = np.asarray(t, dtype=np.float64)
        if self.mu is not None:
            with np.errstate(divide="ignore"):
                t = np.where(t > 0, math.exp(self.mu) / (math.exp(self.mu) + (1.0 / np.maximum(t, 1e-300) - 1.0)), 0.0)
        return self.shift * t / (1.0 + (self.shift - 1.0) * t)

    def __repr__(self) -> str:
        extra = f", mu={self.mu}" if self.mu is not None else ""
        return f"FlowMatching(shift={self.shift}{extra})"


def _betas(kind: str, n: int, beta_start: float, beta_end: float) -> np.ndarray:
    if kind == "linear":
        return np.linspace(beta_start, beta_end, n, dtype=np.float64)
    if kind == "scaled_linear":
        return np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2
    if kind == "squaredcos_cap_v2":
        def f(u):
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], dtype=np.float64)
    raise ValueError(f"unknown beta schedule {kind!r}; valid: linear, scaled_linear, squaredcos_cap_v2")


def rescale_zero_terminal_snr(alphas_cumprod: np.ndarray) -> np.ndarray:
    """Shift and scale ``sqrt(alphas_cumprod)`` so the last step has zero SNR (Lin et al. 2023)."""
    a = np.sqrt(alphas_cumprod)
    a0, aT = a[0], a[-1]
    a = (a - aT) * a0 / (a0 - aT)
    return a**2


class VP(Schedule):
    """Variance preserving: ``alpha^2 + sigma^2 = 1``.

    Discrete (``VP(beta_schedule=...)``): diffusers' beta schedules; time is the
    training index in ``[0, T-1]`` and fractional times interpolate
    ``log(sigma/alpha)`` linearly, as diffusers' sigma-to-timestep mapping does.
    ``alphas_cumprod`` may be passed directly. Continuous (``VP.cosine()``): the
    cosine schedule ``alpha = cos(pi/2 * t)`` on ``[0, 1]``.
    """

    def __init__(
        self,
        beta_schedule: str = "scaled_linear",
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        rescale_betas_zero_snr: bool = False,
        alphas_cumprod: np.ndarray | None = None,
    ):
        # An explicit alphas_cumprod is the schedule: beta_schedule and the betas are not read (nor named by repr).
        source = beta_schedule if alphas_cumprod is None else "alphas_cumprod"
        if not isinstance(rescale_betas_zero_snr, (bool, np.bool_)):  # a string flag would be taken as True
            raise TypeError(f"rescale_betas_zero_snr must be a bool, got {rescale_betas_zero_snr!r}")
        if alphas_cumprod is None:
            if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, (int, np.integer)):
                raise TypeError(f"num_train_timesteps must be an int, got {num_train_timesteps!r}")
            if num_train_timesteps < 2:
                raise ValueError("num_train_timesteps must be at least 2")
            for name, value in (("beta_start", beta_start), ("beta_end", beta_end)):
                check_real(name, value)
                # scaled_linear takes square roots: a negative beta's is complex, whose real part (0) numpy keeps
                if not 0.0 <= value < 1.0:
                    raise ValueError(f"{name} must lie in [0, 1), got {value}")
            betas = _betas(beta_schedule, num_train_timesteps, beta_start, beta_end)
            alphas_cumprod = np.cumprod(1.0 - betas)
        alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
        if alphas_cumprod.ndim != 1 or len(alphas_cumprod) < 2:
            raise ValueError(f"alphas_cumprod must be 1-D with at least 2 entries, got shape {alphas_cumprod.shape}")
        if rescale_betas_zero_snr:
            alphas_cumprod = rescale_zero_terminal_snr(alphas_cumprod)
            # Keep the last step finite for conversions, as diffusers does.
            alphas_cumprod[-1] = 2.0**-24
        if np.any(~np.isfinite(alphas_cumprod)) or np.any(alphas_cumprod <= 0) or np.any(alphas_cumprod > 1):
            raise ValueError("alphas_cumprod must lie in (0, 1]")
        if np.any(np.diff(alphas_cumprod) >= 0):
            raise ValueError("alphas_cumprod must be strictly decreasing")
        self.alphas_cumprod = alphas_cumprod
        self.kind = "discrete"
        self.discrete = True
        self.t_min, self.t_max = 0.0, float(len(alphas_cumprod) - 1)
        with np.errstate(divide="ignore"):
            self._log_s = 0.5 * np.log((1.0 - alphas_cumprod) / alphas_cumprod)  # log sigma_ve per index
        self._desc = f"VP({source}, T={len(alphas_cumprod)}{', zero-SNR' if rescale_betas_zero_snr else ''})"

    @classmethod
    def cosine(cls, t_min: float = 1e-4, t_max: float = 0.9999) -> VP:
        """Continuous cosine schedule ``alpha = cos(pi t / 2)``, ``sigma = sin(pi t / 2)``.

        ``alpha`` is evaluated as ``sin(pi (1 - t) / 2)``, exactly 0 at ``t = 1`` (``cos`` gives 6e-17 there, which
        an eps model's data prediction would divide by instead of refusing the step)."""
        self = cls.__new__(cls)
        check_real("t_min", t_min)
        check_real("t_max", t_max)
        if not 0.0 <= t_min < t_max <= 1.0:
            raise ValueError(f"need 0 <= t_min < t_max <= 1, got {t_min}, {t_max}")
        self.kind = "cosine"
        self.t_min, self.t_max = float(t_min), float(t_max)
        self._desc = "VP(cosine)"
        return self

    def time_range(self) -> tuple[float, float]:
        """Discrete: the training indices ``[0, T-1]``; cosine: ``[0, 1]``."""
        if self.kind == "cosine":
            return 0.0, 1.0
        return 0.0, float(len(self._log_s) - 1)

    # log sigma_ve(t) for the discrete schedule, piecewise linear in t
    def _log_sve(self, t):
        t = np.clip(_arr(t), self.t_min, self.t_max)
        return np.interp(t, np.arange(len(self._log_s), dtype=np.float64), self._log_s)

    def _dlog_sve(self, t):
        t = np.clip(_arr(t), self.t_min, self.t_max)
        i = np.clip(np.floor(t).astype(np.int64), 0, len(self._log_s) - 2)
        return self._log_s[i + 1] - self._log_s[i]

    def alpha(self, t):
        if self.kind == "cosine":
            return np.sin(0.5 * np.pi * (1.0 - _arr(t)))
        return 1.0 / np.sqrt(1.0 + np.exp(2 * self._log_sve(t)))

    def sigma(self, t):
        if self.kind == "cosine":
            return np.sin(0.5 * np.pi * _arr(t))
        s = np.exp(self._log_sve(t))
        return s / np.sqrt(1.0 + s * s)

    def d_alpha(self, t):
        if self.kind == "cosine":
            return -0.5 * np.pi * np.sin(0.5 * np.pi * _arr(t))
        # alpha = (1 + s^2)^-1/2 with d(log s)/dt = k: d alpha = -alpha * sigma^2 * k
        return -self.alpha(t) * self.sigma(t) ** 2 * self._dlog_sve(t)

    def d_sigma(self, t):
        if self.kind == "cosine":
            return 0.5 * np.pi * np.sin(0.5 * np.pi * (1.0 - _arr(t)))
        return self.sigma(t) * self.alpha(t) ** 2 * self._dlog_sve(t)

    def t_from_sigma_ve(self, s):
        s = np.asarray(s, dtype=np.float64)
        if self.kind == "cosine":
            return np.arctan(s) * 2.0 / np.pi
        with np.errstate(divide="ignore"):
            log_s = np.log(s)
        return np.interp(log_s, self._log_s, np.arange(len(self._log_s), dtype=np.float64))

    def __repr__(self) -> str:
        return self._desc


class EDM(Schedule):
    """Variance exploding (Karras et al. 2022): ``alpha = 1``, ``sigma = t`` on ``[sigma_min, sigma_max]``.

    ``rho`` is the default Karras grid's exponent.
    """

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0):
        for name, value in (("sigma_min", sigma_min), ("sigma_max", sigma_max), ("rho", rho)):
            check_real(name, value)
        if not (0 < sigma_min < sigma_max and math.isfinite(sigma_max)):
            raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got {sigma_min}, {sigma_max}")
        if not (rho > 0 and math.isfinite(rho)):
            raise ValueError(f"rho must be positive, got {rho}")
        self.t_min, self.t_max, self.rho = float(sigma_min), float(sigma_max), float(rho)

    def alpha(self, t):
        return np.ones_like(_arr(t))

    def sigma(self, t):
        return _arr(t) + 0.0

    def d_alpha(self, t):
        return np.zeros_like(_arr(t))

    def d_sigma(self, t):
        return np.ones_like(_arr(t))

    def time_range(self) -> tuple[float, float]:
        return 0.0, math.inf

    def t_from_sigma_ve(self, s):
        return np.asarray(s, dtype=np.float64) + 0.0

    def __repr__(self) -> str:
        return f"EDM(sigma_min={self.t_min}, sigma_max={self.t_max}, rho={self.rho})"


class Rescaled(Schedule):
    """``(alpha, sigma) -> (c alpha, c sigma)``: a constant ``c``, or ``c(t)`` with its derivative.

    A model of the base schedule serves the rescaled one with ``z -> c z``. DDIM is
    invariant under this map; Euler on the probability-flow ODE is invariant for a
    constant ``c`` but not for a time-dependent one.
    """

    def __init__(
        self,
        base: Schedule,
        scale: float | Callable[[np.ndarray], np.ndarray],
        d_scale: Callable[[np.ndarray], np.ndarray] | None = None,
    ):
        if not isinstance(base, Schedule):
            raise TypeError(f"base must be a fastflow Schedule (VP, EDM, FlowMatching, ...), got {base!r}")
        if callable(scale):
            if d_scale is None:
                raise ValueError("a time-dependent scale needs its derivative d_scale")
            self._c, self._dc = scale, d_scale
        else:
            check_real("scale", scale)  # float() would take a string or a bool
            c = float(scale)
            if not (c > 0 and math.isfinite(c)):
                raise ValueError(f"scale must be positive and finite, got {scale}")
            self._c = lambda t: np.full_like(_arr(t), c)
            self._dc = lambda t: np.zeros_like(_arr(t))
        self.base = base
        self.t_min, self.t_max = base.t_min, base.t_max
        self.discrete = base.discrete
        if hasattr(base, "rho"):  # the Karras grid's default exponent is the base's
            self.rho = base.rho

    def scale(self, t):
        return self._c(_arr(t))

    def clean_alpha(self) -> float:
        """Every state is ``c`` times the base's, the clean one too: ``c`` at ``t_min``, the time nearest it."""
        return float(self._c(_arr(self.t_min))) * self.base.clean_alpha()

    def alpha(self, t):
        return self._c(_arr(t)) * self.base.alpha(t)

    def sigma(self, t):
        return self._c(_arr(t)) * self.base.sigma(t)

    def d_alpha(self, t):
        return self._dc(_arr(t)) * self.base.alpha(t) + self._c(_arr(t)) * self.base.d_alpha(t)

    def d_sigma(self, t):
        return self._dc(_arr(t)) * self.base.sigma(t) + self._c(_arr(t)) * self.base.d_sigma(t)

    def time_range(self) -> tuple[float, float]:
        return self.base.time_range()

    def t_from_sigma_ve(self, s):
        return self.base.t_from_sigma_ve(s)

    def __repr__(self) -> str:
        return f"Rescaled({self.base!r})"


def root_schedule(schedule: Schedule) -> Schedule:
    """The schedule a :class:`Rescaled` chain rescales (the schedule itself otherwise)."""
    while isinstance(schedule, Rescaled):
        schedule = schedule.base
    return schedule
