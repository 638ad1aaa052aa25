"""Drop-in ``SCMScheduler`` (Sana Sprint's): the sCM consistency step in the TrigFlow parametrization.

At angle ``s`` the data prediction is ``cos(s) x - sin(s) F`` (``F`` the model output), and the
next sample at angle ``t`` re-noises it: ``cos(t) x0 + sin(t) sigma_data n``. diffusers draws
``n`` at every step (also the last, where ``sin(0) = 0``) in float32, so a 16-bit sample
comes back in float32, as diffusers returns it; the cosines and sines are diffusers' float32
values.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.schedulers import scheduling_scm as _scm

from ._base import FastflowScheduler
from ._outputs import output_maker
from ._spec import StepSpec, X, noise, promoted_dtype

__all__ = ["SCMScheduler"]
_OUTPUT = output_maker(_scm.SCMSchedulerOutput, "prev_sample", "pred_original_sample")


class SCMScheduler(FastflowScheduler, _scm.SCMScheduler):
    """diffusers' ``SCMScheduler`` whose ``step`` is one fused fastflow call.

    ``trigflow`` prediction (diffusers implements no other); every schedule diffusers' ``set_timesteps`` makes
    (``max_timesteps``, ``intermediate_timesteps``, custom ``timesteps``). The noise is fastflow's in-kernel
    noise, or with a ``generator`` the tensor diffusers draws.
    """

    _ff_start_dependent = False

    def _ff_check_config(self) -> None:
        self._ff_require_prediction(("trigflow",), diffusers_too=True)

    def _ff_prepare(self) -> None:
        self._ff_angles = self.timesteps.detach().to("cpu", torch.float32)

    def _ff_num_steps(self) -> int:
        return len(self._ff_angles) - 1  # the last angle is where the loop ends

    def _ff_spec(self, i: int, k: int, variant: Any) -> StepSpec:
        s, t = self._ff_angles[i], self._ff_angles[i + 1]
        update = X(k) * float(torch.cos(t))
        scale = float(torch.sin(t)) * float(self.config.sigma_data)
        return StepSpec(float(torch.cos(s)), -float(torch.sin(s)), update + noise(scale) if scale else update,
                        draws=True)

    def step(
        self,
        model_output: torch.FloatTensor,
        timestep: float,
        sample: torch.FloatTensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> _scm.SCMSchedulerOutput | tuple:
        """diffusers' SCM step (same arguments and outputs), in one backend call."""
        if generator is None and (done := self._ff_lane_step(model_output, timestep, sample)) is not None:
            return done if not return_dict else _OUTPUT(*done)
        self._ff_require_timesteps()
        dtype = promoted_dtype(sample, model_output)
        prev, pred = self._ff_step(
            model_output, timestep, sample, draw=self._ff_draw(generator, model_output, torch.float32),
            state_dtype=dtype, out_dtype=torch.promote_types(dtype, torch.float32), lane=generator is None,
        )
        if not return_dict:
            return (prev, pred)
        return _OUTPUT(prev, pred)
