"""FlowMatchEulerDiscreteScheduler drop-in (SD3, Flux, Wan, ...).

The deterministic step is ``sample + (sigma_next - sigma) * v``: the kernel's
``x_hat`` is taken to be the velocity itself (``xz = 0, xo = 1``), so the update is
exactly diffusers' two float32 operations, with ``dt`` rounded as diffusers'
float32 subtraction rounds it. With ``stochastic_sampling`` the kernel's ``x_hat``
is ``sample - sigma * v`` and the next sample ``(1 - sigma_next) x0 + sigma_next N``.
Shift, dynamic shifting (``mu``), ``shift_terminal``, Karras/exponential/beta sigmas,
``invert_sigmas`` and custom ``sigmas``/``timesteps`` are diffusers' own
``set_timesteps``.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.schedulers import scheduling_flow_match_euler_discrete as fm

from ._base import StepSpec, X, Z, noise, output_maker
from .euler import _SigmaMixin

__all__ = ["FlowMatchEulerDiscreteScheduler"]
_OUTPUT = output_maker(fm.FlowMatchEulerDiscreteSchedulerOutput, "prev_sample")


class FlowMatchEulerDiscreteScheduler(_SigmaMixin, fm.FlowMatchEulerDiscreteScheduler):
    """diffusers' ``FlowMatchEulerDiscreteScheduler`` whose ``step`` is one fused fastflow call.

    diffusers accepts churn arguments here but does not use them; so does the drop-in.
    ``per_token_timesteps`` (per-token sigmas picked by comparison) raises.
    """

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
        if per_token_timesteps is not None:
            raise NotImplementedError(
                "per_token_timesteps is not supported by fastflow's FlowMatchEulerDiscreteScheduler (its sigmas "
                "are chosen per token by comparisons on device data)"
            )
        draw = self._ff_draw(generator, sample, torch.float32)
        prev, _ = self._ff_step(
            model_output, timestep, sample,
            draw=draw, state_dtype=torch.float32, out_dtype=model_output.dtype, want_pred=False,
        )
        if not return_dict:
            return (prev,)
        return _OUTPUT(prev)

