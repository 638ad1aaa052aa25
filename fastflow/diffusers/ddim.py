"""DDIM and DDPM drop-ins: diffusers' discrete-time VP steps as fastflow plans.

Both read diffusers' own float32 ``alphas_cumprod`` (so beta schedules, trained
betas and zero-terminal-SNR rescaling are diffusers'), and both address each step
by its timestep as diffusers does: DDIM steps from ``t`` to
``t - num_train_timesteps // num_inference_steps`` whatever the spacing; DDPM to the
next timestep of the schedule.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from diffusers.schedulers import scheduling_ddim, scheduling_ddpm
from diffusers.utils.torch_utils import randn_tensor

from ._base import FastflowScheduler, O, StepSpec, X, Z, noise, sqrt

__all__ = ["DDIMScheduler", "DDPMScheduler", "x0_coefs", "eps_coefs"]

_PREDICTIONS = ("epsilon", "sample", "v_prediction")
_ONE = np.float32(1.0)


def x0_coefs(prediction: str, a: float) -> tuple[float, float]:
    """``(xz, xo)`` with ``x0 = xz * sample + xo * model_output`` at ``alpha_cumprod = a``."""
    sa, sb = math.sqrt(a), math.sqrt(1.0 - a)
    if prediction == "epsilon":
        if sa == 0.0:
            raise ValueError("epsilon prediction at a timestep with alphas_cumprod = 0 has no x0 (zero terminal SNR "
                             "needs v_prediction)")
        return 1.0 / sa, -sb / sa
    if prediction == "sample":
        return 0.0, 1.0
    return sa, -sb


def eps_coefs(prediction: str, a: float) -> tuple[float, float]:
    """``(ez, eo)`` with ``eps = ez * sample + eo * model_output`` (from the unclipped output)."""
    sa, sb = math.sqrt(a), math.sqrt(1.0 - a)
    if prediction == "epsilon":
        return 0.0, 1.0
    if prediction == "sample":
        return 1.0 / sb, -sa / sb
    return sb, sa


class _VPMixin(FastflowScheduler):
    """Host copies of diffusers' ``alphas_cumprod`` and the options shared by DDIM, DDPM and LCM."""

    _ff_timestep_addressed = True
    _ff_start_dependent = False

    def _ff_check_config(self) -> None:
        cfg = self.config
        if cfg.prediction_type not in _PREDICTIONS:
            raise NotImplementedError(
                f"prediction_type={cfg.prediction_type!r} is not supported by {type(self).__name__}; "
                f"valid: {', '.join(_PREDICTIONS)}"
            )
        if cfg.get("thresholding", False):
            raise NotImplementedError(
                "thresholding=True (dynamic thresholding) needs a per-sample quantile of x0, which fastflow's fused "
                "step does not compute; use clip_sample instead"
            )

    def _ff_prepare(self) -> None:
        ac = self.alphas_cumprod
        self._ff_ac = ac.detach().to("cpu", torch.float64).numpy()

    def _ff_alpha(self, t: int) -> float:
        return float(self._ff_ac[t])

    def _ff_clip(self) -> float | None:
        cfg = self.config
        if cfg.get("clip_sample", False):
            return float(cfg.clip_sample_range)
        return None


