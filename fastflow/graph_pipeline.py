"""CUDA graph capture of a diffusers pipeline's denoising loop (model calls + fastflow scheduler steps).

    pipe.scheduler = fastflow.diffusers.from_scheduler(pipe.scheduler)
    fast = fastflow.graph_pipeline.capture_pipeline(pipe)
    images = fast(batch_size=4, num_inference_steps=30).images   # 1st call: eager, records the loop
    images = fast(batch_size=4, num_inference_steps=30).images   # later calls: one graph replay

How: for the length of a call, the denoiser's ``forward`` and the scheduler's
``step`` (and ``scale_model_input``) are wrapped. The first call with a given
signature (its arguments' types, shapes and values; tensors by shape, dtype and
device) runs eagerly and records the loop: the sequence of model calls and steps,
and how each feeds the next. Right after it, that loop is replayed on static
buffers, warmed up on a side stream and captured into one CUDA graph with its own
memory pool. A later call with the same signature lets the pipeline's own code run
(text encoding, initial noise, ``set_timesteps``, decoding, post-processing), but
inside the loop the wrappers only copy the call's new inputs (the initial latents
and any device tensor the model takes, such as prompt embeddings or class labels)
into the static buffers and hand back placeholder tensors; at the last step the
graph replays and the real final latents are returned.

What is captured: loops where each model call takes the latents the previous step
returned (possibly through ``scheduler.scale_model_input``), and each step takes
that model call's output as is, the same latents, and the loop's timestep:
``DDIMPipeline``, ``DDPMPipeline`` and any pipeline written the same way, with
conditioning tensors passed straight to the model.

What falls back to eager (``.reason`` says which and why, a warning is given once):

* the scheduler is not a fastflow drop-in (diffusers' own steps sync with the host
  and keep their state in Python between calls);
* the pipeline is not on a CUDA device, or the call passes per-step callbacks
  (they read intermediate latents on the host);
* the pipeline's own code changes the data between the model and the step
  (classifier-free guidance arithmetic, ``torch.cat([latents] * 2)``): that work
  would not be in the graph. Capture such loops with :func:`fastflow.graph.capture`
  and a ``model_fn`` that does the doubling and returns ``(cond, uncond)``;
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
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

import torch

from .graph import _is_sync_warning, _probing_syncs

__all__ = ["CapturedPipeline", "PipelineFallbackWarning", "capture_pipeline"]

_MODEL_ATTRS = ("unet", "transformer", "prior", "decoder")
_CHAIN_NAMES = ("sample", "hidden_states", "x")
_CALLBACK_KWARGS = ("callback", "callback_on_step_end", "callback_steps")
_WARNED: set[str] = set()


class PipelineFallbackWarning(UserWarning):
    """A pipeline call runs eagerly because its loop cannot be captured; the message says why."""


class _Uncapturable(Exception):
    pass


def _warn_once(reason: str) -> None:
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(
            f"fastflow.graph_pipeline: running the pipeline eagerly: {reason}", PipelineFallbackWarning, stacklevel=3
        )


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
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    if isinstance(value, torch.dtype | torch.device):
        return str(value)
    return ("object", type(value).__qualname__, id(value))


def _tensor_fields(out: Any) -> tuple[str, list[tuple[Any, torch.Tensor]]]:
    """How a model or step output holds its tensors: ('tuple', [(i, t)]) or ('fields', [(name, t)])."""
    if isinstance(out, torch.Tensor):
        return "tensor", [(None, out)]
    if isinstance(out, tuple) and not hasattr(out, "_fields"):
        return "tuple", [(i, v) for i, v in enumerate(out) if isinstance(v, torch.Tensor)]
    if is_dataclass(out):
        return "fields", [
            (f.name, getattr(out, f.name)) for f in fields(out) if isinstance(getattr(out, f.name), torch.Tensor)
        ]
    raise _Uncapturable(f"an output of type {type(out).__name__} is neither a tensor, a tuple nor a diffusers output")


def _rebuild(template: Any, replace: dict[Any, torch.Tensor | None]) -> Any:
    """``template`` (an output) with its tensors replaced by ``replace[key]``."""
    if isinstance(template, torch.Tensor):
        return replace[None]
    if isinstance(template, tuple):
        return tuple(replace.get(i, v) for i, v in enumerate(template))
    values = {f.name: replace.get(f.name, getattr(template, f.name)) for f in fields(template)}
    return type(template)(**values)


@dataclass
class _Arg:
    """One argument of a recorded call: the chain tensor, a device input (static buffer), a host constant."""

    kind: str  # "chain", "buffer", "host"
    buffer: int = -1
    host: Any = None
    device_copy: torch.Tensor | None = None


@dataclass
class _Event:
    kind: str  # "scale", "model", "step"
    args: list[_Arg]
    kwargs: dict[str, _Arg]
    chain_in: Any  # the position or name of the chain tensor among the arguments
    out_key: Any = None  # model/step: which output field continues the chain
    template: Any = None  # the output's structure, tensors removed
    out_meta: dict = field(default_factory=dict)  # output field -> (shape, dtype)
    identity: bool = False  # scale_model_input returned its input


@dataclass
class _Trace:
    """A recorded loop and, once captured, its graph and static buffers."""

    events: list[_Event] = field(default_factory=list)
    buffers: list[torch.Tensor] = field(default_factory=list)
    x0: torch.Tensor | None = None
    host_timesteps: Any = None
    seeds: torch.Tensor | None = None
    graph: torch.cuda.CUDAGraph | None = None
    outputs: Any = None
    placeholders: dict[tuple, torch.Tensor] = field(default_factory=dict)
    stochastic: bool = False
    keep: dict = field(default_factory=dict)
    reason: str | None = None
    memory_bytes: int = 0

    def placeholder(self, role: str, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """A tensor handed to the pipeline in place of an intermediate result (its values are meaningless)."""
        key = (role, tuple(shape), dtype)
        if key not in self.placeholders:
            self.placeholders[key] = torch.empty(shape, dtype=dtype, device=self.x0.device)
        return self.placeholders[key]

    def release(self) -> None:
        if self.graph is not None:
            self.graph.reset()
        self.graph = None
        self.outputs = None
        self.keep = {}
        self.memory_bytes = 0


class _Recorder:
    """The wrappers' state for one eager call: builds a _Trace and checks the loop's data flow."""

    def __init__(self, device: torch.device):
        self.trace = _Trace()
        self.device = device
        self.chain: torch.Tensor | None = None  # latents that the next model call / step must take
        self.scaled: torch.Tensor | None = None
        self.model_out: torch.Tensor | None = None
        self.ids: dict[int, int] = {}
        self.problem: str | None = None
        self.keep: list[torch.Tensor] = []  # keeps recorded inputs alive so ids stay unique in this call
        self.last_label = "the first loop call"

    def fail(self, reason: str) -> None:
        if self.problem is None:
            self.problem = reason

    def classify(self, value: Any, for_model: bool = False) -> _Arg:
        """A non-latents argument: a device tensor becomes a static buffer, anything else a host constant."""
        if isinstance(value, torch.Tensor):
            if value.device == self.device:
                key = id(value)
                if key not in self.ids:
                    self.ids[key] = len(self.trace.buffers)
                    self.trace.buffers.append(value.detach().clone())
                    self.keep.append(value)
                return _Arg("buffer", buffer=self.ids[key])
            if value.device.type == "cpu":
                # a host tensor (a timestep from a CPU schedule): a constant of the loop, moved once
                copy = value.to(self.device) if for_model and self.device.type == "cuda" else None
                return _Arg("host", host=value.clone(), device_copy=copy)
            raise _Uncapturable(f"an input lives on {value.device}, the loop on {self.device}")
        if isinstance(value, torch.Generator):
            if value.device.type != "cpu":
                raise _Uncapturable("a CUDA torch.Generator is passed into the loop; its state is kept on the host")
            return _Arg("host", host=value)
        return _Arg("host", host=value)


def _find_chain(args: tuple, kwargs: dict) -> tuple[Any, Any]:
    if args:
        return 0, args[0]
    for name in _CHAIN_NAMES:
        if name in kwargs:
            return name, kwargs[name]
    return None, None


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

    # ------------------------------------------------------------------ calls
    def _key(self, args: tuple, kwargs: dict) -> tuple:
        return (
            id(self.model),
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
        trace = self._traces.get(key)
        if trace is not None:
            self._traces.move_to_end(key)
            if trace.reason is not None:
                return self._eager(trace.reason, args, kwargs)
            return self._replay(trace, args, kwargs)
        trace, result = self._record(args, kwargs)
        while len(self._traces) >= self.max_graphs:
            _, old = self._traces.popitem(last=False)
            old.release()
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
    @contextlib.contextmanager
    def _wrapped(self, forward: Callable, step: Callable, scale: Callable | None):
        model, scheduler = self.model, self.scheduler
        saved_forward = model.__dict__.get("forward")
        saved = {name: scheduler.__dict__.get(name) for name in ("step", "scale_model_input")}
        model.forward = forward
        scheduler.step = step
        if scale is not None:
            scheduler.scale_model_input = scale
        try:
            yield
        finally:
            if saved_forward is None:
                model.__dict__.pop("forward", None)
            else:
                model.forward = saved_forward
            for name, value in saved.items():
                if value is None:
                    scheduler.__dict__.pop(name, None)
                else:
                    setattr(scheduler, name, value)

    def _originals(self) -> tuple[Callable, Callable, Callable | None]:
        model, scheduler = self.model, self.scheduler
        forward = model.__dict__.get("forward") or type(model).forward.__get__(model)
        step = scheduler.__dict__.get("step") or type(scheduler).step.__get__(scheduler)
        scale = scheduler.__dict__.get("scale_model_input")
        if scale is None and hasattr(type(scheduler), "scale_model_input"):
            scale = type(scheduler).scale_model_input.__get__(scheduler)
        return forward, step, scale

    # ------------------------------------------------------------------ record (eager call)
    def _record(self, args: tuple, kwargs: dict) -> tuple[_Trace, Any]:
        forward, step, scale = self._originals()
        rec = _Recorder(self.device)
        watch = _GapWatch(rec.device.type == "cuda" and torch.cuda.is_available())

        def record(kind: str, fn: Callable, call_args: tuple, call_kwargs: dict) -> Any:
            watch.close(rec, kind)
            label = f"{_LABELS[kind]} at loop call {len(rec.trace.events)}"
            try:
                if rec.problem is None:
                    _note(rec, kind, call_args, call_kwargs)
            except _Uncapturable as exc:
                rec.fail(f"{label}: {exc}")
            out = fn(*call_args, **call_kwargs)
            try:
                if rec.problem is None:
                    _note_output(rec, kind, out, call_args, call_kwargs)
            except _Uncapturable as exc:
                rec.fail(f"{label}: {exc}")
            rec.last_label = label
            watch.open()
            return out

        def forward_w(*a: Any, **k: Any) -> Any:
            return record("model", forward, a, k)

        def step_w(*a: Any, **k: Any) -> Any:
            return record("step", step, a, k)

        def scale_w(*a: Any, **k: Any) -> Any:
            return record("scale", scale, a, k)

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            watch.caught = caught
            with self._wrapped(forward_w, step_w, scale_w if scale is not None else None):
                try:
                    result = self.pipe(*args, **kwargs)
                finally:
                    watch.stop()
        for w in caught:  # pass on what the pipeline warned, minus the sync probes
            if not any(w is ours for ours in watch.ours):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        trace = rec.trace
        if rec.problem is None and watch.culprit is not None:
            rec.fail(watch.culprit)
        if rec.problem is None:
            events = trace.events
            if not events or events[-1].kind != "step":
                rec.fail("no denoising loop was seen (no call of the model followed by scheduler.step)")
            elif not any(e.kind == "model" for e in events):
                rec.fail("no model call was seen inside the loop")
        trace.reason = rec.problem
        trace.host_timesteps = _host_timesteps(self.scheduler)
        # The drop-ins draw a loop seed at the first noisy step that uses their own noise.
        trace.stochastic = getattr(self.scheduler, "_ff_seed", None) is not None
        return trace, result

    # ------------------------------------------------------------------ capture
    def _run_trace(self, trace: _Trace, originals: tuple, probe: Callable[[str], None] | None = None) -> Any:
        """The recorded loop on the static buffers (warm-up and capture); returns the last step's output."""
        forward, step, scale = originals
        latents = trace.x0
        scaled = latents
        model_out = None
        final = None
        for k, ev in enumerate(trace.events):
            values = {"chain": latents, "scaled": scaled, "model_out": model_out}
            a = [_value(x, trace, values, ev.kind) for x in ev.args]
            kw = {name: _value(x, trace, values, ev.kind) for name, x in ev.kwargs.items()}
            if ev.kind == "model":
                model_out = _field(forward(*a, **kw), ev.out_key)
            elif ev.kind == "scale":
                scaled = scale(*a, **kw)
            else:
                final = step(*a, **kw)
                latents = scaled = _field(final, ev.out_key)
            if probe is not None:
                probe(f"{_LABELS[ev.kind]} at loop call {k}")
        return final

    def _capture(self, trace: _Trace) -> None:
        originals = self._originals()
        scheduler = self.scheduler
        device = self.device
        if trace.stochastic and hasattr(scheduler, "_ff_seed_tensor"):
            # The drop-in caches the seed tensor its steps read; creating it now makes it a static buffer.
            trace.seeds = scheduler._ff_seed_tensor(trace.x0.shape[0], trace.x0.device)
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
        events = trace.events
        state: dict[str, Any] = {"k": 0, "latents": None, "scaled": None, "model_out": None, "done": False}
        loaded: set[int] = set()

        def diverged(why: str) -> None:
            trace.reason = f"the pipeline's loop diverged from the recorded one: {why}"
            trace.release()
            raise RuntimeError(
                f"{trace.reason}; this call cannot be completed from the graph (the next one runs eagerly)"
            )

        def begin(kind: str, a: tuple, kw: dict) -> _Event:
            k = state["k"]
            if k >= len(events):
                diverged(f"more loop calls than the {len(events)} recorded")
            ev = events[k]
            if ev.kind != kind:
                diverged(f"loop call {k} is {_LABELS[kind]}, recorded {_LABELS[ev.kind]}")
            if k == 0 and not _same_host(_host_timesteps(self.scheduler), trace.host_timesteps):
                diverged("the scheduler's timesteps differ from the recorded ones")
            if kind == "step":
                o = a[0] if a else kw.get("model_output")
                sample = a[2] if len(a) > 2 else kw.get("sample")
                if o is not state["model_out"]:
                    diverged(f"scheduler.step at loop call {k} does not take the model's output as returned")
                if sample is not state["latents"]:
                    diverged(f"scheduler.step at loop call {k} does not take the latents of the previous step")
            else:
                name, chain = _find_chain(a, kw)
                if name != ev.chain_in:
                    diverged(f"loop call {k} takes its latents as {name!r}, recorded {ev.chain_in!r}")
                if state["latents"] is None:
                    x0 = trace.x0
                    if not isinstance(chain, torch.Tensor) or chain.shape != x0.shape or chain.dtype != x0.dtype:
                        diverged("the initial latents differ in shape or dtype from the recorded ones")
                    x0.copy_(chain)
                    state["latents"] = state["scaled"] = chain
                want = "scaled" if kind == "model" and _chain_kind(ev) == "scaled" else "latents"
                if chain is not state[want]:
                    diverged(f"loop call {k} does not take the latents the previous call returned")
            _load_inputs(trace, ev, a, kw, diverged, k, loaded)
            state["k"] = k + 1
            return ev

        def forward_r(*a: Any, **kw: Any) -> Any:
            ev = begin("model", a, kw)
            shape, dtype = ev.out_meta[ev.out_key]
            state["model_out"] = trace.placeholder("model_out", shape, dtype)
            return _rebuild(ev.template, {ev.out_key: state["model_out"]})

        def scale_r(*a: Any, **kw: Any) -> Any:
            ev = begin("scale", a, kw)
            if not ev.identity:
                x0 = trace.x0
                state["scaled"] = trace.placeholder("scaled", x0.shape, x0.dtype)
            return state["scaled"]

        def step_r(*a: Any, **kw: Any) -> Any:
            ev = begin("step", a, kw)
            if state["k"] == len(events):
                if trace.seeds is not None:
                    _write_seeds(trace.seeds)
                trace.graph.replay()
                self.replays += 1
                state["done"] = True
                _, items = _tensor_fields(trace.outputs)
                return _rebuild(trace.outputs, {key: t.clone() for key, t in items})
            parts = {key: trace.placeholder(f"step.{key}", *meta) for key, meta in ev.out_meta.items()}
            state["latents"] = state["scaled"] = parts[ev.out_key]
            return _rebuild(ev.template, parts)

        _, _, scale = self._originals()
        with self._wrapped(forward_r, step_r, scale_r if scale is not None else None):
            result = self.pipe(*args, **kwargs)
        if not state["done"]:
            trace.reason = "the pipeline ended before the recorded loop's last step"
            trace.release()
            raise RuntimeError(f"{trace.reason}; its result came from placeholders (the next call runs eagerly)")
        self.reason = None
        return result


