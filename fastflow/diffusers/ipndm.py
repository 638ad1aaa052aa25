"""Drop-in ``IPNDMScheduler``: diffusers' improved pseudo-numerical method (fourth-order Adams-Bashforth on
its ``ets``) as one fused step.

Each call forms ``ets = beta * sample + alpha * output`` (the kernel's ``x_hat``; diffusers'
own ``betas``/``alphas`` of the step, read as they are), combines the last up to four with
Adams-Bashforth weights counted from the loop's first call into ``E``, and steps
``next_alpha (sample - beta E) / max(alpha, 1e-8) + next_beta E``. The earlier three
``ets`` are the kernel's history. diffusers' first step has ``alpha = 0``, where it
divides by 1e-8 a difference that is exactly 0; the drop-in writes that call's ``E``
through the sample and the output, so the difference is 0 in its coefficients too.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.schedulers import scheduling_ipndm as _ipndm

from ..solvers.base import UndefinedStepError
from ._base import FastflowScheduler
from ._outputs import output_maker
from ._spec import O, StepSpec, X, Z, promoted_dtype

__all__ = ["IPNDMScheduler", "adams_bashforth_weights"]
_OUTPUT = output_maker(_ipndm.SchedulerOutput, "prev_sample")
_DIVISOR_FLOOR = 1e-8  # diffusers' max(alpha, 1e-8)


def adams_bashforth_weights(count: int) -> tuple[float, ...]:
    """diffusers' weights of the newest ``ets`` first, with ``count`` of them kept (orders 1 to 4)."""
    if count == 1:
        return (1.0,)
    if count == 2:
        return (1.5, -0.5)
    if count == 3:
        return (23 / 12, -16 / 12, 5 / 12)
    return (55 / 24, -59 / 24, 37 / 24, -9 / 24)


class IPNDMScheduler(FastflowScheduler, _ipndm.IPNDMScheduler):
    """diffusers' ``IPNDMScheduler`` whose ``step`` is one fused fastflow call."""

    _ff_start_dependent = True  # the weights count the ets from the loop's first call

    def _ff_prepare(self) -> None:
        self._ff_betas = self.betas.detach().to("cpu", torch.float32).tolist()
        self._ff_alphas = self.alphas.detach().to("cpu", torch.float32).tolist()

    def _ff_spec(self, i: int, k: int, variant: Any) -> StepSpec:
        beta, alpha = self._ff_betas[i], self._ff_alphas[i]
        next_beta, next_alpha = self._ff_betas[i + 1], self._ff_alphas[i + 1]
        divisor = max(alpha, _DIVISOR_FLOOR)
        weights = adams_bashforth_weights(min(k + 1, 4))
        if len(weights) == 1:  # E is this call's ets: written through the sample and the output
            ets = Z(k) * beta + O(k) * alpha
        elif alpha < _DIVISOR_FLOOR:
            raise UndefinedStepError(f"step {i} has alpha {alpha:g}, where diffusers divides its update by 1e-8")
        else:
            ets = X(k) * weights[0]
            for j, w in enumerate(weights[1:], start=1):
                ets = ets + X(k - j) * w
        update = (Z(k) - ets * beta) * (next_alpha / divisor) + ets * next_beta
        return StepSpec(beta, alpha, update)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> _ipndm.SchedulerOutput | tuple:
        """diffusers' IPNDM step (same arguments and output), in one backend call."""
        if (done := self._ff_lane_step(model_output, timestep, sample)) is not None:
            return (done[0],) if not return_dict else _OUTPUT(done[0])
        self._ff_require_timesteps()
        prev, _ = self._ff_step(
            model_output, timestep, sample, state_dtype=promoted_dtype(sample, model_output), want_pred=False,
            lane=True,
        )
        if not return_dict:
            return (prev,)
        return _OUTPUT(prev)
