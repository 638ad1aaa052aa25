"""Drop-ins ``CogVideoXDDIMScheduler`` and ``CogVideoXDPMScheduler``: CogVideoX's samplers as one fused step.

diffusers' CogVideoX DDIM writes the deterministic DDIM step as
``prev = a * sample + b * x0`` with ``a = sqrt((1 - abar_prev) / (1 - abar_t))`` and
``b = sqrt(abar_prev) - sqrt(abar_t) * a``, on ``alphas_cumprod`` shifted by
``snr_shift_scale`` (diffusers' own attribute, read as it is). Its step takes DDIM's
arguments (``eta``, ``use_clipped_model_output``, ``generator``, ``variance_noise``) and
ignores them, and never clips (``clip_sample`` is a config option it does not apply);
the drop-in does the same, so the numbers stay diffusers'.

diffusers' CogVideoX DPM is SDE-DPM-Solver++ 2M on the same alphas, written so that the
caller holds its history: each call takes the previous call's ``pred_original_sample``
and timestep (``old_pred_original_sample``, ``timestep_back``) and returns its own. The
drop-in keeps that prediction in the kernel's history instead, so it accepts, as
CogVideoX's pipelines pass them, exactly the tensor its previous call returned (checked by
identity, no data read) and the previous call's timestep (compared where it can be read
without a sync); anything else raises rather than silently stepping from other values.
diffusers draws noise twice in a second-order call (the first draw unused); with a
``generator`` the drop-in draws the same two.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers.schedulers import scheduling_ddim_cogvideox as _cogvideox
from diffusers.schedulers import scheduling_dpm_cogvideox as _cogdpm

from ..solvers.base import UndefinedStepError
from ._locate import host_number
from ._outputs import output_maker
from ._spec import StepSpec, X, Z, noise, promoted_dtype
from .ddim import _VPMixin, x0_coefs

__all__ = ["CogVideoXDDIMScheduler", "CogVideoXDPMScheduler"]
_OUTPUT = output_maker(_cogvideox.DDIMSchedulerOutput, "prev_sample", "pred_original_sample")
_DPM_OUTPUT = output_maker(_cogdpm.DDIMSchedulerOutput, "prev_sample", "pred_original_sample")


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
            raise UndefinedStepError(f"timestep {t} has alphas_cumprod 1, where the step divides by 1 - alphas_cumprod")
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
        if (done := self._ff_lane_step(model_output, timestep, sample)) is not None:
            return done if not return_dict else _OUTPUT(*done)
        self._ff_require_timesteps()
        prev, pred = self._ff_step(
            model_output, timestep, sample, state_dtype=promoted_dtype(sample, model_output), lane=True
        )
        if not return_dict:
            return (prev, pred)
        return _OUTPUT(prev, pred)


def _half_logsnr(a: float) -> float:
    """``log sqrt(abar / (1 - abar))``, diffusers' lambda of an ``alphas_cumprod`` value (infinite at 0 and 1,
    where diffusers' multipliers take their limits: a zero-SNR first step is ``sqrt(abar_prev) x0`` plus noise)."""
    if a <= 0.0:
        return -math.inf
    return math.inf if a >= 1.0 else 0.5 * math.log(a / (1.0 - a))


