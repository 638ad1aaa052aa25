"""CUDA graph capture of a diffusers pipeline's denoising loop (model calls + fastflow scheduler steps).

    pipe.scheduler = fastflow.diffusers.from_scheduler(pipe.scheduler)
    fast = fastflow.graph_pipeline.capture_pipeline(pipe)
    images = fast(batch_size=4, num_inference_steps=30).images   # 1st call: eager, records the loop
    images = fast(batch_size=4, num_inference_steps=30).images   # later calls: one graph replay

How: for the length of a call, the denoiser's ``forward`` (and a ControlNet's, when
the pipeline has one) and the scheduler's ``step`` (and ``scale_model_input``) are
wrapped, and from the first of those loop calls to the last step a torch function
mode sees the pipeline's own tensor operations. The first call with a given
signature (its arguments' types, shapes and values; tensors by shape, dtype and
device) runs eagerly and records the loop: the model calls, the steps, and every
operation the pipeline's code makes from their outputs in between (classifier-free
guidance: ``torch.cat([latents] * 2)``, ``chunk``, ``uncond + scale * (cond -
uncond)``). Right after it, that loop is
replayed on static buffers, warmed up on a side stream and captured into one CUDA
graph with its own memory pool. A later call with the same signature lets the
pipeline's own code run (text encoding, initial noise, ``set_timesteps``, decoding,
post-processing), but inside the loop the wrappers and the mode only copy the call's
new inputs (the initial latents and any device tensor from outside the loop, such as
prompt embeddings, class labels or timesteps) into the static buffers and hand back
placeholder tensors (no memory, no kernels); at the last step the graph replays and
the real final latents are returned. Every call and operation is checked against the
recording as it comes: a loop that changed is not replayed; that call reruns eagerly
from the random state it started from (its generators and torch's), with a warning
that says where it diverged, and so do later calls of that signature.

What is captured: loops of model calls and steps whose glue is tensor operations:
``DDIMPipeline``, ``DDPMPipeline``, and text-to-image pipelines that do
classifier-free guidance in their own code, with conditioning tensors passed to the
model (Stable Diffusion 1.x/2.x, SDXL, SD3, FLUX.1 with its true CFG, DiT, img2img, and
ControlNet pipelines: the ControlNet's calls are captured whole, like the denoiser's; a
new control image is an input of the graph, a new conditioning scale a new capture).

A new prompt or a new guidance scale needs no new capture. A float that the
pipeline's code only multiplies a floating-point loop tensor by (``guidance_scale *
(cond - uncond)``, a guidance rescale) is a parameter of the graph: the graph reads
it from device memory (in the op's own precision, so replays stay bitwise equal to
eager calls) and each replay writes the call's value there. A call whose signature
differs from a captured one only in float or string arguments (a scale, a prompt
string whose embeddings come in as graph inputs) first replays that capture with its
own values; if one of them reaches anything else (the step's ``eta``, a ``strength``
that changes the timesteps, guidance off at a scale of 1, a prompt whose embeddings
have another shape), the mismatch is found as the loop runs, and the call is
recorded and captured as a signature of its own (from the random state it started
from).

What falls back to eager (``.reason`` says which and why, a warning is given once):

* the scheduler is not a fastflow drop-in (diffusers' own steps sync with the host
  and keep their state in Python between calls);
* the pipeline is not on a CUDA device, or the call passes per-step callbacks
  (they read intermediate latents on the host);
* the pipeline's code changes a loop tensor in place (``latents.mul_(...)``), makes
  more than ``_MAX_OPS_BETWEEN_CALLS`` operations between two loop calls, or steps
  with a tensor that is not made from the model's output;
* the pipeline's code between loop calls, the model or the step syncs with the
  host (``.item()``, a data-dependent branch, per-step noise from a CPU
  ``torch.Generator`` at a stochastic step), or the capture itself fails;
* a per-step noise ``generator`` on a CUDA device (its state is host-side).

Stochastic drop-in steps without a generator draw fastflow's counter-based noise;
each replay writes a fresh seed from torch's global CPU generator into the seed
buffer, as the eager drop-in does once per loop, so replays give fresh samples and
match an eager call made from the same global RNG state.

Memory: one private pool per captured signature (about one eager loop's working
set), at most ``max_graphs`` signatures (least recently used released first).
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.overrides import TorchFunctionMode

from .graph import _is_sync_warning, _probing_syncs

__all__ = ["CapturedPipeline", "PipelineFallbackWarning", "capture_pipeline"]

_MODEL_ATTRS = ("unet", "transformer", "prior", "decoder")
# Networks a loop calls besides the denoiser, at every step: their calls are loop calls too (a ControlNet's
# residuals go into the denoiser), captured into the graph rather than recorded op by op.
_AUX_MODEL_ATTRS = ("controlnet",)
_CALLBACK_KWARGS = ("callback", "callback_on_step_end", "callback_steps")
_WARNED: set[str] = set()
# Tensor operations on loop tensors recorded between two loop calls, at most: guidance takes a handful;
# past the limit the code is not a denoising loop's glue (it may be the decoding after the last step).
_MAX_OPS_BETWEEN_CALLS = 64


class PipelineFallbackWarning(UserWarning):
    """A pipeline call runs eagerly because its loop cannot be captured; the message says why."""


class _Uncapturable(Exception):
    pass


class _Diverged(Exception):
    """A replayed call's loop differs from the recorded one (its message says where)."""


