"""The one operation every backend implements: evaluate one stage of a step plan.

Signature (the backend contract, shared by the torch reference, Triton and C++/CUDA)::

    fused_step(z, out, model_out, model_out_uncond, history, table, step,
               seeds=None, noise=None, x_out=None, model_in_out=None, clip=None,
               use_noise=False, check_overlap=True) -> None

* ``z``: state ``[B, ...]`` (float32, bfloat16, float16 or float64 for the reference).
* ``out``: the next state, same shape and dtype as ``z``; may be ``z`` itself (or another
  input, exactly: each element is read before it is written), never part of an input or
  of another output (the kernels write block by block: every backend refuses it; the
  Python backends skip that test with ``check_overlap=False``, as the allocating form does).
* ``model_out``: model output (the conditional one when guided), same shape as ``z``,
  any floating dtype. ``model_out_uncond``: the unconditional output, or None.
* ``history``: 0 to 3 tensors shaped like ``z``, bound to slots ``h0, h1, h2``.
* ``table``: coefficient table ``[stages, NUM_COEFS]``, float32 or float64, on ``z``'s
  device (the reference computes in float64 for float64 states).
* ``step``: the row to use, a Python int in range or an int32/int64 tensor of one element
  on ``z``'s device (graph mode: read on the device, never on the host; a row outside
  the table gives NaN outputs on the kernels, which cannot raise there). It is also
  the noise counter's step index.
* ``seeds``: int64 ``[B]`` per-sample seeds, needed when ``use_noise`` and ``noise``
  is None. ``noise``: explicit standard-normal noise shaped like ``z``.
* ``x_out``: if given, receives x_hat (after clipping), same shape as ``z``.
* ``model_in_out``: if given, receives ``CIN * z_next`` cast to its dtype; its batch
  may be ``2B``, in which case both halves receive it (classifier-free guidance).
* ``clip``: clamp x_hat to ``[-clip, clip]`` when not None (a positive number; NaN stays NaN).

Arithmetic is float32 (float64 for float64 states); every output is rounded once.

Front ends call the allocating form, :meth:`Backend.fused_step_alloc`, which makes
the outputs not given and returns them. Its default (torch allocations around
``fused_step``) serves every backend; a backend with a cheaper way to allocate (the
C++ extension) overrides it. Per step, front ends reach it through
:meth:`Backend.alloc_entry`: the same call with every argument positional
(:data:`AllocEntry`), which a compiled backend serves with its binding itself, so
no Python frame sits between a front end and the launch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch._subclasses.fake_tensor import is_fake

from ..plan import MAX_HISTORY, NUM_COEFS

OutputTriple = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]
# The dtypes every kernel reads and writes (the C++ extension's list); a tensor in another dtype (an int, a bool, a
# complex, a float8) would be a silent cast on the reference, so every front end and backend refuses it alike.
STEP_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_STEP_DTYPE_NAMES = "float32, float16, bfloat16 or float64"
# fused_step_alloc with every argument positional: (z, out, model_out, model_out_uncond, history (a list),
# table, step, seeds, noise, want_x, x_dtype, model_in_dtype, model_in_double, clip, use_noise, paired).
AllocEntry = Callable[..., OutputTriple]


class Backend:
    """What every backend is: availability checks, ``fused_step`` (the contract above), and the
    allocating form built on it. Each backend subclasses this and defines the first three."""

    name = "backend"

    def __deepcopy__(self, memo: dict[int, Any]) -> Backend:
        """The backend itself: a copy of a sampler or drop-in that has stepped (and keeps its backend) shares it, as
        every sampler does (the Triton backend holds its kernels' module, which cannot be copied)."""
        return self

    def __reduce__(self) -> tuple[Callable[[str], Backend], tuple[str]]:
        """Pickled by name: unpickled as that process's backend of the name."""
        from . import get_backend

        return get_backend, (self.name,)

    def availability(self) -> str | None:
        """None when usable, else the reason it is not."""
        raise NotImplementedError

    def supports(self, device: torch.device) -> str | None:
        """None when this backend runs on ``device``, else the reason it does not."""
        raise NotImplementedError

    def fused_step(
        self,
        z: torch.Tensor,
        out: torch.Tensor,
        model_out: torch.Tensor,
        model_out_uncond: torch.Tensor | None,
        history: Sequence[torch.Tensor],
        table: torch.Tensor,
        step: int | torch.Tensor,
        seeds: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        x_out: torch.Tensor | None = None,
        model_in_out: torch.Tensor | None = None,
        clip: float | None = None,
        use_noise: bool = False,
        check_overlap: bool = True,
    ) -> None:
        """Evaluate one plan stage into the given outputs (the module's contract). Outputs that overlap an input or
        each other in part are refused (:func:`check_outputs_overlap`); ``check_overlap=False`` skips that test for
        a caller whose outputs are fresh or already checked (:meth:`fused_step_alloc`: the test costs tens of
        microseconds in Python)."""
        raise NotImplementedError

    def fused_step_alloc(
        self,
        z: torch.Tensor,
        model_out: torch.Tensor,
        model_out_uncond: torch.Tensor | None,
        history: Sequence[torch.Tensor],
        table: torch.Tensor,
        step: int | torch.Tensor,
        *,
        out: torch.Tensor | None = None,
        seeds: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        want_x: bool = False,
        model_in_dtype: torch.dtype | None = None,
        model_in_double: bool = False,
        clip: float | None = None,
        use_noise: bool = False,
        paired: bool = False,
        x_dtype: torch.dtype | None = None,
    ) -> OutputTriple:
        """``fused_step`` with the outputs not given allocated here; returns ``(out, x_out, model_in)``.

        ``x_out`` is allocated when ``want_x`` (in ``x_dtype``, default the state's), the
        model input when ``model_in_dtype`` is given (batch doubled when ``model_in_double``);
        absent outputs come back as None.
        With ``paired``, ``model_out`` is a guided model's output on a doubled batch
        (``2B``, unconditional half first) and ``model_out_uncond`` is None: the halves are
        split here, where a backend can do it cheaply.
        Kernels read flat memory sample by sample. A state that is dense in another order of its
        dimensions, batch first (channels_last, say), is stepped in that order (:func:`dense_order`):
        inputs in the same layout are read in place, others copied once into it, and the outputs made
        come back in the state's layout, as diffusers' torch ops return them. A stage that draws its
        noise in the kernel (keyed by the row-major index), or a state in no dense order, is stepped
        row-major: inputs in another layout are copied once, outputs made row-major. A given ``out`` the kernel cannot
        write in place is written through a temporary in its order.
        """
        if model_in_dtype is not None and model_in_dtype not in STEP_DTYPES:
            check_model_input_dtype(model_in_dtype)
        if (paired or model_in_dtype is not None) and z.dim() < 1:
            raise ValueError("state must have a batch dimension")  # fused_step's message (the C++ entry's too)
        if paired:
            if model_out_uncond is not None or model_out.dim() < 1 or model_out.shape[0] != 2 * z.shape[0]:
                raise ValueError(
                    f"a paired model output needs batch {2 * z.shape[0]} (uncond first) and no separate uncond, "
                    f"got shape {tuple(model_out.shape)}"
                )
            model_out_uncond, model_out = model_out.chunk(2)
        # The kernel's order: z's own where it is dense in one (no copy of z, outputs in its layout), else row-major.
        order = None if z.is_contiguous() or (use_noise and noise is None) else dense_order(z)
        if order is not None and not _shaped_like(z, model_out, model_out_uncond, noise, out, *history):
            order = None  # a shape error: raised by the checks below, in the caller's order
        if order is not None:
            inverse = _inverse_order(order)
            z = z.permute(order)
            model_out = model_out.permute(order)
            if model_out_uncond is not None:
                model_out_uncond = model_out_uncond.permute(order)
            if noise is not None:
                noise = noise.permute(order)
            history = [h.permute(order) for h in history]
        if not z.is_contiguous():
            z = z.contiguous()
        if not model_out.is_contiguous():
            model_out = model_out.contiguous()
        if model_out_uncond is not None and not model_out_uncond.is_contiguous():
            model_out_uncond = model_out_uncond.contiguous()
        if noise is not None and not noise.is_contiguous():
            noise = noise.contiguous()
        if seeds is not None and not seeds.is_contiguous():  # (a caller's seed tensor: Triton reads flat memory)
            seeds = seeds.contiguous()
        if not table.is_contiguous():
            table = table.contiguous()
        history = [h if h.is_contiguous() else h.contiguous() for h in history]
        given = out
        target = None  # a given out the kernel cannot write in place, written through a temporary in its order
        if out is None:
            out = torch.empty(z.shape, dtype=z.dtype, device=z.device)
        else:
            if order is not None:
                out = out.permute(order)
            if not torch.compiler.is_compiling():  # fake tensors have no memory to compare
                check_out_overlap(out, z, model_out, model_out_uncond, history, noise if use_noise else None,
                                  read_by_all=kernel_wide_inputs(table, step, seeds, noise, use_noise))
            if not out.is_contiguous():
                target, out = out, torch.empty(out.shape, dtype=out.dtype, device=out.device)
        x_out = torch.empty(z.shape, dtype=x_dtype or z.dtype, device=z.device) if want_x else None
        model_in = None
        if model_in_dtype is not None:
            batch = 2 * z.shape[0] if model_in_double else z.shape[0]
            model_in = torch.empty((batch, *z.shape[1:]), dtype=model_in_dtype, device=z.device)
        self.fused_step(  # x_out and model_in are fresh, and a given out was checked above
            z, out, model_out, model_out_uncond, history, table, step,
            seeds=seeds, noise=noise, x_out=x_out, model_in_out=model_in, clip=clip, use_noise=use_noise,
            check_overlap=False,
        )
        if target is not None:
            target.copy_(out)
        if order is not None:  # back to the caller's order: views, the given out itself
            out = out.permute(inverse)
            x_out = None if x_out is None else x_out.permute(inverse)
            model_in = None if model_in is None else model_in.permute(inverse)
        return (out if given is None else given), x_out, model_in

    def fused_step_alloc_args(
        self,
        z: torch.Tensor,
        out: torch.Tensor | None,
        model_out: torch.Tensor,
        model_out_uncond: torch.Tensor | None,
        history: list[torch.Tensor],
        table: torch.Tensor,
        step: int | torch.Tensor,
        seeds: torch.Tensor | None,
        noise: torch.Tensor | None,
        want_x: bool,
        x_dtype: torch.dtype | None,
        model_in_dtype: torch.dtype | None,
        model_in_double: bool,
        clip: float | None,
        use_noise: bool,
        paired: bool,
    ) -> OutputTriple:
        """:meth:`fused_step_alloc` in the positional order of :data:`AllocEntry` (traceable by torch.compile)."""
        return self.fused_step_alloc(
            z, model_out, model_out_uncond, history, table, step, out=out, seeds=seeds, noise=noise, want_x=want_x,
            model_in_dtype=model_in_dtype, model_in_double=model_in_double, clip=clip, use_noise=use_noise,
            paired=paired, x_dtype=x_dtype,
        )

    def alloc_entry(self) -> AllocEntry:
        """The per-step entry of the front ends (:data:`AllocEntry`); resolved once per runner and device, called
        eagerly and under torch.compile alike. An entry that is a compiled binding must have a traceable stand-in
        registered with torch.compile (the C++ backend's: :meth:`fused_step_alloc_args`)."""
        return self.fused_step_alloc_args

    def noise(
        self,
        seeds: torch.Tensor,
        sample_shape: Sequence[int],
        step: int | torch.Tensor = 0,
        tag: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """fastflow's noise for each seed (:func:`fastflow.noise.normal`, the numbers a stage with ``use_noise``
        draws at row ``step``), for front ends that need a stage's noise outside its kernel. This default is the
        torch spec (any device; ``step`` may be a device tensor); kernels with a noise path of their own override
        it. Those draw the float32 normals their kernels add, so a float64 ``dtype`` there holds float32 values
        (the spec's float64 normals to float32 round-off)."""
        from ..noise import normal

        return normal(seeds, sample_shape, step=step, tag=tag, dtype=dtype)


def dense_order(z: torch.Tensor) -> list[int] | None:
    """The order of ``z``'s dimensions, batch first, in which its memory is row-major (``[0, 2, 3, 1]`` for
    channels_last), where that is not their own order; else None (row-major already, or dense in no such order:
    a slice, an expanded tensor). Elementwise kernels step such a state in place in that order, as torch's
    TensorIterator does, and the outputs they make keep its layout."""
    if z.dim() < 3:
        return None
    strides = z.stride()
    # A stable insertion sort by decreasing stride (ties keep their order), not sorted(key=...): under
    # torch.compile(dynamic=True) strides are symbolic and dynamo cannot trace a sort with such keys (a graph break,
    # an error with fullgraph); comparisons of them it traces (as guards).
    order = [0]
    for d in range(1, z.dim()):
        k = len(order)
        while k > 1 and strides[order[k - 1]] < strides[d]:
            k -= 1
        order.insert(k, d)
    if order == list(range(z.dim())) or not z.permute(order).is_contiguous():
        return None
    return order


def kernel_layout(t: torch.Tensor, z: torch.Tensor, draws: bool) -> torch.Tensor:
    """``t`` (shaped like the state ``z``) in the layout :meth:`Backend.fused_step_alloc` reads it in for ``z``: ``t``
    itself where that needs no copy, else one copy in that layout (row-major, or ``z``'s own dense order unless the
    stage ``draws`` its noise in the kernel). For a front end that binds one tensor to two slots, so that it is copied
    once, not once per slot."""
    order = None if z.is_contiguous() or draws or t.shape != z.shape else dense_order(z)
    if order is None:  # (a shape error is left to the backend's checks, which name it)
        return t if t.is_contiguous() else t.contiguous()
    permuted = t.permute(order)
    if permuted.is_contiguous():
        return t
    return permuted.contiguous().permute(_inverse_order(order))


def _inverse_order(order: list[int]) -> list[int]:
    """The permutation that undoes ``order`` (``t.permute(order).permute(_inverse_order(order))`` is ``t``)."""
    inverse = [0] * len(order)
    for k, d in enumerate(order):
        inverse[d] = k
    return inverse


def _shaped_like(z: torch.Tensor, *tensors: torch.Tensor | None) -> bool:
    """Whether every tensor given has ``z``'s shape (so that one permutation serves them all)."""
    return all(t is None or t.shape == z.shape for t in tensors)


def check_step_args(
    z: torch.Tensor,
    out: torch.Tensor,
    model_out: torch.Tensor,
    model_out_uncond: torch.Tensor | None,
    history: Sequence[torch.Tensor],
    table: torch.Tensor,
    seeds: torch.Tensor | None,
    noise: torch.Tensor | None,
    x_out: torch.Tensor | None,
    model_in_out: torch.Tensor | None,
    use_noise: bool,
) -> None:
    """Shape, dtype and device checks shared by all backends (metadata only: no sync)."""
    if z.dtype not in STEP_DTYPES:
        raise TypeError(f"state must be {_STEP_DTYPE_NAMES}, got {z.dtype}")
    if z.dim() < 1:
        raise ValueError("state must have a batch dimension")

    def same(name: str, t: torch.Tensor) -> None:
        if t.shape != z.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, state has {tuple(z.shape)}")
        if t.device != z.device:
            raise ValueError(f"{name} is on {t.device}, state is on {z.device}")
        if t.dtype not in STEP_DTYPES:
            raise TypeError(f"{name} must be {_STEP_DTYPE_NAMES}, got {t.dtype}")

    same("model output", model_out)
    same("output state", out)
    if out.dtype != z.dtype:
        raise TypeError(f"output state dtype {out.dtype} differs from the state's {z.dtype}")
    if model_out_uncond is not None:
        same("unconditional model output", model_out_uncond)
    if len(history) > MAX_HISTORY:
        raise ValueError(f"at most {MAX_HISTORY} history tensors, got {len(history)}")
    for k, h in enumerate(history):
        same(f"history tensor h{k}", h)
    if x_out is not None:
        same("x_hat output", x_out)
    if noise is not None:
        same("noise", noise)
    if use_noise and noise is None:
        if seeds is None:
            raise ValueError("this stage draws noise: pass seeds or an explicit noise tensor")
        if seeds.dtype != torch.int64 or seeds.shape != (z.shape[0],) or seeds.device != z.device:
            raise ValueError(f"seeds must be int64 [{z.shape[0]}] on {z.device}")
    if table.device != z.device or table.dim() != 2:
        raise ValueError(f"coefficient table must be 2-D on {z.device}")
    if table.shape[1] != NUM_COEFS:
        raise ValueError(f"coefficient table must be [stages, {NUM_COEFS}], got {tuple(table.shape)}")
    if table.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"coefficient table must be float32 or float64, got {table.dtype}")
    if model_in_out is not None:
        b = z.shape[0]
        if model_in_out.shape[1:] != z.shape[1:] or model_in_out.shape[0] not in (b, 2 * b):
            raise ValueError(
                f"model input output has shape {tuple(model_in_out.shape)}; expected batch {b} or {2 * b} "
                f"and sample shape {tuple(z.shape[1:])}"
            )
        if model_in_out.device != z.device:
            raise ValueError(f"model input output is on {model_in_out.device}, state is on {z.device}")
        if model_in_out.dtype not in STEP_DTYPES:
            check_model_input_dtype(model_in_out.dtype)


def check_model_input_dtype(dtype: torch.dtype) -> None:
    """Refuse a model input dtype no kernel writes, with the one message every backend gives."""
    if dtype not in STEP_DTYPES:
        raise TypeError(f"the model input dtype must be {_STEP_DTYPE_NAMES}, got {dtype}")


def memory_span(t: torch.Tensor) -> tuple[int, int]:
    """The bytes ``[start, end)`` ``t`` may touch (exact for a contiguous tensor, a superset otherwise)."""
    start = t.data_ptr()
    if t.numel() == 0:
        return start, start
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
    return start, start + (last + 1) * t.element_size()


def shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` may share an element (their spans intersect; on one device)."""
    if a.device != b.device or a.device.type == "meta":
        return False
    a0, a1 = memory_span(a)
    b0, b1 = memory_span(b)
    return a0 < b1 and b0 < a1


def check_out_overlap(
    out: torch.Tensor,
    z: torch.Tensor,
    model_out: torch.Tensor,
    model_out_uncond: torch.Tensor | None,
    history: Sequence[torch.Tensor],
    noise: torch.Tensor | None,
    name: str = "out",
    read_by_all: Sequence[tuple[str, torch.Tensor | None]] = (),
) -> None:
    """Refuse an ``out`` that overlaps an input in part (a ValueError): the kernels run block by block, so an element
    could be overwritten before another block reads it. The same elements in the same layout (``out`` is ``z``) are
    fine, since each element is read before it is written. Only contiguous tensors are compared: a kernel reads a
    copy of any other input and writes any other ``out`` through a temporary. Runs on the ``out=`` path only.
    ``read_by_all``: ``(what, tensor)`` that every block of a kernel reads (the table, a step tensor, the seeds it
    draws from), which ``out`` may not overlap at all (the C++ entries refuse the same)."""
    if not out.is_contiguous() or out.numel() == 0 or out.device.type == "meta":  # meta tensors have no memory
        return
    o0, o1 = memory_span(out)
    for what, t in read_by_all:
        if t is not None and t.is_contiguous() and t.numel() and t.device == out.device:
            t0, t1 = memory_span(t)
            if o0 < t1 and t0 < o1:
                raise ValueError(
                    f"fastflow: {name} overlaps {what}, which every block of the kernels reads; pass a separate tensor"
                )
    named = [("the state", z), ("the model output", model_out), ("the unconditional model output", model_out_uncond)]
    named += [(f"history tensor h{k}", h) for k, h in enumerate(history)]
    named.append(("the noise", noise))
    for what, t in named:
        if t is None or t is out or not t.is_contiguous() or t.numel() == 0 or t.device != out.device:
            continue
        t0, t1 = memory_span(t)
        if o0 < t1 and t0 < o1 and (o0, o1, out.element_size()) != (t0, t1, t.element_size()):
            raise ValueError(
                f"{name} overlaps {what} in part; the kernels write block by block, so pass a separate tensor or "
                "exactly the same one"
            )


def refuse_leaked_fakes(
    z: torch.Tensor, history: Sequence[torch.Tensor], **inputs: torch.Tensor | None
) -> None:
    """Refuse a step of a real state given fake tensors, which a torch.export trace (non-strict) or a
    FakeTensorMode left in a loop's state (its stored history): they hold no values, so the step would write
    nothing real (the operator's fake) or garbage (torch's ops), silently. Off the kernels' per-step path: the
    reference backend's step (torch ops, slow beside it) and the C++ backend's Python entry call it."""
    if is_fake(z):
        return
    leaked = [name for name, t in inputs.items() if t is not None and is_fake(t)]
    if any(is_fake(h) for h in history):
        leaked.append("history")
    if leaked:
        raise RuntimeError(
            f"fastflow: a step of a real state was given fake tensors ({', '.join(leaked)}), which a trace by "
            "torch.export (non-strict) or a FakeTensorMode left behind: they hold no values. Start the loop again "
            "(a Sampler at stage 0, a diffusers drop-in with set_timesteps) rather than continuing a traced one "
            "eagerly"
        )


def kernel_wide_inputs(
    table: torch.Tensor, step: int | torch.Tensor, seeds: torch.Tensor | None, noise: torch.Tensor | None,
    use_noise: bool,
) -> tuple[tuple[str, torch.Tensor | None], ...]:
    """What every block of a kernel reads, for :func:`check_out_overlap`: the table, a step tensor, and the seeds
    of a stage that draws its noise."""
    return (
        ("the coefficient table", table),
        ("the step tensor", step if isinstance(step, torch.Tensor) else None),
        ("the seeds", seeds if use_noise and noise is None else None),
    )


def check_outputs_overlap(
    out: torch.Tensor,
    x_out: torch.Tensor | None,
    model_in_out: torch.Tensor | None,
    z: torch.Tensor,
    model_out: torch.Tensor,
    model_out_uncond: torch.Tensor | None,
    history: Sequence[torch.Tensor],
    noise: torch.Tensor | None,
    read_by_all: Sequence[tuple[str, torch.Tensor | None]] = (),
) -> None:
    """The direct form's outputs, as the C++ entry refuses them: each against the inputs (:func:`check_out_overlap`)
    and against each other (two outputs written block by block into shared memory end with either's values)."""
    named = [("out", out), ("x_out", x_out), ("model_in_out", model_in_out)]
    for name, t in named:
        if t is not None:
            check_out_overlap(t, z, model_out, model_out_uncond, history, noise, name=name, read_by_all=read_by_all)
    for k, (name_a, a) in enumerate(named):
        for name_b, b in named[k + 1 :]:
            if a is None or b is None or a is b or a.numel() == 0 or b.numel() == 0 or not shares_memory(a, b):
                continue
            if (memory_span(a), a.stride(), a.shape, a.dtype) != (memory_span(b), b.stride(), b.shape, b.dtype):
                raise ValueError(
                    f"{name_a} and {name_b} overlap in part; the kernels write each block by block, so pass separate "
                    "tensors or the same one"
                )


_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def check_clip(clip: float | None, state_dtype: torch.dtype | None = None) -> None:
    """A clip every backend clamps alike: positive (the C++ entries refuse the same; NaN fails the test too), and
    within float32's range unless the state is float64 (the arithmetic it clamps in)."""
    if clip is None:
        return
    if not clip > 0:
        raise ValueError(f"fastflow: clip must be a positive number or None, got {clip}")
    if state_dtype is not torch.float64 and clip > _FLOAT32_MAX:
        raise ValueError(f"fastflow: clip {clip} is past float32's range, which a {state_dtype} state computes in")


def step_int(step: object) -> int:
    """A host step index as an int: an int or numpy integer, not a float or a bool (``int()`` would truncate)."""
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise TypeError(f"step must be an int or a one-element integer tensor, got {type(step).__name__}")
    return int(step)
