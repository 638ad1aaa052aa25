"""PNDMScheduler drop-in: diffusers' pseudo linear multistep (PLMS) calls as fused stages.

With ``skip_prk_steps=True`` (Stable Diffusion 1.x's configuration) diffusers steps
on a combination of the model outputs it keeps: the first call steps with its output
alone and saves its sample; the second (its timestep appears twice in the list)
repeats that step from the saved sample with the mean of the two outputs and keeps
neither the new output nor the sample; later calls take Adams-Bashforth weights of
the last two, three, then four kept outputs. Each call is one stage: the kernel's
``x_hat`` is the raw model output, which later stages read from history, so nothing
is kept on the host between calls and no device value is read. diffusers' own
``counter``, ``ets`` and ``cur_sample`` are not kept up to date.

The Runge-Kutta warm-up of ``skip_prk_steps=False`` (diffusers' default) would read
four earlier tensors in one call, more than the kernel's history slots: the drop-in
raises for it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers.schedulers import scheduling_pndm as _pndm
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from ..solvers.base import Lin
from ._base import FastflowScheduler, StepSpec, X, Z, output_maker, promoted_dtype

__all__ = ["PNDMScheduler", "plms_weights"]
_OUTPUT = output_maker(SchedulerOutput, "prev_sample")
_PREDICTIONS = ("epsilon", "v_prediction")
# Adams-Bashforth weights on the kept outputs, newest first, by how many are kept.
_AB_WEIGHTS = {2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def plms_weights(k: int) -> tuple[int, list[tuple[int, float]]]:
    """Call ``k`` of a PLMS loop (counted from the loop's first call, as diffusers' ``counter``): the stage whose
    sample it steps from, and its combination of model outputs as ``(stage, weight)`` pairs.

    diffusers keeps the output of every call but the second, at most four."""
    if k == 0:
        return 0, [(0, 1.0)]
    if k == 1:
        return 0, [(1, 0.5), (0, 0.5)]
    kept = ([0] + list(range(2, k + 1)))[-4:]
    weights = _AB_WEIGHTS[len(kept)]
    return k, [(stage, w) for stage, w in zip(reversed(kept), weights, strict=True)]


class PNDMScheduler(FastflowScheduler, _pndm.PNDMScheduler):
    """diffusers' ``PNDMScheduler`` (``skip_prk_steps=True``) whose ``step`` is one fused fastflow call."""

    def _ff_check_config(self) -> None:
        cfg = self.config
        if not cfg.skip_prk_steps:
            raise NotImplementedError(
                "skip_prk_steps=False (the Runge-Kutta warm-up) is not supported by fastflow's PNDMScheduler; set "
                "skip_prk_steps=True, as Stable Diffusion's PNDM configs do"
            )
        if cfg.prediction_type not in _PREDICTIONS:
            raise NotImplementedError(
                f"prediction_type={cfg.prediction_type!r} is not supported by PNDMScheduler (diffusers does not "
                f"implement it either); valid: {', '.join(_PREDICTIONS)}"
            )

    def _ff_prepare(self) -> None:
        self._ff_ac = self.alphas_cumprod.detach().to("cpu", torch.float64).numpy()
        self._ff_final = float(self.final_alpha_cumprod)
        self._ff_t = [int(v) for v in self._ff_host_timesteps]

    def _ff_alpha(self, t: int) -> float:
        if not 0 <= t < len(self._ff_ac):
            raise ValueError(f"timestep {t} is outside the {len(self._ff_ac)} training timesteps (diffusers fails)")
        return float(self._ff_ac[t])

    def _ff_spec(self, i: int, k: int, variant: Any) -> StepSpec:
        ratio = self.config.num_train_timesteps // self.num_inference_steps
        t, prev = self._ff_t[i], self._ff_t[i] - ratio
        if k == 1:  # diffusers repeats the first step: from one ratio above this timestep to it
            t, prev = t + ratio, t
        a_t = self._ff_alpha(t)
        a_p = self._ff_alpha(prev) if prev >= 0 else self._ff_final
        if a_t == 0.0:
            raise ValueError(f"alphas_cumprod is 0 at timestep {t} (zero SNR): diffusers' PNDM step divides by it")
        base, weights = plms_weights(k)
        sample = Z(base)
        output = Lin({})
        for stage, w in weights:
            output = output + X(stage) * w
        if self.config.prediction_type == "v_prediction":  # diffusers converts the combination with this sample
            output = output * math.sqrt(a_t) + sample * math.sqrt(1.0 - a_t)
        c_sample = math.sqrt(a_p / a_t)
        denom = a_t * math.sqrt(1.0 - a_p) + math.sqrt(a_t * (1.0 - a_t) * a_p)
        return StepSpec(0.0, 1.0, sample * c_sample - output * ((a_p - a_t) / denom))

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """diffusers' PLMS step (same arguments and output), in one backend call."""
        self._ff_require_timesteps()
        prev, _ = self._ff_step(
            model_output, timestep, sample, state_dtype=promoted_dtype(sample, model_output), want_pred=False
        )
        if not return_dict:
            return (prev,)
        return _OUTPUT(prev)
