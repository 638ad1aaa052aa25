"""Drop-in ``HeunDiscreteScheduler``: diffusers' two-call Heun step as fused stages.

A first-order call (Euler predictor from ``sigma`` to ``sigma_next``, sample saved)
and a second-order call at ``sigma_next`` that averages the two slopes and steps
again from the saved sample (see :mod:`._two_call`).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.schedulers import scheduling_heun_discrete as _heun

from ._outputs import output_maker
from ._spec import StepSpec, X, Z, promoted_dtype
from ._two_call import ScaledTwoCallMixin, input_scales
from .euler import ve_x0_coefs

__all__ = ["HeunDiscreteScheduler", "heun_specs"]
_OUTPUT = output_maker(_heun.HeunDiscreteSchedulerOutput, "prev_sample", "pred_original_sample")

_PREDICTIONS = ("epsilon", "v_prediction", "sample")


def heun_specs(sigmas: Any, n_calls: int, start: int, prediction: str) -> list[StepSpec]:
    """Specs of calls ``start .. n_calls-1`` on diffusers' doubled ``sigmas``.

    Like diffusers, the first call taken is first-order whatever its index.
    """
    specs = []
    first = True
    prev = (0, 1.0, 0.0)  # (stage, sigma, dt) of the pending first-order call
    for i in range(start, n_calls):
        k = i - start
        if first:
            sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
            xz, xo = ve_x0_coefs(prediction, sigma)
            dt = sigma_next - sigma
            update = Z(k) + (Z(k) - X(k)) * (dt / sigma)
            prev = (k, sigma, dt)
        else:
            kp, sigma_p, dt = prev
            sigma_next = float(sigmas[i])
            xz, xo = ve_x0_coefs(prediction, sigma_next)
            slope = (Z(kp) - X(kp)) / sigma_p + (Z(k) - X(k)) / sigma_next
            update = Z(kp) + slope * (0.5 * dt)
        specs.append(StepSpec(xz, xo, update))
        first = not first
    return specs


class HeunDiscreteScheduler(ScaledTwoCallMixin, _heun.HeunDiscreteScheduler):
    """diffusers' ``HeunDiscreteScheduler`` whose ``step`` is one fused fastflow call.

    Prediction types ``epsilon``, ``v_prediction``, ``sample``; ``clip_sample``;
    Karras/exponential/beta sigmas and every timestep spacing (diffusers' own schedule).
    """

    _ff_returns_raw_x0 = True

    def _ff_check_config(self) -> None:
        self._ff_require_prediction(_PREDICTIONS)

    def _ff_prepare(self) -> None:
        sig = self.sigmas.detach().to("cpu", torch.float32)
        self._ff_sigmas = sig.to(torch.float64).numpy()
        scales = input_scales(sig[: len(self._ff_host_timesteps)])  # diffusers scales by sigmas[index] either way
        self._ff_in_scales = (scales, scales)

    def _ff_clip(self) -> float | None:
        return float(self.config.clip_sample_range) if self.config.clip_sample else None

    def _ff_specs(self, start: int, variant: Any) -> list[StepSpec]:
        return heun_specs(self._ff_sigmas, self._ff_num_steps(), start, self.config.prediction_type)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> _heun.HeunDiscreteSchedulerOutput | tuple:
        """diffusers' Heun step (same arguments and outputs), in one backend call."""
        if (done := self._ff_lane_step(model_output, timestep, sample)) is not None:
            return done if not return_dict else _OUTPUT(*done)
        prev, pred = self._ff_step(
            model_output, timestep, sample, state_dtype=promoted_dtype(sample, model_output), lane=True
        )
        if not return_dict:
            return (prev, pred)
        return _OUTPUT(prev, pred)
