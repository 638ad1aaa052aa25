"""Drop-in ``CMStochasticIterativeScheduler`` (consistency models' multistep sampler).

Each step maps the sample to the data with the consistency model's boundary-condition scalings,
``x0 = c_skip(sigma) x + c_out(sigma) F`` (``c_skip`` and ``c_out`` vanish and reach 1 at ``sigma_min``),
optionally clamped to [-1, 1], and re-noises it to the next sigma:
``x0 + s_noise sqrt(sigma_next^2 - sigma_min^2) n``. diffusers draws ``n`` at every step of a loop
of more than one step (also the last, where its weight is 0). Every scalar is diffusers' float32 value.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.schedulers import scheduling_consistency_models as _cm

from ._base import FastflowScheduler
from ._outputs import output_maker
from ._spec import StepSpec, X, noise, promoted_dtype

__all__ = ["CMStochasticIterativeScheduler"]
_OUTPUT = output_maker(_cm.CMStochasticIterativeSchedulerOutput, "prev_sample")


class CMStochasticIterativeScheduler(FastflowScheduler, _cm.CMStochasticIterativeScheduler):
    """diffusers' ``CMStochasticIterativeScheduler`` whose ``step`` is one fused fastflow call.

    Its schedule (``num_inference_steps`` or custom ``timesteps``), ``s_noise``, ``clip_denoised``; the noise is
    fastflow's in-kernel noise, or with a ``generator`` the tensor diffusers draws.
    """

    _ff_start_dependent = False

    def _ff_prepare(self) -> None:
        sig = self.sigmas.detach().to("cpu", torch.float32)
        self._ff_sig32 = sig
        data = self.config.sigma_data
        # diffusers' divisor on each 0-d float32 sigma, so a scaled input is bit-identical
        self._ff_in_scale = [float((s**2 + data**2) ** 0.5) for s in sig[: len(self._ff_host_timesteps)]]

    def _ff_clip(self) -> float | None:
        return 1.0 if self.config.clip_denoised else None

    def _ff_spec(self, i: int, k: int, variant: Any) -> StepSpec:
        cfg = self.config
        sig = self._ff_sig32
        # diffusers' rule: the next sigma, or the last one past num_train_timesteps steps (the init-time schedule
        # has no trailing sigma).
        sigma, sigma_next = sig[i], sig[i + 1] if i + 1 < cfg.num_train_timesteps else sig[-1]
        c_skip = cfg.sigma_data**2 / ((sigma - cfg.sigma_min) ** 2 + cfg.sigma_data**2)
        c_out = (sigma - cfg.sigma_min) * cfg.sigma_data / (sigma**2 + cfg.sigma_data**2) ** 0.5
        noisy = len(self._ff_host_timesteps) > 1
        sigma_hat = sigma_next.clamp(min=cfg.sigma_min, max=cfg.sigma_max)
        scale = float(cfg.s_noise) * float((sigma_hat**2 - cfg.sigma_min**2) ** 0.5) if noisy else 0.0
        update = X(k) + noise(scale) if scale else X(k)
        return StepSpec(float(c_skip), float(c_out), update, draws=noisy)

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor) -> torch.Tensor:
        """diffusers' ``sample / sqrt(sigma^2 + sigma_data^2)`` from a host scalar (no device read)."""
        if not self._ff_ready():
            self._ff_reset()
        idx = self._ff_index(timestep)
        self.is_scale_input_called = True
        return sample / self._ff_in_scale[idx]

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> _cm.CMStochasticIterativeSchedulerOutput | tuple:
        """diffusers' consistency-model step (same arguments and output), in one backend call."""
        self._ff_check_timestep(timestep)
        if generator is None and (done := self._ff_lane_step(model_output, timestep, sample)) is not None:
            return (done[0],) if not return_dict else _OUTPUT(done[0])
        prev, _ = self._ff_step(
            model_output, timestep, sample, draw=self._ff_draw(generator, model_output),
            state_dtype=promoted_dtype(sample, model_output), want_pred=False, lane=generator is None,
        )
        if not return_dict:
            return (prev,)
        return _OUTPUT(prev)
