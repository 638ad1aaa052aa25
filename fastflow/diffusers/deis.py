"""Drop-in ``DEISMultistepScheduler``: diffusers' DEIS (log-rho multistep, orders 1-3) as one fused step.

DEIS integrates the noise prediction over ``rho = sigma / alpha`` (diffusers' sigma on
a VP schedule): ``x_t / alpha_t = x_s / alpha_s + sum_j c_j eps_j``, where ``c_j`` is the
integral from ``rho_s`` to ``rho_t`` of the Lagrange basis polynomial in ``log rho``
through the last ``order`` points. diffusers writes each integral out in closed form
and evaluates it in float32 at every step; :func:`logrho_coefficients` integrates the
same polynomials exactly in float64 (``rho = e^u``, so the integral of ``P(u) e^u`` is
``e^u`` times the alternating sum of ``P``'s derivatives), once per loop. The stored
predictions are noise predictions (see :mod:`._multistep` for how the kernel holds them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from diffusers.schedulers import scheduling_deis_multistep as _deis

from ..solvers.base import Lin, UndefinedStepError
from ..solvers.dpmpp import repeated_point
from ._multistep import MultistepScheduler, Undefined, exp_lagrange_integrals, half_logsnr, stored_prediction
from ._outputs import output_maker
from ._spec import Z, promoted_dtype
from .dpmsolver import dpm_orders

__all__ = ["DEISMultistepScheduler", "deis_updates", "logrho_coefficients"]
_OUTPUT = output_maker(_deis.SchedulerOutput, "prev_sample")


def logrho_coefficients(nodes: Sequence[float], rho_from: float, rho_to: float) -> list[float]:
    """For each node ``rho_j``: the integral over ``[rho_from, rho_to]`` of the Lagrange basis polynomial in
    ``log rho`` that is 1 at ``log rho_j`` and 0 at the other nodes' (nodes newest first, as DEIS takes them): in
    ``u = log rho`` (``d rho = e^u du``), :func:`exp_lagrange_integrals` at rate 1."""
    return exp_lagrange_integrals([math.log(v) for v in nodes], math.log(rho_from), math.log(rho_to), 1.0)


def deis_updates(
    sigmas: Sequence[float],
    *,
    start: int = 0,
    solver_order: int = 2,
    lower_order_final: bool = True,
    flow: bool = False,
    x_is_eps: bool = True,
) -> tuple[list[Lin | Undefined], list[int]]:
    """Next-sample formulas for steps ``start .. n-1`` of a diffusers DEIS loop, and each step's order.

    ``sigmas``: diffusers' ``n + 1`` sigmas (flow sigmas with ``flow``). ``x_is_eps``: ``X(k)`` is the noise
    prediction itself; otherwise it is x0 (thresholded) and each noise prediction is read from ``Z`` and ``X``,
    so only orders 1 and 2 fit the history slots. A step diffusers leaves undefined is an :class:`Undefined` (it
    raises when it runs).
    """
    sig, a, s, lam = half_logsnr(sigmas, flow, start)
    n = len(sig) - 1
    orders = dpm_orders(n, start, solver_order, lower_order_final, euler_at_final=False, final_zero=False)
    if not x_is_eps and max(orders, default=1) > 2:
        raise ValueError("DEIS of order 3 with thresholding is not supported (only 1 and 2)")
    rho = s / a
    m = stored_prediction(start, a, s, False, x_is_eps)
    updates = []
    for i, p in zip(range(start, n), orders, strict=True):
        k = i - start
        try:
            if s[i] == 0 or s[i + 1] == 0:
                raise UndefinedStepError(f"step {i} starts or ends at sigma 0, where DEIS's log rho is not finite")
            for j in range(i - p + 1, i):
                if rho[j] == rho[j + 1]:
                    raise UndefinedStepError(repeated_point(j, j + 1, p) + " (diffusers returns NaN there)")
            coefs = logrho_coefficients([rho[i - j] for j in range(p)], rho[i], rho[i + 1])
            out = Z(k) * (a[i + 1] / a[i])
            for j, c in enumerate(coefs):
                out = out + m(i - j) * (a[i + 1] * c)
            updates.append(out)
        except UndefinedStepError as exc:  # a step diffusers leaves undefined: it raises when it runs
            updates.append(Undefined(str(exc)))
    return updates, orders


class DEISMultistepScheduler(MultistepScheduler, _deis.DEISMultistepScheduler):
    """diffusers' ``DEISMultistepScheduler`` whose ``step`` is one fused fastflow call.

    Orders 1-3 (with dynamic thresholding 1-2: a thresholded noise prediction needs a
    stored sample per step), ``lower_order_final``, every prediction type, Karras /
    exponential / beta / flow sigmas and dynamic shifting (diffusers' own schedule).
    """

    _ff_stores_noise = True  # diffusers' DEIS converts every model output to a noise prediction, through x0
    _ff_noise_via_x0 = True

    def _ff_check_config(self) -> None:
        cfg = self.config
        name = type(self).__name__
        if cfg.algorithm_type != "deis" or cfg.solver_type != "logrho":
            raise NotImplementedError(
                f"algorithm_type={cfg.algorithm_type!r}, solver_type={cfg.solver_type!r} is not supported by "
                f"fastflow's {name} (diffusers implements 'deis' with 'logrho' only)"
            )
        if cfg.thresholding and cfg.solver_order > 2:
            raise NotImplementedError(
                f"thresholding=True with solver_order={cfg.solver_order} is not supported by fastflow's {name} "
                "(orders 1 and 2 are, and order 3 without thresholding): its thresholded noise predictions would "
                "need four stored tensors"
            )
        super()._ff_check_config()

    def _ff_updates(self, start: int) -> list[Lin | Undefined]:
        cfg = self.config
        updates, _ = deis_updates(
            self._ff_sigmas,
            start=start,
            solver_order=cfg.solver_order,
            lower_order_final=cfg.lower_order_final,
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
    ) -> _deis.SchedulerOutput | tuple:
        """diffusers' DEIS step (same arguments and output), in one backend call."""
        if (done := self._ff_lane_step(model_output, timestep, sample)) is not None:
            return (done[0],) if not return_dict else _OUTPUT(done[0])
        prev = self._ff_multistep_step(
            model_output, timestep, sample, state_dtype=promoted_dtype(sample, model_output), lane=True
        )
        if not return_dict:
            return (prev,)
        return _OUTPUT(prev)
