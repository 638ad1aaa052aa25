"""Drop-in ``DPMSolverSinglestepScheduler``: diffusers' singlestep DPM-Solver(++) as one fused step a call.

A singlestep solver of order ``p`` spends ``p`` model calls on one interval: the
group's first call takes a first-order step from the group's sample and the later
ones take the whole interval again from that sample, with the group's predictions
(diffusers' ``order_list``, e.g. ``1, 2, 3, 1, 2, 3, ...``; the order drops where fewer
predictions exist, counted from the loop's first call). So a call reads the group's
sample and up to two earlier predictions from the kernel's history. The formulas are
diffusers' (DPM-Solver and DPM-Solver++, midpoint and heun, and SDE-DPM-Solver++),
evaluated in float64 from its float32 sigmas once per loop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from diffusers.schedulers import scheduling_dpmsolver_singlestep as _dps

from ..solvers.base import Lin, UndefinedStepError
from ..solvers.dpmpp import repeated_point
from ._multistep import MultistepScheduler, Undefined, half_logsnr, stored_prediction
from ._outputs import output_maker
from ._spec import X, Z, noise, promoted_dtype

__all__ = ["DPMSolverSinglestepScheduler", "singlestep_updates"]
_OUTPUT = output_maker(_dps.SchedulerOutput, "prev_sample")

ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++", "dpmsolver")
SOLVER_TYPES = ("midpoint", "heun")


def _differences(lam, i: int, g: int, p: int, m, h: float) -> tuple[Lin, Lin | None, Lin | None, Lin | None]:
    """``(D0, D1, D1_1, D2)`` of a call ``i`` of order ``p`` in the group from ``g``, diffusers' definitions."""
    d0 = m(g)
    if p == 1:
        return d0, None, None, None
    r0 = (lam[i] - lam[g]) / h
    if r0 == 0:
        raise UndefinedStepError(repeated_point(g, i, p))
    d1_1 = (m(i) - d0) / r0
    if p == 2:
        return d0, d1_1, d1_1, None
    r1 = (lam[i - 1] - lam[g]) / h
    if r1 == 0 or r0 == r1:
        raise UndefinedStepError(repeated_point(g, i - 1, p) if r1 == 0 else repeated_point(i - 1, i, p))
    d1_0 = (m(i - 1) - d0) / r1
    d1 = (d1_0 * r0 - d1_1 * r1) / (r0 - r1)
    d2 = (d1_1 - d1_0) * (2.0 / (r0 - r1))
    return d0, d1, d1_1, d2


def singlestep_updates(
    sigmas: Sequence[float],
    order_list: Sequence[int],
    *,
    start: int = 0,
    algorithm_type: str = "dpmsolver++",
    solver_type: str = "midpoint",
    flow: bool = False,
    x_is_eps: bool = False,
) -> tuple[list[Lin | Undefined], list[int]]:
    """Next-sample formulas for calls ``start .. n-1`` of a diffusers singlestep DPM-Solver loop, and each call's
    order. ``order_list`` is diffusers' (per call); ``X(k)`` is the data prediction for the ``++`` algorithms,
    and for ``dpmsolver`` the noise prediction itself with ``x_is_eps`` (else the noise prediction is read from
    ``Z`` and ``X``). A step diffusers leaves undefined is an :class:`Undefined` (it raises when it runs)."""
    if algorithm_type not in ALGORITHMS:
        raise ValueError(f"algorithm_type {algorithm_type!r} is not supported; valid: {', '.join(ALGORITHMS)}")
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type {solver_type!r} is not supported; valid: {', '.join(SOLVER_TYPES)}")
    sig, a, s, lam = half_logsnr(sigmas, flow, start)
    n = len(sig) - 1
    plus, sde = algorithm_type.endswith("++"), algorithm_type.startswith("sde")
    m = stored_prediction(start, a, s, plus, x_is_eps)
    updates, orders = [], []
    group = start
    for i in range(start, n):
        k = i - start
        if i >= len(order_list):
            raise ValueError(f"call {i} has no order in diffusers' order_list of {len(order_list)} (diffusers fails)")
        p = min(int(order_list[i]), k + 1)
        orders.append(p)
        try:
            if p == 1:
                group = i
            elif group != i - p + 1:
                raise ValueError(f"call {i} of order {p} does not follow a group of first-order call {i - p + 1}")
            if not plus and not x_is_eps and p == 3:
                raise ValueError("a noise prediction read from the sample and x0 at order 3 needs four stored tensors")
            g, a_t, s_t = group, a[i + 1], s[i + 1]
            if s_t == 0:
                if not plus or p > 1:
                    raise UndefinedStepError(
                        f"call {i} of order {p} steps to sigma = 0, where diffusers divides by zero"
                    )
                updates.append(X(k) * a_t)  # (SDE: the noise's weight is 0 there)
                continue
            h = lam[i + 1] - lam[g]
            z = Z(g - start)
            d0, d1, d1_1, d2 = _differences(lam, i, g, p, m, h)
            heun = solver_type == "heun"
            if plus and not sde:
                em = math.expm1(-h)
                out = z * (s_t / s[g]) - d0 * (a_t * em)
                if p == 2:
                    out = out + d1 * (a_t * (em / h + 1.0) if heun else -0.5 * a_t * em)
                elif p == 3:
                    out = out + (d1 if heun else d1_1) * (a_t * (em / h + 1.0))
                    if heun:
                        out = out - d2 * (a_t * ((em + h) / h**2 - 0.5))
            elif sde:
                e2 = -math.expm1(-2.0 * h)  # 1 - e^{-2h}
                out = z * (s_t / s[g] * math.exp(-h)) + d0 * (a_t * e2) + noise(s_t * math.sqrt(e2))
                if p == 2:
                    out = out + d1 * (a_t * (e2 / (-2.0 * h) + 1.0) if heun else 0.5 * a_t * e2)
                elif p == 3:
                    out = out + (d1 if heun else d1_1) * (a_t * (e2 / (-2.0 * h) + 1.0))
                    if heun:
                        out = out + d2 * (a_t * ((e2 - 2.0 * h) / (4.0 * h * h) - 0.5))
            else:  # noise prediction
                ep = math.expm1(h)
                out = z * (a_t / a[g]) - d0 * (s_t * ep)
                if p == 2:
                    out = out - d1 * (s_t * (ep / h - 1.0) if heun else 0.5 * s_t * ep)
                elif p == 3:
                    out = out - (d1 if heun else d1_1) * (s_t * (ep / h - 1.0))
                    if heun:
                        out = out - d2 * (s_t * ((ep - h) / h**2 - 0.5))
            updates.append(out)
        except UndefinedStepError as exc:  # a call diffusers leaves undefined: it raises when it runs
            updates.append(Undefined(str(exc)))
    return updates, orders


