"""PNDMScheduler drop-in: diffusers' pseudo numerical methods (PRK warm-up, then PLMS) as fused stages.

diffusers steps with ``_get_prev_sample(sample, t, prev, output)``, linear in the
sample and the model output it is given, and keeps model outputs between calls.
Each call is one stage here, and the earlier calls' model outputs are the kernel's
history, kept by reference as diffusers keeps them in ``ets`` (not written again; a
model output changed in place after its call changes the later calls, in diffusers
too), so no device value is read. diffusers' own ``counter``, ``ets``, ``cur_sample`` and
``cur_model_output`` are not kept up to date.

``skip_prk_steps=True`` (Stable Diffusion 1.x's configuration): the first call steps
with its output alone and saves its sample; the second (its timestep appears twice
in the list) repeats that step from the saved sample with the mean of the two
outputs; later calls take Adams-Bashforth weights of the last two, three, then four
kept outputs (every call's but the second).

``skip_prk_steps=False`` (diffusers' default): twelve Runge-Kutta calls first, in
groups of four that all step from the group's first sample, the fourth with
``(o0 + 2 o1 + 2 o2 + o3) / 6``; the group's first output is kept for the
Adams-Bashforth calls that follow. That fourth call reads four earlier tensors in
diffusers (the group's sample and three outputs), one more than the kernel's history
slots, so the drop-in recovers the group's sample from the sample it is given (the
third call's result, a known linear function of it and the third output). A loop that
hands the fourth call any other sample (a new tensor or one changed in place, e.g.
re-noised between calls) raises: diffusers would ignore the change, the recovery would
not (code traced by ``torch.compile`` is not checked). Stable Diffusion's pipelines set
``skip_prk_steps=True`` on any PNDM scheduler they are given; ``PNDMPipeline`` keeps the
warm-up.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers.schedulers import scheduling_pndm as _pndm
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from ..solvers.base import Lin, UndefinedStepError
from ._base import FastflowScheduler
from ._outputs import output_maker
from ._spec import O, StepSpec, X, Z, promoted_dtype

__all__ = ["PNDMScheduler", "plms_weights"]
_OUTPUT = output_maker(SchedulerOutput, "prev_sample")
_PREDICTIONS = ("epsilon", "v_prediction")
# Adams-Bashforth weights on the kept outputs, newest first, by how many are kept.
_AB_WEIGHTS = {2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}
_RK_WEIGHTS = (1 / 6, 1 / 3, 1 / 3, 1 / 6)  # the fourth Runge-Kutta call's combination of its group's outputs


def plms_weights(k: int, prk_calls: int = 0) -> tuple[int, list[tuple[int, float]]]:
    """Call ``k`` of a PLMS loop (counted from the loop's first call, as diffusers' ``counter``): the stage whose
    sample it steps from, and its combination of model outputs as ``(stage, weight)`` pairs.

    Without a warm-up (``prk_calls = 0``) diffusers keeps the output of every call but the second, at most four;
    after ``prk_calls`` Runge-Kutta calls (``k >= prk_calls``) it keeps each of their groups' first outputs, then
    every call's."""
    if prk_calls:
        if k < prk_calls:
            raise ValueError(f"call {k} is a Runge-Kutta call (the first {prk_calls} are)")
        kept = list(range(0, prk_calls, 4)) + list(range(prk_calls, k + 1))
    elif k == 0:
        return 0, [(0, 1.0)]
    elif k == 1:
        return 0, [(1, 0.5), (0, 0.5)]
    else:
        kept = [0] + list(range(2, k + 1))
    kept = kept[-4:]
    weights = _AB_WEIGHTS[len(kept)]
    return k, [(stage, w) for stage, w in zip(reversed(kept), weights, strict=True)]


def _output(stage: int, k: int) -> Lin:
    """The model output of ``stage`` in call ``k``'s update: its own as the kernel's ``x_hat`` (which is the model
    output here), an earlier one as a kept tensor."""
    return X(k) if stage == k else O(stage)


def _sample_mark(sample: torch.Tensor) -> tuple[int, int]:
    """Where a tensor's data lives and its in-place version: equal for the same unchanged tensor (or a copy of the
    scheduler holding its mark), different for a new or modified one. No data is read. Tensors made under
    ``torch.inference_mode`` keep no version: an in-place change of one goes unseen."""
    return sample.data_ptr(), -1 if sample.is_inference() else sample._version


