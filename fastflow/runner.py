"""Running a compiled plan stage by stage: device tables, history buffers, backend dispatch.

Shared by :class:`fastflow.Sampler`, the diffusers drop-in schedulers and graph
capture, so every front end steps the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import NamedTuple

import torch

from .backends import resolve_backend
from .backends.base import AllocEntry, Backend, OutputTriple, shares_memory
from .devices import traced_without_dynamo
from .plan import StepPlan


class BoundEntry(NamedTuple):
    """A runner's entry call for states on one device in one dtype, with the arguments fixed that are the same at
    each of its stages (:meth:`PlanRunner.bind`): a front end that keeps it runs a loop's plain stages
    through :func:`run_bound` without :meth:`PlanRunner.run_plain`'s lookups, and its other stages through
    :meth:`PlanRunner.run_kept`."""

    entry: AllocEntry
    table: torch.Tensor
    clip: float | None
    want_x: bool
    x_dtype: torch.dtype | None


def run_bound(
    bound: BoundEntry,
    step: int | torch.Tensor,
    z: torch.Tensor,
    cond: torch.Tensor,
    history: list[torch.Tensor],
    seeds: torch.Tensor | None,
    use_noise: bool,
) -> OutputTriple:
    """:meth:`PlanRunner.run_plain` of stage ``step`` (or the stage a device tensor holds) through a binding:
    ``z`` and ``cond`` on the device and in the dtype it was bound for (the caller checks), ``use_noise`` the
    stage's (its in-kernel draw from ``seeds``)."""
    entry, table, clip, want_x, x_dtype = bound
    return entry(z, None, cond, None, history, table, step, seeds, None, want_x, x_dtype, None, False, clip, use_noise,
                 False)


class HistoryShapeError(ValueError):
    """A stage's state has another shape than the tensors earlier stages of its loop kept for it to read."""

    def __init__(self, stage: int, state_shape: tuple[int, ...], kept_shape: tuple[int, ...]):
        self.stage, self.state_shape, self.kept_shape = stage, state_shape, kept_shape
        super().__init__(
            f"stage {stage}'s state has shape {state_shape}, but the tensors earlier stages of this loop kept for it "
            f"to read have shape {kept_shape}: a loop's state keeps its shape, or takes one they broadcast to (a "
            "larger batch); start a new loop to change it otherwise"
        )


def broadcasts_to(shape: Sequence[int] | None, target: Sequence[int]) -> bool:
    """Whether a tensor of ``shape`` (None: there is none) broadcasts to ``target`` exactly."""
    if shape is None or tuple(shape) == tuple(target):
        return True
    try:
        return torch.broadcast_shapes(shape, target) == target
    except RuntimeError:
        return False


def _reshaped(i: int, z: torch.Tensor, history: Sequence[torch.Tensor]) -> HistoryShapeError | None:
    """The error to raise in place of a backend's shape error when stage ``i``'s state and kept history differ in
    shape (asked only after a backend raised, so the usual step pays nothing for it)."""
    kept = next((h for h in history if h.shape != z.shape), None)
    return None if kept is None else HistoryShapeError(i, tuple(z.shape), tuple(kept.shape))


