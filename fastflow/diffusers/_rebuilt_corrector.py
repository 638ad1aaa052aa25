"""A sample edited between steps, for the predictor-corrector drop-ins whose diffusers corrector discards it.

diffusers' UniPC and SA-Solver rebuild the corrected sample from the previous step's
(corrected) input, so a sample edited between two steps reaches their next step only
through the model output it produced. Their drop-ins correct the sample they are given,
``z + (C - P)``, which equals diffusers' ``R + (C - P)`` when ``z`` is ``R``, the tensor the
previous step returned. When it is another tensor (a callback made new latents), the step's
output is moved by ``w (R - z)``, ``w`` being its update's weight on the corrected sample:
diffusers' numbers, from three tensor ops taken only then. An edit made in place on the
returned tensor leaves nothing to return to, so it is kept, as any edit is in a step traced by
``torch.compile`` (a trace makes no identity test).

Where a step runs no corrector (a loop's first, one after a ``disable_corrector`` step), diffusers
keeps the caller's own sample as the next corrector's ``last_sample``; a pipeline that then writes
into that tensor (SkyReels-V2's ``latents[:, :, idx] = step(..., latents[:, :, idx])``, a ``copy_``)
changes what that corrector reads. The drop-ins keep a copy of such a sample with its version counter
(one copy per such step) and, where the counter moved, shift the next step's output by ``w r (L - x)``:
``r`` the sample's weight in the step that kept it, ``L`` its contents now, ``x`` its copy.
"""

from __future__ import annotations

import torch

from ..solvers.base import Lin
from ._multistep import MultistepScheduler

__all__ = ["RebuiltCorrectorMixin"]


class RebuiltCorrectorMixin(MultistepScheduler):
    """Keeps the tensor each step returns, and steps another sample as diffusers' rebuilt corrector does.

    Every step asks, so a family's ``step`` inlines the test: ``shift = None if sample is self._ff_returned and
    self._ff_given is None else self._ff_edit_shift(sample)`` before the step, ``self._ff_kept(prev, sample,
    shift)`` after it (the lane's path inlines that too)."""

    _ff_returned: torch.Tensor | None = None  # the last step's output, while the loop has steps left
    # (step index, sample, its version, a copy, weight) of a caller's sample the next corrector reads (see above)
    _ff_given: tuple[int, torch.Tensor, int, torch.Tensor, float] | None = None
    # Steps that run no corrector though not a loop's first (UniPC's after a disable_corrector step)
    _ff_uncorrected: frozenset[int] = frozenset()

    def _ff_corrects(self, i: int, start: int) -> bool:
        """Whether diffusers' step ``i`` (of a loop from ``start``) runs its corrector."""
        raise NotImplementedError

    def _ff_prepare(self) -> None:
        super()._ff_prepare()
        self._ff_returned = None
        self._ff_given = None

    def _ff_sample_weight(self, i: int) -> float:
        """Step ``i``'s weight on its (corrected) sample in the current loop; 0 where it is undefined."""
        start = self._ff_loop_start
        u = self._ff_cached_updates(start)[i - start]
        return u[("z", i - start)] if isinstance(u, Lin) else 0.0

    def _ff_edit_shift(self, sample: torch.Tensor) -> list[tuple[float, torch.Tensor, torch.Tensor]] | None:
        """The terms ``(w, a, b)`` that move this step's output by ``w (a - b)`` to diffusers': from ``R``, the
        tensor the previous step returned, where the sample is another tensor and this step's corrector rebuilds
        it; from a kept caller's sample written in place since (see the module); None where there are none."""
        kept, idx = self._ff_returned, self._step_index
        given, self._ff_given = self._ff_given, None
        if idx is None or idx >= self._ff_steps or torch.compiler.is_compiling():
            return None
        terms = []
        if kept is not None and sample is not kept and self._ff_corrects(idx, self._ff_loop_start):
            w = self._ff_sample_weight(idx)
            if w != 0.0:
                terms.append((w, kept, sample))
        if given is not None:
            at, tensor, version, copy, w = given
            if at == idx and tensor._version != version:
                terms.append((w, tensor, copy))
        return terms or None

    def _ff_keep_given(self, sample: torch.Tensor, i: int) -> None:
        """Step ``i`` ran no corrector: where step ``i + 1`` corrects, diffusers reads ``sample`` there."""
        start = self._ff_loop_start
        if torch.compiler.is_compiling():  # a trace has no version counters (edits are kept, see the module)
            return
        if i + 1 < self._ff_steps and self._ff_corrects(i + 1, start) and not self._ff_corrects(i, start):
            w = self._ff_sample_weight(i + 1) * self._ff_sample_weight(i)
            if w != 0.0:
                self._ff_given = (i + 1, sample, sample._version, sample.clone(), w)

    def _ff_kept(self, prev: torch.Tensor, sample: torch.Tensor,
                 shift: list[tuple[float, torch.Tensor, torch.Tensor]] | None) -> torch.Tensor:
        """The step's output, moved to diffusers' (:meth:`_ff_edit_shift`); kept for the next step's test while
        the loop has steps left, with the caller's sample where the next corrector reads it."""
        if shift is not None:
            prev = self._ff_shifted(prev, shift)
        idx = self._step_index
        if idx < self._ff_steps and not torch.compiler.is_compiling():
            self._ff_returned = prev
            if idx - 1 == self._ff_loop_start or idx - 1 in self._ff_uncorrected:
                self._ff_keep_given(sample, idx - 1)
        else:
            self._ff_returned = None
        return prev

    @staticmethod
    def _ff_shifted(prev: torch.Tensor, shift: list[tuple[float, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """``prev + sum w (a - b)``."""
        for w, a, b in shift:
            prev = prev + (a.to(prev.dtype) - b.to(prev.dtype)) * w
        return prev
