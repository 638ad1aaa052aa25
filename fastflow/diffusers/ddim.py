"""DDIM and DDPM drop-ins: diffusers' discrete-time VP steps as fastflow plans.

Both read diffusers' own float32 ``alphas_cumprod`` (so beta schedules, trained
betas and zero-terminal-SNR rescaling are diffusers'), and both address each step
by its timestep as diffusers does: DDIM steps from ``t`` to
``t - num_train_timesteps // num_inference_steps`` whatever the spacing; DDPM to the
next timestep of the schedule. The few coefficients whose float32 evaluation in
diffusers cancels (``1 - a_t / a_prev``) are computed in diffusers' float32 order,
so loops agree to float32 round-off instead of to that cancellation.

With ``clip_sample`` and diffusers' default ``use_clipped_model_output=False``, the
noise estimate comes from the unclipped model output while ``x0`` is clipped: the
raw output is bound to a kernel history slot (:func:`fastflow.diffusers._spec.O`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from diffusers.schedulers import scheduling_ddim, scheduling_ddpm

from ..solvers.base import UndefinedStepError
from ._base import FastflowScheduler
from ._outputs import output_maker
from ._spec import O, StepSpec, X, Z, noise, promoted_dtype, sqrt

__all__ = ["DDIMScheduler", "DDPMScheduler", "ddim_noise_and_direction", "dynamic_threshold", "eps_coefs",
           "row_quantile", "x0_coefs"]

_PREDICTIONS = ("epsilon", "sample", "v_prediction")
_ONE = np.float32(1.0)
_FIELDS = ("prev_sample", "pred_original_sample")
_DDIM_OUTPUT = output_maker(scheduling_ddim.DDIMSchedulerOutput, *_FIELDS)
_DDPM_OUTPUT = output_maker(scheduling_ddpm.DDPMSchedulerOutput, *_FIELDS)
_DDIM_DEFAULT = (0.0, False)  # DDIM's plan variant (eta, use the clipped output) of a call with the defaults


# Epsilon prediction at alphas_cumprod = 0 (a zero-SNR end): diffusers' x0 = (sample - eps) / 0 is +-inf, which
# clip_sample clips to +-clip_sample_range. 2**64 sample - 2**64 eps (both products exact in float32 below 2**64)
# has the sign of sample - eps, so it clips to the same value (sample == eps gives 0, where diffusers' 0 / 0 is NaN).
_SATURATING_X0 = (2.0**64, -(2.0**64))


def x0_coefs(prediction: str, a: float) -> tuple[float, float]:
    """``(xz, xo)`` with ``x0 = xz * sample + xo * model_output`` at ``alpha_cumprod = a``."""
    sa, sb = math.sqrt(a), math.sqrt(1.0 - a)
    if prediction == "epsilon":
        if sa == 0.0:
            raise UndefinedStepError(
                "prediction_type='epsilon' has no x0 at a timestep with alphas_cumprod = 0 "
                "(rescale_betas_zero_snr=True makes the last one 0): diffusers divides by zero there and steps to "
                "inf or NaN (with clip_sample=True it clips the infinite x0, as fastflow does too; dynamic "
                "thresholding is not reproduced); zero terminal SNR needs prediction_type='v_prediction'"
            )
        return 1.0 / sa, -sb / sa
    if prediction == "sample":
        return 0.0, 1.0
    return sa, -sb


def ddim_noise_and_direction(a_t: float, a_p: float, eta: float) -> tuple[float, float]:
    """DDIM's noise scale ``std`` and the coefficient ``sqrt(1 - a_p - std**2)`` of its noise estimate.

    Both are evaluated as diffusers evaluates them, in float32 (the variance's
    ``1 - a_t / a_p`` cancels, and its square root is torch's ``x ** 0.5`` on a 0-d
    tensor, which rounds differently from ``sqrt``), so loops keep float32 parity.
    With ``var = (1 - a_p) (1 - a_t / a_p) / (1 - a_t)``, ``1 - a_p - eta**2 var`` equals
    ``(1 - a_p)**2 a_t / (a_p (1 - a_t)) + (1 - eta**2) var``: never negative for
    ``eta <= 1``. Where float32 rounds it below zero (next to a zero-SNR or
    ``squaredcos_cap_v2`` end, where diffusers returns NaN) the exact value is taken.
    """
    at32, ap32 = np.float32(a_t), np.float32(a_p)
    var32 = (_ONE - ap32) / (_ONE - at32) * (_ONE - at32 / ap32)
    std32 = np.float32(eta) * np.float32((torch.tensor(var32) ** 0.5).item())
    rest32 = _ONE - ap32 - std32 * std32
    if rest32 >= 0:
        return float(std32), math.sqrt(float(rest32))
    rest = (1.0 - a_p) - eta * eta * (1.0 - a_p) / (1.0 - a_t) * (1.0 - a_t / a_p)
    if rest < 0:
        raise UndefinedStepError(
            f"eta={eta} makes the noise variance of the DDIM step from alphas_cumprod {a_t:.6g} to {a_p:.6g} "
            f"exceed 1 - alphas_cumprod_prev (diffusers returns NaN there); use eta <= 1"
        )
    return float(std32), math.sqrt(rest)


def eps_coefs(prediction: str, a: float) -> tuple[float, float]:
    """``(ez, eo)`` with ``eps = ez * sample + eo * model_output`` (from the unclipped output)."""
    sa, sb = math.sqrt(a), math.sqrt(1.0 - a)
    if prediction == "epsilon":
        return 0.0, 1.0
    if prediction == "sample":
        return 1.0 / sb, -sa / sb
    return sb, sa


def row_quantile(a: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(a, q, dim=1)`` of a 2-d float tensor (linear interpolation), bit for bit, from the ops it
    runs (sort, rank, gather, lerp; a row holding NaN gives NaN), with its ranks in the dtype the running torch forms
    them in (:data:`QUANTILE_RANK_DTYPE`).

    Written out because ``torch.quantile`` does not trace on older torch: inside it is an ``aten.equal`` that fake
    tensors cannot answer, so torch 2.6 and 2.8 refused ``torch.compile(fullgraph=True)``, strict and
    non-strict ``torch.export`` and ``FakeTensorMode`` of a thresholded step (torch 2.13 traces it).
    """
    if QUANTILE_RANK_DTYPE is None:  # a torch whose quantile this does not know: diffusers' call itself
        return torch.quantile(a, q, dim=1)
    return _row_quantile(a, q, QUANTILE_RANK_DTYPE)