# ----------------------------------------------------------------------------- helpers
_LABELS = {"model": "the model call", "step": "scheduler.step", "scale": "scheduler.scale_model_input"}


class _GapWatch:
    """CUDA sync warnings in the pipeline's own code between two loop calls (data-dependent branches, ``.item()``)."""

    def __init__(self, enabled: bool):
        self.caught: list = []
        self.enabled = enabled
        self.active = False
        self.mark = 0
        self.culprit: str | None = None
        self.ours: list = []
        self.previous = 0

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
        return found

    def close(self, rec: _Recorder, kind: str) -> None:
        if not self.active:
            return
        found = self._collect()
        if found and self.culprit is None:
            self.culprit = (
                f"the pipeline's own code between {rec.last_label} and the next {_LABELS[kind]} "
                f"synchronizes with the host ({str(found[0].message).strip()})"
            )

    def stop(self) -> None:
        """After the pipeline returns: the code after the last step is outside the loop, so it is not judged."""
        if self.active:
            self._collect()


def _chain_kind(ev: _Event) -> str:
    for arg in [*ev.args, *ev.kwargs.values()]:
        if arg.kind in ("chain", "scaled"):
            return arg.kind
    return "chain"


def _step_parts(call_args: tuple, call_kwargs: dict) -> tuple[Any, Any]:
    o = call_args[0] if call_args else call_kwargs.get("model_output")
    sample = call_args[2] if len(call_args) > 2 else call_kwargs.get("sample")
    return o, sample