class _RngState:
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


def _warn_once(reason: str) -> None:
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(
            f"fastflow.graph_pipeline: running the pipeline eagerly: {reason}", PipelineFallbackWarning, stacklevel=3
        )


_TEXT = "<text>"  # tags a string argument's value in a signature (prompts), apart from the signature's own tags


def _signature(value: Any) -> Any:
    """A hashable summary of a call argument: what a capture depends on (tensors by metadata, not values)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, str(value.device))
    if isinstance(value, torch.Generator):
        return ("generator", str(value.device))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_signature(v) for v in value))
    if isinstance(value, Mapping):
        return ("map", tuple(sorted((str(k), _signature(v)) for k, v in value.items())))
    if isinstance(value, str):
        return (_TEXT, value)
    if value is None or isinstance(value, (bool, int, float, bytes)):
        return value
    if isinstance(value, torch.dtype | torch.device):
        return str(value)
    return ("object", type(value).__qualname__, id(value))


def _leaves(tree: Any) -> tuple[list[Any], pytree.TreeSpec]:
    """The leaves of an argument or output structure (tuples, lists, dicts, diffusers outputs) and its shape."""
    return pytree.tree_flatten(tree)


def _any_tensor(tree: Any, test: Callable[[torch.Tensor], bool]) -> bool:
    """Whether a tensor in ``tree`` passes ``test``: the cheap first look at every operation inside the loop."""
    if isinstance(tree, torch.Tensor):
        return test(tree)
    if isinstance(tree, (list, tuple)):
        return any(_any_tensor(v, test) for v in tree)
    if isinstance(tree, dict):
        return any(_any_tensor(v, test) for v in tree.values())
    return False


_LEAF_TYPES = frozenset({int, float, bool, str, type(None), slice, type(Ellipsis), torch.dtype, torch.device})


def _flat_args(args: tuple, kwargs: dict) -> list[Any] | None:
    """The leaves of ``(args, kwargs)`` when every argument is a leaf itself (a tensor, a number, None...), in
    pytree's order, without pytree's walk: the common case of a loop call or operation. None otherwise."""
    for value in (*args, *kwargs.values()):
        if not isinstance(value, torch.Tensor) and type(value) not in _LEAF_TYPES:
            return None
    return [*args, *kwargs.values()]


def _uses(args: tuple, kwargs: dict, ids: Mapping[int, Any]) -> bool:
    """Whether a tensor among the arguments (or in lists, tuples and dicts among them) has its id in ``ids``."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            if id(value) in ids:
                return True
        elif isinstance(value, (list, tuple, dict)) and _any_tensor(value, lambda t: id(t) in ids):
            return True
    return False


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [leaf for leaf in pytree.tree_leaves(tree) if isinstance(leaf, torch.Tensor)]


@dataclass
class _Arg:
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
class _Event:
    kind: str  # "scale", "model" (the denoiser), "model:<attr>" (another network, e.g. a ControlNet), "step", "op"
    args: list[_Arg]
    spec: pytree.TreeSpec  # (args, kwargs) structure
    func: Any = None  # op: the torch function called
    outs: list[int | None] = field(default_factory=list)  # output leaf -> value index (None: not a tensor)
    out_spec: pytree.TreeSpec | None = None
    out_consts: list[Any] = field(default_factory=list)  # the non-tensor output leaves
    flat: tuple[int, tuple[str, ...]] | None = None  # (positional count, keyword names) when every argument is a leaf


@dataclass
class _Trace:
    """A recorded loop and, once captured, its graph and static buffers."""

    events: list[_Event] = field(default_factory=list)
    buffers: list[torch.Tensor] = field(default_factory=list)
    value_meta: list[tuple[tuple[int, ...], torch.dtype]] = field(default_factory=list)
    device: torch.device | None = None
    batch: int = 0  # the batch of the first step's latents (per-sample seeds)
    host_timesteps: Any = None
    begin_index: int | None = None  # the scheduler's first step (img2img pipelines set it)
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


class _Recorder:
    """The wrappers' state for one eager call: builds a _Trace of loop calls and the operations between them."""

    def __init__(self, device: torch.device):
        self.trace = _Trace(device=device)
        self.device = device
        # id(tensor) -> (loop value index, weak reference): weak, so the decoding after the loop frees its memory
        self.values: dict[int, tuple[int, weakref.ref]] = {}
        self.ids: dict[int, int] = {}  # id(tensor) -> static buffer index
        self.problem: str | None = None
        self.keep: list[Any] = []  # keeps the outside inputs alive so their ids stay unique in this call
        self.last_label = "the first loop call"
        self.ops_since_call = 0
        self.overflow: str | None = None
        self.done = False  # the scheduler has taken its last step
        self.watch: _GapWatch | None = None

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

    def classify(self, value: Any, for_model: bool = False) -> _Arg:
        """One argument leaf: a loop value, a device tensor from outside (a static buffer), or a host constant."""
        if isinstance(value, torch.Tensor):
            index = self.value_index(value)
            if index is not None:
                return _Arg("value", index=index)
            key = id(value)
            if value.device == self.device:
                if key not in self.ids:
                    self.ids[key] = len(self.trace.buffers)
                    self.trace.buffers.append(value.detach().clone())
                    self.keep.append(value)
                return _Arg("buffer", index=self.ids[key])
            if value.device.type == "cpu":
                # a host tensor (a timestep from a CPU schedule): a constant of the loop, moved once
                copy = value.to(self.device) if for_model and self.device.type == "cuda" else None
                return _Arg("host", host=value.clone(), device_copy=copy)
            raise _Uncapturable(f"an input lives on {value.device}, the loop on {self.device}")
        if isinstance(value, torch.Generator) and value.device.type != "cpu":
            raise _Uncapturable("a CUDA torch.Generator is passed into the loop; its state is kept on the host")
        return _Arg("host", host=value)

    def add_values(self, out: Any) -> tuple[list[int | None], pytree.TreeSpec, list[Any]]:
        """Register the tensors of a call's output as new loop values."""
        leaves, spec = _leaves(out)
        outs: list[int | None] = []
        consts: list[Any] = []
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                if leaf.device != self.device:
                    raise _Uncapturable(f"an output lives on {leaf.device}, the loop on {self.device}")
                index = len(self.trace.value_meta)
                self.trace.value_meta.append((tuple(leaf.shape), leaf.dtype))
                self.values[id(leaf)] = (index, weakref.ref(leaf))
                outs.append(index)
                consts.append(None)
            else:
                outs.append(None)
                consts.append(leaf)
        return outs, spec, consts


