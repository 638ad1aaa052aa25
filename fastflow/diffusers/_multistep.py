"""Shared host side of the multistep drop-ins (DPM-Solver multistep and singlestep, UniPC, DEIS).

They convert diffusers' model output to a data (or noise) prediction with the same
per-step coefficients, build their next-sample formulas from diffusers' float32
sigmas in float64, and apply dynamic thresholding as torch ops before the fused step.
A family supplies only its formulas (:meth:`MultistepScheduler._ff_updates`).

Noise-prediction algorithms (DPM-Solver's ``dpmsolver``, UniPC's ``predict_x0=False``,
DEIS) store diffusers' noise prediction: DEIS converts through x0, ``(z - alpha x0) /
sigma``, the others straight from the model output (:func:`noise_coefs`; on flow sigmas
the two differ for ``v_prediction``, and what such an algorithm thresholds is the x0
its noise implies). Without thresholding the noise prediction is linear in the sample
and the model output, so the kernel's ``x_hat`` is that prediction itself and each
stored one is a single tensor (orders 1 to 3 fit the history slots). With thresholding
it is ``(z - alpha * clip(x0)) / sigma``: ``x_hat`` is the clipped ``x0`` and each stored
prediction is two tensors, the sample and ``x_hat`` (orders 1 and 2).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from ..solvers.base import Lin, eps_of
from ._base import FastflowScheduler
from ._spec import StepSpec, X, Z
from .ddim import thresholded_x0

__all__ = [
    "MultistepScheduler", "Undefined", "alpha_sigma", "eps_coefs", "exp_lagrange_integrals", "float32_step_length",
    "half_logsnr", "noise_coefs", "stored_prediction", "x0_coefs", "x0_of_noise_coefs",
]


class Undefined(NamedTuple):
    """In a family's list of next-sample formulas, a step diffusers leaves undefined (it returns NaN or fails there),
    and why: the step raises that when it runs, so a loop that stops before it (a pipeline's ``denoising_end``, or
    an img2img loop's end) runs as diffusers' does."""

    why: str


def exp_lagrange_integrals(nodes: Sequence[float], lo: float, hi: float, rate: float) -> list[float]:
    """For each node: the integral over ``[lo, hi]`` of ``l_j(lambda) e^{rate lambda}``, ``l_j`` the Lagrange basis
    polynomial that is 1 at node ``j`` and 0 at the others (``rate`` nonzero). In ``u = lambda - lo`` the integral of
    ``P(u) e^{rate u}`` is ``e^{rate u}`` times ``sum_d (-1)^d P^(d)(u) / rate^(d + 1)``. Plain floats: a schedule
    evaluates this a few times a step, and numpy's polynomial objects took a millisecond a call."""
    if len(set(nodes)) < len(nodes):
        raise ValueError(f"the interpolation nodes {list(nodes)} repeat: their Lagrange basis is undefined")
    u = [float(v) - lo for v in nodes]
    width = hi - lo
    grow = math.exp(rate * width)
    out = []
    for j, uj in enumerate(u):
        coefs = [1.0]  # l_j's coefficients, lowest degree first
        for m, um in enumerate(u):
            if m != j:
                d = uj - um
                coefs = [((coefs[p - 1] if p else 0.0) - (coefs[p] * um if p < len(coefs) else 0.0)) / d
                         for p in range(len(coefs) + 1)]
        at_width = at_zero = 0.0
        scale = 1.0 / rate
        for _ in range(len(u)):  # the derivatives of P, each over one more power of rate, signs alternating
            at_width += scale * sum(c * width**p for p, c in enumerate(coefs))
            at_zero += scale * coefs[0]
            coefs = [p * c for p, c in enumerate(coefs)][1:] or [0.0]
            scale = -scale / rate
        out.append(math.exp(rate * lo) * (grow * at_width - at_zero))
    return out


def alpha_sigma(sigmas: Sequence[float] | np.ndarray | torch.Tensor, flow: bool, ve: bool = False) -> tuple[Any, Any]:
    """diffusers' ``_sigma_to_alpha_sigma_t`` in its order of operations: VP (``alpha^2 + sigma^2 = 1``), flow
    (``a + s = 1``) or, with ``ve``, variance exploding (``alpha = 1``: EDM's inputs are scaled before the model).
    A torch tensor is evaluated in its own dtype (a 0-d float32 one rounds as diffusers' step does); anything else
    in float64."""
    s = sigmas if isinstance(sigmas, torch.Tensor) else np.asarray(sigmas, dtype=np.float64)
    if ve:
        return (torch.ones_like(s) if isinstance(s, torch.Tensor) else np.ones_like(s)), s
    if flow:
        return 1 - s, s
    a = 1 / ((s**2 + 1) ** 0.5)
    return a, s * a


def x0_coefs(prediction: str, alpha: float, sigma: float, sigma_ve: float) -> tuple[float, float]:
    """diffusers' data prediction ``x0 = az * sample + ao * model_output`` for a multistep scheduler.

    ``flow_prediction`` uses the raw diffusers sigma, as diffusers does, whatever the schedule.
    """
    if prediction == "epsilon":
        return 1.0 / alpha, -sigma / alpha
    if prediction == "sample":
        return 0.0, 1.0
    if prediction == "v_prediction":
        return alpha, -sigma
    if prediction == "flow_prediction":
        return 1.0, -sigma_ve
    raise ValueError(f"prediction_type {prediction!r} is not supported")


def eps_coefs(prediction: str, alpha: float, sigma: float, sigma_ve: float) -> tuple[float, float]:
    """diffusers' noise prediction ``eps = ez * sample + eo * model_output``: ``(sample - alpha * x0) / sigma`` of
    :func:`x0_coefs` (an epsilon model's output exactly, not through its x0). For ``flow_prediction`` diffusers'
    DEIS divides by the raw sigma its x0 conversion read (the same as ``sigma`` on flow sigmas, not on others)."""
    if prediction == "epsilon":
        return 0.0, 1.0
    az, ao = x0_coefs(prediction, alpha, sigma, sigma_ve)
    divisor = sigma_ve if prediction == "flow_prediction" else sigma
    return (1.0 - alpha * az) / divisor, -alpha * ao / divisor


def noise_coefs(prediction: str, alpha: float, sigma: float, sigma_ve: float) -> tuple[float, float]:
    """diffusers' noise prediction taken straight from the model output, as DPM-Solver's ``dpmsolver`` and UniPC's
    ``predict_x0=False`` convert it: ``eps = ez * sample + eo * model_output``."""
    if prediction == "epsilon":
        return 0.0, 1.0
    if prediction == "sample":
        return 1.0 / sigma, -alpha / sigma
    if prediction == "v_prediction":
        return sigma, alpha
    raise ValueError(f"prediction_type {prediction!r} has no noise conversion in diffusers")


def x0_of_noise_coefs(prediction: str, alpha: float, sigma: float, sigma_ve: float) -> tuple[float, float]:
    """The x0 a :func:`noise_coefs` noise prediction implies, ``(sample - sigma * eps) / alpha`` (what diffusers
    thresholds for those algorithms)."""
    ez, eo = noise_coefs(prediction, alpha, sigma, sigma_ve)
    return (1.0 - sigma * ez) / alpha, -sigma * eo / alpha


def half_logsnr(
    sigmas: Sequence[float], flow: bool, start: int = 0, ve: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """diffusers' sigmas in float64 with their ``alpha``, ``sigma`` and ``lambda = log(alpha / sigma)``.

    Raises where a loop from step ``start`` meets a flow sigma past 1 (``alpha < 0``).
    """
    sig = np.asarray(sigmas, dtype=np.float64)
    if flow and sig[start:].size and sig[start:].max() > 1.0:
        raise ValueError(
            f"use_flow_sigmas=True, but this schedule's sigmas reach {sig[start:].max():.6g}: a flow sigma lies in "
            "[0, 1] (alpha = 1 - sigma), and past 1 diffusers' steps return NaN. The Karras, exponential or beta "
            "sigmas of this scheduler are variance-exploding values; do not combine them with use_flow_sigmas"
        )
    a, s = alpha_sigma(sig, flow, ve)
    with np.errstate(divide="ignore", invalid="ignore"):  # sigma 0 (lambda inf); flow sigmas past 1 before a start
        lam = np.log(a) - np.log(s)
    return sig, a, s, lam


def float32_step_length(sigma: float, sigma_next: float, flow: bool, ve: bool = False) -> float:
    """A step's ``h = lambda_next - lambda`` as diffusers' float32 arithmetic gets it (0-d tensor ops, in its
    order): between sigmas an ulp apart it can be 0 or negative where the float64 one is not, and diffusers' step
    then follows that (a 0 / 0, or the square root of a negative variance)."""

    def lam(value: float) -> torch.Tensor:
        alpha, sigma_t = alpha_sigma(torch.tensor(value, dtype=torch.float32), flow, ve)
        return torch.log(alpha) - torch.log(sigma_t)

    return float(lam(sigma_next) - lam(sigma))


def stored_prediction(
    start: int, a: np.ndarray, s: np.ndarray, data: bool, x_is_eps: bool = False
) -> Callable[[int], Lin]:
    """The model output of step ``i`` as diffusers stores it: x0 (``data``) or the noise it implies, which is
    ``x_hat`` itself with ``x_is_eps`` (see the module docstring)."""

    def m(i: int) -> Lin:
        k = i - start
        return X(k) if data or x_is_eps else eps_of(k, a[i], s[i])

    return m


class MultistepScheduler(FastflowScheduler):
    """A multistep drop-in: per-step x0 conversion, formulas built once per loop start, optional thresholding."""

    _ff_draws = False  # whether each step draws noise
    _ff_stores_noise = False  # whether diffusers stores noise predictions (families set it from the config)
    _ff_noise_via_x0 = False  # whether it converts them through x0 (DEIS) rather than from the output directly

    def _ff_check_config(self) -> None:
        """The checks every multistep family ends with: solver order and prediction type."""
        cfg = self.config
        name = type(self).__name__
        if cfg.solver_order not in (1, 2, 3):
            raise NotImplementedError(f"solver_order={cfg.solver_order} is not supported (1, 2 or 3)")
        if cfg.prediction_type not in ("epsilon", "sample", "v_prediction", "flow_prediction"):
            raise NotImplementedError(f"prediction_type={cfg.prediction_type!r} is not supported by {name}")

    @property
    def _ff_thresholding(self) -> bool:
        return bool(self.config.thresholding)

    @property
    def _ff_x_is_eps(self) -> bool:
        """Whether the kernel's ``x_hat`` is diffusers' stored noise prediction (see the module docstring)."""
        return self._ff_stores_noise and not self._ff_thresholding

    def _ff_updates(self, start: int) -> list[Lin | Undefined]:
        """Next-sample formulas of steps ``start .. n-1`` from ``self._ff_sigmas``: :class:`Undefined` for a step
        diffusers cannot run. Raises for a loop it cannot build at all (an unsupported combination of options, or
        flow sigmas past 1 from its first step)."""
        raise NotImplementedError

    def _ff_prepare(self) -> None:
        self._ff_thresholding_on = self._ff_thresholding
        sig = self._ff_diffusers_sigmas()
        self._ff_sigmas = sig
        self._ff_conv = self._ff_conversions(sig)
        if self._ff_x_is_eps:
            noise = eps_coefs if self._ff_noise_via_x0 else noise_coefs
            self._ff_kernel_conv = self._ff_per_step(sig, noise)
        else:
            self._ff_kernel_conv = self._ff_conv
        if self.num_inference_steps is not None:
            with contextlib.suppress(ValueError):  # a loop from step 0 is undefined: its first step raises
                self._ff_host_cache["specs0"] = self._ff_build(0)

    def _ff_diffusers_sigmas(self) -> np.ndarray:
        """diffusers' sigmas of this schedule in float64: step ``i`` goes from sigma ``i`` to ``i + 1``."""
        return self.sigmas.detach().to("cpu", torch.float64).numpy()

    def _ff_conversions(self, sig: np.ndarray) -> list[tuple[float, float]]:
        """Each step's data prediction ``(az, ao)`` at diffusers' sigmas ``sig``: :func:`x0_coefs`, or for an
        algorithm that takes its noise prediction straight from the output, the x0 that implies."""
        direct_noise = self._ff_stores_noise and not self._ff_noise_via_x0
        return self._ff_per_step(sig, x0_of_noise_coefs if direct_noise else x0_coefs)

    def _ff_per_step(self, sig: np.ndarray, coefs: Callable) -> list[tuple[float, float]]:
        """``coefs(prediction_type, alpha, sigma, sigma_ve)`` at each step's sigma, as Python floats, not numpy's:
        step reads them (thresholding), and torch.compile traces numpy scalars as tensors, so a branch on one
        would break the graph."""
        cfg = self.config
        a, s = alpha_sigma(sig, cfg.use_flow_sigmas)
        return [
            tuple(float(c) for c in coefs(cfg.prediction_type, a[i], s[i], sig[i])) for i in range(len(sig) - 1)
        ]

    def _ff_cached_updates(self, start: int) -> list[Lin | Undefined]:
        """:meth:`_ff_updates` of a loop from ``start``, built once per schedule (SA-Solver's take milliseconds a
        step)."""
        found = self._ff_host_cache.get(("updates", start))
        if found is None:
            found = self._ff_host_cache["updates", start] = self._ff_updates(start)
        return found

    def _ff_build(self, start: int) -> list[StepSpec]:
        specs = []
        for k, u in enumerate(self._ff_cached_updates(start)):
            if isinstance(u, Undefined):
                specs.append(StepSpec(0.0, 1.0, Z(k), error=u.why))
                continue
            xz, xo = (0.0, 1.0) if self._ff_thresholding else self._ff_kernel_conv[start + k]
            spec = StepSpec(xz, xo, u, draws=self._ff_draws)
            error = self._ff_finiteness_error(spec, start + k)
            specs.append(spec if error is None else StepSpec(0.0, 1.0, Z(k), error=error))
        return specs

    def _ff_multistep_step(
        self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, index: int | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """The body of every multistep ``step``: diffusers' check, the step's index (``index``: the caller
        already asked for it), the thresholded x0 where thresholding is on, one fused call (``kwargs``: noise,
        dtypes and ``lane``, see :meth:`_ff_step`); returns the next sample."""
        if index is None:
            index = self._ff_scheduled_index(timestep)
        prev, _ = self._ff_step(
            model_output, timestep, sample, want_pred=False,
            kernel_output=self._ff_thresholded(index, model_output, sample) if self._ff_thresholding_on else None,
            index=index, **kwargs,
        )
        return prev

    def _ff_thresholded(self, idx: int, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor | None:
        """diffusers' thresholded x0 of step ``idx`` (None when thresholding is off)."""
        if not self._ff_thresholding_on:  # set by _ff_prepare, which ran when idx was found; read every step
            return None
        return thresholded_x0(self._ff_conv[idx], model_output, sample, self.config)

    def _ff_specs(self, start: int, variant: Any) -> list[StepSpec]:
        if start == 0 and "specs0" in self._ff_host_cache:
            return self._ff_host_cache["specs0"]
        return self._ff_build(start)
