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
"""

from __future__ import annotations

import torch

from ..solvers.base import Lin
from ._multistep import MultistepScheduler

__all__ = ["RebuiltCorrectorMixin"]


class RebuiltCorrectorMixin(MultistepScheduler):
    """Keeps the tensor each step returns, and steps another sample as diffusers' rebuilt corrector does.

    Every step asks, so a family's ``step`` inlines the test: ``shift = None if sample is self._ff_returned else
    self._ff_edit_shift(sample)`` before the step, ``self._ff_kept(prev, sample, shift)`` after it."""

    _ff_returned: torch.Tensor | None = None  # the last step's output, while the loop has steps left

    def _ff_corrects(self, i: int, start: int) -> bool:
        """Whether diffusers' step ``i`` (of a loop from ``start``) runs its corrector."""
        raise NotImplementedError

    def _ff_prepare(self) -> None:
        super()._ff_prepare()
        self._ff_returned = None
        self._ff_edit_weights: dict[int, list[float]] = {}

    def _ff_edit_shift(self, sample: torch.Tensor) -> tuple[float, torch.Tensor] | None:
        """``(w, R)`` for a sample that is not ``R``, the tensor the previous step returned, where this step's
        corrector rebuilds it; else None."""
        kept, idx, start = self._ff_returned, self._step_index, self._ff_loop_start
        if kept is None or idx is None or idx >= self._ff_steps or torch.compiler.is_compiling():
            return None
        weights = self._ff_edit_weights.get(start)
        if weights is None:
            weights = self._ff_edit_weights[start] = self._ff_sample_weights(start)
        w = weights[idx - start]
        return None if w == 0.0 else (w, kept)

    def _ff_sample_weights(self, start: int) -> list[float]:
        """Each step's weight on its corrected sample where its corrector runs, else 0."""
        weights = []
        for k, u in enumerate(self._ff_updates(start)):
            corrects = isinstance(u, Lin) and self._ff_corrects(start + k, start)
            weights.append(u[("z", k)] if corrects else 0.0)
        return weights

    def _ff_kept(self, prev: torch.Tensor, sample: torch.Tensor, shift: tuple[float, torch.Tensor] | None
                 ) -> torch.Tensor:
        """The step's output, moved to diffusers' where the sample was another tensor; kept for the next step's
        test while the loop has steps left. (The lane's path inlines it without the trace test: a traced step
        keeps a tensor it never shifts toward.)"""
        if shift is not None:
            prev = self._ff_shifted(prev, sample, shift)
        self._ff_returned = prev if self._step_index < self._ff_steps and not torch.compiler.is_compiling() else None
        return prev

    @staticmethod
    def _ff_shifted(prev: torch.Tensor, sample: torch.Tensor, shift: tuple[float, torch.Tensor]) -> torch.Tensor:
        """``prev + w (R - sample)``: the step from ``R`` rather than from the sample given."""
        w, kept = shift
        return prev + (kept.to(prev.dtype) - sample.to(prev.dtype)) * w
