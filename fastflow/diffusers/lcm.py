"""LCMScheduler drop-in: consistency-model boundary scalings folded into the step plan.

Without clipping the kernel's ``x_hat`` is LCM's ``denoised`` itself
(``c_out * x0 + c_skip * sample`` is linear in ``(sample, o)``). With
``clip_sample`` the kernel clips ``x0`` and the returned ``denoised`` is formed by
one extra op.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers.schedulers import scheduling_lcm

from ._outputs import output_maker
from ._spec import StepSpec, X, Z, noise, promoted_dtype
from .ddim import _VPMixin

__all__ = ["LCMScheduler"]
_OUTPUT = output_maker(scheduling_lcm.LCMSchedulerOutput, "prev_sample", "denoised")


class LCMScheduler(_VPMixin, scheduling_lcm.LCMScheduler):
    """diffusers' ``LCMScheduler`` whose ``step`` is one fused fastflow call (returns ``denoised`` too)."""

    # diffusers' step sets this constant of its boundary scalings (c_skip, c_out below use its square, 0.25)
    sigma_data = 0.5
    _ff_timestep_addressed = False  # diffusers' LCM counts steps like Euler
    _ff_mixed_addressed = True  # and reads alphas_cumprod at the timestep's value

    def _ff_spec(self, i: int, k: int, variant: Any) -> StepSpec:
        cfg = self.config
        ts = self._ff_host_timesteps
        t = int(ts[i])
        prev = int(ts[i + 1]) if i + 1 < len(ts) else t
        a_t = self._ff_alpha(t)
        a_p = self._ff_alpha(prev) if prev >= 0 else float(self.final_alpha_cumprod)
        scaled = t * cfg.timestep_scaling
        c_skip = 0.25 / (scaled**2 + 0.25)
        c_out = scaled / math.sqrt(scaled**2 + 0.25)
        xz, xo = self._ff_conversion(a_t)
        if self._ff_clip() is None and not self._ff_thresholding:
            denoised, pred = X(k), None
            xz, xo = c_out * xz + c_skip, c_out * xo
        else:
            denoised = X(k) * c_out + Z(k) * c_skip
            pred = denoised
        last = i == self.num_inference_steps - 1
        update = denoised if last else denoised * math.sqrt(a_p) + noise(math.sqrt(1.0 - a_p))
        return StepSpec(xz, xo, update, pred=pred, draws=not last)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> scheduling_lcm.LCMSchedulerOutput | tuple:
        """diffusers' LCM step (same arguments and outputs), in one backend call."""
        if generator is None and (done := self._ff_lane_step(model_output, timestep, sample)) is not None:
            return done if not return_dict else _OUTPUT(*done)
        self._ff_require_timesteps()
        dtype = promoted_dtype(sample, model_output)
        draw = self._ff_draw(generator, model_output, dtype)
        idx = self._ff_peek_index(timestep)
        prev, denoised = self._ff_step(
            model_output, timestep, sample, draw=draw, state_dtype=dtype,
            kernel_output=self._ff_thresholded(idx, model_output, sample),
            index=idx,
            lane=generator is None,
        )
        if not return_dict:
            return (prev, denoised)
        return _OUTPUT(prev, denoised)
