"""What a recorded loop is, and how a loop call's arguments and outputs are recorded: loop values, static buffers
and host constants, call signatures, the random state a call starts from."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.utils._pytree as pytree

if TYPE_CHECKING:
    from .loop_ops import GapWatch


class Uncapturable(Exception):
    pass


class Diverged(Exception):
    """A replayed call's loop differs from the recorded one (its message says where)."""


class RngState:
    """The random state a pipeline call starts from: its generators' and torch's global ones, to rerun it exactly."""

    def __init__(self, args: tuple, kwargs: dict, device: torch.device):
        found = [g for g in pytree.tree_leaves((args, kwargs)) if isinstance(g, torch.Generator)]
        self.generators = [(g, g.get_state()) for g in found]
        self.cpu = torch.get_rng_state()
        self.cuda = None
        if device.type == "cuda" and torch.cuda.is_initialized():
            self.device = device
            self.cuda = torch.cuda.get_rng_state(device)

    def restore(self) -> None:
        for g, state in self.generators:
            g.set_state(state)
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


_TEXT = "<text>"  # tags a string argument's value in a signature (prompts), apart from the signature's own tags


def call_signature(value: Any) -> Any:
    """A hashable summary of a call argument: what a capture depends on (tensors by metadata, not values)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, str(value.device))
    if isinstance(value, torch.Generator):
        return ("generator", str(value.device))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(call_signature(v) for v in value))
    if isinstance(value, Mapping):
        return ("map", tuple(sorted((str(k), call_signature(v)) for k, v in value.items())))
    if isinstance(value, str):
        return (_TEXT, value)
    if value is None or isinstance(value, (bool, int, float, bytes)):
        return value
    if isinstance(value, torch.dtype | torch.device):
        return str(value)
    if isinstance(value, np.ndarray):
        return ("array", value.shape, str(value.dtype))
    if type(value).__module__.startswith("PIL.") and hasattr(value, "size") and hasattr(value, "mode"):
        # an image the pipeline turns into a tensor outside the loop (a static input): its content is no key
        return ("image", tuple(value.size), value.mode)
    return ("object", type(value).__qualname__, id(value))


def leaves_and_spec(tree: Any) -> tuple[list[Any], pytree.TreeSpec]:
    """The leaves of an argument or output structure (tuples, lists, dicts, diffusers outputs) and its shape."""
    return pytree.tree_flatten(tree)


def any_tensor(tree: Any, test: Callable[[torch.Tensor], bool]) -> bool:
    """Whether a tensor in ``tree`` passes ``test``: the cheap first look at every operation inside the loop."""
    if isinstance(tree, torch.Tensor):
        return test(tree)
    if isinstance(tree, (list, tuple)):
        return any(any_tensor(v, test) for v in tree)
    if isinstance(tree, dict):
        return any(any_tensor(v, test) for v in tree.values())
    return False


LEAF_TYPES = frozenset({int, float, bool, str, type(None), slice, type(Ellipsis), torch.dtype, torch.device})


def flat_args(args: tuple, kwargs: dict) -> list[Any] | None:
    """The leaves of ``(args, kwargs)`` when every argument is a leaf itself (a tensor, a number, None...), in
    pytree's order, without pytree's walk: the common case of a loop call or operation. None otherwise."""
    for value in (*args, *kwargs.values()):
        if not isinstance(value, torch.Tensor) and type(value) not in LEAF_TYPES:
            return None
    return [*args, *kwargs.values()]


def uses_any(args: tuple, kwargs: dict, ids: Mapping[int, Any]) -> bool:
    """Whether a tensor among the arguments (or in lists, tuples and dicts among them) has its id in ``ids``."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            if id(value) in ids:
                return True
        elif isinstance(value, (list, tuple, dict)) and any_tensor(value, lambda t: id(t) in ids):
            return True
    return False


def tree_tensors(tree: Any) -> list[torch.Tensor]:
    return [leaf for leaf in pytree.tree_leaves(tree) if isinstance(leaf, torch.Tensor)]


@dataclass
class Arg:
    """One leaf of a recorded call's arguments.

    ``value``: a tensor the loop itself made (an output of an earlier model call, step or
    operation), by index; ``buffer``: a device tensor from outside the loop (prompt
    embeddings, the initial latents, a timestep), copied into a static buffer on every
    replay; ``param``: a float factor of a multiplication in the pipeline's code, by index
    into the trace's parameters (read from device memory by the graph, written per replay);
    ``host``: anything else, a constant of the loop checked on every replay.
    """

    kind: str  # "value", "buffer", "param", "host"
    index: int = -1
    host: Any = None
    device_copy: torch.Tensor | None = None