class CapturedPipeline:
    """A diffusers pipeline whose denoising loop replays from a CUDA graph on repeated same-shape calls.

    Call it exactly like the pipeline. ``reason`` is why the last call ran eagerly
    (None when it replayed or recorded a capturable loop); ``captures`` counts
    captured signatures.
    """

    def __init__(self, pipe: Any, *, model_attr: str | None = None, max_graphs: int = 2, warmup: int = 2):
        if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
            raise ValueError(f"max_graphs must be an int >= 1, got {max_graphs!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an int >= 1, got {warmup!r}")
        self.pipe = pipe
        if model_attr is None:
            model_attr = next((a for a in _MODEL_ATTRS if isinstance(getattr(pipe, a, None), torch.nn.Module)), None)
            if model_attr is None:
                raise ValueError(
                    f"no denoiser found on the pipeline (looked for {', '.join(_MODEL_ATTRS)}); pass model_attr="
                )
        elif not isinstance(getattr(pipe, model_attr, None), torch.nn.Module):
            raise ValueError(f"pipe.{model_attr} is not a torch.nn.Module")
        if getattr(pipe, "scheduler", None) is None:
            raise ValueError("the pipeline has no scheduler")
        self.model_attr = model_attr
        self.max_graphs = max_graphs
        self.warmup = warmup
        self.reason: str | None = None
        self.captures = 0
        self.replays = 0
        self._traces: OrderedDict[tuple, _Trace] = OrderedDict()
        # signature -> the captured signature whose graph it replays (it differs only in parameters' values)
        self._aliases: dict[tuple, tuple] = {}

    # ------------------------------------------------------------------ static checks
    @property
    def model(self) -> torch.nn.Module:
        return getattr(self.pipe, self.model_attr)

    @property
    def scheduler(self) -> Any:
        return self.pipe.scheduler

    @property
    def device(self) -> torch.device:
        try:
            return next(self.model.parameters()).device
        except StopIteration:
            return torch.device("cpu")

    def blockers(self, kwargs: Mapping[str, Any] | None = None) -> list[str]:
        """Why calls of this pipeline (with ``kwargs``) cannot be captured, known before running it."""
        reasons = []
        try:
            from .diffusers import FastflowScheduler
        except ImportError as exc:
            reasons.append(f"fastflow.diffusers is not importable ({exc})")
        else:
            if not isinstance(self.scheduler, FastflowScheduler):
                reasons.append(
                    f"the scheduler {type(self.scheduler).__name__} is not a fastflow drop-in: diffusers' own steps "
                    "sync with the host and keep Python-side state (use fastflow.diffusers.from_scheduler)"
                )
        device = self.device
        if device.type != "cuda":
            reasons.append(f"CUDA graphs need a CUDA device; the pipeline's {self.model_attr} is on {device}")
        elif not torch.cuda.is_available():
            reasons.append("CUDA is not available")
        for name in _CALLBACK_KWARGS:
            if kwargs and kwargs.get(name) is not None:
                reasons.append(f"{name} is given: per-step callbacks read intermediate latents on the host")
        return reasons

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the private pools of the captured signatures."""
        return sum(t.memory_bytes for t in self._traces.values())

    def release(self) -> None:
        """Release every capture."""
        for trace in self._traces.values():
            trace.release()
        self._traces.clear()
        self._aliases.clear()

    # ------------------------------------------------------------------ calls
    def _key(self, args: tuple, kwargs: dict) -> tuple:
        return (
            tuple(id(net) for net in self._networks().values()),
            id(self.scheduler),
            type(self.scheduler).__name__,
            _signature(args),
            _signature(dict(kwargs)),
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        blockers = self.blockers(kwargs)
        if blockers:
            return self._eager("; ".join(blockers), args, kwargs)
        key = self._key(args, kwargs)
        found = key if key in self._traces else self._aliases.get(key)
        trace = self._traces.get(found) if found is not None else None
        if trace is not None:
            self._traces.move_to_end(found)
            if trace.reason is not None:
                return self._eager(trace.reason, args, kwargs)
            return self._replay(trace, args, kwargs)
        self._aliases.pop(key, None)
        sibling_key = self._sibling(key)
        if sibling_key is not None:
            # The same call but for floats or strings (a guidance scale, a prompt): replay that capture, with this
            # call's parameter values and inputs.
            rng = _RngState(args, kwargs, self.device)
            try:
                result = self._replay_once(self._traces[sibling_key], args, kwargs)
            except _Diverged:
                rng.restore()  # a float or string reached the loop's structure or constants: record this call
            else:
                self._aliases[key] = sibling_key
                self._traces.move_to_end(sibling_key)
                return result
        trace, result = self._record(args, kwargs)
        while len(self._traces) >= self.max_graphs:
            old_key, old = self._traces.popitem(last=False)
            old.release()
            for alias in [a for a, target in self._aliases.items() if target == old_key]:
                del self._aliases[alias]
        self._traces[key] = trace
        if trace.reason is None:
            try:
                self._capture(trace)
                self.captures += 1
            except _Uncapturable as exc:
                trace.reason = str(exc)
                trace.release()
        if trace.reason is not None:
            _warn_once(trace.reason)
        self.reason = trace.reason
        return result

    def _sibling(self, key: tuple) -> tuple | None:
        """The most recently used captured signature that differs from ``key`` only in float or string values.

        Replaying it is safe whatever those values do: every loop call and operation is checked against the
        recording as it comes, so a value that reaches more than a parameter or an input shows as a divergence.
        """
        loose = _loosen(key)
        return next((k for k, t in reversed(self._traces.items())
                     if t.reason is None and t.graph is not None and _loosen(k) == loose), None)

    def explain(self, *args: Any, **kwargs: Any) -> str | None:
        """Run one eager call while recording its loop; None when the loop's data flow can be captured, else why.

        Works on any device (the sync and capture checks themselves need CUDA).
        """
        blockers = [b for b in self.blockers(kwargs) if "CUDA" not in b]
        if blockers:
            return "; ".join(blockers)
        trace, _ = self._record(args, kwargs)
        return trace.reason

    def _eager(self, reason: str, args: tuple, kwargs: dict) -> Any:
        self.reason = reason
        _warn_once(reason)
        return self.pipe(*args, **kwargs)

    # ------------------------------------------------------------------ wrapping
    def _networks(self) -> dict[str, torch.nn.Module]:
        """The networks the loop calls, by event kind: the denoiser, then the auxiliary ones."""
        nets = {"model": self.model}
        for attr in _AUX_MODEL_ATTRS:
            net = getattr(self.pipe, attr, None)
            if attr != self.model_attr and isinstance(net, torch.nn.Module):
                nets[f"model:{attr}"] = net
        return nets

    @contextlib.contextmanager
    def _wrapped(self, forwards: dict[str, Callable], step: Callable, scale: Callable | None):
        nets, scheduler = self._networks(), self.scheduler
        saved_forwards = {kind: nets[kind].__dict__.get("forward") for kind in forwards}
        saved = {name: scheduler.__dict__.get(name) for name in ("step", "scale_model_input")}
        for kind, forward in forwards.items():
            nets[kind].forward = forward
        scheduler.step = step
        if scale is not None:
            scheduler.scale_model_input = scale
        try:
            yield
        finally:
            for kind, saved_forward in saved_forwards.items():
                if saved_forward is None:
                    nets[kind].__dict__.pop("forward", None)
                else:
                    nets[kind].forward = saved_forward
            for name, value in saved.items():
                if value is None:
                    scheduler.__dict__.pop(name, None)
                else:
                    setattr(scheduler, name, value)

    def _originals(self) -> tuple[dict[str, Callable], Callable, Callable | None]:
        """The networks' forwards by event kind, the scheduler's step and its scale_model_input (or None)."""
        scheduler = self.scheduler
        forwards = {
            kind: net.__dict__.get("forward") or type(net).forward.__get__(net)
            for kind, net in self._networks().items()
        }
        step = scheduler.__dict__.get("step") or type(scheduler).step.__get__(scheduler)
        scale = scheduler.__dict__.get("scale_model_input")
        if scale is None and hasattr(type(scheduler), "scale_model_input"):
            scale = type(scheduler).scale_model_input.__get__(scheduler)
        return forwards, step, scale

    # ------------------------------------------------------------------ record (eager call)
    def _record(self, args: tuple, kwargs: dict) -> tuple[_Trace, Any]:
        forwards, step, scale = self._originals()
        rec = _Recorder(self.device)
        watch = rec.watch = _GapWatch(rec.device.type == "cuda" and torch.cuda.is_available())
        ops = _LoopOps(lambda func, a, k: _record_op(rec, func, a, k))
        scheduler = self.scheduler

        def record(kind: str, fn: Callable, call_args: tuple, call_kwargs: dict) -> Any:
            # From the first loop call on, the pipeline's own tensor operations are recorded; the
            # loop calls themselves (the model, the step) run without the mode.
            ops.stop()
            watch.close(rec, kind)
            label = f"{_label(kind)} at loop call {len(rec.trace.events)}"
            if rec.overflow is not None:
                rec.fail(rec.overflow)
            if rec.done:  # the scheduler said its loop was over: the operations since were not recorded
                rec.fail(f"{label} comes after the scheduler's last step")
            rec.ops_since_call = 0
            try:
                if rec.problem is None:
                    _note(rec, kind, call_args, call_kwargs)
            except _Uncapturable as exc:
                rec.fail(f"{label}: {exc}")
            out = fn(*call_args, **call_kwargs)
            try:
                if rec.problem is None:
                    _note_output(rec, kind, out)
            except _Uncapturable as exc:
                rec.fail(f"{label}: {exc}")
            rec.last_label = label
            if kind == "step" and _loop_finished(scheduler):
                rec.done = True
            else:
                ops.start()
            watch.open()
            return out

        def forward_w(kind: str, forward: Callable) -> Callable[..., Any]:
            return lambda *a, **k: record(kind, forward, a, k)

        def step_w(*a: Any, **k: Any) -> Any:
            return record("step", step, a, k)

        def scale_w(*a: Any, **k: Any) -> Any:
            return record("scale", scale, a, k)

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            watch.caught = caught
            wrapped = {kind: forward_w(kind, forward) for kind, forward in forwards.items()}
            with self._wrapped(wrapped, step_w, scale_w if scale is not None else None):
                try:
                    result = self.pipe(*args, **kwargs)
                finally:
                    ops.stop()
                    watch.stop()
        for w in caught:  # pass on what the pipeline warned, minus the sync probes
            if not any(w is ours for ours in watch.ours):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        trace = rec.trace
        if rec.problem is None and watch.culprit is not None:
            rec.fail(watch.culprit)
        events = trace.events
        while events and events[-1].kind == "op":  # after the last step: the pipeline's decoding, not the loop
            events.pop()
        if rec.problem is None:
            if not events or events[-1].kind != "step":
                rec.fail("no denoising loop was seen (no call of the model followed by scheduler.step)")
            elif not any(e.kind == "model" for e in events):
                rec.fail("no model call was seen inside the loop")
        trace.reason = rec.problem
        trace.host_timesteps = _host_timesteps(scheduler)
        trace.begin_index = getattr(scheduler, "begin_index", None)
        # The drop-ins draw a loop seed at the first noisy step that uses their own noise.
        trace.stochastic = getattr(scheduler, "_ff_seed", None) is not None
        return trace, result

    # ------------------------------------------------------------------ capture
    def _run_trace(self, trace: _Trace, originals: tuple, probe: Callable[[str], None] | None = None) -> Any:
        """The recorded loop on the static buffers (warm-up and capture); returns the last step's output."""
        forwards, step, scale = originals
        calls = {**forwards, "step": step, "scale": scale}
        values: list[Any] = [None] * len(trace.value_meta)
        final = None
        for k, ev in enumerate(trace.events):
            leaves = [_resolve(arg, trace, values, ev.kind) for arg in ev.args]
            a, kw = pytree.tree_unflatten(leaves, ev.spec)
            if ev.kind != "op":
                out = calls[ev.kind](*a, **kw)
            else:  # a parameter is one of the two positional arguments of a multiplication (see _record_op)
                factor = next((j for j, arg in enumerate(ev.args) if arg.kind == "param"), None)
                out = ev.func(*a, **kw) if factor is None else _param_mul(a[1 - factor], a[factor])
            out_leaves = pytree.tree_leaves(out)
            if len(out_leaves) != len(ev.outs):
                raise _Uncapturable(f"{_describe(ev)} at loop call {k} returned a different structure than recorded")
            for index, leaf in zip(ev.outs, out_leaves, strict=True):
                if index is not None:
                    values[index] = leaf
            if ev.kind == "step":
                final = out
            if probe is not None:
                probe(f"{_describe(ev)} at loop call {k}")
        return final

    def _capture(self, trace: _Trace) -> None:
        originals = self._originals()
        scheduler = self.scheduler
        device = self.device
        if trace.stochastic and hasattr(scheduler, "_ff_seed_tensor"):
            # The drop-in caches the seed tensor its steps read; creating it now makes it a static buffer.
            trace.seeds = scheduler._ff_seed_tensor(trace.batch, trace.device)
        _make_param_values(trace)
        with torch.cuda.device(device), torch.no_grad():
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            culprit = None
            with torch.cuda.stream(side):
                for _ in range(self.warmup - 1):
                    self._run_trace(trace, originals)
                with _probing_syncs() as probe:
                    self._run_trace(trace, originals, probe.mark)
                culprit = probe.culprit
            torch.cuda.current_stream(device).wait_stream(side)
            torch.cuda.synchronize(device)
            if culprit is not None:
                raise _Uncapturable(culprit)
            graph = torch.cuda.CUDAGraph()
            before = torch.cuda.memory_reserved(device)
            with torch.cuda.stream(side):
                graph.capture_begin()
                try:
                    final = self._run_trace(trace, originals)
                except Exception as exc:
                    with contextlib.suppress(Exception):
                        graph.capture_end()
                    with contextlib.suppress(Exception):
                        torch.cuda.synchronize(device)
                    raise _Uncapturable(f"capture failed: {type(exc).__name__}: {exc}") from exc
                try:
                    graph.capture_end()
                except Exception as exc:
                    raise _Uncapturable(f"capture failed: {type(exc).__name__}: {exc}") from exc
            trace.memory_bytes = max(0, torch.cuda.memory_reserved(device) - before)
        trace.graph = graph
        trace.outputs = final
        # The graph reads device tensors the scheduler made outside it (coefficient tables, seeds, step
        # counters); set_timesteps replaces the scheduler's dicts of them, so hold this generation alive.
        trace.keep = dict(vars(scheduler))

    # ------------------------------------------------------------------ replay
    def _replay(self, trace: _Trace, args: tuple, kwargs: dict) -> Any:
        """A call from the graph; if the pipeline's loop turns out to differ from the recording, the call is run
        again eagerly from the same random state (as if it had never been replayed), and so are later ones."""
        rng = _RngState(args, kwargs, self.device)
        try:
            return self._replay_once(trace, args, kwargs)
        except _Diverged as exc:
            trace.reason = str(exc)
            trace.release()
            rng.restore()
            return self._eager(trace.reason, args, kwargs)

    def _replay_once(self, trace: _Trace, args: tuple, kwargs: dict) -> Any:
        events = trace.events
        state: dict[str, Any] = {"k": 0, "done": False}
        loaded: set[int] = set()
        live: dict[int, int] = {}  # id(placeholder) -> loop value, for the placeholders handed out so far
        params = list(trace.params)  # this call's parameter values, as its operations come

        def diverged(why: str) -> None:
            raise _Diverged(f"the pipeline's loop diverged from the recorded one: {why}")

        def take(kind: str, func: Any, a: tuple, kw: dict) -> _Event:
            """Match this call against the next recorded event; load its outside inputs into the static buffers."""
            k = state["k"]
            if k >= len(events):
                diverged(f"more loop calls than the {len(events)} recorded")
            ev = events[k]
            if ev.kind != kind or (kind == "op" and ev.func != func):
                diverged(f"loop call {k} is {_describe_call(kind, func)}, recorded {_describe(ev)}")
            if k == 0 and not _same_host(_host_timesteps(self.scheduler), trace.host_timesteps):
                diverged("the scheduler's timesteps differ from the recorded ones")
            if k == 0 and getattr(self.scheduler, "begin_index", None) != trace.begin_index:
                # the graph's steps are the recorded ones; a timestep tensor on the device is not compared
                diverged("the scheduler's first step (begin_index) differs from the recorded one")
            leaves = _flat_args(a, kw) if ev.flat == (len(a), tuple(kw)) else None
            if leaves is None:  # arguments with structure: compare it whole
                leaves, spec = _leaves((a, kw))
                if spec != ev.spec:
                    diverged(f"loop call {k} ({_describe(ev)}) has different arguments than recorded")
            for arg, leaf in zip(ev.args, leaves, strict=True):
                if arg.kind == "value":
                    if not isinstance(leaf, torch.Tensor) or live.get(id(leaf)) != arg.index:
                        diverged(f"loop call {k} ({_describe(ev)}) does not take the tensors the recorded loop gave it")
                elif arg.kind == "buffer":
                    buf = trace.buffers[arg.index]
                    if not isinstance(leaf, torch.Tensor) or leaf.shape != buf.shape or leaf.dtype != buf.dtype:
                        diverged(f"an input of loop call {k} ({_describe(ev)}) changed shape or dtype")
                    if arg.index not in loaded:
                        buf.copy_(leaf)
                        loaded.add(arg.index)
                elif arg.kind == "param":
                    if not _is_float(leaf):
                        diverged(f"loop call {k} ({_describe(ev)}) multiplies by {leaf!r}, recorded a float")
                    params[arg.index] = float(leaf)
                elif not _same_host(leaf, arg.host):
                    diverged(f"a host input of loop call {k} ({_describe(ev)}) changed ({leaf!r} vs {arg.host!r})")
            state["k"] = k + 1
            return ev

        def placeholders(ev: _Event) -> Any:
            leaves = []
            for index, const in zip(ev.outs, ev.out_consts, strict=True):
                if index is None:
                    leaves.append(const)
                else:
                    ph = trace.placeholder(index)
                    live[id(ph)] = index
                    leaves.append(ph)
            if len(leaves) == 1 and ev.out_spec.is_leaf():  # a lone tensor (most operations)
                return leaves[0]
            return pytree.tree_unflatten(leaves, ev.out_spec)

        def loop_call(kind: str) -> Callable[..., Any]:
            def call(*a: Any, **kw: Any) -> Any:
                ops.start()
                ev = take(kind, None, a, kw)
                if kind == "step" and state["k"] == len(events):
                    ops.stop()
                    if trace.seeds is not None:
                        _write_seeds(trace.seeds)
                    _write_params(trace, params)
                    trace.graph.replay()
                    state["done"] = True
                    return pytree.tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, trace.outputs)
                return placeholders(ev)

            return call

        def op(func: Any, a: tuple, kw: dict) -> Any:
            if state["done"] or not _uses(a, kw, live):
                return func(*a, **kw)
            k = state["k"]
            if k < len(events) and events[k].kind == "op" and events[k].func == func:
                return placeholders(take("op", func, a, kw))
            out = func(*a, **kw)  # a read of metadata (shape, dtype) is fine; new tensors are not in the graph
            if _new_tensors(out, pytree.tree_leaves((a, kw))):
                diverged(f"the pipeline's code calls {_describe_call('op', func)} on loop tensors at loop call {k}, "
                         "which the recorded loop does not")
            return out

        ops = _LoopOps(op)
        forwards, _, scale = self._originals()
        wrappers = (
            {kind: loop_call(kind) for kind in forwards},
            loop_call("step"),
            loop_call("scale") if scale is not None else None,
        )
        try:
            with self._wrapped(*wrappers):
                result = self.pipe(*args, **kwargs)
        finally:
            ops.stop()
        if not state["done"]:
            raise _Diverged("the pipeline ended before the recorded loop's last step")
        self.replays += 1  # counted once the call is over: a loop found longer after the replay is rerun eagerly
        self.reason = None
        return result