class DDIMScheduler(_VPMixin, scheduling_ddim.DDIMScheduler):
    """diffusers' ``DDIMScheduler`` whose ``step`` is one fused fastflow call.

    ``eta`` and ``use_clipped_model_output`` are step arguments in diffusers; each
    distinct pair compiles its own plan once per ``set_timesteps``.
    """

    _ff_default_variant = (0.0, False)

    def _ff_spec(self, i: int, k: int, variant: Any) -> StepSpec:
        eta, use_clipped = variant
        cfg = self.config
        t = int(self._ff_host_timesteps[i])
        prev = t - cfg.num_train_timesteps // self.num_inference_steps
        a_t = self._ff_alpha(t)
        a_p = self._ff_alpha(prev) if prev >= 0 else float(self.final_alpha_cumprod)
        xz, xo = x0_coefs(cfg.prediction_type, a_t)
        # The variance's ``1 - a_t / a_p`` cancels; float32 as diffusers computes it keeps parity.
        at32, ap32 = np.float32(a_t), np.float32(a_p)
        var = float((_ONE - ap32) / (_ONE - at32) * (_ONE - at32 / ap32))
        std = float(np.float32(eta) * np.sqrt(np.float32(var)))
        c_dir = sqrt(float(_ONE - ap32 - np.float32(std) ** 2))
        if self._ff_clip() is not None and not use_clipped:
            ez, eo = eps_coefs(cfg.prediction_type, a_t)
            eps = Z(k) * ez + O(k) * eo
        else:
            eps = (Z(k) - X(k) * math.sqrt(a_t)) / math.sqrt(1.0 - a_t)
        update = X(k) * math.sqrt(a_p) + eps * c_dir
        if std > 0:
            update = update + noise(std)
        return StepSpec(xz, xo, update, draws=eta > 0)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> scheduling_ddim.DDIMSchedulerOutput | tuple:
        """diffusers' DDIM step (same arguments and outputs), in one backend call."""
        if self.num_inference_steps is None:
            raise ValueError("num_inference_steps is None: call set_timesteps before step")
        eta = float(eta)
        if eta < 0 or not math.isfinite(eta):
            raise ValueError(f"eta must be finite and non-negative, got {eta}")
        draw = None
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("pass either generator or variance_noise, not both")
            if variance_noise is None and generator is not None:
                def draw() -> torch.Tensor:
                    return randn_tensor(
                        model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
                    )
        use_clipped = bool(use_clipped_model_output) and self._ff_clip() is not None
        prev, pred = self._ff_step(
            model_output, timestep, sample,
            variant=(eta, use_clipped),
            draw=draw,
            noise=variance_noise if eta > 0 else None,
            state_dtype=torch.promote_types(sample.dtype, model_output.dtype),
        )
        if not return_dict:
            return (prev, pred)
        return scheduling_ddim.DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=pred)


class DDPMScheduler(_VPMixin, scheduling_ddpm.DDPMScheduler):
    """diffusers' ``DDPMScheduler`` whose ``step`` is one fused fastflow call.

    Supported ``variance_type``: ``fixed_small``, ``fixed_small_log``, ``fixed_large``.
    The learned variances need the model's second output half per element, and
    ``fixed_large_log`` gives NaN in diffusers; they raise.
    """

    _VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large")

    def _ff_check_config(self) -> None:
        super()._ff_check_config()
        if self.config.variance_type not in self._VARIANCES:
            raise NotImplementedError(
                f"variance_type={self.config.variance_type!r} is not supported by fastflow's DDPMScheduler; "
                f"valid: {', '.join(self._VARIANCES)}"
            )

    def _ff_prev_t(self, i: int) -> int:
        ts = self._ff_host_timesteps
        if self.custom_timesteps or self.num_inference_steps:
            return int(ts[i + 1]) if i + 1 < len(ts) else -1
        return int(ts[i]) - 1

    def _ff_spec(self, i: int, k: int, variant: Any) -> StepSpec:
        cfg = self.config
        t = int(self._ff_host_timesteps[i])
        prev = self._ff_prev_t(i)
        a_t = self._ff_alpha(t)
        a_p = self._ff_alpha(prev) if prev >= 0 else 1.0
        xz, xo = x0_coefs(cfg.prediction_type, a_t)
        # diffusers' float32 order of operations: ``1 - a_t / a_p`` cancels at small steps.
        at32, ap32 = np.float32(a_t), np.float32(a_p)
        b_t, b_p = _ONE - at32, _ONE - ap32
        cur_alpha = at32 / ap32
        cur_beta = _ONE - cur_alpha
        c_x = float(np.sqrt(ap32) * cur_beta / b_t)
        c_z = float(np.sqrt(cur_alpha) * b_p / b_t)
        update = X(k) * c_x + Z(k) * c_z
        if t > 0:
            var = max(b_p / b_t * cur_beta, np.float32(1e-20))
            if cfg.variance_type == "fixed_small":
                std = float(np.sqrt(var))
            elif cfg.variance_type == "fixed_small_log":
                std = float(np.exp(np.float32(0.5) * np.log(var)))
            else:
                std = sqrt(float(cur_beta))
            update = update + noise(std)
        return StepSpec(xz, xo, update, draws=t > 0)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> scheduling_ddpm.DDPMSchedulerOutput | tuple:
        """diffusers' DDPM step (same arguments and outputs), in one backend call."""
        draw = None
        if generator is not None:
            def draw() -> torch.Tensor:
                return randn_tensor(
                    model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
                )
        prev, pred = self._ff_step(
            model_output, timestep, sample,
            draw=draw,
            state_dtype=torch.promote_types(sample.dtype, model_output.dtype),
        )
        if not return_dict:
            return (prev, pred)
        return scheduling_ddpm.DDPMSchedulerOutput(prev_sample=prev, pred_original_sample=pred)
