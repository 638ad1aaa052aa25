"""Drop-in ``SASolverScheduler``: SA-Solver (stochastic Adams predictor-corrector, Xue et al. 2023) as one fused
step.

diffusers' step corrects the sample it is given (Adams-Moulton over the interval just taken, with
this step's model output and the noise the predictor drew there), then predicts the next one
(Adams-Bashforth with fresh noise). A corrector and the predictor it corrects start from the
same sample over the same interval with the same ``tau``, so their sample and noise terms are
equal: the corrected sample is the given one plus a combination of data (or noise) predictions,
``c_i = z_i + sum_j (B'_j - B_j) m_j``. The fused stage folds that into the prediction, so no
noise is stored and each step is one kernel call over ``z_i`` and the stored predictions. In a
loop this equals diffusers' form (which rebuilds the corrected sample from the previous step's
input and noise) to float32 round-off; a sample edited between steps is stepped as diffusers'
corrector does, see :mod:`._rebuilt_corrector`.

Coefficients: for the Lagrange basis ``l_j`` in ``lambda = log(alpha / sigma)`` through the
last ``order`` steps, data prediction weighs ``m_j`` by ``(1 + tau^2) sigma_t e^{-tau^2 lambda_t}
int l_j(lambda) e^{(1 + tau^2) lambda} dlambda``, noise prediction by ``-(1 + tau^2) alpha_t int
l_j(lambda) e^{-lambda} dlambda`` (:func:`exp_lagrange_integrals`, exact in float64, where
diffusers evaluates monomial moments in float32), plus diffusers' second-order modification.
``tau`` is the config's ``tau_func`` at each step's timestep, evaluated once per schedule on the
host (a tensor ``tau_func`` would sync every step in diffusers).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from diffusers.schedulers import scheduling_sasolver as _sa

from ..solvers.base import Lin, UndefinedStepError
from ._multistep import Undefined, exp_lagrange_integrals, half_logsnr, stored_prediction
from ._outputs import output_maker
from ._rebuilt_corrector import RebuiltCorrectorMixin
from ._spec import Z, noise, promoted_dtype

__all__ = ["SASolverScheduler", "exp_lagrange_integrals", "sa_orders", "sa_updates"]
_OUTPUT = output_maker(_sa.SchedulerOutput, "prev_sample")
_MAX_HISTORY_ORDER = 3  # a predictor of order 4 would read four earlier predictions: the kernel has three slots


def sa_orders(n: int, start: int, predictor_order: int, corrector_order: int,
              lower_order_final: bool) -> list[tuple[int, int]]:
    """diffusers' ``(predictor order, corrector order)`` set at each step ``start .. n-1``: the corrector order set
    at step ``i`` is the one step ``i + 1`` corrects with. Warm-up counts from the loop's first step."""
    most = max(predictor_order, corrector_order - 1)
    orders = []
    for i in range(start, n):
        done = min(i - start, most)
        p, c = predictor_order, corrector_order
        if lower_order_final:
            p, c = min(p, n - i), min(c, n - i + 1)
        orders.append((min(p, done + 1), min(c, done + 2)))
    return orders