@dataclass
class Event:
    kind: str  # "scale", "model" (the denoiser), "model:<attr>" (another network, e.g. a ControlNet), "step", "op"
    args: list[Arg]
    spec: pytree.TreeSpec  # (args, kwargs) structure
    func: Any = None  # op: the torch function called
    outs: list[int | None] = field(default_factory=list)  # output leaf -> value index (None: not a tensor)
    out_spec: pytree.TreeSpec | None = None
    out_consts: list[Any] = field(default_factory=list)  # the non-tensor output leaves
    flat: tuple[int, tuple[str, ...]] | None = None  # (positional count, keyword names) when every argument is a leaf


@dataclass
class Trace:
    """A recorded loop and, once captured, its graph and static buffers."""

    events: list[Event] = field(default_factory=list)
    buffers: list[torch.Tensor] = field(default_factory=list)
    value_meta: list[tuple[tuple[int, ...], torch.dtype]] = field(default_factory=list)
    device: torch.device | None = None
    batch: int = 0  # the batch of the first step's latents (per-sample seeds)
    host_timesteps: Any = None
    host_sigmas: torch.Tensor | None = None  # the sigmas its steps were built from, edits included (_host_sigmas)
    begin_index: int | None = None  # the scheduler's first step (img2img pipelines set it)
    first_step: int | None = None  # the step index the loop's first step took (its runs start there)
    scheduler_settings: dict = field(default_factory=dict)  # the config and options its steps were built from
    seeds: torch.Tensor | None = None
    graph: torch.cuda.CUDAGraph | None = None
    outputs: Any = None
    placeholders: dict[int, torch.Tensor] = field(default_factory=dict)
    stochastic: bool = False
    keep: dict = field(default_factory=dict)
    reason: str | None = None
    memory_bytes: int = 0
    params: list[float] = field(default_factory=list)  # the parameters' values the graph holds now
    param_values: torch.Tensor | None = None  # the same, float64, on the device (the graph reads these)

    def placeholder(self, index: int) -> torch.Tensor:
        """What the pipeline holds in place of loop value ``index`` during a replay: a tensor of its shape and
        dtype with no memory of its own (one element broadcast), unique per value so the data flow is checkable."""
        found = self.placeholders.get(index)
        if found is None:
            shape, dtype = self.value_meta[index]
            found = torch.empty((), dtype=dtype, device=self.device).expand(shape)
            self.placeholders[index] = found
        return found

    def release(self) -> None:
        if self.graph is not None:
            self.graph.reset()
        self.graph = None
        self.outputs = None
        self.keep = {}
        self.memory_bytes = 0


class Recorder:
    """The wrappers' state for one eager call: builds a Trace of loop calls and the operations between them."""

    def __init__(self, device: torch.device):
        self.trace = Trace(device=device)
        self.device = device
        # id(tensor) -> (loop value index, weak reference): weak, so the decoding after the loop frees its memory
        self.values: dict[int, tuple[int, weakref.ref]] = {}
        self.ids: dict[int, int] = {}  # id(tensor) -> static buffer index
        self.versions: dict[int, int] = {}  # id(tensor) -> its version counter when first seen
        self.problem: str | None = None
        self.keep: list[Any] = []  # keeps the outside inputs alive so their ids stay unique in this call
        self.last_label = "the first loop call"
        self.ops_since_call = 0
        self.overflow: str | None = None
        self.done = False  # the scheduler has taken its last step
        self.watch: GapWatch | None = None

    def fail(self, reason: str) -> None:
        if self.problem is None:
            self.problem = reason

    def value_index(self, leaf: Any) -> int | None:
        if not isinstance(leaf, torch.Tensor):
            return None
        entry = self.values.get(id(leaf))
        return entry[0] if entry is not None and entry[1]() is leaf else None

    def is_value(self, leaf: Any) -> bool:
        return self.value_index(leaf) is not None

    def classify(self, value: Any, for_model: bool = False) -> Arg:
        """One argument leaf: a loop value, a device tensor from outside (a static buffer), or a host constant."""
        if isinstance(value, torch.Tensor):
            index = self.value_index(value)
            if index is not None:
                return Arg("value", index=index)
            key = id(value)
            if value.device == self.device:
                if key not in self.ids:
                    self.ids[key] = len(self.trace.buffers)
                    self.versions[key] = value._version
                    self.trace.buffers.append(value.detach().clone())
                    self.keep.append(value)
                elif value._version != self.versions[key]:
                    raise Uncapturable(
                        "an input from outside the loop is changed in place between loop calls (a preallocated "
                        "tensor refilled each step): a graph reads one value of it for every step; pass a new "
                        "tensor each step"
                    )
                return Arg("buffer", index=self.ids[key])
            if value.device.type == "cpu":
                # a host tensor (a timestep from a CPU schedule): a constant of the loop, moved once
                copy = value.to(self.device) if for_model and self.device.type == "cuda" else None
                return Arg("host", host=value.clone(), device_copy=copy)
            raise Uncapturable(f"an input lives on {value.device}, the loop on {self.device}")
        if isinstance(value, torch.Generator) and value.device.type != "cpu":
            raise Uncapturable("a CUDA torch.Generator is passed into the loop; its state is kept on the host")
        return Arg("host", host=value)

    def add_values(self, out: Any) -> tuple[list[int | None], pytree.TreeSpec, list[Any]]:
        """Register the tensors of a call's output as new loop values."""
        leaves, spec = leaves_and_spec(out)
        outs: list[int | None] = []
        consts: list[Any] = []
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                if leaf.device != self.device:
                    raise Uncapturable(f"an output lives on {leaf.device}, the loop on {self.device}")
                index = len(self.trace.value_meta)
                self.trace.value_meta.append((tuple(leaf.shape), leaf.dtype))
                self.values[id(leaf)] = (index, weakref.ref(leaf))
                outs.append(index)
                consts.append(None)
            else:
                outs.append(None)
                consts.append(leaf)
        return outs, spec, consts


