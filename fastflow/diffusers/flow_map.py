"""Drop-in ``FlowMapEulerDiscreteScheduler`` (AnyFlow's flow-map sampler).

diffusers' step moves the sample from ``timestep`` to ``r_timestep`` (by default the next
timestep of the schedule) along the predicted mean velocity, ``sample - (sigma_t - sigma_r) * v``,
in float64 (its sigmas are float64) rounded once to the model output's dtype. Each call finds
its sigmas from the timestep's value (on the schedule within 1e-3, else ``t / num_train_timesteps``),
so the same call twice gives the same sample. The drop-in locates a schedule timestep without a
device read (a Python number or CPU tensor by value, an element of its own ``timesteps`` by its
offset; another device tensor, as for every drop-in, by the loop's step counter) and runs that
step's fused stage (float32 arithmetic, within float32 round-off of diffusers'). Any-step calls
(an explicit ``r_timestep``, or a timestep off the schedule) run diffusers' formula as torch ops:
host values are looked up as diffusers does, and a device tensor that is not an element of the
schedule is taken as ``t / num_train_timesteps`` on the device, element by element as diffusers
divides a tensor off its schedule (no read; for a value on the schedule that is its sigma to
float64 round-off, since diffusers' timesteps are its sigmas times ``num_train_timesteps``).
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.schedulers import scheduling_flow_map_euler_discrete as _fmap

from ._base import FastflowScheduler
from ._outputs import output_maker
from ._spec import StepSpec, X, Z, promoted_dtype

__all__ = ["FlowMapEulerDiscreteScheduler"]
_OUTPUT = output_maker(_fmap.FlowMapEulerDiscreteSchedulerOutput, "prev_sample")
_ON_SCHEDULE = 1e-3  # diffusers' tolerance for a timestep on the schedule (float32 timesteps)


class FlowMapEulerDiscreteScheduler(FastflowScheduler, _fmap.FlowMapEulerDiscreteScheduler):
    """diffusers' ``FlowMapEulerDiscreteScheduler`` whose schedule steps are one fused fastflow call each."""

    _ff_start_dependent = False

    def _ff_prepare(self) -> None:
        self._ff_sig = self.sigmas.detach().to("cpu", torch.float64).numpy()
        self._ff_host32 = self.timesteps.detach().to("cpu", torch.float32)
        self._ff_first = {}  # float32 timestep -> its first index: the lookup of an exact value, in Python
        for i, t in enumerate(self._ff_host32.tolist()):
            self._ff_first.setdefault(t, i)

    def _ff_num_steps(self) -> int:
        return len(self._ff_sig) - 1

    def _ff_spec(self, i: int, k: int, variant: object) -> StepSpec:
        return StepSpec(0.0, 1.0, Z(k) - X(k) * float(self._ff_sig[i] - self._ff_sig[i + 1]))

    def _ff_lookup(self, value: float) -> int | None:
        """diffusers' ``index_for_timestep``: the nearest float32 timestep (the first of equals), if within its
        tolerance."""
        idx = self._ff_first.get(float(np.float32(value)))  # diffusers subtracts in float32
        if idx is not None:
            return idx
        diffs = (self._ff_host32 - value).abs()
        idx = int(diffs.argmin())
        return idx if float(diffs[idx]) <= _ON_SCHEDULE else None

    def _ff_host_value(self, timestep: float | torch.Tensor) -> float | None:
        """A timestep's value where the host has it without a device read (a number, a CPU tensor, an element of
        this scheduler's ``timesteps``); None for another device tensor."""
        if not isinstance(timestep, torch.Tensor):
            return float(timestep)
        if timestep.device.type == "cpu":
            return timestep.item() if timestep.dim() == 0 else float(timestep.reshape(-1)[0])
        return self._ff_view_value(timestep.flatten()[0] if timestep.dim() else timestep)

    def _ff_sigma(self, timestep: float | torch.Tensor, device: torch.device) -> float | torch.Tensor:
        """The sigma of any timestep as diffusers finds it: a schedule timestep's sigma (a Python float), else the
        timestep over the training length, a float64 tensor of the timestep's shape for a tensor (per element, as
        diffusers divides it; see the module docstring for a device tensor the host cannot locate)."""
        value = self._ff_host_value(timestep)
        idx = self._ff_lookup(value) if value is not None else None
        if idx is not None:
            return float(self._ff_sig[idx])
        if isinstance(timestep, torch.Tensor):
            return timestep.to(device=device, dtype=torch.float64) / self.config.num_train_timesteps
        return value / self.config.num_train_timesteps

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        r_timestep: float | torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> _fmap.FlowMapEulerDiscreteSchedulerOutput | tuple:
        """diffusers' flow-map step (same arguments and output): a schedule step in one backend call."""
        if getattr(self, "_ff_compiled", None) is None:
            self._ff_reset()
        compiling = torch.compiler.is_compiling()
        value = None if compiling else self._ff_host_value(timestep)
        idx = self._ff_lookup(value) if value is not None else None
        if r_timestep is None and (idx is not None or value is None):
            counter = self._step_index
            if idx is None:  # traced, or a device tensor the host cannot locate: the loop's counter
                idx = counter = self._ff_index(timestep)
            elif counter is None:
                counter = self.begin_index if self.begin_index is not None else idx
            prev, _ = self._ff_step(
                model_output, timestep, sample, state_dtype=promoted_dtype(sample, model_output),
                out_dtype=model_output.dtype, want_pred=False, index=idx,
            )
            self._step_index = counter + 1  # diffusers counts calls (observable state; the value found the step)
        else:
            if r_timestep is None:
                raise ValueError(
                    f"timestep {value} is not on the current schedule, so the next one (r_timestep) cannot be "
                    "inferred; pass an explicit r_timestep for any-step sampling outside the schedule"
                )
            prev = self._ff_any_step(model_output, timestep, sample, r_timestep)
        if not return_dict:
            return (prev,)
        return _OUTPUT(prev)

    def _ff_any_step(
        self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor,
        r_timestep: float | torch.Tensor,
    ) -> torch.Tensor:
        """A step between any two timesteps as torch ops, in float64 as diffusers computes it."""
        device = sample.device
        sigma_t, sigma_r = self._ff_sigma(timestep, device), self._ff_sigma(r_timestep, device)
        delta = sigma_t - sigma_r  # a Python float, or a tensor shaped as diffusers views it (trailing 1s)
        if isinstance(delta, torch.Tensor):
            delta = delta.reshape(*delta.shape, *[1] * (model_output.dim() - delta.dim()))
        if self._step_index is None:
            self._step_index = self.begin_index if self.begin_index is not None else self._ff_peek_lookup(timestep)
        self._step_index += 1
        # float64 throughout, as diffusers' float64 sigmas promote it (a host delta needs no copy to the device)
        wide = torch.float64
        return (sample.to(wide) - delta * model_output.to(wide)).to(model_output.dtype)

    def _ff_peek_lookup(self, timestep: float | torch.Tensor) -> int:
        """diffusers' first step index of a loop: the timestep's place on the schedule, 0 off it."""
        value = self._ff_host_value(timestep)
        idx = self._ff_lookup(value) if value is not None else None
        return 0 if idx is None else idx