class CogVideoXDPMScheduler(_VPMixin, _cogdpm.CogVideoXDPMScheduler):
    """diffusers' ``CogVideoXDPMScheduler`` whose ``step`` is one fused fastflow call (see the module docstring
    for the history its caller passes)."""

    _ff_returns_raw_x0 = True
    _ff_start_dependent = True  # a loop's first call is first-order, the later ones read the call before
    _ff_pred_handed_back = True  # the caller passes each returned prediction to the next call

    @property
    def compute_pred_original_sample(self) -> bool:
        """Always True: the caller hands each returned prediction back to the next call."""
        return True

    @compute_pred_original_sample.setter
    def compute_pred_original_sample(self, value: bool) -> None:
        if not value:
            raise ValueError(f"{type(self).__name__} returns its prediction at every step: its caller passes it to "
                             "the next step")

    def _ff_clip(self) -> float | None:
        return None  # its step never clips

    def _ff_prepare(self) -> None:
        super()._ff_prepare()
        # The last loop's returned prediction, which no call of a new schedule reads (its loop's first call takes
        # no history): not kept alive, a sample's size, until that loop's first step.
        self._ff_last_pred = None

    def _ff_prev_t(self, t: int) -> int:
        return t - self.config.num_train_timesteps // self.num_inference_steps

    def _ff_spec(self, i: int, k: int, variant: Any) -> StepSpec:
        ts = self._ff_host_timesteps
        t = int(ts[i])
        prev = self._ff_prev_t(t)
        a_t = self._ff_alpha(t)
        a_p = self._ff_alpha(prev) if prev >= 0 else float(self.final_alpha_cumprod)
        if a_t >= 1.0:
            raise UndefinedStepError(f"timestep {t} has alphas_cumprod 1, where the step divides by 1 - alphas_cumprod")
        xz, xo = x0_coefs(self.config.prediction_type, a_t)
        if a_p >= 1.0:  # the limit of diffusers' multipliers (it evaluates exp(-inf) * 0 and expm1(-inf) there)
            return StepSpec(xz, xo, X(k), draws=True)
        lam = _half_logsnr(a_t)
        h = _half_logsnr(a_p) - lam
        mult1 = math.sqrt((1.0 - a_p) / (1.0 - a_t)) * math.exp(-h)
        mult2 = math.expm1(-2.0 * h) * math.sqrt(a_p)
        denoised = X(k)
        if k > 0 and prev >= 0:  # second order, from the call before
            r = (lam - _half_logsnr(self._ff_alpha(int(ts[i - 1])))) / h
            denoised = X(k) * (1.0 + 1.0 / (2.0 * r)) - X(k - 1) * (1.0 / (2.0 * r))
        scale = math.sqrt(1.0 - a_p) * math.sqrt(-math.expm1(-2.0 * h))
        return StepSpec(xz, xo, Z(k) * mult1 - denoised * mult2 + noise(scale), draws=True)

    def step(
        self,
        model_output: torch.Tensor,
        old_pred_original_sample: torch.Tensor | None,
        timestep: int,
        timestep_back: int | None,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = False,
    ) -> _cogdpm.DDIMSchedulerOutput | tuple:
        """diffusers' CogVideoX DPM step (same arguments and outputs; ``eta``, ``use_clipped_model_output`` and
        ``variance_noise`` ignored, as diffusers ignores them), in one backend call."""
        idx = self._ff_scheduled_index(timestep)
        t = int(self._ff_host_values[idx])  # a list: dynamo traces a numpy array's element as a tensor, then reads it
        second = idx > self._ff_loop_start and self._ff_prev_t(t) >= 0
        self._ff_check_history(idx, old_pred_original_sample, timestep_back)
        draw = one = self._ff_draw(generator, sample)
        if one is not None and second:  # diffusers draws twice when it takes the second-order step, using the last

            def draw() -> torch.Tensor:
                one()
                return one()

        prev, pred = self._ff_step(
            model_output, timestep, sample, draw=draw, state_dtype=promoted_dtype(sample, model_output), index=idx
        )
        self._ff_last_pred = pred
        if old_pred_original_sample is None or not second or not return_dict:
            return (prev, pred)  # diffusers returns a tuple there whatever return_dict says
        return _DPM_OUTPUT(prev, pred)

    def _ff_check_history(self, idx: int, old: torch.Tensor | None, timestep_back: Any) -> None:
        """The caller's history must be what the kernel holds: none at a loop's first call, else the prediction
        this scheduler returned last and the previous call's timestep."""
        name = type(self).__name__
        if idx == self._ff_loop_start:
            if old is not None:
                raise NotImplementedError(
                    f"{name}: old_pred_original_sample given at a loop's first call; the drop-in keeps the "
                    "history itself and starts each loop first-order (pass None, as CogVideoX's pipelines do)"
                )
            return
        if old is None or old is not self.__dict__.get("_ff_last_pred"):
            raise NotImplementedError(
                f"{name}: old_pred_original_sample must be the pred_original_sample this scheduler returned at "
                "the previous call (the drop-in reads it from its own history); another tensor, or None mid-loop, "
                "is not supported"
            )
        # A traced step cannot read a tensor's value (a CPU one included): it takes the counter's step, as documented.
        back = None if torch.compiler.is_compiling() else host_number(timestep_back)
        if back is not None and back != float(self._ff_host_timesteps[idx - 1]):
            raise NotImplementedError(
                f"{name}: timestep_back={back:g} is not the previous call's timestep "
                f"{float(self._ff_host_timesteps[idx - 1]):g}; the drop-in steps from the previous call"
            )
