"""Drop-in ``CogVideoXDDIMScheduler``: CogVideoX's DDIM (SNR-shifted ``alphas_cumprod``) as one fused step.

diffusers' CogVideoX DDIM writes the deterministic DDIM step as
``prev = a * sample + b * x0`` with ``a = sqrt((1 - abar_prev) / (1 - abar_t))`` and
``b = sqrt(abar_prev) - sqrt(abar_t) * a``, on ``alphas_cumprod`` shifted by
``snr_shift_scale`` (diffusers' own attribute, read as it is). Its step takes DDIM's
arguments (``eta``, ``use_clipped_model_output``, ``generator``, ``variance_noise``) and
ignores them, and never clips (``clip_sample`` is a config option it does not apply);
the drop-in does the same, so the numbers stay diffusers'.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers.schedulers import scheduling_ddim_cogvideox as _cogvideox

from ._base import StepSpec, X, Z, output_maker, promoted_dtype
from .ddim import _VPMixin, x0_coefs

__all__ = ["CogVideoXDDIMScheduler"]
_OUTPUT = output_maker(_cogvideox.DDIMSchedulerOutput, "prev_sample", "pred_original_sample")


class CogVideoXDDIMScheduler(_VPMixin, _cogvideox.CogVideoXDDIMScheduler):
    """diffusers' ``CogVideoXDDIMScheduler`` whose ``step`` is one fused fastflow call."""

    _ff_returns_raw_x0 = True

    def _ff_clip(self) -> float | None:
        return None  # diffusers' CogVideoX DDIM step never clips

    def _ff_spec(self, i: int, k: int, variant: Any) -> StepSpec:
        cfg = self.config
        t = int(self._ff_host_timesteps[i])
        prev = t - cfg.num_train_timesteps // self.num_inference_steps
        a_t = self._ff_alpha(t)
        a_p = self._ff_alpha(prev) if prev >= 0 else float(self.final_alpha_cumprod)
        if a_t == 1.0:
            raise ValueError(f"timestep {t} has alphas_cumprod 1, where the step divides by 1 - alphas_cumprod")
        xz, xo = x0_coefs(cfg.prediction_type, a_t)
        a = math.sqrt((1.0 - a_p) / (1.0 - a_t))
        b = math.sqrt(a_p) - math.sqrt(a_t) * a
        return StepSpec(xz, xo, Z(k) * a + X(k) * b)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> _cogvideox.DDIMSchedulerOutput | tuple:
        """diffusers' CogVideoX DDIM step (same arguments, ignored as diffusers ignores them, and outputs), in one
        backend call."""
        self._ff_require_timesteps()
        prev, pred = self._ff_step(model_output, timestep, sample, state_dtype=promoted_dtype(sample, model_output))
        if not return_dict:
            return (prev, pred)
        return _OUTPUT(prev, pred)
