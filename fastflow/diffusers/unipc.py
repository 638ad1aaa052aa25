"""Drop-in ``UniPCMultistepScheduler``: diffusers' UniPC (bh1/bh2, orders 1-3) as one fused step.

Each step corrects the incoming sample with the new prediction (UniC), then
predicts the next sample (UniP). The correction is written as a change to the
incoming sample, ``z + (C - P)``, where ``P`` is the previous predictor's
higher-order term and ``C`` the corrector's, so a step stays linear in the sample
and at most three stored predictions. In a loop this equals diffusers' form
(which rebuilds the corrected sample from the previous step's input) to float32
round-off; a sample edited between steps (another tensor than the one the last
step returned) is stepped as diffusers' corrector does, discarding the edit, see
:mod:`._rebuilt_corrector`.

Per-step orders follow diffusers: warm-up from the first step taken, and with
``lower_order_final`` the order never exceeds the number of steps left (at any
step count, unlike DPM-Solver's 15-step rule).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from diffusers.schedulers import scheduling_unipc_multistep as _unipc

from ..solvers.base import Lin, UndefinedStepError
from ..solvers.dpmpp import multistep_order
from ..solvers.unipc import correction, differences, predictor_update
from ._multistep import Undefined, half_logsnr, stored_prediction
from ._outputs import output_maker
from ._rebuilt_corrector import RebuiltCorrectorMixin
from ._spec import X, Z

__all__ = ["UniPCMultistepScheduler", "unipc_corrects", "unipc_orders", "unipc_updates"]
_OUTPUT = output_maker(_unipc.SchedulerOutput, "prev_sample")

SOLVER_TYPES = ("bh1", "bh2")


def unipc_orders(n: int, start: int, solver_order: int, lower_order_final: bool) -> list[int]:
    """The predictor order diffusers uses at each step ``start .. n-1``: the core's :func:`multistep_order` rule,
    with warm-up counted from the first step taken and ``lower_order_final`` at any loop length."""
    return [
        multistep_order(i, n, solver_order, lower_order_final, start=start, lower_below=math.inf)
        for i in range(start, n)
    ]


def unipc_corrects(i: int, start: int, disable_corrector: Sequence[int]) -> bool:
    """Whether diffusers' UniPC runs its corrector at step ``i`` of a loop from ``start``: every step after the
    first taken, but those whose previous step ``disable_corrector`` lists."""
    return i > start and (i - 1) not in disable_corrector


def unipc_updates(
    sigmas: Sequence[float],
    *,
    start: int = 0,
    solver_order: int = 2,
    solver_type: str = "bh2",
    predict_x0: bool = True,
    lower_order_final: bool = True,
    disable_corrector: Sequence[int] = (),
    flow: bool = False,
    x_is_eps: bool = False,
) -> tuple[list[Lin | Undefined], list[int]]:
    """Next-sample formulas for steps ``start .. n-1`` of a diffusers UniPC loop, and each step's predictor order.

    With ``predict_x0=False`` diffusers stores noise predictions: ``x_is_eps`` says ``X(k)`` is
    that prediction itself; without it each needs a stored state and data prediction, so only
    ``solver_order=1`` fits the three history slots. A step diffusers leaves undefined is an :class:`Undefined` (it
    raises when it runs).
    """
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type {solver_type!r} is not supported; valid: {', '.join(SOLVER_TYPES)}")
    if not predict_x0 and not x_is_eps and solver_order != 1:
        raise ValueError("predict_x0=False with x0 as x_hat is supported with solver_order=1 only")
    sig, a, s, lam = half_logsnr(sigmas, flow, start)
    n = len(sig) - 1
    orders = unipc_orders(n, start, solver_order, lower_order_final)
    skip = {int(j) for j in disable_corrector}
    # x0 form steps with (sigma ratio, alpha); the noise form with (alpha ratio, sigma) and the opposite sign of h.
    sign = -1.0 if predict_x0 else 1.0

    m = stored_prediction(start, a, s, predict_x0, x_is_eps)

    def ratio(t: int, f: int) -> float:
        return s[t] / s[f] if predict_x0 else a[t] / a[f]

    def scale(t: int) -> float:
        return a[t] if predict_x0 else s[t]

    def check(i: int, order: int, what: str) -> None:
        if s[i + 1] == 0 and solver_type == "bh1":
            raise UndefinedStepError(
                f"step {i} ends at sigma 0 with solver_type='bh1' (final_sigmas_type='zero'), where diffusers "
                "multiplies an infinite B(h) by zero (returns NaN); use final_sigmas_type='sigma_min' or "
                "solver_type='bh2'"
            )
        zero_length = lam[i + 1] == lam[i]
        if (not math.isfinite(lam[i + 1]) and (order > 1 or not predict_x0)) or (zero_length and order > 2):
            fix = ("final_sigmas_type='sigma_min' or predict_x0=True" if not predict_x0 and s[i + 1] == 0
                   else "lower_order_final=True, final_sigmas_type='zero' or predict_x0=True")
            raise UndefinedStepError(
                f"the {what} of step {i} ends at sigma {sig[i + 1]:.6g} with order {order}"
                f"{'' if predict_x0 else ' and predict_x0=False'}, where diffusers divides by zero "
                f"(returns NaN or fails); use {fix}"
            )

    updates = []
    for i, p in zip(range(start, n), orders, strict=True):
        k = i - start
        try:
            z = Z(k)
            if unipc_corrects(i, start, skip):
                rks, d1s = differences(lam, i - 1, orders[k - 1], m)
                z = z + correction(m(i), m(i - 1), rks, d1s, sign * -(lam[i] - lam[i - 1]), solver_type, scale(i))
            check(i, p, "predictor")
            if s[i + 1] == 0:
                updates.append(X(k) * a[i + 1])
                continue
            if lam[i + 1] == lam[i]:
                updates.append(z)  # zero-length step of order 1 or 2: diffusers' terms all vanish
                continue
            rks, d1s = differences(lam, i, p, m)
            h = sign * -(lam[i + 1] - lam[i])
            updates.append(predictor_update(z, m(i), rks, d1s, h, solver_type, ratio(i + 1, i), scale(i + 1)))
        except UndefinedStepError as exc:  # a step diffusers leaves undefined: it raises when it runs
            updates.append(Undefined(str(exc)))
    return updates, orders


class UniPCMultistepScheduler(RebuiltCorrectorMixin, _unipc.UniPCMultistepScheduler):
    """diffusers' ``UniPCMultistepScheduler`` whose ``step`` is one fused fastflow call.

    bh1/bh2, orders 1-3, ``disable_corrector``, ``lower_order_final``, flow sigmas and
    dynamic shifting, ``predict_x0`` either way (with ``False`` the kernel's ``x_hat`` is
    the noise prediction diffusers stores); ``solver_p`` (another scheduler as predictor)
    raises. Dynamic thresholding runs as plain torch ops before the fused step (sync-free,
    not fused), as in DPM-Solver.
    """

    def _ff_check_config(self) -> None:
        cfg = self.config
        name = type(self).__name__
        if self.solver_p is not None:
            raise NotImplementedError(f"solver_p (another scheduler as UniPC's predictor) is not supported by {name}")
        if not cfg.predict_x0 and cfg.prediction_type == "flow_prediction":
            raise NotImplementedError("prediction_type='flow_prediction' with predict_x0=False is not supported "
                                      "(diffusers rejects it too)")
        super()._ff_check_config()

    @property
    def _ff_thresholding(self) -> bool:
        return bool(self.config.thresholding) and self.predict_x0  # diffusers thresholds x0 predictions only

    @property
    def _ff_stores_noise(self) -> bool:
        return not self.predict_x0

    def _ff_prepare(self) -> None:
        super()._ff_prepare()
        self._ff_uncorrected = frozenset(int(j) + 1 for j in self.disable_corrector)

    def _ff_corrects(self, i: int, start: int) -> bool:
        return unipc_corrects(i, start, {int(j) for j in self.disable_corrector})

    def _ff_updates(self, start: int) -> list[Lin | Undefined]:
        cfg = self.config
        updates, _ = unipc_updates(
            self._ff_sigmas,
            start=start,
            solver_order=cfg.solver_order,
            solver_type=cfg.solver_type,
            predict_x0=self.predict_x0,
            lower_order_final=cfg.lower_order_final,
            disable_corrector=self.disable_corrector,
            flow=cfg.use_flow_sigmas,
            x_is_eps=self._ff_x_is_eps,
        )
        return updates

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> _unipc.SchedulerOutput | tuple:
        """diffusers' step (same arguments and output), in one backend call."""
        shift = None if sample is self._ff_returned and self._ff_given is None else self._ff_edit_shift(sample)
        if (done := self._ff_lane_step(model_output, timestep, sample)) is not None:
            prev = done[0] if shift is None else self._ff_shifted(done[0], shift)
            idx = self._step_index  # _ff_kept, inlined without its trace test (a traced step keeps nothing)
            self._ff_returned = prev if idx < self._ff_steps else None
            if idx - 1 in self._ff_uncorrected:
                self._ff_keep_given(sample, idx - 1)
            return (prev,) if not return_dict else _OUTPUT(prev)
        prev = self._ff_kept(self._ff_multistep_step(model_output, timestep, sample, lane=True), sample, shift)
        if not return_dict:
            return (prev,)
        return _OUTPUT(prev)