def _adams(
    lam: np.ndarray, a: np.ndarray, s: np.ndarray, i: int, order: int, tau: float, data: bool, corrector: bool
) -> tuple[float, float, list[float]]:
    """One Adams update over ``[lambda_i, lambda_{i+1}]`` (a predictor from step ``i``; a corrector at step ``i + 1``
    over the same interval, its nodes from ``i + 1`` down): ``(sample weight, noise scale, prediction weights)``,
    the weights newest node first."""
    top = i + 1 if corrector else i
    nodes = [lam[top - j] for j in range(order)]
    if len(set(nodes)) < len(nodes):  # a timestep the schedule repeats (1000 leading steps repeat t=500)
        raise UndefinedStepError(
            f"step {top}: SA-Solver's order-{order} {'corrector' if corrector else 'predictor'} interpolates "
            "through the same lambda twice (the schedule repeats a timestep), where diffusers' step divides by zero")
    h = lam[i + 1] - lam[i]
    c = 1.0 + tau * tau
    if data:
        weights = exp_lagrange_integrals(nodes, lam[i], lam[i + 1], c)
        if order == 2:  # diffusers' second-order modification (as UniPC's)
            rest = (h * c + math.expm1(-c * h)) / c**2  # (h c - 1 + e^{-c h}) / c^2
            core = h / 2 - rest / h if corrector else (h * h / 2 - rest) / (lam[i] - lam[i - 1])
            shift = math.exp(c * lam[i + 1]) * core
            weights = [weights[0] + shift, weights[1] - shift]
        scale = c * s[i + 1] * math.exp(-tau * tau * lam[i + 1])
        sample_weight = math.exp(-tau * tau * h) * s[i + 1] / s[i]
        noise_scale = s[i + 1] * math.sqrt(-math.expm1(-2.0 * tau * tau * h))
    else:
        weights = exp_lagrange_integrals(nodes, lam[i], lam[i + 1], -1.0)
        scale = -c * a[i + 1]
        sample_weight = a[i + 1] / a[i]
        noise_scale = tau * s[i + 1] * math.sqrt(math.expm1(2.0 * h))
    return sample_weight, noise_scale, [scale * w for w in weights]


def sa_updates(
    sigmas: Sequence[float],
    taus: Sequence[float],
    *,
    start: int = 0,
    predictor_order: int = 2,
    corrector_order: int = 2,
    lower_order_final: bool = True,
    data: bool = True,
    flow: bool = False,
) -> list[Lin | Undefined]:
    """Next-sample formulas for steps ``start .. n-1`` of a diffusers SA-Solver loop (``taus[i]``: tau at step
    ``i``'s timestep). ``X(k)`` holds the stored prediction (x0 with ``data``, else the noise prediction). A step
    diffusers leaves undefined is an :class:`Undefined` (it raises when it runs)."""
    sig, a, s, lam = half_logsnr(sigmas, flow, start)
    n = len(sig) - 1
    orders = sa_orders(n, start, predictor_order, corrector_order, lower_order_final)
    m = stored_prediction(start, a, s, data=True)
    updates = []
    previous: tuple[float, list[float]] | None = None  # the last predictor's (noise scale, weights)
    for i, (p, _) in zip(range(start, n), orders, strict=True):
        k = i - start
        try:
            if not np.isfinite(lam[i : i + 2]).all():
                raise UndefinedStepError(f"step {i} starts or ends at sigma 0, where SA-Solver's lambda is not finite")
            corrected = Z(k)
            if previous is not None:  # c_i = z_i + (corrector - predictor) prediction terms over the last interval
                order_c = orders[k - 1][1]
                _, _, weights_c = _adams(lam, a, s, i - 1, order_c, taus[i - 1], data, corrector=True)
                for j, w in enumerate(weights_c):
                    corrected = corrected + m(i - j) * w
                for j, w in enumerate(previous[1]):
                    corrected = corrected - m(i - 1 - j) * w
            sample_weight, noise_scale, weights = _adams(lam, a, s, i, p, taus[i], data, corrector=False)
            out = corrected * sample_weight
            for j, w in enumerate(weights):
                out = out + m(i - j) * w
            updates.append(out + noise(noise_scale) if noise_scale else out)
            previous = (noise_scale, weights)
        except UndefinedStepError as exc:  # a step diffusers leaves undefined: it raises when it runs
            updates.append(Undefined(str(exc)))
    return updates


