"""Euler-family drop-ins (k-diffusion style, on diffusers' own float32 sigmas).

The sample lives in the variance-exploding parameterization at noise level
``sigma``. diffusers' Euler applies churn *inside* ``step``: the model saw the
un-churned sample, then ``sample + c * noise`` is what the update and the
``x0`` conversion use. With ``S = Z + c N`` these are still linear in
``(z, o, N)``; the kernel's ``x_hat`` leaves out the noise part, which is added
back (one extra op, churned steps only) to the returned ``pred_original_sample``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from diffusers.schedulers import scheduling_edm_euler, scheduling_euler_ancestral_discrete, scheduling_euler_discrete

from ._base import FastflowScheduler
from ._outputs import output_maker
from ._spec import Lin, StepSpec, X, Z, noise

__all__ = ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "EDMEulerScheduler", "ve_x0_coefs"]

_SQRT2_M1 = 2**0.5 - 1
_NO_CHURN = (0.0, 0.0, float("inf"), 1.0)  # (s_churn, s_tmin, s_tmax, s_noise) of a step without churn
_EDM_DEFAULT = (_NO_CHURN, False)  # EDM Euler's plan variant (churn, x0 given) of a call with the defaults
_FIELDS = ("prev_sample", "pred_original_sample")
_EULER_OUTPUT = output_maker(scheduling_euler_discrete.EulerDiscreteSchedulerOutput, *_FIELDS)
_ANCESTRAL_OUTPUT = output_maker(scheduling_euler_ancestral_discrete.EulerAncestralDiscreteSchedulerOutput, *_FIELDS)
_EDM_OUTPUT = output_maker(scheduling_edm_euler.EDMEulerSchedulerOutput, *_FIELDS)


def _upcast(model_output: torch.Tensor) -> torch.dtype:
    """The dtype diffusers' Euler steps compute in: the sample upcast to float32, promoted with the model output
    (float64 for a float64 output, so the prediction field is float64 too)."""
    return torch.float64 if model_output.dtype is torch.float64 else torch.float32


def ve_x0_coefs(prediction: str, sigma: float, sigma_hat: float | None = None) -> tuple[float, float]:
    """diffusers' ``x0 = xz * sample + xo * model_output`` of a variance-exploding sample at ``sigma``
    (``sigma_hat``, the churned level, for epsilon; default ``sigma``); a data prediction is ``x0`` itself."""
    if prediction == "epsilon":
        return 1.0, -(sigma if sigma_hat is None else sigma_hat)
    if prediction == "v_prediction":
        return 1.0 / (sigma**2 + 1), -sigma / math.sqrt(sigma**2 + 1)
    return 0.0, 1.0


class _SigmaMixin(FastflowScheduler):
    """Host copies of diffusers' float32 ``sigmas`` and per-step model-input scales."""

    _ff_start_dependent = False

    def _ff_prepare(self) -> None:
        sig = self.sigmas.detach().to("cpu", torch.float32)
        self._ff_sig32 = sig
        self._ff_sig = sig.to(torch.float64).numpy()
        # diffusers' own scalar formula on its float32 sigma, so the scaled input is bit-identical.
        self._ff_in_scale = [self._ff_input_scale(sig[i]) for i in range(len(sig) - 1)]

    def _ff_input_scale(self, sigma: torch.Tensor) -> float:
        return 1.0

    def _ff_num_steps(self) -> int:
        return len(self._ff_sig) - 1

    def _ff_gamma(self, i: int, variant: Any) -> tuple[float, float, float, bool]:
        """``(sigma, sigma_hat, churn noise scale, churned)`` of step ``i``.

        ``variant = (s_churn, s_tmin, s_tmax, s_noise)``; a churned step draws noise in
        diffusers even when ``s_noise = 0``. A negative ``s_churn`` churns nothing but, as in
        diffusers, steps from ``sigma_hat = sigma (1 + gamma)`` below sigma.
        """
        s_churn, s_tmin, s_tmax, s_noise = variant
        sig = float(self._ff_sig[i])
        gamma = min(s_churn / (len(self._ff_sig) - 1), _SQRT2_M1) if s_tmin <= sig <= s_tmax else 0.0
        if gamma == 0:
            return sig, sig, 0.0, False
        s_hat = float(np.float32(sig) * np.float32(gamma + 1))  # diffusers multiplies in float32
        if gamma < 0:
            return sig, s_hat, 0.0, False
        return sig, s_hat, s_noise * math.sqrt(s_hat**2 - sig**2), True

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor) -> torch.Tensor:
        """diffusers' input scaling of the current step, from a host scalar (no device read)."""
        idx = self._ff_peek_index(timestep)
        self.is_scale_input_called = True
        return self._ff_apply_input_scale(sample, idx)

    def _ff_apply_input_scale(self, sample: torch.Tensor, idx: int) -> torch.Tensor:
        return sample

    @staticmethod
    def _ff_churn_variant(s_churn: float, s_tmin: float, s_tmax: float, s_noise: float) -> tuple:
        """The plan variant of a step's churn arguments. Without churn (``s_churn == 0``) the others change
        nothing: the default variant, compiled in set_timesteps (and no tuple made per call)."""
        if s_churn == 0:
            return _NO_CHURN
        return (float(s_churn), float(s_tmin), float(s_tmax), float(s_noise))

    def _ff_euler_spec(self, k: int, gamma: tuple[float, float, float, bool], s_next: float, xz: float, xo: float,
                       given_x0: bool = False) -> StepSpec:
        """diffusers' churned Euler: ``S = z + c N``, ``x0 = xz S + xo o``, next ``S + (S - x0) dt / s_hat``."""
        _, s_hat, c, churned_step = gamma
        churned = Z(k) + noise(c) if c else Z(k)
        x0 = X(k) if given_x0 or not c else X(k) + noise(xz * c)
        update = churned + (churned - x0) * ((s_next - s_hat) / s_hat)
        pred: Lin | None = x0 if (c and xz and not given_x0) else None
        return StepSpec(xz, xo, update, pred=pred, draws=churned_step)


