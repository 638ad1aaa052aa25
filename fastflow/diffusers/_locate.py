"""Which step of its schedule a drop-in's ``step`` call is, found without a host sync.

Step index: a Python int, advanced by ``step``. A timestep given as a Python number
or a CPU tensor locates the first step (as diffusers does; PNDM, whose diffusers class
counts calls instead, by the timestep's position in its own timesteps where it is one
of them, since its schedule repeats values); a device tensor is never
read (that would sync): an element of the scheduler's own ``timesteps`` (what a
pipeline's loop passes, from a slice too, as CogVideoX's video-to-video pipeline starts)
is located by its offset in their storage, and any other device tensor takes the first
step, so such a loop that does not start there must call ``set_begin_index`` first, as
diffusers' img2img pipelines do. Mid-loop, classes whose diffusers step derives from the
timestep's value alone (DDIM, DDPM, their inverse, UnCLIP, CogVideoX) follow a timestep that
is not the counter's step (a step taken twice, a loop that skips steps) where the host knows it
without a read: an element of ``timesteps`` by its position, a number or a CPU tensor by its
value (a step taken again draws fresh in-kernel noise); LCM, TCD and PNDM, whose diffusers step reads
its counter and the timestep both, raise for such a timestep.

``torch.compile``: ``step`` traces without a graph break (``fullgraph=True``) once its
index is known without reading a tensor: after a first eager step, after
``set_begin_index``, or with Python-number timesteps (a CPU-tensor timestep at a
loop's first step raises an error that says so). The index is a Python int, so each
step index traces its own graph: a compiled loop of N steps needs dynamo's
``recompile_limit`` to be at least N, or compile the model alone (the step is one
kernel launch already); :mod:`fastflow.graph_pipeline` captures a whole loop instead.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = ["StepLocator", "host_number"]


def host_number(timestep: Any) -> float | None:
    """The value of a timestep when reading it costs no device sync (Python number or CPU tensor), else None."""
    if isinstance(timestep, (int, float, np.integer, np.floating)):
        return float(timestep)
    if isinstance(timestep, torch.Tensor) and timestep.device.type == "cpu":
        n = timestep.numel()
        if n == 1:
            return float(timestep.item())  # one op: a loop's first step reads its timestep
        if n > 1:  # a batch's timestep, read where every sample's is the same
            flat = timestep.reshape(-1)
            if not bool((flat == flat[0]).all()):
                raise ValueError(
                    f"step was given {n} different timesteps ({', '.join(f'{v:g}' for v in flat[:4].tolist())}"
                    f"{', ...' if n > 4 else ''}): a drop-in steps every sample of a batch from the same timestep, "
                    "as diffusers' step does; pass one"
                )
            return float(flat[0])
    return None


def _element_offset(element: torch.Tensor, ts: torch.Tensor) -> int | None:
    """The index of a one-element tensor in the 1-d dense tensor ``ts`` whose storage it shares, from addresses
    alone, else None."""
    if element.dtype != ts.dtype or element.device != ts.device or ts.dim() != 1 or ts.stride(0) != 1:
        return None
    if element.untyped_storage().data_ptr() != ts.untyped_storage().data_ptr():
        return None
    offset, rest = divmod(element.data_ptr() - ts.data_ptr(), ts.element_size())
    return offset if not rest and 0 <= offset < len(ts) else None


class StepLocator:
    """The step index of a drop-in (a mixin of :class:`~fastflow.diffusers._base.FastflowScheduler`, whose
    ``_ff_reset`` sets up the host copies of the schedule read here); see the module docstring."""

    # True where diffusers derives each step from the timestep value alone (DDIM, DDPM):
    # then a host-readable timestep relocates the step index.
    _ff_timestep_addressed: bool = False
    # True where diffusers' step reads its counter and the timestep's value both (LCM, TCD, PNDM, SA-Solver):
    # mid-loop, a timestep whose value the host knows must be the counter's step's. _ff_value_reads names what
    # diffusers reads at the value, for the error.
    _ff_mixed_addressed: bool = False
    _ff_value_reads: str = "alphas_cumprod"
    # True where diffusers never locates a step but counts its calls (PNDM): a loop's first call is found by its
    # timestep's position in this scheduler's own timesteps where it is one of them, else by the value's first
    # occurrence (diffusers' rule of a repeat's second match is its locating classes').
    _ff_counts_calls: bool = False
    _step_index: int | None = None  # diffusers' DDIM and DDPM keep no step counter; every drop-in has one

    @staticmethod
    def _ff_check_timestep(timestep: float | torch.Tensor) -> None:
        """diffusers' sigma schedulers (Euler family, flow matching, consistency models) take a timestep value,
        never an integer index; they call this at each step."""
        if type(timestep) is torch.Tensor and timestep.is_floating_point():  # the usual case, decided quickly
            return
        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
            raise ValueError("pass one of scheduler.timesteps as timestep, not an integer index")

    def _ff_require_timesteps(self) -> None:
        """diffusers' error for a ``step`` before ``set_timesteps`` (the schedulers that check it)."""
        if self.num_inference_steps is None:
            raise ValueError("num_inference_steps is None: call set_timesteps before step")

    def _ff_scheduled_index(self, timestep: Any) -> int:
        """:meth:`_ff_peek_index` for the schedulers whose diffusers ``step`` needs ``set_timesteps`` first: its
        error before that, else the step's index (the schedule's setup, such as what ``step`` reads from
        ``_ff_prepare``, is then in place)."""
        if self._step_index is None:  # mid-loop, a step has passed the check (set_timesteps cannot undo it)
            self._ff_require_timesteps()
        return self._ff_peek_index(timestep)

    # diffusers' DDIM/DDPM have no step counter; these make every drop-in the same.
    @property
    def step_index(self) -> int | None:
        """Index of the next step (None before the first step of a loop)."""
        return getattr(self, "_step_index", None)

    @property
    def begin_index(self) -> int | None:
        """First step index, set with :meth:`set_begin_index` (img2img pipelines)."""
        return getattr(self, "_begin_index", None)

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = int(begin_index)

    def _ff_locate(self, value: float) -> int:
        """Index of a timestep value in the schedule: where it repeats, the second match, as diffusers' classes that
        locate steps take it; the first for those that do not (value-addressed or call-counting)."""
        values = self._ff_host_values
        try:
            i = values.index(value)  # a scan in C that stops at the first match (a loop's first step: at once)
        except ValueError:
            note = self._ff_schedule_note()
            if not note and self._ff_timestep_addressed and not self._ff_mixed_addressed:
                note = (f" (diffusers' {type(self).__name__} steps from any timestep's value; this drop-in steps "
                        "the timesteps of its schedule only)")
            raise ValueError(f"timestep {value} is not in this scheduler's timesteps{note}") from None
        if not (self._ff_timestep_addressed or self._ff_counts_calls) and value in values[i + 1 :]:
            i = values.index(value, i + 1)
        return i

    def _ff_schedule_note(self) -> str:
        """Where ``set_timesteps`` made non-finite timesteps (a ``mu`` or shift the schedule cannot take, NaN
        sigmas passed in), the clause an error adds to say so; else nothing."""
        what, values = "timesteps", self._ff_host_values
        bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
        sigmas = getattr(self, "sigmas", None)
        if not bad and isinstance(sigmas, torch.Tensor) and sigmas.device.type == "cpu":  # no device read here
            what, values = "sigmas", sigmas.tolist()
            bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
        if not bad:
            return ""
        listed = ", ".join(map(str, bad[:4])) + (", ..." if len(bad) > 4 else "")
        return (f"; set_timesteps made {what} that are not finite (at index {listed} of {len(values)}): check its "
                "sigmas, shift or mu (diffusers steps to NaN there)")

    def _ff_view_value(self, timestep: Any) -> float | None:
        """The value of a device timestep that is an element of this scheduler's own ``timesteps`` (a pipeline's
        ``for t in timesteps``, sliced or not), from its offset in their storage: no data is read. None for any
        other tensor."""
        pos = self._ff_view_position(timestep)
        return None if pos is None else self._ff_host_values[pos]

    def _ff_is_element(self, timestep: torch.Tensor, idx: int) -> bool:
        """Whether ``timestep`` is element ``idx`` of this scheduler's ``timesteps`` (a pipeline's ``for t in
        timesteps``), from its address alone: no data is read. True while tracing, where no address is known."""
        if torch.compiler.is_compiling():
            return True
        base, stride = self._ff_timesteps_address
        return timestep.data_ptr() == base + idx * stride

    def _ff_relocate(self, timestep: torch.Tensor, idx: int) -> int:
        """The step of a tensor timestep other than the counter's (``idx``) on a scheduler whose diffusers class
        derives each step from the timestep's value (a step taken twice, or a loop that skips steps): found by its
        position where it is an element of ``timesteps``, by its value where it lives on the CPU. Any other device
        tensor takes the counter's step (reading it would sync the host). A step taken again draws fresh noise."""
        pos = self._ff_view_position(timestep)
        if pos is None:
            value = host_number(timestep)
            if value is None or value == self._ff_host_values[idx]:
                return idx
            pos = self._ff_locate(value)
        return self._ff_move_to(pos, idx)

    def _ff_move_to(self, pos: int, idx: int) -> int:
        """Move the step counter from ``idx`` to step ``pos``, which the timestep named. Back to a step this loop
        has run, the in-kernel noise, keyed by the step, would repeat: it is drawn afresh, as diffusers draws."""
        if pos < idx:
            self._ff_seed = None
            self._ff_seeds = {}
            self._ff_lane = None
        self._step_index = pos
        return pos

    def _ff_require_counter_timestep(self, timestep: Any, idx: int) -> None:
        """Raise where a class whose diffusers step reads both its counter and the timestep's value is given, at
        step ``idx``, a timestep whose value the host knows and that is not that step's."""
        if type(timestep) is torch.Tensor:
            if self._ff_is_element(timestep, idx):
                return
            pos = self._ff_view_position(timestep)
            value = host_number(timestep) if pos is None else self._ff_host_values[pos]
        else:
            value = host_number(timestep)
        if value is None or not self._ff_value_differs(value, idx):
            return
        raise NotImplementedError(
            f"{type(self).__name__}.step was given timestep {value:g} at step {idx}, whose timestep is "
            f"{self._ff_host_values[idx]:g}: diffusers' step then mixes the two (it reads {self._ff_value_reads} "
            "from the given timestep, the rest from its step counter); fastflow's steps through its timesteps in order "
            "(call set_timesteps, or set_begin_index, to start a loop elsewhere)"
        )

    def _ff_value_differs(self, value: float, idx: int) -> bool:
        """Whether diffusers' step ``idx`` given timestep ``value`` reads other numbers than at its own timestep."""
        return value != self._ff_host_values[idx]

    def _ff_view_position(self, timestep: Any) -> int | None:
        """The index in this schedule of a timestep that is an element of its ``timesteps`` (its offset in their
        storage, on any device; no data is read), else None. Offsets count from the tensor ``set_timesteps`` made,
        so a pipeline that puts a slice of it in ``scheduler.timesteps`` still gets the schedule's own index; a
        tensor put there in its place with the schedule's length (a cast, a move) is read as the same schedule."""
        if not (isinstance(timestep, torch.Tensor) and timestep.numel() == 1):
            return None
        made = self._ff_schedule_tensor
        pos = _element_offset(timestep, made)
        if pos is None:
            ts = getattr(self, "timesteps", None)
            if ts is not made and isinstance(ts, torch.Tensor) and ts.shape == made.shape:
                pos = _element_offset(timestep, ts)
        return pos

    def _ff_peek_index(self, timestep: Any) -> int:
        """The index of the step about to run (set up on first use; ``step`` advances it)."""
        idx = self._step_index
        # Mid-loop with a tensor timestep (a pipeline's loop), or on a scheduler that finds steps by counting alone:
        # the counter, decided in one test since every step asks.
        if idx is not None and idx < self._ff_steps and (
            type(timestep) is torch.Tensor or not self._ff_timestep_addressed
        ):
            if (self._ff_timestep_addressed or self._ff_mixed_addressed) and not torch.compiler.is_compiling():
                base, stride = self._ff_timesteps_address  # _ff_is_element, inlined: every step asks
                if type(timestep) is not torch.Tensor or timestep.data_ptr() != base + idx * stride:
                    if self._ff_mixed_addressed:
                        self._ff_require_counter_timestep(timestep, idx)
                    else:
                        return self._ff_relocate(timestep, idx)
            return idx
        if getattr(self, "_ff_compiled", None) is None:  # _ff_ready(), inlined
            self._ff_reset()  # diffusers steps with its init-time schedule when set_timesteps was not called
        return self._ff_index(timestep)

    def _ff_index(self, timestep: Any) -> int:
        """The index of the step about to run, without reading device memory (set up: _ff_reset has run)."""
        idx = self._step_index
        if idx is None or idx >= self._ff_steps:
            if not torch.compiler.is_compiling():
                self._ff_follow_edits()
                idx = self._step_index
            begin = self.begin_index
            # diffusers' DDIM family has no begin index: each step is its timestep's, which a begin index left from
            # an earlier loop must not override; it places the first step only where the value is not known.
            by_value = self._ff_timestep_addressed and not self._ff_mixed_addressed
            if begin is not None and (not by_value or torch.compiler.is_compiling()):
                idx = begin
            else:
                on_host = isinstance(timestep, torch.Tensor) and timestep.device.type == "cpu"
                if on_host and torch.compiler.is_compiling():
                    raise RuntimeError(
                        f"{type(self).__name__}.step under torch.compile: the first step of a loop is located by "
                        "its timestep's value, which a traced graph cannot read from a tensor; call "
                        "set_begin_index(0) before the loop (as diffusers' img2img pipelines do), pass the "
                        "timestep as a Python number, or take the first step eagerly"
                    )
                pos = None if torch.compiler.is_compiling() else self._ff_view_position(timestep)
                if pos is not None and self._ff_counts_calls:
                    idx = pos
                else:
                    value = host_number(timestep)
                    if value is None and pos is not None:
                        value = self._ff_host_values[pos]
                    idx = (begin or 0) if value is None else self._ff_locate(value)
            self._step_index = idx
            self._ff_set_loop_start(idx)
        elif (
            self._ff_timestep_addressed
            and type(timestep) is not torch.Tensor  # the usual case, decided before a four-type isinstance
            and isinstance(timestep, (int, float, np.integer, np.floating))
            and self._ff_host_values[idx] != float(timestep)  # a list: numpy would be traced as a tensor
        ):
            idx = self._ff_move_to(self._ff_locate(float(timestep)), idx)
        return idx
