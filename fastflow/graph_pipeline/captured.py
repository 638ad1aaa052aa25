"""``CapturedPipeline``: a pipeline call recorded, captured into a CUDA graph, and replayed on later calls."""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.utils._pytree as pytree

from .._capture import WarnedTexts, probing_syncs, user_stacklevel
from .loop_ops import GapWatch, LoopOps, after_loop_op, new_tensors, record_op, stale_use
from .params import is_float, make_param_values, param_mul, write_params
from .recording import (
    LEAF_TYPES,
    Diverged,
    Event,
    Recorder,
    RngState,
    Trace,
    Uncapturable,
    call_signature,
    describe,
    describe_call,
    flat_args,
    leaves_and_spec,
    loop_call_label,
    loosen,
    note,
    note_output,
    resolve,
    uses_any,
)

_MODEL_ATTRS = ("unet", "transformer", "prior", "decoder")
# Networks a loop calls besides the denoiser, at every step: their calls are loop calls too (a ControlNet's
# residuals go into the denoiser), captured into the graph rather than recorded op by op.
_AUX_MODEL_ATTRS = ("controlnet",)
_CALLBACK_KWARGS = ("callback", "callback_on_step_end", "callback_steps")
_WARNED = WarnedTexts()
# Signatures remembered as replaying another capture (they differ from it only in float or string values: every
# new prompt or guidance scale makes one). Least recently used first out: a forgotten one finds its capture again
# through _sibling, so the bound costs a lookup, and a server seeing endless prompts keeps a bounded table.
_MAX_ALIASES = 64


class PipelineFallbackWarning(UserWarning):
    """A pipeline call runs eagerly because its loop cannot be captured; the message says why."""


