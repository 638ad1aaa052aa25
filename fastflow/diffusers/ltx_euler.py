"""Drop-in ``LTXEulerAncestralRFScheduler`` (LTX-Video's): ComfyUI's Euler-ancestral step for rectified flow.

The model output is a velocity, ``x0 = x - sigma v``. A step goes down to
``sigma_down = sigma_next (1 + (sigma_next / sigma - 1) eta)`` along the line to ``x0``,
rescales by ``alpha_next / alpha_down`` (``alpha = 1 - sigma``) and adds the noise that
brings the sample back to ``sigma_next``; the step to ``sigma_next = 0`` returns ``x0``.
``eta`` and ``s_noise`` are config values. Every coefficient is evaluated as diffusers
evaluates it (float32 0-d tensors, its ``1e-12`` guards included). diffusers computes in
float32 and returns the sample's dtype: so does the kernel, rounding once. A call past the
schedule's last step (a loop over timesteps that end with the terminal 0) returns the
sample, as diffusers does.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.schedulers import scheduling_ltx_euler_ancestral_rf as _ltx

from ._base import FastflowScheduler
from ._outputs import output_maker
from ._spec import StepSpec, X, Z, noise

__all__ = ["LTXEulerAncestralRFScheduler"]
_OUTPUT = output_maker(_ltx.LTXEulerAncestralRFSchedulerOutput, "prev_sample")
_GUARD = 1e-12  # diffusers' guard on alpha_down


class LTXEulerAncestralRFScheduler(FastflowScheduler, _ltx.LTXEulerAncestralRFScheduler):
    """diffusers' ``LTXEulerAncestralRFScheduler`` whose ``step`` is one fused fastflow call.

    Any ``eta`` and ``s_noise``; diffusers' schedule (flow-matching sigmas, or explicit ``sigmas``/``timesteps``).
    The ancestral noise is fastflow's in-kernel noise, or with a ``generator`` the tensor diffusers draws.
    """

    _ff_start_dependent = False

    def _ff_prepare(self) -> None:
        self._ff_sig32 = self.sigmas.detach().to("cpu", torch.float32)
        self._ff_last_index = len(self._ff_sig32) - 1  # diffusers' step_index stops here
        cfg = self.config
        self._ff_noisy = float(cfg.eta) > 0.0 and float(cfg.s_noise) > 0.0

    def _ff_spec(self, i: int, k: int, variant: Any) -> StepSpec:
        sig = self._ff_sig32
        if i >= len(sig) - 1:  # past the last step: diffusers returns the sample
            return StepSpec(0.0, 1.0, Z(k))
        sigma, sigma_next = sig[i], sig[i + 1]
        xz, xo = 1.0, -float(sigma)
        if float(sigma_next.abs()) < 1e-8:  # the final step: x0
            return StepSpec(xz, xo, X(k))
        cfg = self.config
        eta = float(cfg.eta)
        down = sigma_next * (1.0 + (sigma_next / sigma - 1.0) * eta)
        ratio = down / sigma
        update = Z(k) * float(ratio) + X(k) * float(1.0 - ratio)
        if not self._ff_noisy:
            return StepSpec(xz, xo, update)
        alpha_next, alpha_down = 1.0 - sigma_next, 1.0 - down
        renoise = (sigma_next**2 - down**2 * alpha_next**2 / (alpha_down**2 + _GUARD)).clamp(min=0.0).sqrt()
        rescale = float(alpha_next / (alpha_down + _GUARD))
        return StepSpec(xz, xo, update * rescale + noise(float(renoise) * float(cfg.s_noise)), draws=True)

    def step(
        self,
        model_output: torch.FloatTensor,
        timestep: float | torch.Tensor,
        sample: torch.FloatTensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> _ltx.LTXEulerAncestralRFSchedulerOutput | tuple[torch.FloatTensor]:
        """diffusers' LTX Euler-ancestral step (same arguments and output), in one backend call."""
        self._ff_check_timestep(timestep)
        done = self._ff_lane_step(model_output, timestep, sample) if generator is None else None
        if done is not None:
            prev = done[0]
        else:
            if self.sigmas is None or self.timesteps is None:
                raise ValueError("Scheduler has not been initialized. Call `set_timesteps` before `step`.")
            prev, _ = self._ff_step(
                model_output, timestep, sample, draw=self._ff_draw(generator, sample, torch.float32),
                state_dtype=torch.float32, out_dtype=sample.dtype, want_pred=False, lane=generator is None,
            )
        if self._step_index > self._ff_last_index:  # sigmas that do not end at 0: the last step repeats
            self._step_index = self._ff_last_index
        if not return_dict:
            return (prev,)
        return _OUTPUT(prev)