# ----------------------------------------------------------------------------- helpers
_LABELS = {"model": "the model call", "step": "scheduler.step", "scale": "scheduler.scale_model_input"}


def _label(kind: str) -> str:
    return f"the {kind.partition(':')[2]} call" if kind.startswith("model:") else _LABELS[kind]


def _is_network(kind: str) -> bool:
    return kind == "model" or kind.startswith("model:")


class _GapWatch:
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
        found = [w for w in self.caught[self.mark :] if _is_sync_warning(w)]
        self.ours.extend(found)
        return [w for w in found if not any(w is e for e in self.excused)]

    def close(self, rec: _Recorder, kind: str) -> None:
        if not self.active:
            return
        found = self._collect()
        if found and self.culprit is None:
            self.culprit = (
                f"the pipeline's own code between {rec.last_label} and the next {_label(kind)} "
                f"synchronizes with the host ({str(found[0].message).strip()})"
            )

    def stop(self) -> None:
        """After the pipeline returns: the code after the last step is outside the loop, so it is not judged."""
        if self.active:
            self._collect()


class _LoopOps(TorchFunctionMode):
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


def _record_op(rec: _Recorder, func: Any, args: tuple, kwargs: dict) -> Any:
    """One torch function call of the pipeline's own code inside the loop: recorded when it makes new tensors from
    loop tensors (classifier-free guidance, ``torch.cat([latents] * 2)``, a rescale), else just run."""
    if rec.done or rec.problem is not None or rec.overflow is not None:
        return func(*args, **kwargs)
    if not _any_tensor((args, kwargs), rec.is_value):
        watch = rec.watch
        if watch is None or not watch.active:
            return func(*args, **kwargs)
        start = len(watch.caught)
        out = func(*args, **kwargs)
        watch.excuse_since(start)
        return out
    leaves, spec = _leaves((args, kwargs))
    name = _describe_call("op", func)
    if _in_place(func, kwargs):
        rec.fail(f"{name} after {rec.last_label} changes a loop tensor in place; a replay could not follow it")
        return func(*args, **kwargs)
    out = func(*args, **kwargs)
    if not _new_tensors(out, leaves):  # a read of metadata (shape, dtype), or an op that returned its input
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
        event = _Event("op", [rec.classify(leaf) for leaf in leaves], spec, func=func, flat=_flat_shape(args, kwargs))
        factor = _param_position(func, args, kwargs)
        if factor is not None:
            event.args[factor] = _Arg("param", index=len(rec.trace.params), host=args[factor])
            rec.trace.params.append(float(args[factor]))
        event.outs, event.out_spec, event.out_consts = rec.add_values(out)
    except _Uncapturable as exc:
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