def _row_quantile(a: torch.Tensor, q: float, rank_dtype: torch.dtype | str) -> torch.Tensor:
    """:func:`row_quantile` with ranks formed in ``rank_dtype`` ("input": ``a``'s dtype) from ``q`` in ``a``'s."""
    last = a.shape[1] - 1
    if last >= 2**24:  # torch.quantile's own limit: a float32 rank no longer names every element
        raise RuntimeError("quantile() input tensor is too large")
    ordered = a.sort(dim=1).values
    ranks = torch.scalar_tensor(q, dtype=a.dtype, device=a.device)
    if rank_dtype != "input":
        ranks = ranks.to(rank_dtype)
    ranks = (ranks * last).expand(a.shape[0], 1)
    ranks = ranks.masked_fill(ordered.isnan().any(1, keepdim=True), last)  # NaN sorts last: the row's quantile
    below = ranks.long()
    above = ordered.gather(1, ranks.ceil().long())
    return ordered.gather(1, below).lerp(above, (ranks - below).to(a.dtype)).squeeze(1)


def _quantile_rank_dtype() -> torch.dtype | str | None:
    """How this torch's ``torch.quantile`` forms the ranks of a float32 input: in the input's dtype ("input", torch
    2.13 and older) or in float64 (torch 2.14), told apart by an input whose quantile differs between the two; None
    when neither matches (:func:`row_quantile` then calls ``torch.quantile``)."""
    a = (torch.arange(1001, device="cpu") >= 900).to(torch.float32).unsqueeze(0)  # rank 899.99998 or 900
    want = torch.quantile(a, 0.9, dim=1)
    return next((dtype for dtype in ("input", torch.float64) if torch.equal(_row_quantile(a, 0.9, dtype), want)),
                None)


QUANTILE_RANK_DTYPE = _quantile_rank_dtype()


