"""LMSDiscreteScheduler drop-in: diffusers' linear multistep steps on its ODE derivatives as fused stages.

diffusers keeps the derivative ``d = (sample - x0) / sigma`` of each call (the last
``order`` of them) and steps ``sample + sum_j c_j d_(k-j)``, where ``c_j`` integrates
the Lagrange basis polynomial of the last ``order`` sigmas over the step's sigma
interval. diffusers integrates it at every call with scipy's ``quad`` on float32 tensor
arithmetic (about a millisecond a coefficient on a CPU; calling it for every step of
each schedule, including the 1000-step one diffusers' constructor sets, took seconds);
:func:`lms_coefficients` integrates the same polynomial exactly (a Gauss-Legendre rule,
float64), once per ``set_timesteps``, without scipy. The two agree to float32 round-off
(tested against ``get_lms_coefficient``). The kernel's ``x_hat`` is the derivative,
which later stages read from history; the returned ``pred_original_sample`` is
diffusers' ``x0`` of the sample and the model output (plain torch ops beside the fused
step; ``compute_pred_original_sample = False`` skips them), or for
``prediction_type='sample'`` the model output itself, as diffusers returns it.

diffusers counts the derivatives from the loop's first call but takes the order from
the step index (``min(step_index + 1, order)``): a loop that starts part-way
(img2img) uses the leading coefficients of the higher order with fewer derivatives,
and so does the drop-in.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers.schedulers import scheduling_lms_discrete as _lms

from ..solvers.base import UndefinedStepError
from ._outputs import output_maker
from ._spec import O, StepSpec, X, Z, promoted_dtype
from .euler import _VEInputMixin

__all__ = ["LMSDiscreteScheduler", "lms_coefficients"]
_OUTPUT = output_maker(_lms.LMSDiscreteSchedulerOutput, "prev_sample", "pred_original_sample")
_PREDICTIONS = ("epsilon", "v_prediction", "sample")
MAX_ORDER = 4  # a step reads the derivatives of the three calls before it: the kernel's history slots
# Gauss-Legendre nodes and weights on [-1, 1]: exact for the basis polynomials (degree < MAX_ORDER <= 2 * 4).
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(4)


def lms_coefficients(sigmas: np.ndarray, i: int, order: int) -> list[float]:
    """The linear multistep coefficients of step ``i``, newest derivative first: for ``j < order``, the integral
    over ``[sigmas[i], sigmas[i + 1]]`` of the Lagrange basis polynomial that is 1 at ``sigmas[i - j]`` and 0 at
    the other ``sigmas[i - m]``, ``m < order``."""
    if not 1 <= order <= min(i + 1, MAX_ORDER):
        raise ValueError(f"order {order} at step {i}: 1 to min(step + 1, {MAX_ORDER})")
    a, b = float(sigmas[i]), float(sigmas[i + 1])
    taus = 0.5 * (b - a) * _GL_NODES + 0.5 * (a + b)
    nodes = [float(sigmas[i - m]) for m in range(order)]
    if len(set(nodes)) < order:
        raise UndefinedStepError(
            f"steps {i - order + 1} to {i} repeat a sigma: the Lagrange basis divides by their difference "
            "(diffusers returns NaN)"
        )
    coefs = []
    for j in range(order):
        basis = np.ones_like(taus)
        for m in range(order):
            if m != j:
                basis *= (taus - nodes[m]) / (nodes[j] - nodes[m])
        coefs.append(0.5 * (b - a) * float(_GL_WEIGHTS @ basis))
    return coefs


class LMSDiscreteScheduler(_VEInputMixin, _lms.LMSDiscreteScheduler):
    """diffusers' ``LMSDiscreteScheduler`` whose ``step`` is one fused fastflow call (orders 1 to 4).

    ``order`` is a step argument in diffusers; each distinct value compiles its own plan once per
    ``set_timesteps``, and a loop keeps the order of its first call (another order later raises).
    """

    _ff_start_dependent = True  # the derivatives count from the loop's first call
    _ff_default_variant = 4
    _ff_loop_order = 4
    _ff_returns_raw_x0 = True

    def _ff_check_config(self) -> None:
        self._ff_require_prediction(_PREDICTIONS, diffusers_too=True)

    def _ff_spec(self, i: int, k: int, variant: Any) -> StepSpec:
        sigma = float(self._ff_sig[i])
        if sigma == 0.0:
            raise UndefinedStepError(f"step {i} is at sigma 0, where diffusers' derivative divides by it")
        xz, xo = self._ff_x0_coefs(sigma, sigma)
        kept = min(k + 1, variant)  # derivatives diffusers holds at this call
        order = min(i + 1, variant)  # the order of its coefficients
        update = Z(k)
        for j, c in enumerate(lms_coefficients(self._ff_sig, i, order)[:kept]):
            update = update + X(k - j) * c
        pred = Z(k) * xz + O(k) * xo if xz else O(k) * xo
        return StepSpec((1.0 - xz) / sigma, -xo / sigma, update, pred=pred)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        order: int = 4,
        return_dict: bool = True,
    ) -> _lms.LMSDiscreteSchedulerOutput | tuple:
        """diffusers' LMS step (same arguments and outputs), in one backend call. Unlike diffusers' Euler steps, its
        LMS takes an integer timestep too (a value, located among its timesteps at a loop's first step)."""
        raw = self._ff_x0_is_output  # diffusers' x0 is then the model output itself
        # Mid-loop, a call of the loop's order (the lane is bound for it) runs from the lane.
        done = self._ff_lane_step(model_output, timestep, sample, variant=order) if type(order) is int else None
        if done is not None:
            prev, pred = done
            if raw and self.compute_pred_original_sample:
                pred = model_output
            return (prev, pred) if not return_dict else _OUTPUT(prev, pred)
        if type(order) is not int or not 1 <= order <= MAX_ORDER:
            order = int(order)
            if not 1 <= order <= MAX_ORDER:
                raise NotImplementedError(
                    f"order={order} is not supported by fastflow's LMSDiscreteScheduler (1 to {MAX_ORDER})"
                )
        idx = self._ff_peek_index(timestep)
        if idx == self._ff_loop_start:
            self._ff_loop_order = order
        elif order != self._ff_loop_order:
            raise NotImplementedError(
                f"order={order} after order={self._ff_loop_order} earlier in this loop: fastflow's "
                "LMSDiscreteScheduler keeps one order per loop (its plan fixes how many derivatives each step reads)"
            )
        prev, pred = self._ff_step(
            model_output, timestep, sample, variant=order, state_dtype=promoted_dtype(sample, model_output),
            index=idx, want_pred=not raw, lane=True,
        )
        if raw and self.compute_pred_original_sample:
            pred = model_output
        if not return_dict:
            return (prev, pred)
        return _OUTPUT(prev, pred)
