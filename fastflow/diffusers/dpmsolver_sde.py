"""Drop-in ``DPMSolverSDEScheduler``: DPM-Solver++ SDE ("DPM++ SDE", k-diffusion's ``dpmpp_sde``) as diffusers
runs it, two ``step`` calls a step (see :mod:`._two_call`).

A step from ``sigma`` to ``sigma_next`` goes through their log-midpoint ``sigma_mid``: the first call is an
ancestral exponential-integrator step to ``sigma_mid`` with the ``x0`` at ``sigma``, the second steps from the
saved sample to ``sigma_next`` with the ``x0`` at ``sigma_mid``; each adds ``sigma_up`` times noise. A call
to ``sigma_next = 0`` is an Euler step without noise. Every coefficient is evaluated as diffusers evaluates it
(float32 0-d tensor arithmetic on its float32 sigmas), so a float64 loop agrees with diffusers' to 1e-9.

Noise. diffusers draws it from one Brownian motion ``W`` over sigma (torchsde's Brownian tree): a call from
``s`` to ``s'`` adds ``(W(s') - W(s)) / sqrt(s - s')``. The second call's interval contains the first's, so
its noise is ``sqrt(rho) n1 + sqrt(1 - rho) m`` with ``rho = (sigma - sigma_mid) / (sigma - sigma_next)``,
``n1`` the first call's noise and ``m`` independent of it: that joint distribution is what the drop-in
reproduces. The kernel draws ``m``; ``n1`` is taken back from what the first call wrote,
``(z - A z_prev - B x0_prev) / C`` (exact up to the rounding of the stored sample), which holds while the
second call is given the very tensor the first returned, unmodified (checked by identity and version counter;
no data is read). Otherwise (an inpainting pipeline blends the sample between the calls, or the step is being
traced by ``torch.compile``) both noises are drawn again from fastflow's noise spec and the kernel is handed
the noise that, through its taking back, adds that combination. ``noise_sampler_seed`` seeds fastflow's noise
when set. With ``diffusers_noise``, diffusers' own Brownian tree draws every call's noise
(``noise_sampler_seed`` as diffusers uses it), so outputs match diffusers'; that needs torchsde, as diffusers'
class itself does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.schedulers import scheduling_dpmsolver_sde as _sde

from ..runner import HistoryShapeError, broadcasts_to
from ..solvers.base import UndefinedStepError
from ._outputs import output_maker
from ._spec import StepSpec, X, Z, noise, promoted_dtype
from ._two_call import ScaledTwoCallMixin, input_scales

__all__ = ["DPMSolverSDEScheduler", "SDEInterval", "sde_interval"]
_OUTPUT = output_maker(_sde.DPMSolverSDESchedulerOutput, "prev_sample", "pred_original_sample")
_PREDICTIONS = ("epsilon", "v_prediction")


def _sigma_fn(t: torch.Tensor) -> torch.Tensor:
    return t.neg().exp()


def _t_fn(sigma: torch.Tensor) -> torch.Tensor:
    return sigma.log().neg()


def _x0_coefs(prediction: str, sigma: torch.Tensor) -> tuple[float, float]:
    """``x0 = xz * sample + xo * model_output`` at ``sigma`` (a float32 0-d tensor), as diffusers evaluates it."""
    if prediction == "epsilon":
        return 1.0, -float(sigma)
    return 1.0 / float(sigma**2 + 1), float(-sigma / (sigma**2 + 1) ** 0.5)


@dataclass(frozen=True)
class _Call:
    """One call's update ``A * z_base + B * x0 + up * s_noise * noise`` and diffusers' Brownian-tree query."""

    xz: float
    xo: float
    a: float
    b: float
    up: float
    query: tuple[torch.Tensor, torch.Tensor]  # the sigmas diffusers passes its noise sampler (float32 0-d)


@dataclass(frozen=True)
class SDEInterval:
    """Both calls of one step from ``sigma`` to ``sigma_next > 0``, and the correlation ``rho`` of their noises."""

    first: _Call
    second: _Call
    mid: torch.Tensor  # sigma_mid, float32 0-d: the second call's model-input sigma
    rho: float


def _ancestral(prediction: str, t: torch.Tensor, t_to: torch.Tensor, sigma_in: torch.Tensor) -> _Call:
    """A call from ``sigma_fn(t)`` to ``sigma_fn(t_to)`` with the x0 at ``sigma_in``, in diffusers' arithmetic."""
    s_from, s_to = _sigma_fn(t), _sigma_fn(t_to)
    up = min(s_to, (s_to**2 * (s_from**2 - s_to**2) / s_from**2) ** 0.5)
    down = (s_to**2 - up**2) ** 0.5
    t_down = _t_fn(down)
    xz, xo = _x0_coefs(prediction, sigma_in)
    a = _sigma_fn(t_down) / _sigma_fn(t)
    return _Call(xz, xo, float(a), -float((t - t_down).expm1()), float(up), (s_from, s_to))


