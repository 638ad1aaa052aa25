"""Drop-in ``KDPM2DiscreteScheduler`` and ``KDPM2AncestralDiscreteScheduler``: k-diffusion's DPM-Solver-2 as
diffusers runs it, two ``step`` calls a step (see :mod:`._two_call`).

The first-order call is an Euler step from ``sigma`` to the geometric midpoint
``sigma_mid`` (saving the sample); the second-order call evaluates the slope there
and steps from the saved sample to the next sigma (ancestral: to ``sigma_down``, then
adds ``sigma_up`` times fresh noise). Every sigma is read from diffusers' own float32
tensors (``sigmas``, ``sigmas_interpol``, ``sigmas_up``, ``sigmas_down``) at the call
index diffusers uses, including its different midpoint index for the ancestral class.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers.schedulers import scheduling_k_dpm_2_ancestral_discrete as _kdpm2a
from diffusers.schedulers import scheduling_k_dpm_2_discrete as _kdpm2

from ..solvers.base import UndefinedStepError
from ._outputs import output_maker
from ._spec import StepSpec, X, Z, noise, promoted_dtype
from ._two_call import ScaledTwoCallMixin, input_scales
from .euler import ve_x0_coefs

__all__ = ["KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler"]
_FIELDS = ("prev_sample", "pred_original_sample")
_OUTPUT = output_maker(_kdpm2.KDPM2DiscreteSchedulerOutput, *_FIELDS)
_ANCESTRAL_OUTPUT = output_maker(_kdpm2a.KDPM2AncestralDiscreteSchedulerOutput, *_FIELDS)
_PREDICTIONS = ("epsilon", "v_prediction")


def _host(t: torch.Tensor) -> np.ndarray:
    """A diffusers float32 schedule tensor as float64 host values (exactly its float32 values)."""
    return t.detach().to("cpu", torch.float32).to(torch.float64).numpy()


class _KDPM2Mixin(ScaledTwoCallMixin):
    """What both classes share: the schedule's host copies, the checks and the first-order call."""

    _ANCESTRAL = False

    def _ff_check_config(self) -> None:
        self._ff_require_prediction(_PREDICTIONS, diffusers_too=True)

    def _ff_prepare(self) -> None:
        self._ff_sig = _host(self.sigmas)
        self._ff_mid = _host(self.sigmas_interpol)
        n = len(self._ff_host_timesteps)
        # diffusers' second-order call scales by sigmas_interpol[index] (ancestral: [index - 1], Python's
        # [-1] at index 0, where no second-order call falls).
        mid = self.sigmas_interpol[:n] if not self._ANCESTRAL else torch.cat([self.sigmas_interpol[-1:],
                                                                              self.sigmas_interpol[: n - 1]])
        self._ff_in_scales = (input_scales(self.sigmas[:n]), input_scales(mid))

    def _ff_sigma(self, i: int, table: np.ndarray, name: str) -> float:
        value = float(table[i])
        if value == 0.0:
            raise UndefinedStepError(f"call {i} divides by {name} = 0 (diffusers returns NaN or inf there)")
        return value

    def _ff_first_spec(self, i: int, k: int, mid_index: int) -> StepSpec:
        """Euler from ``sigmas[i]`` to ``sigmas_interpol[mid_index]``, the x0 at ``sigmas[i]``."""
        sigma = self._ff_sigma(i, self._ff_sig, "sigma")
        xz, xo = ve_x0_coefs(self.config.prediction_type, sigma)
        update = Z(k) + (Z(k) - X(k)) * ((float(self._ff_mid[mid_index]) - sigma) / sigma)
        return StepSpec(xz, xo, update)

    def _ff_second(self, i: int, k: int, mid_index: int) -> tuple[float, float, Any]:
        """``(xz, xo, slope)`` of a second-order call: the x0 and the slope at ``sigmas_interpol[mid_index]``."""
        mid = self._ff_sigma(mid_index, self._ff_mid, "sigma_interpol")
        xz, xo = ve_x0_coefs(self.config.prediction_type, mid)
        return xz, xo, (Z(k) - X(k)) / mid


class KDPM2DiscreteScheduler(_KDPM2Mixin, _kdpm2.KDPM2DiscreteScheduler):
    """diffusers' ``KDPM2DiscreteScheduler`` whose ``step`` is one fused fastflow call.

    Prediction types ``epsilon`` and ``v_prediction`` (diffusers implements no other);
    Karras/exponential/beta sigmas and every timestep spacing (diffusers' own schedule).
    """

    def _ff_spec(self, i: int, k: int, variant: Any) -> StepSpec:
        if k % 2 == 0:  # the loop's first call is first-order
            return self._ff_first_spec(i, k, i + 1)
        sigma, s_next = float(self._ff_sig[i - 1]), float(self._ff_sig[i])
        xz, xo, slope = self._ff_second(i, k, i)
        return StepSpec(xz, xo, Z(k - 1) + slope * (s_next - sigma))

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> _kdpm2.KDPM2DiscreteSchedulerOutput | tuple:
        """diffusers' KDPM2 step (same arguments and outputs), in one backend call."""
        if (done := self._ff_lane_step(model_output, timestep, sample)) is not None:
            return done if not return_dict else _OUTPUT(*done)
        prev, pred = self._ff_step(
            model_output, timestep, sample, state_dtype=promoted_dtype(sample, model_output), lane=True
        )
        if not return_dict:
            return (prev, pred)
        return _OUTPUT(prev, pred)


class KDPM2AncestralDiscreteScheduler(_KDPM2Mixin, _kdpm2a.KDPM2AncestralDiscreteScheduler):
    """diffusers' ``KDPM2AncestralDiscreteScheduler`` whose ``step`` is one fused fastflow call.

    The second-order call adds ``sigma_up`` times noise: fastflow's in-kernel noise by
    default, or with a ``generator`` the tensor diffusers draws (model output's dtype).
    """

    _ANCESTRAL = True

    def _ff_prepare(self) -> None:
        super()._ff_prepare()
        self._ff_up = _host(self.sigmas_up)
        self._ff_down = _host(self.sigmas_down)

    def _ff_spec(self, i: int, k: int, variant: Any) -> StepSpec:
        if k % 2 == 0:
            return self._ff_first_spec(i, k, i)
        sigma, up, down = float(self._ff_sig[i - 1]), float(self._ff_up[i - 1]), float(self._ff_down[i - 1])
        xz, xo, slope = self._ff_second(i, k, i - 1)
        update = Z(k - 1) + slope * (down - sigma)
        return StepSpec(xz, xo, update + noise(up) if up else update, draws=True)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> _kdpm2a.KDPM2AncestralDiscreteSchedulerOutput | tuple:
        """diffusers' KDPM2-ancestral step (same arguments and outputs), in one backend call."""
        if generator is None and (done := self._ff_lane_step(model_output, timestep, sample)) is not None:
            return done if not return_dict else _ANCESTRAL_OUTPUT(*done)
        prev, pred = self._ff_step(
            model_output, timestep, sample, draw=self._ff_draw(generator, model_output),
            state_dtype=promoted_dtype(sample, model_output), lane=generator is None,
        )
        if not return_dict:
            return (prev, pred)
        return _ANCESTRAL_OUTPUT(prev, pred)