def _warn_once(reason: str) -> None:
    if _WARNED.first(reason):
        warnings.warn(
            f"fastflow.graph_pipeline: running the pipeline eagerly: {reason}",
            PipelineFallbackWarning,
            stacklevel=user_stacklevel(),
        )


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
        self._traces: OrderedDict[tuple, Trace] = OrderedDict()
        # signature -> the captured signature whose graph it replays (it differs only in parameters' values)
        self._aliases: OrderedDict[tuple, tuple] = OrderedDict()

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
            from ..diffusers import FastflowScheduler
        except ImportError as exc:
            reasons.append(f"fastflow.diffusers is not importable ({exc})")
        else:
            if not isinstance(self.scheduler, FastflowScheduler):
                reasons.append(
                    f"the scheduler {type(self.scheduler).__name__} is not a fastflow drop-in: diffusers' own steps "
                    "sync with the host and keep Python-side state (use fastflow.diffusers.from_scheduler)"
                )
            elif self.scheduler.diffusers_noise:
                reasons.append(
                    "the drop-in draws diffusers' noise from torch's global generator (diffusers_noise=True); a "
                    "replay renews only fastflow's own noise"
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
        # Weak references, not id(): a new network or scheduler at a freed one's address is another object (its
        # loop a new capture, not a replay that diverges and leaves the signature eager for good).
        return (
            tuple(weakref.ref(net) for net in self._networks().values()),
            weakref.ref(self.scheduler),
            type(self.scheduler).__name__,
            call_signature(args),
            call_signature(dict(kwargs)),
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
            if found is not key:
                self._aliases.move_to_end(key)
            if trace.reason is not None:
                return self._eager(trace.reason, args, kwargs)
            return self._replay(trace, args, kwargs)
        self._aliases.pop(key, None)
        sibling_key = self._sibling(key)
        if sibling_key is not None:
            # The same call but for floats or strings (a guidance scale, a prompt): replay that capture, with this
            # call's parameter values and inputs.
            rng = RngState(args, kwargs, self.device)
            try:
                result = self._replay_once(self._traces[sibling_key], args, kwargs)
            except Diverged:
                rng.restore()  # a float or string reached the loop's structure or constants: record this call
            else:
                self._aliases[key] = sibling_key
                while len(self._aliases) > _MAX_ALIASES:
                    self._aliases.popitem(last=False)
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
            except Uncapturable as exc:
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
        loose = loosen(key)
        return next((k for k, t in reversed(self._traces.items())
                     if t.reason is None and t.graph is not None and loosen(k) == loose), None)

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
    def _record(self, args: tuple, kwargs: dict) -> tuple[Trace, Any]:
        forwards, step, scale = self._originals()
        rec = Recorder(self.device)
        watch = rec.watch = GapWatch(rec.device.type == "cuda" and torch.cuda.is_available())
        ops = LoopOps(lambda func, a, k: record_op(rec, func, a, k))
        after = LoopOps(lambda func, a, k: after_loop_op(rec, func, a, k))
        scheduler = self.scheduler

        def record(kind: str, fn: Callable, call_args: tuple, call_kwargs: dict) -> Any:
            # From the first loop call on, the pipeline's own tensor operations are recorded; the
            # loop calls themselves (the model, the step) run without the mode.
            ops.stop()
            watch.close(rec, kind)
            label = f"{loop_call_label(kind)} at loop call {len(rec.trace.events)}"
            if rec.overflow is not None:
                rec.fail(rec.overflow)
            if rec.done:  # the scheduler said its loop was over: the operations since were not recorded
                rec.fail(f"{label} comes after the scheduler's last step")
            rec.ops_since_call = 0
            if not rec.trace.events:  # the loop's first call: what its steps are built from, as it starts
                rec.trace.scheduler_settings = _scheduler_settings(scheduler)
                rec.trace.host_sigmas = _host_sigmas(scheduler)
            try:
                if rec.problem is None:
                    note(rec, kind, call_args, call_kwargs)
            except Uncapturable as exc:
                rec.fail(f"{label}: {exc}")
            out = fn(*call_args, **call_kwargs)
            if kind == "step" and rec.trace.first_step is None:
                index = getattr(scheduler, "step_index", None)
                rec.trace.first_step = index - 1 if isinstance(index, int) else None
            try:
                if rec.problem is None:
                    note_output(rec, kind, out)
            except Uncapturable as exc:
                rec.fail(f"{label}: {exc}")
            rec.last_label = label
            if kind == "step" and _loop_finished(scheduler):
                rec.done = True
                after.start()
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
                    after.stop()
                    watch.stop()
        if rec.done and rec.problem is None and stale_use((pytree.tree_leaves(result),), {}, rec):
            rec.fail("the pipeline returns a tensor of the loop other than its last step's outputs, which a graph "
                     "does not keep")
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
    def _run_trace(self, trace: Trace, originals: tuple, probe: Callable[[str], None] | None = None) -> Any:
        """The recorded loop on the static buffers (warm-up and capture); returns the last step's output.

        The scheduler's step counter starts at the recorded loop's first step and is put back after, so these runs
        leave the scheduler as they found it: a loop that stops before its schedule's end (SDXL's
        ``denoising_end``) leaves the counter mid-schedule, where a run would otherwise go on with the steps after
        the recorded ones."""
        scheduler = self.scheduler
        kept = getattr(scheduler, "_step_index", None)
        if trace.first_step is not None:
            scheduler._step_index = trace.first_step
        try:
            return self._run_events(trace, originals, probe)
        finally:
            if trace.first_step is not None:
                scheduler._step_index = kept

    def _run_events(self, trace: Trace, originals: tuple, probe: Callable[[str], None] | None) -> Any:
        forwards, step, scale = originals
        calls = {**forwards, "step": step, "scale": scale}
        values: list[Any] = [None] * len(trace.value_meta)
        final = None
        for k, ev in enumerate(trace.events):
            leaves = [resolve(arg, trace, values, ev.kind) for arg in ev.args]
            a, kw = pytree.tree_unflatten(leaves, ev.spec)
            if ev.kind != "op":
                out = calls[ev.kind](*a, **kw)
            else:  # a parameter is one of the two positional arguments of a multiplication (see record_op)
                factor = next((j for j, arg in enumerate(ev.args) if arg.kind == "param"), None)
                out = ev.func(*a, **kw) if factor is None else param_mul(a[1 - factor], a[factor])
            out_leaves = pytree.tree_leaves(out)
            if len(out_leaves) != len(ev.outs):
                raise Uncapturable(f"{describe(ev)} at loop call {k} returned a different structure than recorded")
            for index, leaf in zip(ev.outs, out_leaves, strict=True):
                if index is not None:
                    values[index] = leaf
            if ev.kind == "step":
                final = out
            if probe is not None:
                probe(f"{describe(ev)} at loop call {k}")
        return final

    def _capture(self, trace: Trace) -> None:
        originals = self._originals()
        scheduler = self.scheduler
        device = self.device
        if trace.stochastic and hasattr(scheduler, "_ff_seed_tensor"):
            # The drop-in caches the seed tensor its steps read; creating it now makes it a static buffer.
            trace.seeds = scheduler._ff_seed_tensor(trace.batch, trace.device)
        make_param_values(trace)
        with torch.cuda.device(device), torch.no_grad():
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            culprit = None
            with torch.cuda.stream(side):
                for _ in range(self.warmup - 1):
                    self._run_trace(trace, originals)
                with probing_syncs() as probe:
                    self._run_trace(trace, originals, probe.mark)
                culprit = probe.culprit
            torch.cuda.current_stream(device).wait_stream(side)
            torch.cuda.synchronize(device)
            if culprit is not None:
                raise Uncapturable(culprit)
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
                    raise Uncapturable(f"capture failed: {type(exc).__name__}: {exc}") from exc
                try:
                    graph.capture_end()
                except Exception as exc:
                    raise Uncapturable(f"capture failed: {type(exc).__name__}: {exc}") from exc
            trace.memory_bytes = max(0, torch.cuda.memory_reserved(device) - before)
        trace.graph = graph
        trace.outputs = final
        # The graph reads device tensors the scheduler made outside it (coefficient tables, seeds, step
        # counters); set_timesteps replaces the scheduler's dicts of them, so hold this generation alive.
        trace.keep = _held(vars(scheduler))

    # ------------------------------------------------------------------ replay
    def _replay(self, trace: Trace, args: tuple, kwargs: dict) -> Any:
        """A call from the graph; if the pipeline's loop turns out to differ from the recording, the call is run
        again eagerly from the same random state (as if it had never been replayed), and so are later ones."""
        rng = RngState(args, kwargs, self.device)
        try:
            return self._replay_once(trace, args, kwargs)
        except Diverged as exc:
            trace.reason = str(exc)
            trace.release()
            rng.restore()
            return self._eager(trace.reason, args, kwargs)

    def _replay_once(self, trace: Trace, args: tuple, kwargs: dict) -> Any:
        events = trace.events
        state: dict[str, Any] = {"k": 0, "done": False}
        loaded: dict[int, tuple[torch.Tensor, int]] = {}  # static buffer -> the tensor loaded into it, its version
        live: dict[int, int] = {}  # id(placeholder) -> loop value, for the placeholders handed out so far
        params = list(trace.params)  # this call's parameter values, as its operations come

        def diverged(why: str) -> None:
            raise Diverged(f"the pipeline's loop diverged from the recorded one: {why}")

        def take(kind: str, func: Any, a: tuple, kw: dict) -> Event:
            """Match this call against the next recorded event; load its outside inputs into the static buffers."""
            k = state["k"]
            if k >= len(events):
                diverged(f"more loop calls than the {len(events)} recorded")
            ev = events[k]
            if ev.kind != kind or (kind == "op" and ev.func != func):
                diverged(f"loop call {k} is {describe_call(kind, func)}, recorded {describe(ev)}")
            if k == 0 and not _same_host(_host_timesteps(self.scheduler), trace.host_timesteps):
                diverged("the scheduler's timesteps differ from the recorded ones")
            if k == 0 and getattr(self.scheduler, "begin_index", None) != trace.begin_index:
                # the graph's steps are the recorded ones; a timestep tensor on the device is not compared
                diverged("the scheduler's first step (begin_index) differs from the recorded one")
            if k == 0:
                changed = _changed_settings(self.scheduler, trace.scheduler_settings)
                if changed:  # the graph steps with the tables built at its capture
                    diverged(f"the scheduler's {', '.join(changed)} changed since the loop was captured (call "
                             "fast.release() after reconfiguring a scheduler in place)")
                if not _same_host(_host_sigmas(self.scheduler), trace.host_sigmas):
                    diverged("the scheduler's sigmas differ from the recorded ones (edited after set_timesteps)")
            leaves = flat_args(a, kw) if ev.flat == (len(a), tuple(kw)) else None
            if leaves is None:  # arguments with structure: compare it whole
                leaves, spec = leaves_and_spec((a, kw))
                if spec != ev.spec:
                    diverged(f"loop call {k} ({describe(ev)}) has different arguments than recorded")
            for arg, leaf in zip(ev.args, leaves, strict=True):
                if arg.kind == "value":
                    if not isinstance(leaf, torch.Tensor) or live.get(id(leaf)) != arg.index:
                        diverged(f"loop call {k} ({describe(ev)}) does not take the tensors the recorded loop gave it")
                elif arg.kind == "buffer":
                    buf = trace.buffers[arg.index]
                    if not isinstance(leaf, torch.Tensor) or leaf.shape != buf.shape or leaf.dtype != buf.dtype:
                        diverged(f"an input of loop call {k} ({describe(ev)}) changed shape or dtype")
                    first = loaded.get(arg.index)
                    if first is None:
                        buf.copy_(leaf)
                        loaded[arg.index] = (leaf, leaf._version)
                    elif first[0] is not leaf or first[1] != leaf._version:
                        # the recording passed one unchanged tensor at both places: the graph reads one buffer
                        diverged(f"loop call {k} ({describe(ev)}) takes another tensor, or one changed in place, "
                                 "where the recorded loop passed again a tensor it had already taken")
                elif arg.kind == "param":
                    if not is_float(leaf):
                        diverged(f"loop call {k} ({describe(ev)}) multiplies by {leaf!r}, recorded a float")
                    params[arg.index] = float(leaf)
                elif not _same_host(leaf, arg.host):
                    diverged(f"a host input of loop call {k} ({describe(ev)}) changed ({leaf!r} vs {arg.host!r})")
            state["k"] = k + 1
            return ev

        def placeholders(ev: Event) -> Any:
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
                if kind == "step" and trace.seeds is not None and "seed" not in state:
                    state["seed"] = _loop_seed(self.scheduler, a, kw)  # at the first step, as the drop-in takes it
                if kind == "step" and state["k"] == len(events):
                    ops.stop()
                    if trace.seeds is not None:
                        _write_seeds(trace.seeds, state["seed"])
                    write_params(trace, params)
                    trace.graph.replay()
                    state["done"] = True
                    return pytree.tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, trace.outputs)
                return placeholders(ev)

            return call

        def op(func: Any, a: tuple, kw: dict) -> Any:
            if state["done"] or not uses_any(a, kw, live):
                return func(*a, **kw)
            k = state["k"]
            if k < len(events) and events[k].kind == "op" and events[k].func == func:
                return placeholders(take("op", func, a, kw))
            out = func(*a, **kw)  # a read of metadata (shape, dtype) is fine; new tensors are not in the graph
            if new_tensors(out, pytree.tree_leaves((a, kw))):
                diverged(f"the pipeline's code calls {describe_call('op', func)} on loop tensors at loop call {k}, "
                         "which the recorded loop does not")
            return out

        ops = LoopOps(op)
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
            raise Diverged("the pipeline ended before the recorded loop's last step")
        if uses_any((pytree.tree_leaves(result),), {}, live):  # a stand-in holds no data (see after_loop_op)
            diverged("the pipeline returns a tensor of the loop other than its last step's outputs")
        self.replays += 1  # counted once the call is over: a loop found longer after the replay is rerun eagerly
        self.reason = None
        return result


def _held(value: Any, depth: int = 4) -> Any:
    """``value`` with its dicts, lists and tuples copied (``depth`` levels down): a capture's hold on the tensors the
    graph reads must outlive in-place changes of the scheduler's own containers, such as ``_ff_row`` replacing a
    shorter noise counter tensor in the dict it keeps across schedules (freed, its memory would be reused while a
    replay still reads it)."""
    if depth and isinstance(value, dict):
        return {k: _held(v, depth - 1) for k, v in value.items()}
    if depth and isinstance(value, (list, tuple)):
        return [_held(v, depth - 1) for v in value]
    return value


_SCHEDULER_OPTIONS = ("backend", "compute_pred_original_sample", "diffusers_noise")


def _scheduler_settings(scheduler: Any) -> dict[str, Any]:
    """What a drop-in's steps are built from besides its timesteps: its config and its own options. A graph keeps the
    tables built at its capture, so the same scheduler reconfigured in place (the same signature) is not replayed."""
    config = getattr(scheduler, "config", None)
    # the config's attributes, as the drop-in follows them (_ff_follow_edits): a pipeline may set one on the frozen
    # config (Stable Cascade's ``config.clip_sample = False``), which its items do not show
    settings = dict(vars(config)) if config is not None else {}
    settings.update({f"option {name}": getattr(scheduler, name, None) for name in _SCHEDULER_OPTIONS})
    return settings


def _changed_settings(scheduler: Any, recorded: dict[str, Any]) -> list[str]:
    """The names of the settings (:func:`_scheduler_settings`) that differ from the recorded ones."""
    now = _scheduler_settings(scheduler)
    return [name for name in sorted(now.keys() | recorded.keys())
            if name not in now or name not in recorded or not _same_host(now[name], recorded[name])]


def _loop_finished(scheduler: Any) -> bool:
    """Whether the drop-in scheduler has taken the last step of its loop (its step counter says so)."""
    index = getattr(scheduler, "step_index", None)
    total = getattr(scheduler, "_ff_num_steps", None)
    return index is not None and total is not None and index >= total()


def _same_host(a: Any, b: Any) -> bool:
    if type(a) is type(b) and type(a) in LEAF_TYPES:  # None, numbers, strings: the common host constants
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


def _host_sigmas(scheduler: Any) -> torch.Tensor | None:
    """The sigmas a drop-in's loop starting now is built from, as host values: a pipeline may edit them in place
    between ``set_timesteps`` and its loop (Cosmos 2's ``sigmas[-1] = sigmas[-2]``), which the drop-in follows and a
    graph keeps. Unedited, this reads nothing from the device; an edited tensor is read once, as the eager step does."""
    now = getattr(scheduler, "_ff_sigmas_now", None)
    return now() if now is not None else None


def _host_timesteps(scheduler: Any) -> Any:
    host = getattr(scheduler, "_ff_host_timesteps", None)
    if host is not None:
        return host.copy()
    ts = getattr(scheduler, "timesteps", None)
    if isinstance(ts, torch.Tensor) and ts.device.type == "cpu":
        return ts.clone()
    return None


def _loop_seed(scheduler: Any, args: tuple, kwargs: dict) -> int:
    """The seed of a replayed loop's in-kernel noise, taken as the eager drop-in takes it at its first step: the one
    its schedule fixes (DPMSolverSDE's ``noise_sampler_seed``, folded in by ``set_timesteps``) or the step's generator
    gives (CosineDPMSolverMultistep's), else a fresh one from torch's global CPU generator. (A fresh one in every
    case would give other noise than the eager call of the same seed.)"""
    seed_from = getattr(scheduler, "_ff_seed_from", None)
    if seed_from is not None:
        try:
            bound = inspect.signature(type(scheduler).step).bind(scheduler, *args, **kwargs)
        except TypeError:  # the step itself raises for these arguments; the recording ran it fine
            bound = None
        seed_from(None if bound is None else bound.arguments.get("generator"))
    return scheduler._ff_loop_seed()


def _write_seeds(seeds: torch.Tensor, seed: int) -> None:
    host = torch.arange(seeds.shape[0], dtype=torch.int64) + seed
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
