"""Drop-in ``DDPMWuerstchenScheduler`` (Stable Cascade's prior and decoder, Wuerstchen).

diffusers' step takes the timestep as a per-sample tensor that its pipelines make by expanding
the schedule's value and casting it to the model's dtype, and evaluates the cosine schedule at
that rounded value (and at the schedule's next timestep, unrounded):
``mu = alpha^{-1/2} (x - (1 - alpha) F / sqrt(1 - a_t))``, ``alpha = a_t / a_prev``, plus noise
scaled by the posterior's standard deviation except into the final timestep 0. The drop-in
cannot read a device timestep, so it takes its step from the loop's count and its rounding from
the tensor's dtype (host metadata), evaluating diffusers' own ``_alpha_cumprod`` on that rounded
value: the same float32 coefficients. Every sample of a batch is stepped from the same timestep,
as the pipelines pass it (a CPU timestep whose samples differ raises; a device one, or one being traced, is not
read).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.schedulers import scheduling_ddpm_wuerstchen as _w

from ._base import FastflowScheduler
from ._locate import host_number
from ._outputs import output_maker
from ._spec import StepSpec, X, Z, noise

__all__ = ["DDPMWuerstchenScheduler"]
_OUTPUT = output_maker(_w.DDPMWuerstchenSchedulerOutput, "prev_sample")


class DDPMWuerstchenScheduler(FastflowScheduler, _w.DDPMWuerstchenScheduler):
    """diffusers' ``DDPMWuerstchenScheduler`` whose ``step`` is one fused fastflow call.

    Its config (``scaler``, ``s``), its schedule (``num_inference_steps`` or custom ``timesteps``); the noise is
    fastflow's in-kernel noise, or with a ``generator`` the tensor diffusers draws.
    """

    _ff_start_dependent = False
    _ff_default_variant = torch.float32  # the timestep's dtype: the value diffusers evaluates is rounded to it

    def _ff_prepare(self) -> None:
        self._ff_ts32 = self.timesteps.detach().to("cpu", torch.float32)

    def _ff_num_steps(self) -> int:
        return len(self._ff_ts32) - 1  # a step moves to the next timestep; the last one ends the loop

    def _ff_locate(self, value: float) -> int:
        """diffusers' rule: the timestep nearest the given value (a pipeline's value is rounded to the model's
        dtype)."""
        return int((self._ff_ts32.double() - value).abs().argmin())

    def _ff_alpha_cumprod(self, t: torch.Tensor) -> float:
        return float(self._alpha_cumprod(t.reshape(1), torch.device("cpu"))[0])

    def _ff_spec(self, i: int, k: int, variant: Any) -> StepSpec:
        t = self._ff_ts32[i].to(variant)  # the pipeline's value: expanded and cast to the model's dtype
        prev = self._ff_ts32[i + 1]
        a_t = torch.tensor(self._ff_alpha_cumprod(t), dtype=torch.float32)
        a_p = torch.tensor(self._ff_alpha_cumprod(prev), dtype=torch.float32)
        alpha = a_t / a_p
        scale = (1.0 / alpha).sqrt()
        update = Z(k) * float(scale) - X(k) * float(scale * (1 - alpha) / (1 - a_t).sqrt())
        if float(prev) != 0.0:
            update = update + noise(float(((1 - alpha) * (1.0 - a_p) / (1.0 - a_t)).sqrt()))
        return StepSpec(0.0, 1.0, update, draws=True)  # x_hat: the model output itself

    def _ff_timestep_dtype(self, timestep: Any) -> torch.dtype:
        """The variant of a call: its timestep's dtype, after checking that a readable one steps every sample from
        the same timestep."""
        if not isinstance(timestep, torch.Tensor):
            return torch.float64
        readable = timestep.device.type == "cpu" and timestep.numel() > 1 and not torch.compiler.is_compiling()
        if readable and not bool((timestep == timestep.reshape(-1)[0]).all()):
            raise ValueError(
                "DDPMWuerstchenScheduler steps every sample from the same timestep (as its pipelines pass it); got "
                "per-sample timesteps that differ"
            )
        return timestep.dtype

    def _ff_step_of_value(self, timestep: Any, idx: int, variant: torch.dtype) -> int:
        """The step of a timestep whose value the host has (a number or a CPU tensor): diffusers evaluates its
        schedule at that value, so it must be one of the schedule's timesteps (rounded to the timestep's dtype),
        found by value as diffusers finds the next one; a device timestep is not read and takes ``idx``."""
        value = host_number(timestep)
        if value is None:
            return idx
        key = ("rounded timesteps", variant)
        rounded = self._ff_host_cache.get(key)
        if rounded is None:
            rounded = self._ff_host_cache[key] = self._ff_ts32[: self._ff_steps].to(variant).double().tolist()
        if 0 <= idx < len(rounded) and rounded[idx] == value:
            return idx
        if value not in rounded:
            raise NotImplementedError(
                f"DDPMWuerstchenScheduler.step was given timestep {value:g}, which is not one its steps start from "
                f"(its timesteps but the last, {float(self._ff_ts32[-1]):g}, which ends a loop): diffusers evaluates "
                "its schedule at any value, fastflow's plan holds the steps of its timesteps"
            )
        self._step_index = rounded.index(value)
        return self._step_index

    def step(
        self,
        model_output: torch.Tensor,
        timestep: torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> _w.DDPMWuerstchenSchedulerOutput | tuple[torch.Tensor]:
        """diffusers' Wuerstchen step (same arguments and output), in one backend call; computed in float32 and
        returned in the model output's dtype, as diffusers does."""
        variant = self._ff_timestep_dtype(timestep)
        idx = self._ff_peek_index(timestep)
        if not torch.compiler.is_compiling():
            idx = self._ff_step_of_value(timestep, idx, variant)
        prev, _ = self._ff_step(
            model_output, timestep, sample, variant=variant,
            draw=self._ff_draw(generator, model_output), state_dtype=torch.float32, out_dtype=model_output.dtype,
            want_pred=False, index=idx,
        )
        if not return_dict:
            return (prev,)
        return _OUTPUT(prev)
