"""Drop-in ``DPMSolverMultistepInverseScheduler``: DPM-Solver(++) run up the noise levels (DPM-Solver inversion).

diffusers' inverse scheduler takes the forward one's update formulas, with its sigmas rising
from the data end (its default, Karras, exponential and beta sigmas; its flow sigmas fall, as
diffusers builds them), no final step to sigma = 0, and no upcast: it computes in the
promoted dtype of the sample and the model output, draws SDE noise in that of its converted
output, and has no third-order SDE step. The stages are the forward drop-in's
(:func:`~fastflow.diffusers.dpmsolver.dpm_updates`), so a loop reproduces diffusers' to float32
round-off. A 16-bit state is computed in float32 and rounded once (diffusers rounds each
operation in 16 bits).
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.schedulers import scheduling_dpmsolver_multistep_inverse as _inverse

from ._outputs import output_maker
from ._spec import promoted_dtype
from .dpmsolver import DPMSolverOptions

__all__ = ["DPMSolverMultistepInverseScheduler"]
_OUTPUT = output_maker(_inverse.SchedulerOutput, "prev_sample")


class DPMSolverMultistepInverseScheduler(DPMSolverOptions, _inverse.DPMSolverMultistepInverseScheduler):
    """diffusers' ``DPMSolverMultistepInverseScheduler`` whose ``step`` is one fused fastflow call.

    Algorithms ``dpmsolver++`` and ``dpmsolver`` (orders 1-3; ``dpmsolver`` with dynamic thresholding 1-2), every
    prediction type, VP, Karras, exponential, beta and flow sigmas. The SDE algorithms (orders 1-2; diffusers fails
    at an SDE step of order 3) are defined only on steps that lower the noise level: a rising step raises, where
    diffusers returns NaN.
    """

    _ff_sde_max_order = 2  # diffusers' inverse third-order step takes no noise and fails for sde-dpmsolver++
    _ff_zero_length = (
        "Karras, exponential, beta and flow sigmas end on their last sigma twice",
        "euler_at_final=True or lower_order_final=True with fewer than 15 steps",
    )

    @property
    def _ff_final_zero(self) -> bool:
        return False  # no step to sigma = 0: the last step's order follows lower_order_final and euler_at_final

    def _ff_diffusers_sigmas(self) -> np.ndarray:
        # diffusers drops repeated timesteps but keeps every sigma: step i still goes from sigma i to i + 1.
        sig = super()._ff_diffusers_sigmas()
        return sig[: len(self.timesteps) + 1]

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> _inverse.SchedulerOutput | tuple:
        """diffusers' inverse step (same arguments and output) in one backend call, returned in the promoted dtype
        of the sample and the model output; an SDE step takes ``variance_noise`` as given or draws diffusers' noise
        with ``generator``, else fastflow's in-kernel noise."""
        default = generator is None and variance_noise is None and not self._ff_learned_eps
        if default and (done := self._ff_lane_step(model_output, timestep, sample)) is not None:
            return (done[0],) if not return_dict else _OUTPUT(done[0])
        idx = self._ff_scheduled_index(timestep)
        model_output = self._ff_model_output(model_output)
        dtype = promoted_dtype(sample, model_output)
        draw = None
        if self._ff_draws_noise and variance_noise is None:
            # diffusers draws in the dtype of its converted output: the model output itself where it converts
            # nothing, else the promotion of the output's and the sample's.
            draw = self._ff_draw(generator, model_output, model_output.dtype if self._ff_raw_conversion else dtype)
        prev = self._ff_multistep_step(
            model_output, timestep, sample, idx,
            draw=draw,
            noise=variance_noise if self._ff_draws_noise else None,
            state_dtype=dtype, lane=default,
        )
        if not return_dict:
            return (prev,)
        return _OUTPUT(prev)