def _note(rec: _Recorder, kind: str, call_args: tuple, call_kwargs: dict) -> None:
    """Record one loop call's inputs and check that it continues the chain (latents -> model -> step)."""
    events = rec.trace.events
    if kind == "step":
        o, sample = _step_parts(call_args, call_kwargs)
        if o is None or o is not rec.model_out:
            raise _Uncapturable(
                "the step does not take the model's output as the model returned it (the pipeline transforms it in "
                "its own code, e.g. classifier-free guidance, which a graph of model calls and steps would miss)"
            )
        if sample is None or sample is not rec.chain:
            raise _Uncapturable("the step does not take the latents the previous step returned")
        roles = {0: "model_out", 2: "chain", "model_output": "model_out", "sample": "chain"}
        args = [_Arg(roles[i]) if i in roles else rec.classify(v) for i, v in enumerate(call_args)]
        kwargs = {n: _Arg(roles[n]) if n in roles else rec.classify(v) for n, v in call_kwargs.items()}
        events.append(_Event("step", args, kwargs, chain_in=2 if len(call_args) > 2 else "sample"))
        return
    name, chain = _find_chain(call_args, call_kwargs)
    if not isinstance(chain, torch.Tensor):
        raise _Uncapturable("no latents tensor among its arguments")
    role = "chain"
    if not events:
        if chain.device != rec.device:
            raise _Uncapturable(f"the initial latents are on {chain.device}, the model on {rec.device}")
        rec.trace.x0 = chain.detach().clone()
        rec.chain = chain
    elif kind == "scale":
        if chain is not rec.chain:
            raise _Uncapturable("scale_model_input does not take the latents the previous step returned")
    elif chain is rec.chain:
        role = "chain"
    elif rec.scaled is not None and chain is rec.scaled:
        role = "scaled"
    else:
        raise _Uncapturable(
            "the model does not take the latents the previous step returned (the pipeline changes them in its own "
            "code, e.g. torch.cat([latents] * 2) for classifier-free guidance)"
        )
    if kind == "model" and events and events[-1].kind == "model":
        raise _Uncapturable("two model calls without a step between them")
    args = [_Arg(role) if i == name else rec.classify(v, for_model=kind == "model") for i, v in enumerate(call_args)]
    kwargs = {
        n: _Arg(role) if n == name else rec.classify(v, for_model=kind == "model") for n, v in call_kwargs.items()
    }
    events.append(_Event(kind, args, kwargs, chain_in=name))