class _VEInputMixin(_SigmaMixin):
    """diffusers' ``sample / sqrt(sigma^2 + 1)`` model input and x0 conversion of a variance-exploding sample."""

    def _ff_input_scale(self, sigma: torch.Tensor) -> float:
        return float((sigma**2 + 1) ** 0.5)

    def _ff_apply_input_scale(self, sample: torch.Tensor, idx: int) -> torch.Tensor:
        return sample / self._ff_in_scale[idx]

    def _ff_x0_coefs(self, sigma: float, sigma_hat: float) -> tuple[float, float]:
        """``x0 = xz * sample + xo * model_output`` at ``sigma`` (``sigma_hat`` after churn, for epsilon)."""
        return ve_x0_coefs(self.config.prediction_type, sigma, sigma_hat)


class EulerDiscreteScheduler(_VEInputMixin, scheduling_euler_discrete.EulerDiscreteScheduler):
    """diffusers' ``EulerDiscreteScheduler`` whose ``step`` is one fused fastflow call.

    All sigma options (Karras/exponential/beta sigmas, ``interpolation_type``,
    ``final_sigmas_type``, ``timestep_type``, custom ``timesteps``/``sigmas``) are
    diffusers' own computation. Churn parameters are step arguments there; each
    distinct set compiles a plan once per ``set_timesteps``.
    """

    _ff_default_variant = _NO_CHURN
    _ff_returns_raw_x0 = True

    _PREDICTIONS = ("epsilon", "v_prediction", "sample", "original_sample")

    def _ff_check_config(self) -> None:
        self._ff_require_prediction(self._PREDICTIONS)

    def _ff_spec(self, i: int, k: int, variant: Any) -> StepSpec:
        gamma = self._ff_gamma(i, variant)
        sig, s_hat = gamma[0], gamma[1]
        xz, xo = self._ff_x0_coefs(sig, s_hat)
        return self._ff_euler_spec(k, gamma, float(self._ff_sig[i + 1]), xz, xo)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> scheduling_euler_discrete.EulerDiscreteSchedulerOutput | tuple:
        """diffusers' Euler step (same arguments and outputs), in one backend call."""
        self._ff_check_timestep(timestep)
        variant = self._ff_churn_variant(s_churn, s_tmin, s_tmax, s_noise)
        default = generator is None and variant is _NO_CHURN
        if default:
            done = self._ff_lane_step(model_output, timestep, sample)
            if done is not None:
                return done if not return_dict else _EULER_OUTPUT(*done)
        prev, pred = self._ff_step(
            model_output, timestep, sample,
            variant=variant, draw=self._ff_draw(generator, model_output), state_dtype=_upcast(model_output),
            out_dtype=model_output.dtype, lane=default,
        )
        if not return_dict:
            return (prev, pred)
        return _EULER_OUTPUT(prev, pred)