class PNDMScheduler(FastflowScheduler, _pndm.PNDMScheduler):
    """diffusers' ``PNDMScheduler`` whose ``step`` is one fused fastflow call."""

    _ff_counts_calls = True  # diffusers' counter: a loop's first call starts the warm-up wherever it is
    _ff_mixed_addressed = True  # and reads alphas_cumprod at the timestep's value and one stride from it
    _ff_value_reads = "alphas_cumprod and the previous timestep"
    _ff_prk_mark: tuple[int, int] | None = None

    def _ff_check_config(self) -> None:
        self._ff_require_prediction(_PREDICTIONS, diffusers_too=True)

    def _ff_prepare(self) -> None:
        self._ff_ac = self.alphas_cumprod.detach().to("cpu", torch.float64).numpy()
        self._ff_final = float(self.final_alpha_cumprod)
        self._ff_t = [int(v) for v in self._ff_host_timesteps]
        self._ff_prk_t = [int(v) for v in self.prk_timesteps]  # empty with skip_prk_steps
        self._ff_prk_mark = None

    def _ff_alpha(self, t: int) -> float:
        if not 0 <= t < len(self._ff_ac):
            raise UndefinedStepError(
                f"timestep {t} is outside the {len(self._ff_ac)} training timesteps (diffusers fails)"
            )
        return float(self._ff_ac[t])

    def _ff_prev_coefs(self, t: int, prev: int) -> tuple[float, float]:
        """diffusers' ``_get_prev_sample(sample, t, prev, output)`` as ``a * sample + b * output``: ``(a, b)``
        (a v-prediction output is converted to epsilon with that sample first)."""
        a_t = self._ff_alpha(t)
        a_p = self._ff_alpha(prev) if prev >= 0 else self._ff_final
        if a_t == 0.0:
            raise UndefinedStepError(
                f"alphas_cumprod is 0 at timestep {t} (zero SNR): diffusers' PNDM step divides by it"
            )
        c_sample = math.sqrt(a_p / a_t)
        c_output = -(a_p - a_t) / (a_t * math.sqrt(1.0 - a_p) + math.sqrt(a_t * (1.0 - a_t) * a_p))
        if self.config.prediction_type == "v_prediction":  # eps = sqrt(a_t) v + sqrt(1 - a_t) sample
            return c_sample + c_output * math.sqrt(1.0 - a_t), c_output * math.sqrt(a_t)
        return c_sample, c_output

    def _ff_prev(self, sample: Lin, output: Lin, t: int, prev: int) -> StepSpec:
        a, b = self._ff_prev_coefs(t, prev)
        return StepSpec(0.0, 1.0, sample * a + output * b)

    def _ff_spec(self, i: int, k: int, variant: Any) -> StepSpec:
        ratio = self.config.num_train_timesteps // self.num_inference_steps
        prk_calls = len(self._ff_prk_t)
        if k < prk_calls:
            return self._ff_prk_spec(i, k, ratio)
        t, prev = self._ff_t[i], self._ff_t[i] - ratio
        if k == 1 and not prk_calls:  # diffusers repeats the first step: from one ratio above this timestep to it
            t, prev = t + ratio, t
        base, weights = plms_weights(k, prk_calls)
        output = Lin({})
        for stage, w in weights:
            output = output + _output(stage, k) * w
        return self._ff_prev(Z(base), output, t, prev)

    def _ff_prk_spec(self, i: int, k: int, ratio: int) -> StepSpec:
        """Runge-Kutta call ``k``: from its group's first sample at the group's timestep to this call's timestep
        less half a ratio (even calls) or to it (odd ones), as diffusers' ``step_prk``."""
        first = k - k % 4
        t = self._ff_prk_t[first]
        prev = self._ff_t[i] - (0 if k % 2 else ratio // 2)
        if k % 4 < 3:
            return self._ff_prev(Z(first), X(k), t, prev)
        # The group's sample from this call's: the third call gave it a * Z(first) + b * X(k - 1).
        a, b = self._ff_prev_coefs(t, self._ff_t[i - 1] - ratio // 2)
        if a == 0.0:
            raise ValueError(
                f"Runge-Kutta call {k} cannot recover its group's sample: the call before it scaled that sample by 0"
            )
        group_sample = (Z(k) - O(k - 1) * b) * (1.0 / a)
        output = Lin({})
        for j, w in enumerate(_RK_WEIGHTS):
            output = output + _output(first + j, k) * w
        return self._ff_prev(group_sample, output, t, prev)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """diffusers' PNDM step (same arguments and output), in one backend call."""
        # Past the Runge-Kutta calls (every call with skip_prk_steps) the lane serves the loop's steps.
        if (
            self._ff_lane is not None
            and self._step_index is not None
            and self._step_index - self._ff_loop_start >= len(self._ff_prk_t)
            and (done := self._ff_lane_step(model_output, timestep, sample)) is not None
        ):
            return (done[0],) if not return_dict else _OUTPUT(done[0])
        idx = self._ff_scheduled_index(timestep)
        call = idx - self._ff_loop_start
        phase = call % 4 if 0 <= call < len(self._ff_prk_t) else None  # of a Runge-Kutta call
        tracing = phase is not None and phase >= 2 and torch.compiler.is_compiling()
        if phase == 3 and not tracing and self._ff_prk_mark not in (None, _sample_mark(sample)):
            raise NotImplementedError(
                f"PNDMScheduler's Runge-Kutta call {call} was given a sample other than the one the call before "
                "it returned (a new tensor or one changed in place): diffusers ignores the change there, fastflow's "
                "fused step cannot; set skip_prk_steps=True"
            )
        prev, _ = self._ff_step(
            model_output, timestep, sample, state_dtype=promoted_dtype(sample, model_output), want_pred=False,
            index=idx, lane=phase is None,
        )
        if phase == 2:
            self._ff_prk_mark = None if tracing else _sample_mark(prev)
        if not return_dict:
            return (prev,)
        return _OUTPUT(prev)
