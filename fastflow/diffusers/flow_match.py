"""FlowMatchEulerDiscreteScheduler (SD3, Flux, Wan, ...) and FlowMatchHeunDiscreteScheduler drop-ins.

The deterministic step is ``sample + (sigma_next - sigma) * v``: the kernel's
``x_hat`` is taken to be the velocity itself (``xz = 0, xo = 1``), so the update is
exactly diffusers' two float32 operations, with ``dt`` rounded as diffusers'
float32 subtraction rounds it. With ``stochastic_sampling`` the kernel's ``x_hat``
is ``sample - sigma * v`` and the next sample ``(1 - sigma_next) x0 + sigma_next N``.
Shift, dynamic shifting (``mu``), ``shift_terminal``, Karras/exponential/beta sigmas,
``invert_sigmas`` and custom ``sigmas``/``timesteps`` are diffusers' own
``set_timesteps``. The Heun scheduler is diffusers' two-call Heun step (see
:mod:`._two_call`) on flow sigmas, where each slope ``(sample - x0) / sigma`` is the
velocity itself: the kernel's ``x_hat`` is the velocity (diffusers forms ``x0`` and
divides it back out, which near the last sigma of 1e-3 costs it digits).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers.schedulers import scheduling_flow_match_euler_discrete as fm
from diffusers.schedulers import scheduling_flow_match_heun_discrete as fmh

from ._base import absent_method
from ._outputs import output_maker
from ._spec import StepSpec, X, Z, noise
from ._two_call import TwoCallMixin
from .euler import _SigmaMixin

__all__ = ["FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"]
_OUTPUT = output_maker(fm.FlowMatchEulerDiscreteSchedulerOutput, "prev_sample")
_HEUN_OUTPUT = output_maker(fmh.FlowMatchHeunDiscreteSchedulerOutput, "prev_sample")
_SQRT2_M1 = 2**0.5 - 1


class FlowMatchEulerDiscreteScheduler(_SigmaMixin, fm.FlowMatchEulerDiscreteScheduler):
    """diffusers' ``FlowMatchEulerDiscreteScheduler`` whose ``step`` is one fused fastflow call.

    diffusers accepts churn arguments here but does not use them; so does the drop-in.
    ``per_token_timesteps`` (LTX-Video's conditioning pipelines, Sana WM: each token steps from its own sigma to the
    schedule's next sigma below it) runs diffusers' formula as torch ops on the device, sync-free but not fused:
    the sigmas differ per token and are chosen by comparisons on device data.
    """

    scale_model_input = absent_method()  # diffusers' class has none, and pipelines test hasattr (EasyAnimate)

    def _ff_spec(self, i: int, k: int, variant: object) -> StepSpec:
        sig, sig_next = self._ff_sig[i], self._ff_sig[i + 1]
        if self.config.stochastic_sampling:
            return StepSpec(1.0, -sig, X(k) * (1.0 - sig_next) + noise(sig_next), draws=True)
        dt = float(np.float32(sig_next) - np.float32(sig))
        return StepSpec(0.0, 1.0, Z(k) + X(k) * dt)

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
        per_token_timesteps: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> fm.FlowMatchEulerDiscreteSchedulerOutput | tuple:
        """diffusers' flow-matching Euler step (same arguments and outputs), in one backend call."""
        self._ff_check_timestep(timestep)
        default = generator is None and per_token_timesteps is None
        if default and (done := self._ff_lane_step(model_output, timestep, sample)) is not None:
            return (done[0],) if not return_dict else _OUTPUT(done[0])
        draw = self._ff_draw(generator, sample, torch.float32)
        if per_token_timesteps is not None:
            prev = self._ff_per_token_step(model_output, timestep, sample, per_token_timesteps, draw)
            return (prev,) if not return_dict else _OUTPUT(prev)
        prev, _ = self._ff_step(
            model_output, timestep, sample,
            draw=draw, state_dtype=torch.float32, out_dtype=model_output.dtype, want_pred=False, lane=default,
        )
        if not return_dict:
            return (prev,)
        return _OUTPUT(prev)

    def _ff_per_token_step(
        self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor,
        per_token_timesteps: torch.Tensor, draw: Any,
    ) -> torch.Tensor:
        """diffusers' per-token step as torch ops: each token's sigma is its timestep over the training length, its
        next sigma the largest of the schedule's below it (more than 1e-6 below); float32, not cast back."""
        idx = self._ff_peek_index(timestep)
        sample = sample.to(torch.float32)
        sigma = per_token_timesteps / self.config.num_train_timesteps
        schedule = self._ff_sigmas_on(sigma.device)[:, None, None]
        below = (schedule < sigma[None] - 1e-6) * schedule
        sigma_next = below.max(dim=0)[0][..., None]
        sigma = sigma[..., None]
        if self.config.stochastic_sampling:
            if draw is not None:
                noise = draw()
            else:  # the noise this step's kernel would draw
                stage = self._ff_stages.get((None, idx)) or self._ff_stage(idx, None)
                noise = self._ff_kernel_noise(stage.runner, stage.k, sample)
            prev = (1.0 - sigma_next) * (sample - sigma * model_output) + sigma_next * noise.to(sample.dtype)
        else:
            prev = sample + (sigma - sigma_next) * model_output
        self._step_index = idx + 1
        return prev

    def _ff_sigmas_on(self, device: torch.device) -> torch.Tensor:
        """diffusers' sigmas on ``device`` (where set_timesteps put them, or a copy made once per schedule)."""
        if self.sigmas.device == device:
            return self.sigmas
        copies = self._ff_host_cache.setdefault("sigmas_on", {})
        if device not in copies:
            copies[device] = self.sigmas.to(device)
        return copies[device]


class FlowMatchHeunDiscreteScheduler(TwoCallMixin, fmh.FlowMatchHeunDiscreteScheduler):
    """diffusers' ``FlowMatchHeunDiscreteScheduler`` whose ``step`` is one fused fastflow call.

    Churn (``s_churn`` with a sigma inside ``[s_tmin, s_tmax]``) raises: diffusers' second call then steps from
    the churned sample, which holds the first call's noise, and the kernel's history keeps no noise (a negative
    ``s_churn``, which moves diffusers' ``sigma_hat`` below sigma, raises too).
    """

    def _ff_prepare(self) -> None:
        self._ff_sigmas = self.sigmas.detach().to("cpu", torch.float32).to(torch.float64).numpy()

    def _ff_spec(self, i: int, k: int, variant: Any) -> StepSpec:
        if k % 2 == 0:  # first-order (the loop's first call is): Euler to the next sigma, slope saved
            return StepSpec(0.0, 1.0, Z(k) + X(k) * self._ff_dt(i))
        return StepSpec(0.0, 1.0, Z(k - 1) + (X(k - 1) + X(k)) * (0.5 * self._ff_dt(i - 1)))

    def _ff_dt(self, i: int) -> float:
        """The first-order call ``i``'s step, ``sigma_next - sigma``, as diffusers' float32 subtraction gives it."""
        return float(np.float32(self._ff_sigmas[i + 1]) - np.float32(self._ff_sigmas[i]))

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
    ) -> fmh.FlowMatchHeunDiscreteSchedulerOutput | tuple:
        """diffusers' flow-matching Heun step (same arguments and outputs), in one backend call."""
        self._ff_check_timestep(timestep)
        if s_churn == 0 and (done := self._ff_lane_step(model_output, timestep, sample)) is not None:
            return (done[0],) if not return_dict else _HEUN_OUTPUT(done[0])
        idx = self._ff_peek_index(timestep)
        if s_churn != 0:
            sigma = float(self._ff_sigmas[idx if self._ff_first_order(idx) else idx - 1])
            if s_tmin <= sigma <= s_tmax and min(s_churn / (len(self._ff_sigmas) - 1), _SQRT2_M1) != 0:
                raise NotImplementedError(
                    f"s_churn={s_churn} at sigma {sigma:.6g} is not supported by fastflow's "
                    "FlowMatchHeunDiscreteScheduler (with churn its second call would step from a churned sample; "
                    "a negative s_churn moves diffusers' sigma_hat below sigma)"
                )
        prev, _ = self._ff_step(
            model_output, timestep, sample, state_dtype=torch.float32, out_dtype=model_output.dtype,
            want_pred=False, index=idx, lane=s_churn == 0,
        )
        if not return_dict:
            return (prev,)
        return _HEUN_OUTPUT(prev)