def _new_tensors(out: Any, inputs: list[Any]) -> list[torch.Tensor]:
    """The tensors of ``out`` that are not among ``inputs`` (an op may hand back its input unchanged)."""
    return [t for t in _tensors(out) if not any(t is leaf for leaf in inputs)]


_MULTIPLY = frozenset({torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.Tensor.mul, torch.mul})
_PARAM_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _is_float(value: Any) -> bool:
    return isinstance(value, float)  # bool and int are not floats; numpy's float64 is


def _param_position(func: Any, args: tuple, kwargs: dict) -> int | None:
    """Where the float factor is, when the call multiplies a floating-point tensor by a Python float."""
    if func not in _MULTIPLY or kwargs or len(args) != 2:
        return None
    for factor in (1, 0):
        tensor = args[1 - factor]
        if _is_float(args[factor]) and isinstance(tensor, torch.Tensor) and tensor.dtype in _PARAM_DTYPES:
            return factor
    return None


def _param_mul(tensor: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``tensor * factor`` for a one-element float64 device tensor ``factor``, rounded as eager torch rounds a
    Python float factor: the factor converted to the op's math type (float64 for float64 tensors, else float32),
    one product in that type, one rounding to the tensor's dtype. (A tensor factor of the tensor's own dtype would
    be rounded to it first, 7.3 to 7.3125 in bfloat16; on the CPU a 0-d one would be read as a scalar, which is
    why the factor has one dimension: CPU and CUDA then compute alike.)"""
    wide = tensor.dtype == torch.float64
    product = tensor * factor if wide else (tensor.float() * factor.float()).to(tensor.dtype)
    return product.reshape(()) if tensor.dim() == 0 else product


def _make_param_values(trace: _Trace) -> None:
    """The device tensor the graph reads the parameters from (one element per parameter)."""
    if trace.params:
        trace.param_values = torch.tensor(trace.params, dtype=torch.float64, device=trace.device)


def _write_params(trace: _Trace, values: list[float]) -> None:
    """Before a replay: this call's parameter values into the graph's (one host-to-device copy, when changed)."""
    if values != trace.params and trace.param_values is not None:
        host = torch.tensor(values, dtype=torch.float64)
        if trace.param_values.device.type == "cuda":  # pinned and asynchronous: no host sync, as for the seeds
            trace.param_values.copy_(host.pin_memory(), non_blocking=True)
        else:
            trace.param_values.copy_(host)
        trace.params = list(values)


def _loosen(signature: Any) -> Any:
    """A signature with every float and string value replaced by a token: calls that differ only in those (a
    guidance scale, a prompt, an output type) match; their ints, shapes and structure still have to agree."""
    if isinstance(signature, float):
        return "<float>"
    if isinstance(signature, tuple):
        if len(signature) == 2 and signature[0] == _TEXT:
            return (_TEXT, "<any>")
        return tuple(_loosen(v) for v in signature)
    return signature


def _flat_shape(args: tuple, kwargs: dict) -> tuple[int, tuple[str, ...]] | None:
    return (len(args), tuple(kwargs)) if _flat_args(args, kwargs) is not None else None


def _step_parts(call_args: tuple, call_kwargs: dict) -> tuple[Any, Any]:
    o = call_args[0] if call_args else call_kwargs.get("model_output")
    sample = call_args[2] if len(call_args) > 2 else call_kwargs.get("sample")
    return o, sample


def _note(rec: _Recorder, kind: str, call_args: tuple, call_kwargs: dict) -> None:
    """Record one loop call's arguments: loop tensors by value, outside device tensors as buffers, the rest as is."""
    if kind == "step":
        o, sample = _step_parts(call_args, call_kwargs)
        if not rec.is_value(o):
            raise _Uncapturable(
                "the step does not take a tensor the loop made from the model's output (it takes a tensor made "
                "outside the loop)"
            )
        if not isinstance(sample, torch.Tensor):
            raise _Uncapturable("the step takes no latents tensor")
        if not rec.trace.batch:
            rec.trace.batch = sample.shape[0]
    leaves, spec = _leaves((call_args, call_kwargs))
    args = [rec.classify(leaf, for_model=_is_network(kind)) for leaf in leaves]
    rec.trace.events.append(_Event(kind, args, spec, flat=_flat_shape(call_args, call_kwargs)))