class DPMSolverSinglestepScheduler(MultistepScheduler, _dps.DPMSolverSinglestepScheduler):
    """diffusers' ``DPMSolverSinglestepScheduler`` whose ``step`` is one fused fastflow call.

    Algorithms ``dpmsolver++``, ``sde-dpmsolver++`` and ``dpmsolver``; solver types
    ``midpoint`` and ``heun``; orders 1-3, ``lower_order_final``, final sigma types,
    every prediction type and sigma family (diffusers' own schedule and order list).
    Dynamic thresholding runs as plain torch ops before the fused step, as in the
    multistep drop-ins (with ``dpmsolver`` it raises: diffusers' step fails there).
    """

    _ff_learned_eps = False  # the model output carries a learned variance after its noise (set by _ff_prepare)

    @property
    def _ff_draws(self) -> bool:
        return self.config.algorithm_type.startswith("sde")

    @property
    def _ff_stores_noise(self) -> bool:
        return self.config.algorithm_type == "dpmsolver"

    def _ff_check_config(self) -> None:
        cfg = self.config
        name = type(self).__name__
        if cfg.algorithm_type not in ALGORITHMS:
            raise NotImplementedError(f"algorithm_type={cfg.algorithm_type!r} is not supported by fastflow's {name}")
        if cfg.algorithm_type == "dpmsolver" and cfg.thresholding:
            raise NotImplementedError(
                "algorithm_type='dpmsolver' with thresholding=True is not supported: diffusers' singlestep step "
                "reads its training alphas at an undefined timestep there and fails"
            )
        if cfg.algorithm_type == "dpmsolver" and cfg.prediction_type == "flow_prediction":
            raise NotImplementedError("prediction_type='flow_prediction' with algorithm_type='dpmsolver' is not "
                                      "supported (diffusers rejects it too)")
        super()._ff_check_config()

    def _ff_prepare(self) -> None:
        super()._ff_prepare()
        cfg = self.config  # what step reads per call, kept here rather than read from the config each time
        self._ff_learned_eps = cfg.variance_type in ("learned", "learned_range") and cfg.prediction_type == "epsilon"

    def _ff_updates(self, start: int) -> list[Lin | Undefined]:
        cfg = self.config
        updates, _ = singlestep_updates(
            self._ff_sigmas,
            self.order_list,
            start=start,
            algorithm_type=cfg.algorithm_type,
            solver_type=cfg.solver_type,
            flow=cfg.use_flow_sigmas,
            x_is_eps=self._ff_x_is_eps,
        )
        return updates

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> _dps.SchedulerOutput | tuple:
        """diffusers' step (same arguments and output), in one backend call. ``sde-dpmsolver++``: a ``generator``
        gives diffusers' exact numbers; without one the kernel draws fastflow's own noise."""
        default = generator is None and not self._ff_learned_eps
        if default and (done := self._ff_lane_step(model_output, timestep, sample)) is not None:
            return (done[0],) if not return_dict else _OUTPUT(done[0])
        idx = self._ff_scheduled_index(timestep)
        if self._ff_learned_eps:
            model_output = model_output[:, :3]  # diffusers keeps the first three channels as the noise
        dtype = promoted_dtype(sample, model_output)  # diffusers steps in that dtype (no upcast)
        # diffusers draws in its converted output's dtype: the model output itself for 'sample', else promoted
        raw = self.config.prediction_type == "sample"
        draw = self._ff_draw(generator, model_output, model_output.dtype if raw else dtype) if self._ff_draws else None
        prev = self._ff_multistep_step(model_output, timestep, sample, idx, draw=draw, state_dtype=dtype, lane=default)
        if not return_dict:
            return (prev,)
        return _OUTPUT(prev)
