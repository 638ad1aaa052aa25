"""Drop-in ``HeunDiscreteScheduler``: diffusers' two-call Heun step as fused stages.

diffusers runs Heun as alternating ``step`` calls on doubled timesteps: a
first-order call (Euler predictor from ``sigma`` to ``sigma_next``, state saved)
and a second-order call at ``sigma_next`` that averages the two slopes and steps
again from the saved sample. Each call is one stage here; the second reads the
first's sample and data prediction from history, so nothing is kept on the host
between calls and no device value is read.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.schedulers import scheduling_heun_discrete as _heun

from ._base import FastflowScheduler, StepSpec, X, Z, output_maker, promoted_dtype

__all__ = ["HeunDiscreteScheduler", "heun_specs"]
_OUTPUT = output_maker(_heun.HeunDiscreteSchedulerOutput, "prev_sample", "pred_original_sample")

_PREDICTIONS = ("epsilon", "v_prediction", "sample")


def _x0_coefs(prediction: str, sigma: float) -> tuple[float, float]:
    """diffusers' Heun ``x0 = xz * sample + xo * model_output`` at noise level ``sigma`` (VE sample)."""
    if prediction == "epsilon":
        return 1.0, -sigma
    if prediction == "v_prediction":
        return 1.0 / (sigma**2 + 1), -sigma / (sigma**2 + 1) ** 0.5
    return 0.0, 1.0


def heun_specs(sigmas: Any, n_calls: int, start: int, prediction: str) -> tuple[list[StepSpec], list[bool]]:
    """Specs of calls ``start .. n_calls-1`` on diffusers' doubled ``sigmas``, and which calls are first-order.

    Like diffusers, the first call taken is first-order whatever its index.
    """
    specs, first_flags = [], []
    first = True
    prev = (0, 1.0, 0.0)  # (stage, sigma, dt) of the pending first-order call
    for i in range(start, n_calls):
        k = i - start
        first_flags.append(first)
        if first:
            sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
            xz, xo = _x0_coefs(prediction, sigma)
            dt = sigma_next - sigma
            update = Z(k) + (Z(k) - X(k)) * (dt / sigma)
            prev = (k, sigma, dt)
        else:
            kp, sigma_p, dt = prev
            sigma_next = float(sigmas[i])
            xz, xo = _x0_coefs(prediction, sigma_next)
            slope = (Z(kp) - X(kp)) / sigma_p + (Z(k) - X(k)) / sigma_next
            update = Z(kp) + slope * (0.5 * dt)
        specs.append(StepSpec(xz, xo, update))
        first = not first
    return specs, first_flags


class HeunDiscreteScheduler(FastflowScheduler, _heun.HeunDiscreteScheduler):
    """diffusers' ``HeunDiscreteScheduler`` whose ``step`` is one fused fastflow call.

    Prediction types ``epsilon``, ``v_prediction``, ``sample``; ``clip_sample``;
    Karras/exponential/beta sigmas and every timestep spacing (diffusers' own schedule).
    """

    _ff_returns_raw_x0 = True

    def _ff_check_config(self) -> None:
        if self.config.prediction_type not in _PREDICTIONS:
            raise NotImplementedError(
                f"prediction_type={self.config.prediction_type!r} is not supported by HeunDiscreteScheduler; "
                f"valid: {', '.join(_PREDICTIONS)}"
            )

    def _ff_prepare(self) -> None:
        sig = self.sigmas.detach().to("cpu", torch.float32)
        self._ff_sigmas = sig.to(torch.float64).numpy()
        # diffusers' own formula in float32, element by element, so the scaled input is bit-identical.
        self._ff_in_scale = ((sig[: len(self._ff_host_timesteps)] ** 2 + 1) ** 0.5).tolist()
        self._ff_first: dict[int, list[bool]] = {}

    def _ff_clip(self) -> float | None:
        return float(self.config.clip_sample_range) if self.config.clip_sample else None

    def _ff_specs(self, start: int, variant: Any) -> list[StepSpec]:
        specs, first = heun_specs(self._ff_sigmas, self._ff_num_steps(), start, self.config.prediction_type)
        self._ff_first[start] = first
        return specs

    @property
    def state_in_first_order(self) -> bool:
        """Whether the next ``step`` call is a first-order (predictor) call."""
        idx = self.step_index
        start = self._ff_loop_start
        flags = getattr(self, "_ff_first", {}).get(start)
        if idx is None or flags is None:
            return True
        k = idx - start
        return flags[k] if 0 <= k < len(flags) else True

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor) -> torch.Tensor:
        """diffusers' ``sample / sqrt(sigma^2 + 1)`` from a host scalar (no device read)."""
        if not self._ff_ready():
            self._ff_reset()
        idx = self._ff_index(timestep)
        return sample / self._ff_in_scale[idx]

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> _heun.HeunDiscreteSchedulerOutput | tuple:
        """diffusers' Heun step (same arguments and outputs), in one backend call."""
        prev, pred = self._ff_step(
            model_output, timestep, sample, state_dtype=promoted_dtype(sample, model_output)
        )
        if not return_dict:
            return (prev, pred)
        return _OUTPUT(prev, pred)
