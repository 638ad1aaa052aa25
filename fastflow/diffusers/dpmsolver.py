"""Drop-in ``DPMSolverMultistepScheduler``: diffusers' DPM-Solver(++) as one fused step.

diffusers decides each step's order from its own rules (warm-up, ``lower_order_final``
below 15 steps, ``euler_at_final``, a final step to sigma = 0) and writes its
updates in diffusers' sigma (``sigma / alpha``). The stages here follow those rules
and formulas exactly, evaluated once in float64 from diffusers' own float32
sigmas, so a loop reproduces diffusers' numbers to float32 round-off.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from diffusers.schedulers import scheduling_dpmsolver_multistep as _dpm

from ..solvers.base import Lin, UndefinedStepError
from ..solvers.dpmpp import dpmpp_differences, dpmpp_update, multistep_order
from ._multistep import (
    MultistepScheduler,
    Undefined,
    alpha_sigma,
    float32_step_length,
    half_logsnr,
    stored_prediction,
    x0_coefs,
)
from ._outputs import output_maker
from ._spec import X, Z, noise, promoted_dtype

__all__ = [
    "DPMSolverFormulas", "DPMSolverMultistepScheduler", "DPMSolverOptions", "alpha_sigma", "dpm_orders", "dpm_updates",
    "x0_coefs",
]
_OUTPUT = output_maker(_dpm.SchedulerOutput, "prev_sample")

ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver")
# A zero-length step of a forward schedule: its likely cause, and the options that avoid it.
ZERO_LENGTH = (
    "use_karras_sigmas or use_lu_lambdas with final_sigmas_type='sigma_min'?",
    "final_sigmas_type='zero' or euler_at_final=True",
)


def dpm_orders(n: int, start: int, solver_order: int, lower_order_final: bool, euler_at_final: bool,
               final_zero: bool) -> list[int]:
    """The order diffusers uses at each step ``start .. n-1``: the core's :func:`multistep_order` rule, with
    warm-up counted from the first step taken and a first-order last step with ``euler_at_final`` or ``final_zero``."""
    last_first = euler_at_final or final_zero
    return [
        multistep_order(i, n, solver_order, lower_order_final, start=start, final_first_order=last_first)
        for i in range(start, n)
    ]


def dpm_updates(
    sigmas: Sequence[float],
    *,
    start: int = 0,
    solver_order: int = 2,
    algorithm_type: str = "dpmsolver++",
    solver_type: str = "midpoint",
    lower_order_final: bool = True,
    euler_at_final: bool = False,
    final_zero: bool = True,
    flow: bool = False,
    ve: bool = False,
    sde_max_order: int = 3,
    x_is_eps: bool = False,
    zero_length: tuple[str, str] = ZERO_LENGTH,
) -> tuple[list[Lin | Undefined], list[int]]:
    """Next-sample formulas for steps ``start .. n-1`` of a diffusers DPM-Solver loop, and each step's order.

    ``sigmas`` are diffusers' ``n + 1`` sigmas, flow sigmas with ``flow``, variance-exploding ones (``alpha = 1``)
    with ``ve``. Formula ``k`` is step ``start + k``; ``X(k)`` is diffusers' converted model output (x0 for the
    ``++`` variants). An SDE step above ``sde_max_order`` raises when it runs (diffusers' EDM scheduler defines
    none of order 3 and fails there). ``x_is_eps``: the noise-prediction algorithms' ``X(k)`` is the noise
    prediction itself (no thresholding), not x0; without it their stored predictions need two tensors each, so
    only orders 1 and 2 fit. ``zero_length``: what makes a schedule's step zero-length, and the options that avoid
    it, for the error such a step raises. A step diffusers leaves undefined is an :class:`Undefined` (it raises
    when it runs).
    """
    if algorithm_type not in ALGORITHMS:
        raise ValueError(f"algorithm_type {algorithm_type!r} is not supported; valid: {', '.join(ALGORITHMS)}")
    sig, a, s, lam = half_logsnr(sigmas, flow, start, ve)
    n = len(sig) - 1
    orders = dpm_orders(n, start, solver_order, lower_order_final, euler_at_final, final_zero)
    plus = algorithm_type.endswith("++")
    sde = algorithm_type.startswith("sde")
    if not plus and max(orders) > 2 and not x_is_eps:
        raise ValueError(
            f"algorithm_type {algorithm_type!r} with solver_order 3 and thresholding is not supported (only 1 and 2)"
        )

    m = stored_prediction(start, a, s, plus, x_is_eps)  # x0 (``++``) or eps

    def length32(j: int) -> float:
        """Step ``j``'s length as diffusers' float32 sees it where the float64 one is tiny (elsewhere they agree
        in sign and are far from 0: lambda's float32 error is about 1e-6)."""
        h = lam[j + 1] - lam[j]
        return float32_step_length(sig[j], sig[j + 1], flow, ve) if abs(h) < 1e-3 else h

    updates = []
    for i, p in zip(range(start, n), orders, strict=True):
        k = i - start
        try:
            a_t, s_t, s_s = a[i + 1], s[i + 1], s[i]
            if s_t == 0:
                if not plus:
                    raise UndefinedStepError(f"algorithm_type {algorithm_type!r} cannot step to sigma = 0")
                updates.append(X(k) * a_t)
                continue
            h = lam[i + 1] - lam[i]
            h32 = length32(i)
            for j in range(i - p + 1, i):
                if length32(j) == 0:
                    # The differences of stored predictions divide by the earlier steps' lengths.
                    raise UndefinedStepError(
                        f"step {i} (order {p}) follows a zero-length step {j} (sigma {sig[j]:.6g} to "
                        f"{sig[j + 1]:.6g}: repeated sigmas, or custom timesteps past num_train_timesteps - 1?); its "
                        f"order-{p} differences divide by that length and diffusers returns NaN there. Use distinct "
                        "timesteps or solver_order=1"
                    )
            if h32 == 0:
                # A zero-length step in diffusers' float32 (Karras sigmas ending at sigma_min twice, or sigmas an
                # ulp apart): diffusers leaves the sample unchanged at order 1 and 2M-midpoint, and divides 0 by 0
                # otherwise.
                if p > 2 or (p == 2 and solver_type != "midpoint"):
                    cause, fix = zero_length
                    raise UndefinedStepError(
                        f"step {i} has zero length (sigma {sig[i]:.6g} to {sig[i + 1]:.6g}; {cause}); diffusers "
                        f"returns NaN there for a step of order {p}"
                        f"{' with solver_type=' + repr(solver_type) if p == 2 else ''}. "
                        f"Use {fix}{', or solver_type=midpoint' if p == 2 else ''}"
                    )
                updates.append(Z(k))
                continue
            if sde and p > (top := sde_max_order if plus else 2):
                raise UndefinedStepError(
                    f"step {i} is of order {p}, and {algorithm_type!r} has no step of that order in this scheduler "
                    f"(diffusers fails there); use solver_order={top}"
                )
            if sde and h32 < 0:
                if h < 0:  # the schedule itself raises the noise level (an inversion)
                    raise UndefinedStepError(
                        f"step {i} goes from sigma {sig[i]:.6g} up to {sig[i + 1]:.6g}, where the noise scale of "
                        f"algorithm_type {algorithm_type!r} is the square root of a negative number and diffusers "
                        "returns NaN: an SDE step must lower the noise level. Use algorithm_type='dpmsolver++' to run "
                        "up the noise levels"
                    )
                raise UndefinedStepError(
                    f"step {i} goes from sigma {sig[i]:.6g} up to {sig[i + 1]:.6g} in diffusers' float32 arithmetic "
                    f"(sigmas an ulp apart; use_lu_lambdas with final_sigmas_type='sigma_min'?), where the noise "
                    f"scale of algorithm_type {algorithm_type!r} is the square root of a negative number and diffusers "
                    "returns NaN. Use final_sigmas_type='zero'"
                )
            # diffusers' 3M halves D2 (diffusers_3m); its SDE-3M adds the D2 term the core's SDE never uses.
            d0, d1, d2 = dpmpp_differences(lam, i, p, m, diffusers_3m=True)
            if plus:
                out = dpmpp_update(Z(k), h, a_t, s_t, s_s, d0, d1, d2, sde=sde, solver_type=solver_type)
            else:  # noise-prediction DPM-Solver (no core counterpart)
                z = Z(k)
                ep1 = math.expm1(h)
                c = 2.0 if sde else 1.0
                out = z * (a_t / a[i]) - d0 * (c * s_t * ep1)
                if d2 is not None:  # diffusers' third order ignores solver_type (it has no SDE one)
                    out = out - d1 * (s_t * (ep1 / h - 1.0)) - d2 * (s_t * ((ep1 - h) / h**2 - 0.5))
                elif d1 is not None:
                    w = 0.5 * c * s_t * ep1 if solver_type == "midpoint" else c * s_t * (ep1 / h - 1.0)
                    out = out - d1 * w
                if sde:
                    out = out + noise(s_t * math.sqrt(math.expm1(2.0 * h)))
            updates.append(out)
        except UndefinedStepError as exc:  # a step diffusers leaves undefined: it raises when it runs
            updates.append(Undefined(str(exc)))
    return updates, orders


class DPMSolverFormulas(MultistepScheduler):
    """The steps of a diffusers DPM-Solver scheduler from its config (:func:`dpm_updates`): shared by the drop-ins
    of ``DPMSolverMultistepScheduler`` and ``EDMDPMSolverMultistepScheduler``, which differ in their sigmas'
    parametrization (:meth:`_ff_sigma_kind`) and highest SDE order."""

    _ff_sde_max_order = 3
    _ff_zero_length = ZERO_LENGTH  # dpm_updates' zero_length

    @property
    def _ff_final_zero(self) -> bool:
        """Whether the schedule ends at sigma = 0 (diffusers then takes a first-order last step)."""
        return self.config.final_sigmas_type == "zero"

    @property
    def _ff_algorithm(self) -> str:
        """diffusers' ``algorithm_type`` (a family without the option fixes it)."""
        return self.config.algorithm_type

    @property
    def _ff_stores_noise(self) -> bool:
        return not self._ff_algorithm.endswith("++")

    def _ff_sigma_kind(self) -> dict[str, bool]:
        """``dpm_updates``' keywords for what diffusers' sigmas are (``flow``, ``ve``)."""
        raise NotImplementedError

    @property
    def _ff_draws(self) -> bool:
        return self._ff_algorithm.startswith("sde")

    def _ff_updates(self, start: int) -> list[Lin | Undefined]:
        cfg = self.config
        updates, _ = dpm_updates(
            self._ff_sigmas,
            start=start,
            solver_order=cfg.solver_order,
            algorithm_type=self._ff_algorithm,
            solver_type=cfg.solver_type,
            lower_order_final=cfg.lower_order_final,
            euler_at_final=cfg.euler_at_final,
            final_zero=self._ff_final_zero,
            sde_max_order=self._ff_sde_max_order,
            x_is_eps=self._ff_x_is_eps,
            zero_length=self._ff_zero_length,
            **self._ff_sigma_kind(),
        )
        return updates


class DPMSolverOptions(DPMSolverFormulas):
    """The config checks and conversions of diffusers' DPM-Solver multistep schedulers, forward and inverse
    (every algorithm, VP or flow sigmas)."""

    _ff_learned_eps = False  # the model output carries a learned variance after its noise (set by _ff_prepare)

    def _ff_check_config(self) -> None:
        cfg = self.config
        name = type(self).__name__
        if cfg.algorithm_type not in ALGORITHMS:
            raise NotImplementedError(f"algorithm_type={cfg.algorithm_type!r} is not supported by fastflow's {name}")
        if cfg.algorithm_type in ("dpmsolver", "sde-dpmsolver"):
            if cfg.solver_order > 2 and cfg.thresholding:
                raise NotImplementedError(
                    f"algorithm_type={cfg.algorithm_type!r} with thresholding=True and "
                    f"solver_order={cfg.solver_order} is not supported by fastflow's {name} (orders 1 and 2 are, "
                    "and order 3 without thresholding): its thresholded noise predictions would need four stored "
                    "tensors"
                )
            if cfg.prediction_type == "flow_prediction":
                raise NotImplementedError(
                    f"prediction_type='flow_prediction' with algorithm_type={cfg.algorithm_type!r} is not "
                    "supported (diffusers rejects it too)"
                )
        super()._ff_check_config()

    def _ff_prepare(self) -> None:
        super()._ff_prepare()
        cfg = self.config
        # diffusers returns prev_sample in the dtype of its converted model output (x0, or eps for the dpmsolver
        # algorithms): the model output's where the conversion is the output itself, else the promotion of the
        # output's and the sample's.
        if cfg.algorithm_type.endswith("++"):
            self._ff_raw_conversion = cfg.prediction_type == "sample"
        else:
            self._ff_raw_conversion = cfg.prediction_type == "epsilon" and not cfg.thresholding
        # What step reads per call, kept here rather than read from the config each time.
        self._ff_learned_eps = cfg.variance_type in ("learned", "learned_range") and cfg.prediction_type == "epsilon"
        self._ff_draws_noise = self._ff_draws

    def _ff_sigma_kind(self) -> dict[str, bool]:
        return {"flow": bool(self.config.use_flow_sigmas)}

    def _ff_model_output(self, model_output: torch.Tensor) -> torch.Tensor:
        """The part of the model output diffusers converts: a learned variance's noise channels (the first three).
        Called after the step's index is known (its schedule set up)."""
        return model_output[:, :3] if self._ff_learned_eps else model_output


class DPMSolverMultistepScheduler(DPMSolverOptions, _dpm.DPMSolverMultistepScheduler):
    """diffusers' ``DPMSolverMultistepScheduler`` whose ``step`` is one fused fastflow call.

    Algorithms ``dpmsolver++``, ``sde-dpmsolver++`` and ``dpmsolver``, orders 1-3 (``dpmsolver``
    with dynamic thresholding 1-2, since a thresholded noise prediction needs a stored sample per
    step); ``sde-dpmsolver``, orders 1-2 (diffusers has no third-order step for it). Dynamic thresholding
    needs a per-sample quantile of x0: it runs as plain torch ops before the fused step
    (sync-free, not fused), and the kernel reads the thresholded x0 in place of the model
    output.
    """

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> _dpm.SchedulerOutput | tuple:
        """diffusers' step (same arguments and output), in one backend call.

        SDE variants: ``variance_noise`` or ``generator`` give diffusers' exact numbers;
        with neither, the kernel draws fastflow's own noise.
        """
        default = generator is None and variance_noise is None and not self._ff_learned_eps
        if default and (done := self._ff_lane_step(model_output, timestep, sample)) is not None:
            return (done[0],) if not return_dict else _OUTPUT(done[0])
        idx = self._ff_scheduled_index(timestep)
        model_output = self._ff_model_output(model_output)
        draw = None
        noise_in = None
        if self._ff_draws_noise:
            if variance_noise is not None:
                noise_in = variance_noise.to(device=model_output.device, dtype=torch.float32)
            else:
                draw = self._ff_draw(generator, model_output, torch.float32)
        prev = self._ff_multistep_step(
            model_output, timestep, sample, idx,
            draw=draw,
            noise=noise_in,
            state_dtype=torch.float32,
            out_dtype=model_output.dtype if self._ff_raw_conversion else promoted_dtype(sample, model_output),
            lane=default,
        )
        if not return_dict:
            return (prev,)
        return _OUTPUT(prev)
