"""TCDScheduler drop-in: trajectory consistency distillation's strategic stochastic sampling as one fused step.

TCD predicts the sample at an intermediate timestep ``s = floor((1 - gamma) t_prev)``
(``gamma`` is the step's ``eta``): ``pred_noised = sqrt(a_s) x0 + sqrt(1 - a_s) eps``,
linear in the sample and the model output, so it is the kernel's ``x_hat`` itself; the
step then re-noises it to ``t_prev`` with fresh noise (none at ``gamma = 0`` or on the
last step). diffusers' TCD step ignores ``clip_sample`` and ``thresholding`` (they are
config options it never applies), and so does the drop-in.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from diffusers.schedulers import scheduling_tcd

from ._outputs import output_maker
from ._spec import StepSpec, X, noise, promoted_dtype
from .ddim import _VPMixin, eps_coefs, x0_coefs

__all__ = ["TCDScheduler", "tcd_intermediate_timestep"]
_OUTPUT = output_maker(scheduling_tcd.TCDSchedulerOutput, "prev_sample", "pred_noised_sample")


def tcd_intermediate_timestep(gamma: float, t_prev: int) -> int:
    """diffusers' ``floor((1 - gamma) * t_prev)`` as it computes it: a Python float times an integer tensor, in
    float32 (the default dtype), then floored."""
    return int(np.floor(np.float32(1.0 - gamma) * np.float32(t_prev)))


class TCDScheduler(_VPMixin, scheduling_tcd.TCDScheduler):
    """diffusers' ``TCDScheduler`` whose ``step`` is one fused fastflow call (returns ``pred_noised_sample`` too).

    ``eta`` (TCD's gamma) is a step argument in diffusers; each distinct value compiles
    its own plan once per ``set_timesteps``.
    """

    _ff_timestep_addressed = False  # diffusers' TCD counts steps
    _ff_mixed_addressed = True  # and reads alphas_cumprod at the timestep's value
    _ff_default_variant = 0.3  # diffusers' default eta

    @property
    def _ff_thresholding(self) -> bool:
        return False  # diffusers' TCD step never thresholds

    def _ff_clip(self) -> float | None:
        return None  # nor clips

    def _ff_spec(self, i: int, k: int, variant: Any) -> StepSpec:
        gamma = variant
        ts = self._ff_host_timesteps
        t = int(ts[i])
        t_prev = int(ts[i + 1]) if i + 1 < len(ts) else 0
        s = tcd_intermediate_timestep(gamma, t_prev)
        a_t, a_prev, a_s = self._ff_alpha(t), self._ff_alpha(t_prev), self._ff_alpha(s)
        prediction = self.config.prediction_type
        xz, xo = x0_coefs(prediction, a_t)
        ez, eo = eps_coefs(prediction, a_t)
        ra, rb = math.sqrt(a_s), math.sqrt(1.0 - a_s)
        noisy = gamma > 0 and i != self.num_inference_steps - 1
        update = X(k)
        if noisy:
            update = X(k) * math.sqrt(a_prev / a_s) + noise(math.sqrt(1.0 - a_prev / a_s))
        return StepSpec(ra * xz + rb * ez, ra * xo + rb * eo, update, draws=noisy)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        eta: float = 0.3,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> scheduling_tcd.TCDSchedulerOutput | tuple:
        """diffusers' TCD step (same arguments and outputs), in one backend call."""
        # Mid-loop, a call without a generator at the eta the lane is bound for (checked then) runs from it.
        if generator is None and type(eta) is float and (
            done := self._ff_lane_step(model_output, timestep, sample, variant=eta)
        ) is not None:
            return done if not return_dict else _OUTPUT(*done)
        self._ff_require_timesteps()
        eta = float(eta)
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta (TCD's gamma) must be in [0, 1], got {eta}")
        dtype = promoted_dtype(sample, model_output)
        prev, pred = self._ff_step(
            model_output, timestep, sample, variant=eta, draw=self._ff_draw(generator, model_output, dtype),
            state_dtype=dtype, lane=generator is None,
        )
        if not return_dict:
            return (prev, pred)
        return _OUTPUT(prev, pred)
