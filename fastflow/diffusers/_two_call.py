"""Shared machinery of diffusers' two-call schedulers (Heun, flow-matching Heun, KDPM2, KDPM2 ancestral).

diffusers runs each of their steps as two ``step`` calls on doubled timesteps: a
first-order call that saves the sample, then a second-order call that steps again from
it. The first call a loop takes is first-order whatever its index (diffusers keys the
order on whether a sample is saved), so a call's order is the parity of its distance
from the loop's start. Each call is one fused stage; the second reads the saved sample
from the kernel's history, so nothing is kept on the host between calls.
"""

from __future__ import annotations

import torch

from ._base import FastflowScheduler

__all__ = ["ScaledTwoCallMixin", "TwoCallMixin", "input_scales"]


def input_scales(sigmas: torch.Tensor) -> list[float]:
    """diffusers' model-input divisors ``(sigma**2 + 1) ** 0.5``, computed as it computes them (float32 tensor
    arithmetic), so that a scaled input is bit-identical."""
    sig = sigmas.detach().to("cpu", torch.float32)
    return ((sig**2 + 1) ** 0.5).tolist()


class TwoCallMixin(FastflowScheduler):
    """Call order of a two-call scheduler."""

    _ff_last_call_saves = True  # diffusers' first-order call to sigma 0 saves its sample too (DPM-Solver SDE's not)

    def _ff_first_order(self, idx: int) -> bool:
        """Whether call ``idx`` of the current loop is first-order."""
        return (idx - self._ff_loop_start) % 2 == 0

    @property
    def state_in_first_order(self) -> bool:
        """Whether the next ``step`` call is a first-order (predictor) call. After a loop's last call, as in
        diffusers (which keys it on a saved sample): False where that call was a first-order one that saved it."""
        idx = self.step_index
        if idx is None or not self._ff_loop_start <= idx <= self._ff_steps:
            return True
        if idx == self._ff_steps:
            return not (self._ff_last_call_saves and idx > self._ff_loop_start and self._ff_first_order(idx - 1))
        return self._ff_first_order(idx)


class ScaledTwoCallMixin(TwoCallMixin):
    """A two-call scheduler on variance-exploding samples, with diffusers' input scaling. Families set
    ``_ff_in_scales`` in ``_ff_prepare``: per call index, the input divisor of a first-order call and of a
    second-order one."""

    _ff_in_scales: tuple[list[float], list[float]] = ([], [])

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor) -> torch.Tensor:
        """diffusers' ``sample / sqrt(sigma^2 + 1)`` of the call about to run, from a host scalar (no device
        read)."""
        if not self._ff_ready():
            self._ff_reset()
        idx = self._ff_index(timestep)
        first, second = self._ff_in_scales
        return sample / (first if self._ff_first_order(idx) else second)[idx]