def _note_output(rec: _Recorder, kind: str, out: Any, call_args: tuple, call_kwargs: dict) -> None:
    ev = rec.trace.events[-1]
    if kind == "scale":
        if not isinstance(out, torch.Tensor):
            raise _Uncapturable("scale_model_input did not return a tensor")
        ev.identity = out is _find_chain(call_args, call_kwargs)[1]
        rec.scaled = out
        return
    _, items = _tensor_fields(out)
    if not items:
        raise _Uncapturable(f"{_LABELS[kind]} returned no tensor")
    keys = [key for key, _ in items]
    key = "prev_sample" if kind == "step" and "prev_sample" in keys else keys[0]
    ev.out_key = key
    ev.out_meta = {k: (tuple(t.shape), t.dtype) for k, t in items}
    ev.template = _rebuild(out, {k: None for k in keys})
    tensor = dict(items)[key]
    if kind == "model":
        if len(items) != 1:
            raise _Uncapturable("the model returned several tensors; only single-output denoisers are captured")
        rec.model_out = tensor
    else:
        rec.chain = tensor
        rec.scaled = None


def _value(arg: _Arg, trace: _Trace, values: dict, kind: str) -> Any:
    if arg.kind in values:
        return values[arg.kind]
    if arg.kind == "buffer":
        return trace.buffers[arg.buffer]
    if kind == "model" and arg.device_copy is not None:
        return arg.device_copy
    return arg.host


