"""Drop-in ``DDIMInverseScheduler``: deterministic DDIM run forward, from data to noise (DDIM inversion).

diffusers' step at timestep ``t`` converts the model output at the noise level one step
below, ``t - num_train_timesteps // num_inference_steps`` (``initial_alpha_cumprod`` below 0,
the top level's ``N - 1`` at most), and moves the sample up to ``alphas_cumprod[t]``:
``sqrt(a_t) x0 + sqrt(1 - a_t) eps``. The noise estimate is the unclipped model output's, read
from it as diffusers reads it (the output bound to a kernel history slot): taken from the sample
and x0 instead it would divide by ``sqrt(1 - alpha)`` of the lower level, and on the way up
(``a_t`` below that level's alpha) that multiplies x0's round-off by up to ``sqrt(1 - a_t) /
sqrt(1 - alpha)``, about 30 at the first steps.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers.schedulers import scheduling_ddim_inverse as _inverse

from ..solvers.base import UndefinedStepError
from ._outputs import output_maker
from ._spec import O, StepSpec, X, Z, promoted_dtype
from .ddim import _VPMixin, eps_coefs

__all__ = ["DDIMInverseScheduler"]
_OUTPUT = output_maker(_inverse.DDIMSchedulerOutput, "prev_sample", "pred_original_sample")


class DDIMInverseScheduler(_VPMixin, _inverse.DDIMInverseScheduler):
    """diffusers' ``DDIMInverseScheduler`` whose ``step`` is one fused fastflow call.

    Every prediction type, beta schedule, zero-terminal-SNR rescaling, spacing, offset, ``clip_sample`` and
    ``set_alpha_to_one``: diffusers' own ``alphas_cumprod`` and timesteps.
    """

    _ff_returns_raw_x0 = True

    def _ff_spec(self, i: int, k: int, variant: Any) -> StepSpec:
        cfg = self.config
        target = int(self._ff_host_timesteps[i])
        level = min(target - cfg.num_train_timesteps // self.num_inference_steps, cfg.num_train_timesteps - 1)
        a_t = self._ff_alpha(level) if level >= 0 else float(self.initial_alpha_cumprod)
        a_p = self._ff_alpha(target)
        xz, xo = self._ff_conversion(a_t)
        if a_t == 1.0 and cfg.prediction_type == "sample":
            raise UndefinedStepError(
                "prediction_type='sample' has no noise estimate at alphas_cumprod = 1 (set_alpha_to_one=True makes "
                "the first step's level 1): diffusers divides by zero there and steps to inf or NaN"
            )
        ez, eo = eps_coefs(cfg.prediction_type, a_t)
        eps = Z(k) * ez + O(k) * eo
        return StepSpec(xz, xo, X(k) * math.sqrt(a_p) + eps * math.sqrt(1.0 - a_p))

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> _inverse.DDIMSchedulerOutput | tuple:
        """diffusers' DDIM-inverse step (same arguments and outputs), in one backend call."""
        if (done := self._ff_lane_step(model_output, timestep, sample)) is not None:
            return done if not return_dict else _OUTPUT(*done)
        prev, pred = self._ff_step(
            model_output, timestep, sample, state_dtype=promoted_dtype(sample, model_output), lane=True
        )
        if not return_dict:
            return (prev, pred)
        return _OUTPUT(prev, pred)