def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Imagen's dynamic thresholding as diffusers defines it, per sample and sync-free.

    ``s = clamp(quantile(|x0|, ratio), 1, max_value)``; ``clamp(x0, -s, s) / s``
    (float32 at least, as diffusers computes it).
    """
    dtype = x0.dtype
    flat = x0.reshape(x0.shape[0], -1)
    if dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    s = row_quantile(flat.abs(), ratio).clamp(min=1, max=max_value).unsqueeze(1)
    return (flat.clamp(-s, s) / s).reshape(x0.shape).to(dtype)


def learned_range_scale(predicted_variance: torch.Tensor, min_log: float, max_log: float) -> torch.Tensor:
    """The per-element noise scale of diffusers' ``learned_range`` variance: ``exp(v / 2)``, ``v`` interpolated from
    ``min_log`` (the model's -1) to ``max_log`` (its +1)."""
    frac = (predicted_variance + 1) / 2
    return torch.exp(0.5 * (frac * max_log + (1 - frac) * min_log))


def thresholded_x0(coefs: tuple[float, float], model_output: torch.Tensor, sample: torch.Tensor,
                   config: Any) -> torch.Tensor:
    """diffusers' thresholded ``x0 = xz * sample + xo * model_output`` for ``coefs = (xz, xo)`` and its config.

    The model output is upcast to the sample's dtype before the multiply: ``xo`` reaches -156 at the noisiest
    timestep, so a 16-bit product would round ``x0`` by far more than the model output's own rounding.
    """
    xz, xo = coefs
    if xz == 0.0:
        x0 = model_output * xo
    else:
        x0 = sample * xz + model_output.to(torch.promote_types(model_output.dtype, sample.dtype)) * xo
    return dynamic_threshold(x0, config.dynamic_thresholding_ratio, config.sample_max_value)


class _VPMixin(FastflowScheduler):
    """Host copies of diffusers' ``alphas_cumprod`` and the options shared by DDIM, DDPM and LCM.

    Dynamic thresholding (``thresholding=True``) needs a per-sample quantile of
    ``x0``: it runs as plain torch ops before the fused step (sync-free, not fused),
    and the kernel then reads the thresholded ``x0`` in place of the model output.
    """

    _ff_timestep_addressed = True
    _ff_start_dependent = False

    def _ff_check_config(self) -> None:
        self._ff_require_prediction(_PREDICTIONS)

    def _ff_prepare(self) -> None:
        ac = self.alphas_cumprod
        self._ff_ac = ac.detach().to("cpu", torch.float64).numpy()
        # Python numbers for what step reads per call (torch.compile traces numpy reads as tensors).
        self._ff_t = [int(v) for v in self._ff_host_timesteps]
        self._ff_thresholding_on = bool(getattr(self.config, "thresholding", False))
        if self._ff_thresholding:
            self._ff_raw_x0 = [self._ff_raw_x0_of(t) for t in self._ff_t]

    def _ff_raw_x0_of(self, t: int) -> tuple[float, float] | str:
        """The unthresholded x0 conversion at timestep ``t``, or why it is undefined (raised if that step runs)."""
        try:
            return x0_coefs(self.config.prediction_type, self._ff_alpha(t))
        except UndefinedStepError as exc:
            return str(exc)

    def _ff_alpha(self, t: int) -> float:
        return float(self._ff_ac[t])

    @property
    def _ff_thresholding(self) -> bool:
        cached = self.__dict__.get("_ff_thresholding_on")  # set by _ff_prepare
        return bool(getattr(self.config, "thresholding", False)) if cached is None else cached

    def _ff_clip(self) -> float | None:
        cfg = self.config
        if getattr(cfg, "clip_sample", False) and not self._ff_thresholding:
            return float(cfg.clip_sample_range)
        return None

    def _ff_conversion(self, a_t: float) -> tuple[float, float]:
        """The kernel's ``x_hat`` conversion: x0 from the output, or the given thresholded x0."""
        if self._ff_thresholding:
            return 0.0, 1.0
        if a_t == 0.0 and self.config.prediction_type == "epsilon" and self._ff_clip() is not None:
            return _SATURATING_X0
        return x0_coefs(self.config.prediction_type, a_t)

    def _ff_thresholded(self, idx: int, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor | None:
        """The thresholded x0 of step ``idx`` (None when thresholding is off)."""
        if not self._ff_thresholding_on:  # set by _ff_prepare, which ran when idx was found; read every step
            return None
        coefs = self._ff_raw_x0[idx]
        if isinstance(coefs, str):
            raise UndefinedStepError(coefs)
        return thresholded_x0(coefs, model_output, sample, self.config)


class DDIMScheduler(_VPMixin, scheduling_ddim.DDIMScheduler):
    """diffusers' ``DDIMScheduler`` whose ``step`` is one fused fastflow call.

    ``eta`` and ``use_clipped_model_output`` are step arguments in diffusers; each
    distinct pair compiles its own plan once per ``set_timesteps``.
    """

    _ff_default_variant = _DDIM_DEFAULT
    _ff_returns_raw_x0 = True

    def _ff_spec(self, i: int, k: int, variant: Any) -> StepSpec:
        eta, use_clipped = variant
        cfg = self.config
        t = int(self._ff_host_timesteps[i])
        prev = t - cfg.num_train_timesteps // self.num_inference_steps
        a_t = self._ff_alpha(t)
        a_p = self._ff_alpha(prev) if prev >= 0 else float(self.final_alpha_cumprod)
        xz, xo = self._ff_conversion(a_t)
        std, c_dir = ddim_noise_and_direction(a_t, a_p, eta)
        if (self._ff_clip() is not None or self._ff_thresholding) and not use_clipped:
            ez, eo = eps_coefs(cfg.prediction_type, a_t)
            eps = Z(k) * ez + O(k) * eo
        else:
            eps = (Z(k) - X(k) * math.sqrt(a_t)) / math.sqrt(1.0 - a_t)
        update = X(k) * math.sqrt(a_p) + eps * c_dir
        if std > 0:
            update = update + noise(std)
        return StepSpec(xz, xo, update, draws=eta > 0)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> scheduling_ddim.DDIMSchedulerOutput | tuple:
        """diffusers' DDIM step (same arguments and outputs), in one backend call."""
        default = eta == 0.0 and not use_clipped_model_output  # deterministic: generator and noise are unused
        if default:
            done = self._ff_lane_step(model_output, timestep, sample)
            if done is not None:
                return done if not return_dict else _DDIM_OUTPUT(*done)
        if self._step_index is None:  # mid-loop, a step has passed this check (set_timesteps cannot undo it)
            self._ff_require_timesteps()
        variant, draw, noise = _DDIM_DEFAULT, None, None
        if not default:  # the default call skips what follows (every step's host path)
            eta = float(eta)
            if eta < 0 or not math.isfinite(eta):
                raise ValueError(f"eta must be finite and non-negative, got {eta}")
            if eta > 0:
                if variance_noise is not None and generator is not None:
                    raise ValueError("pass either generator or variance_noise, not both")
                if variance_noise is None:
                    draw = self._ff_draw(generator, model_output)
                noise = variance_noise
            clipped = bool(use_clipped_model_output) and (self._ff_clip() is not None or self._ff_thresholding)
            variant = (eta, clipped)
        idx = self._ff_peek_index(timestep)
        prev, pred = self._ff_step(
            model_output, timestep, sample,
            variant=variant,
            draw=draw,
            noise=noise,
            state_dtype=promoted_dtype(sample, model_output),
            kernel_output=self._ff_thresholded(idx, model_output, sample) if self._ff_thresholding_on else None,
            index=idx,
            lane=default,
        )
        if not return_dict:
            return (prev, pred)
        return _DDIM_OUTPUT(prev, pred)


class DDPMScheduler(_VPMixin, scheduling_ddpm.DDPMScheduler):
    """diffusers' ``DDPMScheduler`` whose ``step`` is one fused fastflow call.

    ``variance_type``: ``fixed_small``, ``fixed_small_log`` and ``fixed_large`` are
    plan coefficients. ``learned`` and ``learned_range`` (DeepFloyd IF) read the
    model's second channel half per element: the noise is scaled by it with plain
    torch ops and handed to the kernel as explicit noise. ``fixed_large_log`` (NaN
    in diffusers) raises.
    """

    _VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")
    _LEARNED = ("learned", "learned_range")
    _ff_returns_raw_x0 = True
    _ff_learned = False  # the schedule's variance is learned (set by _ff_prepare)

    def _ff_check_config(self) -> None:
        super()._ff_check_config()
        if self.config.variance_type not in self._VARIANCES:
            raise NotImplementedError(
                f"variance_type={self.config.variance_type!r} is not supported by fastflow's DDPMScheduler; "
                f"valid: {', '.join(self._VARIANCES)}"
            )

    def _ff_prev_t(self, i: int) -> int:
        ts = self._ff_host_timesteps
        if self.custom_timesteps or self.num_inference_steps:
            return int(ts[i + 1]) if i + 1 < len(ts) else -1
        return int(ts[i]) - 1

    def _ff_coefs(self, i: int) -> tuple[int, float, np.float32, np.float32, np.float32, np.float32]:
        """``(t, a_t, a_prev, beta_prod_t, beta_prod_prev, current_beta)``, the last four in diffusers' float32."""
        t = int(self._ff_host_timesteps[i])
        prev = self._ff_prev_t(i)
        a_t = self._ff_alpha(t)
        a_p = self._ff_alpha(prev) if prev >= 0 else 1.0
        # diffusers' float32 order of operations: ``1 - a_t / a_p`` cancels at small steps.
        at32, ap32 = np.float32(a_t), np.float32(a_p)
        return t, a_t, ap32, _ONE - at32, _ONE - ap32, _ONE - at32 / ap32

    def _ff_spec(self, i: int, k: int, variant: Any) -> StepSpec:
        cfg = self.config
        t, a_t, ap32, b_t, b_p, cur_beta = self._ff_coefs(i)
        xz, xo = self._ff_conversion(a_t)
        c_x = float(np.sqrt(ap32) * cur_beta / b_t)
        c_z = float(np.sqrt(np.float32(a_t) / ap32) * b_p / b_t)
        update = X(k) * c_x + Z(k) * c_z
        if t > 0:
            if cfg.variance_type in self._LEARNED:
                std = 1.0  # the step passes noise already scaled per element
            else:
                var = max(b_p / b_t * cur_beta, np.float32(1e-20))
                if cfg.variance_type == "fixed_small":
                    std = float(np.sqrt(var))
                elif cfg.variance_type == "fixed_small_log":
                    std = float(np.exp(np.float32(0.5) * np.log(var)))
                else:
                    std = sqrt(float(cur_beta))
            update = update + noise(std)
        return StepSpec(xz, xo, update, draws=t > 0)

    def _ff_prepare(self) -> None:
        super()._ff_prepare()
        self._ff_learned = self.config.variance_type in self._LEARNED
        if self.config.variance_type == "learned_range":
            self._ff_logvar = []
            for i in range(len(self._ff_t)):
                _, _, _, b_t, b_p, cur_beta = self._ff_coefs(i)
                with np.errstate(divide="ignore"):
                    self._ff_logvar.append(
                        (float(np.log(max(b_p / b_t * cur_beta, np.float32(1e-20)))), float(np.log(cur_beta)))
                    )

    def _ff_learned_noise(
        self, idx: int, predicted_variance: torch.Tensor, xi: torch.Tensor | None, sample: torch.Tensor
    ) -> torch.Tensor:
        """diffusers' per-element noise of a learned variance: ``sqrt(v) xi`` or ``exp(log-var / 2) xi``."""
        if xi is None:  # the in-kernel noise, drawn here because the kernel cannot scale it per element
            stage = self._ff_stages.get((None, idx)) or self._ff_stage(idx, None)
            xi = self._ff_kernel_noise(stage.runner, stage.k, sample).to(predicted_variance.dtype)
        if self.config.variance_type == "learned":
            return predicted_variance**0.5 * xi
        min_log, max_log = self._ff_logvar[idx]
        return learned_range_scale(predicted_variance, min_log, max_log) * xi

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> scheduling_ddpm.DDPMSchedulerOutput | tuple:
        """diffusers' DDPM step (same arguments and outputs), in one backend call."""
        # The lane serves calls without a generator and a fixed variance (a learned one's noise is given).
        if generator is None and not self._ff_learned:
            done = self._ff_lane_step(model_output, timestep, sample)
            if done is not None:
                return done if not return_dict else _DDPM_OUTPUT(*done)
        idx = self._ff_peek_index(timestep)
        learned = self._ff_learned  # set with the schedule (_ff_prepare), read every step
        predicted_variance = None
        if learned and model_output.shape[1] == sample.shape[1] * 2:
            model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)
        draw = self._ff_draw(generator, model_output)
        given = None
        if learned and self._ff_t[idx] > 0:
            if predicted_variance is None:
                raise ValueError(
                    f"variance_type={self.config.variance_type!r} needs a model output with twice the sample's "
                    "channels (noise prediction, then variance)"
                )
            given = self._ff_learned_noise(idx, predicted_variance, draw() if draw is not None else None, sample)
            draw = None
        prev, pred = self._ff_step(
            model_output, timestep, sample,
            draw=draw,
            noise=given,
            state_dtype=promoted_dtype(sample, model_output),
            kernel_output=self._ff_thresholded(idx, model_output, sample) if self._ff_thresholding_on else None,
            index=idx,
            lane=generator is None and not learned,
        )
        if not return_dict:
            return (prev, pred)
        return _DDPM_OUTPUT(prev, pred)
