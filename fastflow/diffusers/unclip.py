"""Drop-in ``UnCLIPScheduler`` (Kandinsky 2.x priors, unCLIP): a DDPM step to a ``prev_timestep`` the caller names.

diffusers' step reads the posterior's coefficients at ``t`` and at ``prev_timestep`` (default
``t - 1``, where it takes the schedule's own ``betas[t]`` and ``alphas[t]``), in float32, as
:class:`~fastflow.diffusers.ddim.DDPMScheduler` does. Which ``prev_timestep`` a call names is
the plan's variant: the schedule's next timestep (what Kandinsky's prior passes, and ``t - 1`` at
the last step where it passes none), ``t - 1``, or any other value (a plan of its own). A device
tensor is located by its offset in the scheduler's own timesteps, never read; another one raises.
``fixed_small_log`` noise is a plan coefficient; ``learned_range`` scales the noise per element
from the model's second half with torch ops and hands it to the kernel.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers.schedulers import scheduling_unclip as _unclip

from ._locate import host_number
from ._outputs import output_maker
from ._spec import StepSpec, X, Z, noise, promoted_dtype
from .ddim import _VPMixin, learned_range_scale

__all__ = ["UnCLIPScheduler"]
_OUTPUT = output_maker(_unclip.UnCLIPSchedulerOutput, "prev_sample", "pred_original_sample")
_NEXT, _ONE_BACK = ("next",), ("t-1",)
_ONE = np.float32(1.0)


class UnCLIPScheduler(_VPMixin, _unclip.UnCLIPScheduler):
    """diffusers' ``UnCLIPScheduler`` whose ``step`` is one fused fastflow call.

    ``epsilon`` and ``sample`` predictions (diffusers implements no other), ``clip_sample``, ``fixed_small_log``
    and ``learned_range`` variances, any ``prev_timestep``.
    """

    _ff_default_variant = _NEXT
    _ff_warm_variants = (_ONE_BACK,)  # a caller passing no prev_timestep
    _ff_returns_raw_x0 = True

    def _ff_check_config(self) -> None:
        self._ff_require_prediction(("epsilon", "sample"), diffusers_too=True)
        if self.config.variance_type not in ("fixed_small_log", "learned_range"):
            raise NotImplementedError(
                f"variance_type={self.config.variance_type!r} is not supported by UnCLIPScheduler (diffusers "
                "implements 'fixed_small_log' and 'learned_range')"
            )

    def _ff_prepare(self) -> None:
        super()._ff_prepare()
        self._ff_betas = self.betas.detach().to("cpu", torch.float32).numpy()
        self._ff_alphas = self.alphas.detach().to("cpu", torch.float32).numpy()

    def _ff_prev(self, i: int, variant: Any) -> int:
        t = self._ff_t[i]
        if variant == _NEXT:
            return self._ff_t[i + 1] if i + 1 < len(self._ff_t) else t - 1
        return t - 1 if variant == _ONE_BACK else int(variant[1])

    def _ff_coefs(self, i: int, variant: Any) -> tuple[int, float, np.float32, np.float32, np.float32, np.float32,
                                                        np.float32]:
        """``(t, a_t, a_prev, beta, alpha, beta_prod_t, beta_prod_prev)``, the last five in diffusers' float32
        (``1 - a_t / a_prev`` cancels at small steps)."""
        t = self._ff_t[i]
        prev = self._ff_prev(i, variant)
        a_t = self._ff_alpha(t)
        at32 = np.float32(a_t)
        ap32 = np.float32(self._ff_alpha(prev)) if prev >= 0 else _ONE
        if prev == t - 1:
            beta, alpha = self._ff_betas[t], self._ff_alphas[t]
        else:
            beta = _ONE - at32 / ap32
            alpha = _ONE - beta
        return t, a_t, ap32, beta, alpha, _ONE - at32, _ONE - ap32

    def _ff_spec(self, i: int, k: int, variant: Any) -> StepSpec:
        t, a_t, ap32, beta, alpha, b_t, b_p = self._ff_coefs(i, variant)
        xz, xo = self._ff_conversion(a_t)
        update = X(k) * float(np.sqrt(ap32) * beta / b_t) + Z(k) * float(np.sqrt(alpha) * b_p / b_t)
        if t > 0:
            if self.config.variance_type == "learned_range":
                std = 1.0  # the step passes noise already scaled per element
            else:
                std = float(np.exp(np.float32(0.5) * np.log(max(b_p / b_t * beta, np.float32(1e-20)))))
            update = update + noise(std)
        return StepSpec(xz, xo, update, draws=t > 0)

    def _ff_prev_rule(self, idx: int, prev_timestep: Any) -> Any:
        """The variant of a call at step ``idx`` naming ``prev_timestep`` (read only where that costs no sync)."""
        t = self._ff_t[idx]
        if prev_timestep is None:
            return _NEXT if idx == len(self._ff_t) - 1 else _ONE_BACK
        value = host_number(prev_timestep)
        if value is None and not torch.compiler.is_compiling():
            value = self._ff_view_value(prev_timestep)
        if value is None:
            raise ValueError(
                "prev_timestep must be a Python number, a CPU tensor or an element of this scheduler's timesteps: "
                "reading another device tensor would sync the host"
            )
        prev = int(value)
        if prev == self._ff_prev(idx, _NEXT):
            return _NEXT
        return _ONE_BACK if prev == t - 1 else ("at", prev)

    def _ff_learned_noise(
        self, idx: int, variant: Any, predicted_variance: torch.Tensor, xi: torch.Tensor | None, sample: torch.Tensor
    ) -> torch.Tensor:
        """diffusers' per-element noise of a learned-range variance: ``exp(v / 2) xi``, ``v`` between the log of
        the posterior variance and the log of beta."""
        key = ("log-variance range", idx, variant)
        if key not in self._ff_host_cache:  # once per schedule, step and variant
            _, _, _, beta, _, b_t, b_p = self._ff_coefs(idx, variant)
            self._ff_host_cache[key] = (float(np.log(b_p / b_t * beta)), float(np.log(beta)))
        min_log, max_log = self._ff_host_cache[key]
        if xi is None:  # fastflow's noise, drawn here because the kernel cannot scale it per element
            stage = self._ff_stages.get((variant, idx)) or self._ff_stage(idx, variant)
            xi = self._ff_kernel_noise(stage.runner, stage.k, sample).to(predicted_variance.dtype)
        return learned_range_scale(predicted_variance, min_log, max_log) * xi

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        prev_timestep: int | None = None,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> _unclip.UnCLIPSchedulerOutput | tuple:
        """diffusers' unCLIP step (same arguments and outputs), in one backend call."""
        predicted_variance = None
        learned = self.config.variance_type == "learned_range"
        if learned and model_output.shape[1] == sample.shape[1] * 2:
            model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)
        idx = self._ff_peek_index(timestep)
        variant = self._ff_prev_rule(idx, prev_timestep)
        draw = self._ff_draw(generator, model_output)
        given = None
        if learned and self._ff_t[idx] > 0:
            if predicted_variance is None:
                raise ValueError(
                    "variance_type='learned_range' needs a model output with twice the sample's channels (the "
                    "prediction, then the variance)"
                )
            given = self._ff_learned_noise(idx, variant, predicted_variance, draw() if draw else None, sample)
            draw = None
        prev, pred = self._ff_step(
            model_output, timestep, sample, variant=variant, draw=draw, noise=given,
            state_dtype=promoted_dtype(sample, model_output), index=idx,
        )
        if not return_dict:
            return (prev, pred)
        return _OUTPUT(prev, pred)