_LABELS = {"model": "the model call", "step": "scheduler.step", "scale": "scheduler.scale_model_input"}


def loop_call_label(kind: str) -> str:
    return f"the {kind.partition(':')[2]} call" if kind.startswith("model:") else _LABELS[kind]


def _is_network(kind: str) -> bool:
    return kind == "model" or kind.startswith("model:")


def loosen(signature: Any) -> Any:
    """A signature with every float and string value replaced by a token: calls that differ only in those (a
    guidance scale, a prompt, an output type) match; their ints, shapes and structure still have to agree."""
    if isinstance(signature, float):
        return "<float>"
    if isinstance(signature, tuple):
        if len(signature) == 2 and signature[0] == _TEXT:
            return (_TEXT, "<any>")
        return tuple(loosen(v) for v in signature)
    return signature


def flat_shape(args: tuple, kwargs: dict) -> tuple[int, tuple[str, ...]] | None:
    return (len(args), tuple(kwargs)) if flat_args(args, kwargs) is not None else None


def _step_parts(call_args: tuple, call_kwargs: dict) -> tuple[Any, Any]:
    o = call_args[0] if call_args else call_kwargs.get("model_output")
    sample = call_args[2] if len(call_args) > 2 else call_kwargs.get("sample")
    return o, sample


def note(rec: Recorder, kind: str, call_args: tuple, call_kwargs: dict) -> None:
    """Record one loop call's arguments: loop tensors by value, outside device tensors as buffers, the rest as is."""
    if kind == "step":
        o, sample = _step_parts(call_args, call_kwargs)
        if not rec.is_value(o):
            raise Uncapturable(
                "the step does not take a tensor the loop made from the model's output (it takes a tensor made "
                "outside the loop)"
            )
        if not isinstance(sample, torch.Tensor):
            raise Uncapturable("the step takes no latents tensor")
        if not rec.trace.batch:
            rec.trace.batch = sample.shape[0]
    leaves, spec = leaves_and_spec((call_args, call_kwargs))
    args = [rec.classify(leaf, for_model=_is_network(kind)) for leaf in leaves]
    rec.trace.events.append(Event(kind, args, spec, flat=flat_shape(call_args, call_kwargs)))


def note_output(rec: Recorder, kind: str, out: Any) -> None:
    if kind == "scale" and not isinstance(out, torch.Tensor):
        raise Uncapturable("scale_model_input did not return a tensor")
    ev = rec.trace.events[-1]
    ev.outs, ev.out_spec, ev.out_consts = rec.add_values(out)
    if all(index is None for index in ev.outs):
        raise Uncapturable(f"{loop_call_label(kind)} returned no tensor")


def resolve(arg: Arg, trace: Trace, values: list[Any], kind: str) -> Any:
    if arg.kind == "value":
        return values[arg.index]
    if arg.kind == "buffer":
        return trace.buffers[arg.index]
    if arg.kind == "param":
        return trace.param_values[arg.index : arg.index + 1]
    if _is_network(kind) and arg.device_copy is not None:
        return arg.device_copy
    return arg.host


def describe_call(kind: str, func: Any) -> str:
    if kind != "op":
        return loop_call_label(kind)
    return f"the operation {getattr(func, '__qualname__', None) or getattr(func, '__name__', repr(func))}"


def describe(ev: Event) -> str:
    return describe_call(ev.kind, ev.func)