def _field(out: Any, key: Any) -> torch.Tensor:
    if key is None:
        return out
    if isinstance(out, tuple):
        return out[key]
    return getattr(out, key)


def _load_inputs(
    trace: _Trace, ev: _Event, call_args: tuple, call_kwargs: dict, diverged: Callable, k: int, loaded: set[int]
) -> None:
    """Copy this call's device inputs into the static buffers; check its host constants against the recording."""
    if len(call_args) != len(ev.args) or set(call_kwargs) != set(ev.kwargs):
        diverged(f"loop call {k} has different arguments than recorded")
    pairs = [*zip(ev.args, call_args, strict=True), *((ev.kwargs[n], v) for n, v in call_kwargs.items())]
    for arg, value in pairs:
        if arg.kind == "buffer":
            buf = trace.buffers[arg.buffer]
            if not isinstance(value, torch.Tensor) or value.shape != buf.shape or value.dtype != buf.dtype:
                diverged(f"an input of loop call {k} changed shape or dtype")
            if arg.buffer not in loaded:
                buf.copy_(value)
                loaded.add(arg.buffer)
        elif arg.kind == "host" and not _same_host(value, arg.host):
            diverged(f"a host input of loop call {k} changed ({value!r} vs {arg.host!r})")


def _same_host(a: Any, b: Any) -> bool:
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
    ``prior``, ``decoder``). See the module docstring for what is captured.
    """
    return CapturedPipeline(pipe, model_attr=model_attr, max_graphs=max_graphs, warmup=warmup)