class PlanRunner:
    """Evaluates stage ``i`` of ``plan`` with one backend call, keeping the history later stages read.

    Everything that does not depend on the tensors (history keys, when each stored
    tensor can be dropped, the table and backend per device) is worked out once,
    since ``run`` is on every step's host path.
    """

    def __init__(self, plan: StepPlan, backend: str = "auto"):
        self.plan = plan
        self._tables: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        # (device, dtype) -> (table, backend, its eager entry) under self.backend: looked up on every step.
        self._dispatch: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, Backend, AllocEntry]] = {}
        self.backend = backend
        self._store: dict[tuple[str, int], torch.Tensor] = {}
        needs = [tuple((ref.kind, ref.stage) for ref in refs) for refs in plan.history]
        last_use: dict[tuple[str, int], int] = {}
        for i, keys in enumerate(needs):
            for key in keys:
                last_use[key] = i
        free_after: list[list[tuple[str, int]]] = [[] for _ in plan.history]
        for key, i in last_use.items():
            free_after[i].append(key)
        # What run() reads per stage, as plain Python values in one tuple (it is on every step's host path):
        # the keys it reads, whether it draws noise, writes x_hat and keeps its model output, and what it keeps
        # (each key with the output it stores: 0 its x_hat, 1 its input state, 2 its model output) and frees (None
        # when it keeps and frees nothing, the usual single-step stage).
        keep_o = plan.keep_o or (False,) * len(plan.history)
        self._keeps_inputs = any(plan.keep_z) or any(keep_o)  # some stage keeps a caller's tensor (see run's out=)
        self._stages = []
        for i in range(len(plan.history)):
            sources = (plan.write_x[i], plan.keep_z[i], keep_o[i])
            keeps = tuple(((kind, i), src) for src, kind in enumerate("xzo") if sources[src])
            self._stages.append((
                needs[i], bool(plan.noise[i]), bool(plan.write_x[i]), bool(keep_o[i]),
                (keeps, tuple(free_after[i])) if keeps or free_after[i] else None,
            ))

    @property
    def backend(self) -> str:
        """The backend name steps resolve (per device and dtype, once)."""
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        self._backend = name
        self._dispatch.clear()  # resolved under the old name

    def table(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The coefficient table on ``device`` (cached; float64 for float64 states)."""
        key = (torch.device(device), dtype)
        table = self._tables.get(key)
        if table is None:
            table = self.plan.table(device, dtype)
            if not traced_without_dynamo():  # a fake there: kept, later eager steps would read no data
                self._tables[key] = table
        return table

    def warm(self, device: torch.device | str, also: torch.dtype | None = None) -> None:
        """Resolve the backend for states on ``device`` (float32, float16, bfloat16, and ``also``) before the first
        step, which may then run under torch.compile's tracing (it cannot import a backend). A backend that does
        not resolve is left to the first step, which raises its error."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())  # as a tensor's .device reads
        for dtype in (torch.float32, torch.float16, torch.bfloat16, *(() if also is None else (also,))):
            with contextlib.suppress(Exception):
                self._table_and_backend_for(device, dtype)

    def reset(self) -> None:
        """Forget stored history (a new loop starts)."""
        self._store.clear()

    def stored(self, kind: str, stage: int) -> torch.Tensor:
        """The tensor stage ``stage`` keeps for later stages: its x_hat (``kind="x"``), input state (``"z"``) or
        model output (``"o"``)."""
        try:
            return self._store[(kind, stage)]
        except KeyError:
            raise RuntimeError(f"no {kind} of stage {stage} is stored; run the stages in order from 0") from None

    def _table_and_backend_for(
        self, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, Backend, AllocEntry]:
        """The coefficient table, backend and entry of states on ``device`` in ``dtype``, resolved once: a step reads
        ``_dispatch[(z.device, z.dtype)]`` in its own body (a helper's frame would cost every step) and calls this
        on a miss. An entry is traceable by torch.compile (see :meth:`Backend.alloc_entry`)."""
        table = self.table(device, torch.float64 if dtype == torch.float64 else torch.float32)
        backend = resolve_backend(self.backend, device, dtype)
        found = (table, backend, backend.alloc_entry())
        # not under non-strict export (its table is a fake there, see table), nor for a numpy array's dtype (a
        # non-tensor state the caller names): traced steps read this dict, and torch 2.8's dynamo cannot hash that
        if not traced_without_dynamo() and isinstance(dtype, torch.dtype):
            self._dispatch[(device, dtype)] = found
        return found

    def is_plain(self, i: int) -> bool:
        """Stage ``i`` reads no stored tensor and keeps none, and is not a loop's first stage (which forgets the
        last loop's history): :meth:`run_plain` may run it."""
        needs, _, _, _, bookkeeping = self._stages[i]
        return i > 0 and not needs and bookkeeping is None

    def bind(self, device: torch.device, dtype: torch.dtype, want_x: bool, x_dtype: torch.dtype | None) -> BoundEntry:
        """The entry call :meth:`run_plain` makes for states on ``device`` in ``dtype`` with ``want_x`` and
        ``x_dtype``, for :func:`run_bound`."""
        found = self._dispatch.get((device, dtype)) or self._table_and_backend_for(device, dtype)
        return BoundEntry(found[2], found[0], self.plan.clip, want_x, x_dtype)

    def run_plain(
        self,
        i: int,
        z: torch.Tensor,
        cond: torch.Tensor,
        seeds: torch.Tensor | None,
        noise: torch.Tensor | None,
        want_x: bool,
        history: list[torch.Tensor],
        step: torch.Tensor | None,
        x_dtype: torch.dtype | None,
    ) -> OutputTriple:
        """:meth:`run` of a stage for which :meth:`is_plain` holds, unguided, without the next model input:
        ``history`` is the caller's tensors for the plan's free slots (a list the call may keep). The drop-in
        schedulers' usual step, with the bookkeeping that stage has no use for left out (it is on every step's
        host path)."""
        use_noise = self._stages[i][1]
        if use_noise and noise is None and seeds is None:
            raise ValueError(f"stage {i} draws noise: pass seeds or noise")
        found = self._dispatch.get((z.device, z.dtype)) or self._table_and_backend_for(z.device, z.dtype)
        return found[2](  # the dispatch entry
            z, None, cond, None, history, found[0], i if step is None else step, seeds, noise, want_x, x_dtype, None,
            False, self.plan.clip, use_noise, False,
        )

    def run(
        self,
        i: int,
        z: torch.Tensor,
        cond: torch.Tensor,
        uncond: torch.Tensor | None = None,
        *,
        seeds: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
        want_x: bool = False,
        model_in_dtype: torch.dtype | None = None,
        model_in_double: bool = False,
        step: int | torch.Tensor | None = None,
        extra_history: Sequence[torch.Tensor] = (),
        paired: bool = False,
        x_dtype: torch.dtype | None = None,
    ) -> OutputTriple:
        """Stage ``i``; returns ``(z_next, x_hat or None, model input or None)``.

        ``model_in_dtype`` asks for the next model input in that dtype (batch doubled with
        ``model_in_double``). ``step`` overrides the table row (graph mode).
        ``extra_history`` binds caller tensors to the history slots after the plan's own
        (a front end whose table puts coefficients there, e.g. on the raw model output).
        ``paired``: ``cond`` is a guided model's doubled batch, uncond half first, and
        ``uncond`` is None (the backend splits it). ``x_dtype``: the dtype x_hat is written
        (and kept for later stages) in, default the state's.
        """
        needs, use_noise, write_x, keeps_o, bookkeeping = self._stages[i]
        store = self._store
        if i == 0:
            store.clear()
        if needs:
            try:
                history = [*map(store.__getitem__, needs), *extra_history]  # no comprehension frame
            except KeyError:
                raise self._missing(i, needs) from None
        else:
            history = [*extra_history]
        if use_noise and noise is None and seeds is None:
            raise ValueError(f"stage {i} draws noise: pass seeds or noise")
        if keeps_o and (uncond is not None or paired):
            raise ValueError(f"stage {i} keeps its model output, which a guided call does not have")
        given_out = out
        if out is not None:
            if out.requires_grad and torch.is_grad_enabled():
                raise RuntimeError(
                    "out= was given a tensor that requires grad: a step is an inference op, and writing it into "
                    "such a tensor would corrupt the gradient through it (torch's own out= ops refuse it too); "
                    "step under torch.no_grad() or into a tensor that does not require grad"
                )
            strides = out.stride()
            if 0 in strides and any(st == 0 and size > 1 for size, st in zip(out.shape, strides, strict=True)):
                raise ValueError(  # an expanded tensor: several elements would be written to one address
                    f"out has stride 0 in a dimension of size > 1 (an expanded tensor, strides {strides}): "
                    "several of its elements are one memory location; pass a tensor of its own"
                )
            if self._keeps_inputs or store:
                self._check_out_spares_kept(i, out, z, cond)
        found = self._dispatch.get((z.device, z.dtype)) or self._table_and_backend_for(z.device, z.dtype)
        try:
            out, x_out, model_in = found[2](  # the dispatch entry
                z, out, cond, uncond, history, found[0], i if step is None else step, seeds, noise, write_x or want_x,
                x_dtype, model_in_dtype, model_in_double, self.plan.clip, use_noise, paired,
            )
        except ValueError as exc:
            if needs and (reshaped := _reshaped(i, z, history[: len(needs)])) is not None:
                if not self._broadcast_store(z):
                    raise reshaped from exc
                return self.run(  # once: the kept tensors now have the state's shape
                    i, z, cond, uncond, seeds=seeds, noise=noise, out=out, want_x=want_x, model_in_dtype=model_in_dtype,
                    model_in_double=model_in_double, step=step, extra_history=extra_history, paired=paired,
                    x_dtype=x_dtype,
                )
            raise
        if bookkeeping is not None:  # what it keeps and frees (the same lines as run_kept's: a helper's frame
            outputs = (x_out, z, cond)  # would cost every multistep step)
            for key, src in bookkeeping[0]:
                store[key] = outputs[src]
            for key in bookkeeping[1]:
                store.pop(key, None)
        if given_out is not None and not torch.compiler.is_compiling():
            # A kernel writes through a pointer that autograd does not see: say the tensor changed, so that a graph
            # that saved it for backward raises, as it does after an in-place torch op.
            torch.autograd.graph.increment_version(given_out)
        return out, x_out, model_in

    def _check_out_spares_kept(self, i: int, out: torch.Tensor, z: torch.Tensor, cond: torch.Tensor) -> None:
        """Refuse an ``out`` sharing memory with a tensor a later stage reads (Heun's ``out=z`` would overwrite the
        state its corrector steps from; a multistep solver's x0, returned with ``want_x``, is the stored one). The
        ``out=`` path only."""
        if torch.compiler.is_compiling():  # fake tensors have no memory to compare
            return
        keeps, freed = self._stages[i][4] or ((), ())
        kept = [(key, t) for key, t in self._store.items() if key not in freed]
        inputs = {"z": z, "o": cond}
        kept += [(key, inputs[key[0]]) for key, _ in keeps if key[0] in inputs]
        for (kind, stage), t in kept:
            if shares_memory(out, t):
                what = "the state z" if kind == "z" else "the model output" if kind == "o" else "the x0"
                raise ValueError(
                    f"out shares memory with {what} of stage {stage}, which is kept for a later stage to read; "
                    f"writing stage {i}'s next state there would change it: pass a separate tensor (or out=None)"
                )

    def run_kept(
        self,
        bound: BoundEntry,
        i: int,
        step: int | torch.Tensor,
        z: torch.Tensor,
        cond: torch.Tensor,
        extra_history: list[torch.Tensor],
        seeds: torch.Tensor | None,
    ) -> OutputTriple:
        """:meth:`run` of stage ``i`` through a binding of this runner (:meth:`bind`): unguided, without the next
        model input, its history read and kept as :meth:`run` does. The drop-ins' lane runs its stages that read or
        keep stored tensors so, without :meth:`run`'s keyword arguments and dispatch lookup (every multistep step).
        ``z`` and ``cond`` are on the device and in the dtype it was bound for (the caller checks); ``extra_history``
        is a list the call may keep; ``seeds`` are given when the stage draws noise."""
        needs, use_noise, write_x, _, bookkeeping = self._stages[i]
        store = self._store
        if i == 0:
            store.clear()
        if needs:
            try:
                history = [*map(store.__getitem__, needs), *extra_history]
            except KeyError:
                raise self._missing(i, needs) from None
        else:
            history = extra_history
        entry, table, clip, want_x, x_dtype = bound
        try:
            out, x_out, model_in = entry(z, None, cond, None, history, table, step, seeds, None, write_x or want_x,
                                         x_dtype, None, False, clip, use_noise, False)
        except ValueError as exc:
            if needs and (reshaped := _reshaped(i, z, history[: len(needs)])) is not None:
                if not self._broadcast_store(z):
                    raise reshaped from exc
                return self.run_kept(bound, i, step, z, cond, extra_history, seeds)  # once, as run's
            raise
        if bookkeeping is not None:
            outputs = (x_out, z, cond)
            for key, src in bookkeeping[0]:
                store[key] = outputs[src]
            for key in bookkeeping[1]:
                store.pop(key, None)
        return out, x_out, model_in

    def _broadcast_store(self, z: torch.Tensor) -> bool:
        """Kept tensors that broadcast to the state's shape (a loop continued on a larger batch from batch-1 history,
        as Text2Video-Zero does; diffusers' stored history broadcasts there): expanded to it in the store, one copy
        each; False, changing nothing, where one of them does not broadcast (a trimmed state)."""
        shape = z.shape
        if not all(broadcasts_to(t.shape, shape) for t in self._store.values()):
            return False
        for key, t in list(self._store.items()):
            if t.shape != shape:
                self._store[key] = t.expand(shape).contiguous()
        return True

    def _missing(self, i: int, needs: tuple[tuple[str, int], ...]) -> RuntimeError:
        """The error of stage ``i`` run before a stage it reads a stored tensor of."""
        kind, stage = next(k for k in needs if k not in self._store)
        return RuntimeError(f"stage {i} needs {kind} of stage {stage}; run the stages in order from 0")
