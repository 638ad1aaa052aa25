"""Baselines: each solver's step written the way a user writes it, with plain torch ops.

These are what fastflow is compared against. Each step takes the model output in
its own dtype, upcasts it, and combines tensors with per-step Python scalars
computed on the host from the schedule, one eager op at a time (or, for the
``torch.compile`` baseline, the same function compiled). States are the
variance-preserving ``z`` of the schedule (``z = alpha * x + sigma * eps``), so the
model input is the state itself.

The pure step functions below take tensors and Python floats only; the
:class:`NaiveStepper` subclasses hold the schedule and the history a multistep
solver needs, and compute the scalars of step ``i``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

Tensor = torch.Tensor
StepFn = Callable[..., object]

__all__ = [
    "NaiveStepper", "NAIVE_STEPPERS", "compile_step", "ddim_step", "ddpm_step", "dpmpp2m_step",
    "euler_ancestral_step", "flow_euler_step", "guided_ddim_step", "make_stepper", "sde_dpmpp2m_step",
    "unipc_step",
]


# ----------------------------------------------------------------------------- pure step functions
def ddim_step(z: Tensor, o: Tensor, a_t: float, s_t: float, a_s: float, s_s: float) -> Tensor:
    """Deterministic DDIM for an eps-predicting model."""
    eps = o.to(z.dtype)
    x0 = (z - s_t * eps) / a_t
    return a_s * x0 + s_s * eps


def guided_ddim_step(
    z: Tensor, o_cond: Tensor, o_uncond: Tensor, w: float, a_t: float, s_t: float, a_s: float, s_s: float
) -> Tensor:
    """Classifier-free guidance followed by DDIM, as a pipeline's loop does it."""
    uncond = o_uncond.to(z.dtype)
    eps = uncond + w * (o_cond.to(z.dtype) - uncond)
    x0 = (z - s_t * eps) / a_t
    return a_s * x0 + s_s * eps


def flow_euler_step(z: Tensor, o: Tensor, dt: float) -> Tensor:
    """Flow matching Euler: ``z + (t_next - t) * u``."""
    return z + dt * o.to(z.dtype)


def ddpm_step(z: Tensor, o: Tensor, a_t: float, s_t: float, a_s: float, c_eps: float, c_noise: float) -> Tensor:
    """Ancestral DDPM (DDIM with eta = 1): fresh noise from torch's generator every step."""
    eps = o.to(z.dtype)
    x0 = (z - s_t * eps) / a_t
    return a_s * x0 + c_eps * eps + c_noise * torch.randn_like(z)


def euler_ancestral_step(
    z: Tensor, o: Tensor, a_t: float, s_t: float, a_s: float, sigma_down: float, sigma_up: float
) -> Tensor:
    """Euler ancestral in the variance-exploding variable ``x = z / alpha``, then back to ``z``."""
    eps = o.to(z.dtype)
    sigma = s_t / a_t
    x = z / a_t
    denoised = x - sigma * eps
    d = (x - denoised) / sigma
    x = x + d * (sigma_down - sigma)
    x = x + torch.randn_like(x) * sigma_up
    return x * a_s