def _note_output(rec: _Recorder, kind: str, out: Any) -> None:
    if kind == "scale" and not isinstance(out, torch.Tensor):
        raise _Uncapturable("scale_model_input did not return a tensor")
    ev = rec.trace.events[-1]
    ev.outs, ev.out_spec, ev.out_consts = rec.add_values(out)
    if all(index is None for index in ev.outs):
        raise _Uncapturable(f"{_label(kind)} returned no tensor")


def _resolve(arg: _Arg, trace: _Trace, values: list[Any], kind: str) -> Any:
    if arg.kind == "value":
        return values[arg.index]
    if arg.kind == "buffer":
        return trace.buffers[arg.index]
    if arg.kind == "param":
        return trace.param_values[arg.index : arg.index + 1]
    if _is_network(kind) and arg.device_copy is not None:
        return arg.device_copy
    return arg.host


def _describe_call(kind: str, func: Any) -> str:
    if kind != "op":
        return _label(kind)
    return f"the operation {getattr(func, '__qualname__', None) or getattr(func, '__name__', repr(func))}"


def _describe(ev: _Event) -> str:
    return _describe_call(ev.kind, ev.func)


def _loop_finished(scheduler: Any) -> bool:
    """Whether the drop-in scheduler has taken the last step of its loop (its step counter says so)."""
    index = getattr(scheduler, "step_index", None)
    total = getattr(scheduler, "_ff_num_steps", None)
    return index is not None and total is not None and index >= total()