class EulerAncestralDiscreteScheduler(
    _VEInputMixin, scheduling_euler_ancestral_discrete.EulerAncestralDiscreteScheduler
):
    """diffusers' ``EulerAncestralDiscreteScheduler`` whose ``step`` is one fused fastflow call.

    diffusers draws a noise tensor at every step (the last one with weight 0); with a
    ``generator`` the drop-in draws the same tensors in the same order.
    """

    _PREDICTIONS = ("epsilon", "v_prediction")

    def _ff_check_config(self) -> None:
        self._ff_require_prediction(self._PREDICTIONS, diffusers_too=True)

    def _ff_spec(self, i: int, k: int, variant: Any) -> StepSpec:
        s, s_to = self._ff_sig[i], self._ff_sig[i + 1]
        xz, xo = self._ff_x0_coefs(s, s)  # epsilon or v_prediction (checked)
        s_up = math.sqrt(max(0.0, s_to**2 * (s**2 - s_to**2) / s**2))
        s_down = math.sqrt(max(0.0, s_to**2 - s_up**2))
        update = Z(k) + (Z(k) - X(k)) * ((s_down - s) / s)
        if s_up > 0:
            update = update + noise(s_up)
        return StepSpec(xz, xo, update, draws=True)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> scheduling_euler_ancestral_discrete.EulerAncestralDiscreteSchedulerOutput | tuple:
        """diffusers' Euler-ancestral step (same arguments and outputs), in one backend call."""
        self._ff_check_timestep(timestep)
        if generator is None:
            done = self._ff_lane_step(model_output, timestep, sample)
            if done is not None:
                return done if not return_dict else _ANCESTRAL_OUTPUT(*done)
        prev, pred = self._ff_step(
            model_output, timestep, sample, draw=self._ff_draw(generator, model_output),
            state_dtype=_upcast(model_output), out_dtype=model_output.dtype, lane=generator is None,
        )
        if not return_dict:
            return (prev, pred)
        return _ANCESTRAL_OUTPUT(prev, pred)


class EDMEulerScheduler(_SigmaMixin, scheduling_edm_euler.EDMEulerScheduler):
    """diffusers' ``EDMEulerScheduler`` whose ``step`` is one fused fastflow call (EDM preconditioning folded in)."""

    _ff_default_variant = _EDM_DEFAULT

    _PREDICTIONS = ("epsilon", "v_prediction")

    def _ff_check_config(self) -> None:
        self._ff_require_prediction(self._PREDICTIONS)

    def _ff_input_scale(self, sigma: torch.Tensor) -> float:
        sd = self.config.sigma_data
        return float(1 / ((sigma**2 + sd**2) ** 0.5))

    def _ff_apply_input_scale(self, sample: torch.Tensor, idx: int) -> torch.Tensor:
        return sample * self._ff_in_scale[idx]

    def _ff_spec(self, i: int, k: int, variant: Any) -> StepSpec:
        churn, given_x0 = variant
        gamma = self._ff_gamma(i, churn)
        s_hat = gamma[1]
        if given_x0:
            xz, xo = 0.0, 1.0
        else:
            sd = self.config.sigma_data
            xz = sd**2 / (s_hat**2 + sd**2)
            xo = s_hat * sd / math.sqrt(s_hat**2 + sd**2)
            if self.config.prediction_type == "v_prediction":
                xo = -xo
        return self._ff_euler_spec(k, gamma, float(self._ff_sig[i + 1]), xz, xo, given_x0=given_x0)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        pred_original_sample: torch.Tensor | None = None,
    ) -> scheduling_edm_euler.EDMEulerSchedulerOutput | tuple:
        """diffusers' EDM Euler step (same arguments and outputs), in one backend call.

        A given ``pred_original_sample`` replaces the model's x0 (the kernel reads it
        in place of the model output).
        """
        self._ff_check_timestep(timestep)
        given = pred_original_sample is not None
        churn = self._ff_churn_variant(s_churn, s_tmin, s_tmax, s_noise)
        default = generator is None and churn is _NO_CHURN and not given
        if default:
            done = self._ff_lane_step(model_output, timestep, sample)
            if done is not None:
                return done if not return_dict else _EDM_OUTPUT(*done)
        prev, pred = self._ff_step(
            pred_original_sample if given else model_output, timestep, sample,
            variant=_EDM_DEFAULT if default else (churn, given),
            draw=self._ff_draw(generator, model_output), state_dtype=_upcast(model_output),
            out_dtype=model_output.dtype, want_pred=not given, lane=default,
        )
        if given:
            pred = pred_original_sample
        if not return_dict:
            return (prev, pred)
        return _EDM_OUTPUT(prev, pred)