def dpmpp2m_step(
    z: Tensor, o: Tensor, x_prev: Tensor | None, a_t: float, s_t: float, c_z: float, c_d: float, r: float
) -> tuple[Tensor, Tensor]:
    """DPM-Solver++(2M), midpoint form; first order when there is no previous prediction.

    ``c_z = sigma_s / sigma_t`` and ``c_d = -alpha_s * expm1(-h)`` come from the host.
    """
    eps = o.to(z.dtype)
    x0 = (z - s_t * eps) / a_t
    d = x0 if x_prev is None else (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x_prev
    return c_z * z + c_d * d, x0


def sde_dpmpp2m_step(
    z: Tensor, o: Tensor, x_prev: Tensor | None, a_t: float, s_t: float, c_z: float, c_x: float, c_d: float,
    c_noise: float,
) -> tuple[Tensor, Tensor]:
    """SDE-DPM-Solver++(2M), midpoint form, with fresh noise every step (coefficients from the host)."""
    eps = o.to(z.dtype)
    x0 = (z - s_t * eps) / a_t
    z_next = c_z * z + c_x * x0
    if x_prev is not None:
        z_next = z_next + c_d * (x0 - x_prev)
    z_next = z_next + c_noise * torch.randn_like(z)
    return z_next, x0


def unipc_step(
    z: Tensor,
    o: Tensor,
    z_last: Tensor | None,
    x_prev: Tensor | None,
    x_prev2: Tensor | None,
    corr: Sequence[float],
    pred: Sequence[float],
    a_t: float,
    s_t: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """UniPC-bh2: correct the state with the new prediction (UniC), then predict the next one (UniP).

    ``corr = (s_ratio, c_prev, c_diff, c_prev2)`` rebuilds the corrected state from the
    previous corrected state ``z_last``; ``pred = (s_ratio, c_x, c_diff)`` is the predictor.
    Returns ``(z_next, x0, z_corrected)``.
    """
    eps = o.to(z.dtype)
    x0 = (z - s_t * eps) / a_t
    if z_last is not None and x_prev is not None:
        z = corr[0] * z_last + corr[1] * x_prev + corr[2] * (x0 - x_prev)
        if x_prev2 is not None:
            z = z + corr[3] * (x_prev2 - x_prev)
    z_next = pred[0] * z + pred[1] * x0
    if x_prev is not None:
        z_next = z_next + pred[2] * (x_prev - x0)
    return z_next, x0, z


# ----------------------------------------------------------------------------- steppers (host-side state)
class NaiveStepper:
    """Steps a whole loop with one pure function; subclasses compute step ``i``'s scalars on the host.

    ``alpha`` and ``sigma`` are the loop's points (one more than the steps; the last
    one is clean when ``sigma`` ends at 0).
    """

    guided = False

    def __init__(self, alpha: np.ndarray, sigma: np.ndarray, fn: StepFn | None = None):
        self.a = [float(v) for v in alpha]
        self.s = [float(v) for v in sigma]
        self.steps = len(self.a) - 1
        self.fn: StepFn = fn or self.default_fn()
        self.reset()

    def default_fn(self) -> StepFn:
        raise NotImplementedError

    def reset(self) -> None:
        """Forget history before a new loop."""

    def __call__(self, o: Tensor | tuple[Tensor, Tensor], z: Tensor, i: int) -> Tensor:
        raise NotImplementedError

    def lam(self, i: int) -> float:
        """Half log-SNR ``log(alpha / sigma)`` at point ``i`` (+inf when clean)."""
        return math.inf if self.s[i] == 0 else math.log(self.a[i] / self.s[i])


class DDIMStepper(NaiveStepper):
    def default_fn(self) -> StepFn:
        return ddim_step

    def __call__(self, o, z, i):
        return self.fn(z, o, self.a[i], self.s[i], self.a[i + 1], self.s[i + 1])


class GuidedDDIMStepper(NaiveStepper):
    guided = True
    scale = 7.5

    def default_fn(self) -> StepFn:
        return guided_ddim_step

    def __call__(self, o, z, i):
        uncond, cond = o.chunk(2) if isinstance(o, Tensor) else (o[1], o[0])
        return self.fn(z, cond, uncond, self.scale, self.a[i], self.s[i], self.a[i + 1], self.s[i + 1])


class FlowEulerStepper(NaiveStepper):
    def default_fn(self) -> StepFn:
        return flow_euler_step

    def __call__(self, o, z, i):
        return self.fn(z, o, self.s[i + 1] - self.s[i])


class DDPMStepper(NaiveStepper):
    eta = 1.0

    def default_fn(self) -> StepFn:
        return ddpm_step

    def __call__(self, o, z, i):
        a_t, s_t, a_s, s_s = self.a[i], self.s[i], self.a[i + 1], self.s[i + 1]
        if s_s == 0:
            c = 0.0
        else:
            ratio = (a_t * s_s / (s_t * a_s)) ** 2
            c = self.eta * s_s * math.sqrt(max(0.0, 1.0 - ratio))
        return self.fn(z, o, a_t, s_t, a_s, math.sqrt(max(0.0, s_s * s_s - c * c)), c)


class EulerAncestralStepper(NaiveStepper):
    def default_fn(self) -> StepFn:
        return euler_ancestral_step

    def __call__(self, o, z, i):
        sig = self.s[i] / self.a[i]
        nxt = self.s[i + 1] / self.a[i + 1]
        up = min(nxt, math.sqrt(max(0.0, nxt**2 * (sig**2 - nxt**2) / sig**2)))
        down = math.sqrt(max(0.0, nxt**2 - up**2))
        return self.fn(z, o, self.a[i], self.s[i], self.a[i + 1], down, up)


class DPMpp2MStepper(NaiveStepper):
    """Second order after the first step; first order on the last step of short loops, as diffusers does."""

    def default_fn(self) -> StepFn:
        return dpmpp2m_step

    def reset(self) -> None:
        self.x_prev: Tensor | None = None

    def _args(self, i: int) -> tuple[float, float, bool]:
        h = self.lam(i + 1) - self.lam(i)
        r = (self.lam(i) - self.lam(i - 1)) / h if i > 0 and math.isfinite(h) else 1.0
        first_order = i == 0 or self.s[i + 1] == 0 or (self.steps < 15 and i == self.steps - 1)
        return h, r, first_order

    def __call__(self, o, z, i):
        h, r, first_order = self._args(i)
        prev = None if first_order else self.x_prev
        a_s, s_s = self.a[i + 1], self.s[i + 1]
        z_next, self.x_prev = self.fn(z, o, prev, self.a[i], self.s[i], s_s / self.s[i], -a_s * math.expm1(-h), r)
        return z_next


class SDEDPMpp2MStepper(DPMpp2MStepper):
    def default_fn(self) -> StepFn:
        return sde_dpmpp2m_step

    def __call__(self, o, z, i):
        h, r, first_order = self._args(i)
        prev = None if first_order else self.x_prev
        a_s, s_s = self.a[i + 1], self.s[i + 1]
        gain = -math.expm1(-2 * h)
        c_z = s_s / self.s[i] * math.exp(-h)
        z_next, self.x_prev = self.fn(
            z, o, prev, self.a[i], self.s[i], c_z, a_s * gain, 0.5 * a_s * gain / r, s_s * math.sqrt(gain)
        )
        return z_next


class UniPCStepper(NaiveStepper):
    """UniPC-bh2 of order 2 with the corrector on every step but the first, as diffusers' default."""

    def default_fn(self) -> StepFn:
        return unipc_step

    def reset(self) -> None:
        self.z_last: Tensor | None = None
        self.x_prev: Tensor | None = None
        self.x_prev2: Tensor | None = None

    def _order(self, i: int) -> int:
        p = min(2, i + 1)
        return min(p, self.steps - i) if self.steps < 15 else p

    @staticmethod
    def _bh2(h: float, r: float | None) -> tuple[float, float, list[float]]:
        """``(h_phi_1, B_h, rhos_c)`` of the bh2 variant; ``r`` is the ratio of the older interval (order 2)."""
        hh = -h
        h_phi_1 = math.expm1(hh)
        b_h = h_phi_1
        b1 = (h_phi_1 / hh - 1) / b_h
        b2 = ((h_phi_1 / hh - 1) / hh - 0.5) * 2 / b_h
        if r is None:
            return h_phi_1, b_h, [0.5]
        # solve [[1, 1], [r, 1]] @ rho = [b1, b2]
        rho0 = (b1 - b2) / (1 - r)
        return h_phi_1, b_h, [rho0, b1 - rho0]

    def __call__(self, o, z, i):
        a, s = self.a, self.s
        corr = (0.0, 0.0, 0.0, 0.0)
        if i > 0:
            p = self._order(i - 1)
            h = self.lam(i) - self.lam(i - 1)
            r = (self.lam(i - 2) - self.lam(i - 1)) / h if p == 2 else None
            h_phi_1, b_h, rho_c = self._bh2(h, r)
            k = -a[i] * b_h
            # z_c = s_i/s_{i-1} z_last - a_i h_phi_1 x_{i-1} - a_i B_h (rho_c[-1] (x_i - x_{i-1}) + rho_c[0] D1)
            corr = (s[i] / s[i - 1], -a[i] * h_phi_1, k * rho_c[-1], k * rho_c[0] / r if p == 2 else 0.0)
        if s[i + 1] == 0:
            pred = (0.0, a[i + 1], 0.0)
        else:
            p = self._order(i)
            h = self.lam(i + 1) - self.lam(i)
            h_phi_1 = math.expm1(-h)
            pred = (s[i + 1] / s[i], -a[i + 1] * h_phi_1, 0.0)
            if p == 2:
                r = (self.lam(i - 1) - self.lam(i)) / h
                pred = (pred[0], pred[1], -a[i + 1] * h_phi_1 * 0.5 / r)
        x_prev2 = self.x_prev2 if i > 1 and self._order(i - 1) == 2 else None
        z_next, x0, z_c = self.fn(
            z, o, self.z_last if i > 0 else None, self.x_prev if i > 0 else None, x_prev2, corr, pred, a[i], s[i]
        )
        self.z_last, self.x_prev2, self.x_prev = z_c, self.x_prev, x0
        return z_next


NAIVE_STEPPERS: dict[str, type[NaiveStepper]] = {
    "ddim": DDIMStepper,
    "flow-euler": FlowEulerStepper,
    "ddpm": DDPMStepper,
    "euler-ancestral": EulerAncestralStepper,
    "sde-dpm++2m": SDEDPMpp2MStepper,
    "cfg-ddim": GuidedDDIMStepper,
    "dpm++2m": DPMpp2MStepper,
    "unipc": UniPCStepper,
}


def compile_step(fn: StepFn) -> StepFn:
    """``torch.compile`` of a pure step, called on flat views so one dynamic-shape graph serves every size."""
    compiled = torch.compile(fn, dynamic=True)

    def call(*args):
        shape = next(a.shape for a in args if isinstance(a, Tensor))
        flat = [a.reshape(-1) if isinstance(a, Tensor) else a for a in args]
        out = compiled(*flat)
        if isinstance(out, tuple):
            return tuple(t.view(shape) for t in out)
        return out.view(shape)

    return call


def make_stepper(family: str, alpha: np.ndarray, sigma: np.ndarray, compiled: bool = False) -> NaiveStepper:
    """The naive stepper of ``family``; with ``compiled``, its pure step under ``torch.compile``."""
    cls = NAIVE_STEPPERS[family]
    stepper = cls(alpha, sigma)
    if compiled:
        stepper.fn = compile_step(stepper.fn)
    return stepper
