"""The pipeline's own tensor operations inside a recorded loop: seen through a torch function mode, recorded when
they make new tensors from loop tensors, and watched for host syncs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.overrides import TorchFunctionMode

from .._capture import is_sync_warning
from .params import param_position
from .recording import (
    Arg,
    Event,
    Recorder,
    Uncapturable,
    any_tensor,
    describe_call,
    flat_shape,
    leaves_and_spec,
    loop_call_label,
    tree_tensors,
)

# Tensor operations on loop tensors recorded between two loop calls, at most: guidance takes a handful;
# past the limit the code is not a denoising loop's glue (it may be the decoding after the last step).
_MAX_OPS_BETWEEN_CALLS = 64


class GapWatch:
    """CUDA sync warnings in the pipeline's own code between two loop calls (data-dependent branches, ``.item()``).

    A sync in an operation on tensors from outside the loop (a CPU timestep moved to the
    device each step) is excused: a replay runs it on the same real tensors, so it only
    costs time. A sync on loop tensors would read placeholders on a replay.
    """

    def __init__(self, enabled: bool):
        self.caught: list = []
        self.enabled = enabled
        self.active = False
        self.mark = 0
        self.culprit: str | None = None
        self.ours: list = []
        self.excused: list = []
        self.previous = 0

    def excuse_since(self, start: int) -> None:
        """The warnings caught from index ``start`` on came from an operation on outside tensors."""
        self.excused.extend(self.caught[start:])

    def open(self) -> None:
        if self.enabled and not self.active:
            self.previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
            self.mark = len(self.caught)
            self.active = True

    def _collect(self) -> list:
        torch.cuda.set_sync_debug_mode(self.previous)
        self.active = False
        found = [w for w in self.caught[self.mark :] if is_sync_warning(w)]
        self.ours.extend(found)
        return [w for w in found if not any(w is e for e in self.excused)]

    def close(self, rec: Recorder, kind: str) -> None:
        if not self.active:
            return
        found = self._collect()
        if found and self.culprit is None:
            self.culprit = (
                f"the pipeline's own code between {rec.last_label} and the next {loop_call_label(kind)} "
                f"synchronizes with the host ({str(found[0].message).strip()})"
            )

    def stop(self) -> None:
        """After the pipeline returns: the code after the last step is outside the loop, so it is not judged."""
        if self.active:
            self._collect()


class LoopOps(TorchFunctionMode):
    """Hands every torch function call made while it is pushed to ``handler(func, args, kwargs)``.

    Pushed at the first loop call and popped after the last step, so the pipeline's code
    before the loop (text encoding) and after it (decoding) runs untouched.
    """

    def __init__(self, handler: Callable[[Any, tuple, dict], Any]):
        super().__init__()
        self.handler = handler
        self.pushed = False

    def start(self) -> None:
        if not self.pushed:
            self.__enter__()
            self.pushed = True

    def stop(self) -> None:
        if self.pushed:
            self.pushed = False
            self.__exit__(None, None, None)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return self.handler(func, args, kwargs or {})


def stale_use(args: tuple, kwargs: dict, rec: Recorder) -> bool:
    """Whether a loop tensor other than the last step's outputs is among the arguments (after the loop)."""
    final = set(rec.trace.events[-1].outs) if rec.trace.events else set()
    for leaf in pytree.tree_leaves((args, kwargs)):
        entry = rec.values.get(id(leaf)) if isinstance(leaf, torch.Tensor) else None
        if entry is not None and entry[1]() is leaf and entry[0] not in final:
            return True
    return False


def after_loop_op(rec: Recorder, func: Any, args: tuple, kwargs: dict) -> Any:
    """A torch function call of the pipeline's code after the loop's last step: a replay hands out stand-ins for
    the loop's tensors, and only the last step's outputs come out of the graph, so code that reads another (a
    trajectory stacked after the loop, the last model output) makes the loop uncapturable."""
    if rec.problem is None and stale_use(args, kwargs, rec):
        rec.fail(f"the pipeline's code calls {getattr(func, '__name__', func)} after the loop's last step on a tensor "
                 "of the loop other than that step's outputs, which a graph does not keep")
    return func(*args, **kwargs)


def record_op(rec: Recorder, func: Any, args: tuple, kwargs: dict) -> Any:
    """One torch function call of the pipeline's own code inside the loop: recorded when it makes new tensors from
    loop tensors (classifier-free guidance, ``torch.cat([latents] * 2)``, a rescale), else just run."""
    if rec.done or rec.problem is not None or rec.overflow is not None:
        return func(*args, **kwargs)
    if not any_tensor((args, kwargs), rec.is_value):
        watch = rec.watch
        if watch is None or not watch.active:
            return func(*args, **kwargs)
        start = len(watch.caught)
        out = func(*args, **kwargs)
        watch.excuse_since(start)
        return out
    leaves, spec = leaves_and_spec((args, kwargs))
    name = describe_call("op", func)
    if _in_place(func, kwargs):
        rec.fail(f"{name} after {rec.last_label} changes a loop tensor in place; a replay could not follow it")
        return func(*args, **kwargs)
    out = func(*args, **kwargs)
    if not new_tensors(out, leaves):  # a read of metadata (shape, dtype), or an op that returned its input
        return out
    rec.ops_since_call += 1
    if rec.ops_since_call > _MAX_OPS_BETWEEN_CALLS:
        # Decoding after the last step also lands here; it only counts if another loop call follows.
        rec.overflow = (
            f"more than {_MAX_OPS_BETWEEN_CALLS} tensor operations on loop tensors after {rec.last_label} "
            "before the next loop call"
        )
        return out
    try:
        event = Event("op", [rec.classify(leaf) for leaf in leaves], spec, func=func, flat=flat_shape(args, kwargs))
        factor = param_position(func, args, kwargs)
        if factor is not None:
            event.args[factor] = Arg("param", index=len(rec.trace.params), host=args[factor])
            rec.trace.params.append(float(args[factor]))
        event.outs, event.out_spec, event.out_consts = rec.add_values(out)
    except Uncapturable as exc:
        rec.fail(f"{name} after {rec.last_label}: {exc}")
        return out
    rec.trace.events.append(event)
    return out


def _in_place(func: Any, kwargs: dict) -> bool:
    """Writes into a tensor, by torch's naming (``mul_``, ``__iadd__``), item assignment or an ``out=`` argument."""
    name = getattr(func, "__name__", "")
    return (
        (name.endswith("_") and not name.endswith("__"))
        or name.startswith("__i")
        or name == "__setitem__"
        or kwargs.get("out") is not None
    )


def new_tensors(out: Any, inputs: list[Any]) -> list[torch.Tensor]:
    """The tensors of ``out`` that are not among ``inputs`` (an op may hand back its input unchanged)."""
    return [t for t in tree_tensors(out) if not any(t is leaf for leaf in inputs)]