class SASolverScheduler(RebuiltCorrectorMixin, _sa.SASolverScheduler):
    """diffusers' ``SASolverScheduler`` whose ``step`` is one fused fastflow call.

    ``data_prediction`` and ``noise_prediction``, predictor orders 1-3, corrector orders 1-4, any ``tau_func``,
    ``lower_order_final``, every prediction type, Karras / exponential / beta / flow sigmas, dynamic thresholding
    (data prediction). A learned variance raises (diffusers' step fails with one). The noise is fastflow's
    in-kernel noise, or with a ``generator`` diffusers' draw.
    """

    _ff_mixed_addressed = True  # diffusers counts steps and reads tau_func at the timestep's value
    _ff_value_reads = "tau_func's noise level"

    @property
    def _ff_stores_noise(self) -> bool:
        return self.config.algorithm_type == "noise_prediction"

    def _ff_check_config(self) -> None:
        cfg = self.config
        name = type(self).__name__
        if cfg.predictor_order > _MAX_HISTORY_ORDER or cfg.predictor_order < 1:
            raise NotImplementedError(
                f"predictor_order={cfg.predictor_order} is not supported by fastflow's {name} (1 to "
                f"{_MAX_HISTORY_ORDER}: order 4 reads four earlier predictions, the fused step holds three)"
            )
        if not 1 <= cfg.corrector_order <= 4:
            raise NotImplementedError(f"corrector_order={cfg.corrector_order} is not supported (1 to 4, as diffusers)")
        if cfg.algorithm_type == "noise_prediction" and cfg.thresholding:
            raise NotImplementedError(
                f"algorithm_type='noise_prediction' with thresholding=True is not supported by {name} (diffusers' "
                "conversion there indexes its schedule with a timestep it no longer receives)"
            )
        if cfg.algorithm_type == "noise_prediction" and cfg.prediction_type == "flow_prediction":
            raise NotImplementedError(
                f"prediction_type='flow_prediction' with algorithm_type='noise_prediction' is not supported by {name} "
                "(diffusers rejects it too)"
            )
        if cfg.variance_type in ("learned", "learned_range"):
            raise NotImplementedError(
                f"variance_type={cfg.variance_type!r} is not supported by {name} (diffusers' step fails there: it "
                "draws its noise in the shape of the doubled model output)"
            )
        if cfg.prediction_type not in ("epsilon", "sample", "v_prediction", "flow_prediction"):
            raise NotImplementedError(f"prediction_type={cfg.prediction_type!r} is not supported by {name}")

    def _ff_prepare(self) -> None:
        kind = self.timesteps.dtype  # (set before the multistep setup, which builds the first loop's steps)
        self._ff_taus = [float(self.tau_func(torch.tensor(t, dtype=kind))) for t in self._ff_host_values]
        super()._ff_prepare()

    def _ff_value_differs(self, value: float, idx: int) -> bool:
        return float(self.tau_func(torch.tensor(value, dtype=self.timesteps.dtype))) != self._ff_taus[idx]

    def _ff_corrects(self, i: int, start: int) -> bool:
        return i > start  # diffusers corrects every step after a loop's first

    def _ff_updates(self, start: int) -> list[Lin | Undefined]:
        cfg = self.config
        return sa_updates(
            self._ff_sigmas,
            self._ff_taus,
            start=start,
            predictor_order=cfg.predictor_order,
            corrector_order=cfg.corrector_order,
            lower_order_final=cfg.lower_order_final,
            data=cfg.algorithm_type == "data_prediction",
            flow=cfg.use_flow_sigmas,
        )

    @property
    def _ff_draws(self) -> bool:
        return True  # diffusers draws a noise tensor at every step, whatever tau

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> _sa.SchedulerOutput | tuple:
        """diffusers' SA-Solver step (same arguments and output), in one backend call."""
        shift = None if sample is self._ff_returned and self._ff_given is None else self._ff_edit_shift(sample)
        if generator is None and (done := self._ff_lane_step(model_output, timestep, sample)) is not None:
            prev = done[0] if shift is None else self._ff_shifted(done[0], shift)
            idx = self._step_index  # _ff_kept, inlined without its trace test (a traced step keeps nothing)
            self._ff_returned = prev if idx < self._ff_steps else None
            if idx - 1 in self._ff_uncorrected:
                self._ff_keep_given(sample, idx - 1)
            return (prev,) if not return_dict else _OUTPUT(prev)
        prev = self._ff_multistep_step(  # diffusers computes in the promoted dtype and returns the sample's
            model_output, timestep, sample, draw=self._ff_draw(generator, model_output),
            state_dtype=promoted_dtype(sample, model_output), out_dtype=sample.dtype, lane=generator is None,
        )
        prev = self._ff_kept(prev, sample, shift)
        if not return_dict:
            return (prev,)
        return _OUTPUT(prev)