def _same_host(a: Any, b: Any) -> bool:
    if type(a) is type(b) and type(a) in _LEAF_TYPES:  # None, numbers, strings: the common host constants
        return a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        return a.shape == b.shape and a.dtype == b.dtype and a.device.type == "cpu" and torch.equal(a, b.to(a.device))
    if isinstance(a, torch.Generator) or isinstance(b, torch.Generator):
        return isinstance(a, torch.Generator) and isinstance(b, torch.Generator) and a.device == b.device
    if hasattr(a, "shape") and hasattr(b, "shape"):  # numpy arrays
        try:
            import numpy as np

            return bool(np.array_equal(a, b))
        except Exception:
            return False
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    try:
        return bool(a == b)
    except Exception:
        return a is b


def _host_timesteps(scheduler: Any) -> Any:
    host = getattr(scheduler, "_ff_host_timesteps", None)
    if host is not None:
        return host.copy()
    ts = getattr(scheduler, "timesteps", None)
    if isinstance(ts, torch.Tensor) and ts.device.type == "cpu":
        return ts.clone()
    return None


def _fresh_seed() -> int:
    """As the drop-ins draw their per-loop seed: from torch's global CPU generator."""
    return int(torch.randint(0, 2**62, (1,)).item())


def _write_seeds(seeds: torch.Tensor) -> None:
    host = torch.arange(seeds.shape[0], dtype=torch.int64) + _fresh_seed()
    if seeds.device.type == "cuda":
        seeds.copy_(host.pin_memory(), non_blocking=True)
    else:
        seeds.copy_(host)


def capture_pipeline(
    pipe: Any, *, model_attr: str | None = None, max_graphs: int = 2, warmup: int = 2
) -> CapturedPipeline:
    """Wrap ``pipe`` so repeated same-signature calls replay its denoising loop from a CUDA graph.

    ``model_attr`` names the denoiser (default: the first of ``unet``, ``transformer``,
    ``prior``, ``decoder``); a ``controlnet`` on the pipeline is wrapped too. See the module
    docstring for what is captured.
    """
    return CapturedPipeline(pipe, model_attr=model_attr, max_graphs=max_graphs, warmup=warmup)
