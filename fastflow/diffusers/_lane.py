"""The lane: a pipeline's default ``step`` call, run from steps bound at its loop's first step.

A pipeline calls ``step`` the same way at every step of a loop. The first such call of a loop runs
_ff_step, which keeps its loop's stage calls and the entry call bound for the tensors' dtypes and device
(runner.BoundEntry) as the lane; the loop's later steps then run from it without _ff_step's decisions
(plain stages straight into the bound entry, others through the runner, which keeps their history).
Only a class's default call (``lane=True``: no generator, given noise or options, the same arguments to
_ff_step at every step) uses it; any other call, tensor or state takes _ff_step.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import torch

from ..runner import HistoryShapeError, run_bound
from ._spec import StageCall

__all__ = ["StepLane"]


class StepLane:
    """The lane's two methods (a mixin of :class:`~fastflow.diffusers._base.FastflowScheduler`, whose ``_ff_step``
    binds it); see the module docstring."""

    _ff_lane: tuple | None = None  # the default call's steps, bound (see _ff_lane_step)

    def _ff_update_lane(
        self, idx: int, variant: Hashable, stage: StageCall, sample: torch.Tensor, model_output: torch.Tensor,
        want_x: bool, x_dtype: torch.dtype | None, out_dtype: torch.dtype | None,
    ) -> None:
        """After a default call of step ``idx`` ran through :meth:`_ff_step`: bind the lane when it is missing,
        bound for other tensors or another ``variant``, or has no seeds though this noisy step has just drawn them.
        ``x_dtype``: the dtype _ff_step writes x_hat in for these tensors, before the rule of a prediction field
        that is the model output (which applies to steps that return x_hat itself: where it changes the dtype, the
        lane leaves the steps with a prediction field of their own to _ff_step)."""
        device = sample.device
        key = (sample.dtype, model_output.dtype, device, sample.shape[0], self.compute_pred_original_sample, out_dtype)
        cur = self._ff_lane
        if cur is not None and cur[-1] == key and cur[0] == variant and (cur[4] is not None or not stage.noisy):
            return
        start = self._ff_loop_start if self._ff_start_dependent else 0
        if idx < start:
            return  # a step before the loop's start runs a plan of its own (see _ff_get)
        comp = self._ff_get(idx, variant)
        own_preds = True  # the lane may run steps whose prediction field is not x_hat itself
        if want_x and self._ff_x0_is_output and model_output.dtype != (x_dtype or sample.dtype):
            x_dtype, own_preds = model_output.dtype, False
        seeds = self._ff_seeds.get((device, sample.shape[0]))
        rows = None if device.type == "cpu" else self._ff_counter_views.setdefault(device, [None] * self._ff_steps)
        bound = comp.runner.bind(device, sample.dtype, want_x, x_dtype)
        self._ff_lane = (variant, comp.calls, comp.start, bound, seeds, rows, own_preds, key)

    def _ff_lane_step(
        self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, variant: Hashable = None
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The class's default call of ``step`` from the lane, as ``(prev_sample, prediction field)``; None where
        the lane does not hold it (the caller then runs :meth:`_ff_step` with ``lane=True``): mid-loop, at a step
        whose index does not depend on the timestep's value, with tensors like those the lane was bound for.
        ``variant``: where a class's default call takes a step argument that selects its plan (LMS's order, TCD's
        eta; validated by the call that bound the lane), the argument, which must be the lane's; None for a class
        whose lane serves one variant."""
        lane = self._ff_lane
        idx = self._step_index
        if lane is None or idx is None:
            return None
        if torch.is_grad_enabled() and (model_output.requires_grad or sample.requires_grad):
            return None  # _ff_step refuses it
        if self._ff_timestep_addressed or self._ff_mixed_addressed:  # the step may depend on the timestep's value
            if type(timestep) is not torch.Tensor:
                return None  # _ff_peek_index finds it
            if not torch.compiler.is_compiling():
                base, stride = self._ff_timesteps_address  # _ff_is_element, inlined
                if timestep.data_ptr() != base + idx * stride:
                    return None
        bound_variant, calls, start, bound, seeds, rows, own_preds, key = lane
        if variant is not None and variant is not bound_variant and variant != bound_variant:
            return None
        k = idx - start
        if not 0 <= k < len(calls):
            return None
        runner, _, noisy, draws, uses_o, pred, error, plain = calls[k]
        z_dtype, o_dtype, device, batch, cpo, out_dtype = key
        if (
            error is not None
            or (pred is not None and bound.want_x and not own_preds)
            or sample.dtype is not z_dtype
            or model_output.dtype is not o_dtype
            or sample.device != device
            or self.compute_pred_original_sample != cpo
            or (draws and self.diffusers_noise)
        ):
            return None
        row = None
        if noisy:
            if seeds is None or sample.shape[0] != batch:
                return None
            if rows is not None:  # the noise counter, a device view (see _ff_noise_inputs)
                row = rows[k]
                if row is None:
                    row = self._ff_noise_inputs(k, sample)[1]
        if uses_o:
            # read in place: row-major, or in the layout of a sample the kernel steps in its own order (no draw)
            if not model_output.is_contiguous() and (noisy or model_output.stride() != sample.stride()):
                return None
            history = [model_output]
        else:
            history = []
        if plain:
            out, x, _ = run_bound(bound, k if row is None else row, sample, model_output, history,
                                  seeds if noisy else None, noisy)
        else:  # a stage that reads or keeps stored tensors: the runner's bookkeeping
            try:
                out, x, _ = runner.run_kept(bound, k, k if row is None else row, sample, model_output, history,
                                            seeds if noisy else None)
            except HistoryShapeError as exc:
                raise self._ff_reshaped(exc) from exc
        if x is not None:
            if not bound.want_x:  # written only for a later stage to read
                x = None
            elif pred is not None:  # a prediction field of its own (LMS's x0, for one)
                x = self._ff_eval(pred, k, x, sample, model_output, None, seeds if noisy else None,
                                  k if row is None else row)
            elif runner.plan.write_x[k] and not self._ff_pred_handed_back:  # kept: a copy (see _ff_step)
                x = x.clone()
        self._step_index = idx + 1
        if out_dtype is not None and out.dtype is not out_dtype:
            out = out.to(out_dtype)
        return out, x