def sde_interval(prediction: str, sigma: torch.Tensor, sigma_next: torch.Tensor) -> SDEInterval:
    """The two calls of a step between diffusers' float32 sigmas ``sigma > sigma_next > 0``."""
    if not float(sigma) > float(sigma_next):
        raise UndefinedStepError(
            f"a step from sigma {float(sigma):.6g} to {float(sigma_next):.6g} draws noise over an empty interval "
            "(diffusers returns NaN there: a loop of this scheduler starts at an even index)"
        )
    t, t_next = _t_fn(sigma), _t_fn(sigma_next)
    t_mid = t + (t_next - t) * 0.5
    mid = _sigma_fn(t_mid)
    first = _ancestral(prediction, t, t_mid, sigma)
    second = _ancestral(prediction, t, t_next, mid)
    s_from, s_mid, s_next = float(first.query[0]), float(first.query[1]), float(second.query[1])
    return SDEInterval(first, second, mid, (s_from - s_mid) / (s_from - s_next))


class DPMSolverSDEScheduler(ScaledTwoCallMixin, _sde.DPMSolverSDEScheduler):
    """diffusers' ``DPMSolverSDEScheduler`` whose ``step`` is one fused fastflow call.

    Prediction types ``epsilon`` and ``v_prediction`` (diffusers implements no other); Karras, exponential and
    beta sigmas and every timestep spacing (diffusers' own schedule); ``s_noise`` as a step argument.
    """

    _ff_last_call_saves = False  # diffusers' step to sigma 0 is an Euler step that saves nothing
    _ff_default_variant = (1.0, False)  # (s_noise, noise passed to the kernel rather than drawn there)

    def _ff_check_config(self) -> None:
        self._ff_require_prediction(_PREDICTIONS, diffusers_too=True)

    def _ff_prepare(self) -> None:
        sig = self.sigmas.detach().to("cpu", torch.float32)
        self._ff_sig32 = sig
        n = len(self._ff_host_timesteps)
        prediction = self.config.prediction_type
        # Interval j: the step whose first call is call j (sigmas[j] -> sigmas[j + 1]); None where it ends at 0,
        # a string where diffusers' step is undefined.
        self._ff_intervals: list[SDEInterval | str | None] = []
        for j in range(n):
            if float(sig[j + 1]) == 0.0:
                self._ff_intervals.append(None)
                continue
            try:
                self._ff_intervals.append(sde_interval(prediction, sig[j], sig[j + 1]))
            except UndefinedStepError as exc:
                self._ff_intervals.append(str(exc))
        # A second-order call i scales by the midpoint of the step its first call i - 1 began (call 0 is never
        # second-order; a step to 0 has no midpoint: diffusers' loops reach neither).
        mids = [iv.mid if isinstance(iv, SDEInterval) else sig[j] for j, iv in enumerate(self._ff_intervals[:-1])]
        second = input_scales(torch.stack(mids)) if mids else []
        self._ff_in_scales = (input_scales(sig[:n]), [1.0, *second])
        seed = getattr(self, "noise_sampler_seed", None)
        if seed is not None:
            self._ff_fold_seed(seed)
        self._ff_first_out: tuple[int, torch.Tensor, int] | None = None  # (call, tensor it returned, version)
        self._ff_first_call: tuple[int, Any] | None = None  # (call, variant) of the last first-order call
        self._ff_first_shape: torch.Size | None = None  # the sample shape of that call

    def _ff_interval(self, j: int) -> SDEInterval | None:
        found = self._ff_intervals[j] if 0 <= j < len(self._ff_intervals) else None
        if isinstance(found, str):
            raise UndefinedStepError(found)
        return found

    def _ff_spec(self, i: int, k: int, variant: Any) -> StepSpec:
        s_noise, explicit = variant
        first = k % 2 == 0  # the loop's first call is first-order
        j = i if first else i - 1
        interval = self._ff_interval(j)
        if interval is None:  # to sigma_next = 0: diffusers' Euler step, no noise
            sigma, sigma_next = self._ff_sig32[j], self._ff_sig32[j + 1]
            sigma_in = sigma if first else _sigma_fn(_t_fn(sigma) + (_t_fn(sigma_next) - _t_fn(sigma)) * 0.5)
            xz, xo = _x0_coefs(self.config.prediction_type, sigma_in)
            return StepSpec(xz, xo, Z(k) + (Z(k) - X(k)) * (float(sigma_next - sigma) / float(sigma)))
        if first:
            call = interval.first
            update = Z(k) * call.a + X(k) * call.b
            return StepSpec(call.xz, call.xo, update + noise(call.up * s_noise) if s_noise else update)
        c1, call = interval.first, interval.second
        update = Z(k - 1) * call.a + X(k) * call.b
        if not s_noise:
            return StepSpec(call.xz, call.xo, update)
        scale = call.up * s_noise
        if explicit or interval.rho == 0.0:
            return StepSpec(call.xz, call.xo, update + noise(scale))
        first_noise = (Z(k) - Z(k - 1) * c1.a - X(k - 1) * c1.b) * (1.0 / (c1.up * s_noise))
        fresh = noise(scale * math.sqrt(1.0 - interval.rho))
        return StepSpec(call.xz, call.xo, update + first_noise * (scale * math.sqrt(interval.rho)) + fresh)

    def _ff_first_noise_is_readable(self, idx: int, sample: torch.Tensor) -> bool:
        """Whether the second-order call ``idx`` is given the unmodified tensor its first call returned."""
        found = self._ff_first_out
        return found is not None and found[0] == idx - 1 and found[1] is sample and sample._version == found[2]

    def _ff_noise_correction(
        self, idx: int, interval: SDEInterval, s_noise: float, z: torch.Tensor
    ) -> torch.Tensor:
        """The noise that makes the second call's kernel add ``sqrt(rho) n1 + sqrt(1 - rho) m`` when its sample
        ``z`` is not what the first call wrote: the kernel takes back ``n1' = (z - A z_prev - B x0_prev) / C``,
        so it is given ``m - sqrt(rho / (1 - rho)) (n1' - n1)`` in place of ``m`` (both drawn again from the
        spec)."""
        stage = self._ff_stages.get(((s_noise, False), idx)) or self._ff_stage(idx, (s_noise, False))
        k, runner, c1 = stage.k, stage.runner, interval.first
        n1, m = self._ff_kernel_noise(runner, k - 1, z), self._ff_kernel_noise(runner, k, z)
        z_prev, x_prev = runner.stored("z", k - 1).float(), runner.stored("x", k - 1).float()
        taken_back = (z.float() - z_prev * c1.a - x_prev * c1.b) / (c1.up * s_noise)
        return m - (taken_back - n1) * math.sqrt(interval.rho / (1.0 - interval.rho))

    def _ff_make_noise_sampler(self, sample: torch.Tensor) -> None:
        """diffusers' Brownian-tree sampler, made at a loop's first call as diffusers makes it (``sigmas`` stay
        on the CPU: no device read)."""
        sig = self.sigmas
        self.noise_sampler = _sde.BrownianTreeNoiseSampler(
            sample, sig[sig > 0].min().item(), sig.max().item(), self.noise_sampler_seed
        )

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
        s_noise: float = 1.0,
    ) -> _sde.DPMSolverSDESchedulerOutput | tuple:
        """diffusers' DPM-Solver SDE step (same arguments and outputs), in one backend call."""
        s_noise = float(s_noise)
        if not math.isfinite(s_noise):
            raise ValueError(f"s_noise must be finite, got {s_noise}")
        idx = self._ff_peek_index(timestep)
        first = self._ff_first_order(idx)
        interval = self._ff_interval(idx if first else idx - 1)
        explicit = self.diffusers_noise
        variant = (s_noise, explicit)
        if not first and interval is not None and self._ff_first_call != (idx - 1, variant):
            raise ValueError(
                "the second call of a DPMSolverSDEScheduler step continues its first: call step with the same "
                "s_noise and diffusers_noise as the first call"
            )
        # The second call steps from the first call's sample, which must broadcast to this one (a larger batch).
        if not first and interval is not None and not broadcasts_to(self._ff_first_shape, sample.shape):
            raise self._ff_reshaped(HistoryShapeError(idx, tuple(sample.shape), tuple(self._ff_first_shape)))
        given = None
        if explicit:
            if self.noise_sampler is None:
                self._ff_make_noise_sampler(sample)
            if interval is not None:  # drawn at s_noise = 0 too, as diffusers draws it
                draw = self.noise_sampler(*(interval.first if first else interval.second).query)
                if not broadcasts_to(draw.shape, sample.shape):
                    raise ValueError(
                        f"DPMSolverSDEScheduler with diffusers_noise: diffusers' Brownian tree was made for this "
                        f"loop's first sample, of shape {tuple(draw.shape)}, and the sample now has shape "
                        f"{tuple(sample.shape)} (diffusers broadcasts the two into a result of neither's shape); "
                        "call set_timesteps to start a new loop at the new shape"
                    )
                given = draw if s_noise else None
        elif not first and interval is not None and s_noise and interval.rho and (
            torch.compiler.is_compiling() or not self._ff_first_noise_is_readable(idx, sample)
        ):
            given = self._ff_noise_correction(idx, interval, s_noise, sample)
        prev, pred = self._ff_step(
            model_output, timestep, sample, variant=variant, noise=given,
            state_dtype=promoted_dtype(sample, model_output), index=idx,
        )
        self._ff_first_out = None
        self._ff_first_call = (idx, variant) if first else None
        self._ff_first_shape = sample.shape if first else None
        if first and interval is not None and not explicit and not torch.compiler.is_compiling():
            self._ff_first_out = (idx, prev, prev._version)
        if not return_dict:
            return (prev, pred)
        return _OUTPUT(prev, pred)
