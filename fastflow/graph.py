"""Whole-loop CUDA graph capture: every model call and every step of a sampling loop, replayed as one graph.

A small model's eager loop is bound by kernel launches from Python: its GPU sits
idle while the host issues hundreds of tiny kernels per step. fastflow's steps
never sync the host and read their row of the coefficient table on the device,
so the whole loop (model calls included) can be recorded once with
``torch.cuda.CUDAGraph`` and replayed with a single launch.

What a replay can change without recapture, because each lives in a static device
buffer that is updated in place before ``graph.replay()``:

* the initial state (``noise=``) or the per-sample seeds it is drawn from (``seed=``);
* the per-sample seeds the stochastic stages draw their noise from;
* the conditioning tensors handed to the model (``cond=``);
* the guidance scale (column ``W`` of the loop's private coefficient table).

Anything that changes the recorded work (steps, solver, schedule, shape, dtypes,
backend) needs a new capture; :class:`GraphCache` keeps a bounded number of them.

Memory: each capture owns one private CUDA memory pool. Tensors freed during the
capture are reused inside it, so the pool peaks at about one eager loop's working
set (one model call's activations, the state, the solver's history), not
``steps`` times that. The pool is returned to PyTorch's caching allocator when the
capture is released (:meth:`CapturedLoop.release`, or eviction from a
:class:`GraphCache`). :attr:`CapturedLoop.memory_bytes` reports its size.

Where the loop cannot be captured (a CPU device, a backend that is not
capture-safe, a model or backend that syncs with the host, a failed capture),
:class:`CapturedLoop` runs the eager loop instead, bitwise equal to
:func:`fastflow.sample`, sets ``.reason`` and warns once per reason.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from . import noise as noise_spec
from ._capture import SyncProbe, WarnedTexts, probing_syncs, user_stacklevel
from .backends import resolve_backend
from .plan import W
from .runner import PlanRunner
from .sampler import Sampler

__all__ = ["CaptureFallbackWarning", "CapturedLoop", "GraphCache", "capture", "capture_blockers"]

Cond = torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor] | None
Seed = int | Sequence[int] | torch.Tensor


_WARNED = WarnedTexts()


class CaptureFallbackWarning(UserWarning):
    """A loop runs eagerly because it could not be captured; the message says why."""


class _NotCapturable(Exception):
    """Internal: the loop runs fine eagerly but cannot be recorded into a graph."""


def _warn_once(reason: str) -> None:
    if _WARNED.first(reason):
        warnings.warn(
            f"fastflow.graph: running the eager loop: {reason}", CaptureFallbackWarning, stacklevel=user_stacklevel()
        )


# ----------------------------------------------------------------------------- validation helpers
def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if not isinstance(shape, Sequence) or any(
        isinstance(s, bool) or not isinstance(s, (int, np.integer)) for s in shape
    ):
        raise TypeError(f"shape must be a sequence of ints, got {shape!r}")
    out = tuple(int(s) for s in shape)
    if len(out) < 1 or any(s < 1 for s in out):
        raise ValueError(f"shape needs a batch dimension and positive sizes, got {out}")
    return out


def _check_sampler(sampler: Any) -> None:
    if not isinstance(sampler, Sampler):
        raise TypeError(f"sampler must be a fastflow.Sampler, got {type(sampler).__name__}")


def _check_float_dtype(name: str, dtype: torch.dtype | None) -> None:
    if dtype is None:
        return
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating torch.dtype, got {dtype!r}")


def _cond_items(cond: Cond) -> tuple[str, list[tuple[Any, torch.Tensor]]]:
    """``cond`` as (kind, [(key, tensor)]): kind is none, tensor, seq or map; keys are positions or names."""
    if cond is None:
        return "none", []
    if isinstance(cond, torch.Tensor):
        return "tensor", [(0, cond)]
    if isinstance(cond, Mapping):
        # by name: the model gets them as keywords, whose order means nothing (a capture per order would be a waste)
        items = sorted(cond.items(), key=lambda kv: str(kv[0]))
        kind = "map"
    elif isinstance(cond, Sequence) and not isinstance(cond, (str, bytes)):
        items = list(enumerate(cond))
        kind = "seq"
    else:
        raise TypeError(f"cond must be a tensor, a sequence of tensors or a dict of tensors, got {type(cond).__name__}")
    for key, value in items:
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"cond[{key!r}] must be a tensor, got {type(value).__name__}")
    return kind, items


def _cond_signature(cond: Cond) -> tuple:
    kind, items = _cond_items(cond)
    return (kind, tuple((key, tuple(t.shape), t.dtype) for key, t in items))


def _settle(device: torch.device) -> None:
    """After a failed capture: wait for the device, ignoring the capture's own (non-sticky) error."""
    with contextlib.suppress(Exception):  # the error was already reported as the fallback reason
        torch.cuda.synchronize(device)


def capture_blockers(sampler: Sampler, device: torch.device | str, dtype: torch.dtype = torch.float32) -> list[str]:
    """Why a loop of ``sampler`` on ``device`` cannot be captured (empty when nothing static prevents it).

    Only what is known before running anything; syncs inside the model or the
    backend are found during warm-up.
    """
    device = torch.device(device)
    reasons = []
    if device.type != "cuda":
        reasons.append(f"CUDA graphs need a CUDA device; the loop is on {device}")
    elif not torch.cuda.is_available():
        reasons.append("CUDA is not available (no device, or a CPU-only torch build)")
    try:
        backend = resolve_backend(sampler.backend, device, dtype)
    except Exception as exc:  # the reason is reported, not raised: eager reports it again if it runs
        reasons.append(f"backend {sampler.backend!r} cannot run on {device}: {exc}")
    else:
        if not getattr(backend, "capturable", True):
            why = getattr(backend, "capture_reason", None) or "it declares itself not capture-safe"
            reasons.append(f"the {backend.name!r} backend cannot be captured: {why}")
    return reasons


# ----------------------------------------------------------------------------- the captured loop
def _checked_arguments(
    model_fn: Any, sampler: Any, shape: Sequence[int], device: torch.device | str, dtype: torch.dtype,
    model_dtype: torch.dtype | None, warmup: Any,
) -> tuple[tuple[int, ...], torch.device]:
    """A capture's arguments checked before any work (``(shape, device)``, the device with its index): what can be
    refused at once is, so :class:`GraphCache` evicts nothing for a call that cannot capture."""
    if not callable(model_fn):
        raise TypeError(f"model_fn must be callable, got {type(model_fn).__name__}")
    _check_sampler(sampler)
    shape = _check_shape(shape)
    _check_float_dtype("dtype", dtype)
    _check_float_dtype("model_dtype", model_dtype)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
        raise ValueError(f"warmup must be an int >= 1 (CUDA graphs need an eager run first), got {warmup!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested, but CUDA is not available")
    try:
        resolve_backend(sampler.backend, device, dtype)
    except RuntimeError as exc:
        raise ValueError(f"this sampler cannot run on {device}: {exc}") from exc
    return shape, device


class CapturedLoop:
    """A sampling loop recorded once as a CUDA graph and replayed per call (or run eagerly, see ``reason``).

    Build one with :func:`capture`. Call it with new initial noise or seeds, new
    conditioning and a new guidance scale; it returns the final state (a clone of
    the static output buffer unless ``copy=False``).
    """

    def __init__(
        self,
        model_fn: Callable[..., Any],
        sampler: Sampler,
        shape: Sequence[int],
        *,
        device: torch.device | str,
        dtype: torch.dtype = torch.float32,
        model_dtype: torch.dtype | None = None,
        cond: Cond = None,
        guidance_scale: float | None = None,
        warmup: int = 2,
        check_syncs: bool = True,
    ):
        self.shape, self.device = _checked_arguments(model_fn, sampler, shape, device, dtype, model_dtype, warmup)
        if guidance_scale is not None:
            self._check_guidance(sampler, guidance_scale)
        self.model_fn = model_fn
        self.sampler = sampler
        self.dtype = dtype
        self.model_dtype = model_dtype or dtype
        self.num_stages = sampler.num_stages
        self.stochastic = any(sampler.plan.noise)
        self.guidance_scale = guidance_scale if guidance_scale is not None else sampler.guidance_scale
        # A private copy of the plan: writing a new guidance scale into its table never touches the sampler's.
        self._runner = PlanRunner(sampler.plan.with_guidance(self.guidance_scale), sampler.backend)
        self._table = self._runner.table(self.device, torch.float64 if dtype == torch.float64 else torch.float32)
        self._times = sampler.timesteps_on(self.device)
        self._steps = torch.arange(self.num_stages, dtype=torch.int64, device=self.device)
        self._zero_step = torch.zeros(1, dtype=torch.int64, device=self.device)
        self._init_scale = _init_scale(sampler)
        self._cond_kind, items = _cond_items(cond)
        self._cond_sig = _cond_signature(cond)
        self._cond = {key: t.detach().to(self.device, copy=True) for key, t in items}
        self._seeds = torch.zeros(self.shape[0], dtype=torch.int64, device=self.device)
        self._z0 = torch.zeros(self.shape, dtype=dtype, device=self.device)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._init_graph: torch.cuda.CUDAGraph | None = None
        self._init_graph_failed = False
        self._out: torch.Tensor | None = None
        self.memory_bytes = 0
        self.reason: str | None = None
        blockers = capture_blockers(sampler, self.device, dtype)
        if blockers:
            self._fall_back("; ".join(blockers))
            return
        self._set_seeds(0)
        self._draw_initial_state()
        try:
            self._capture(warmup, check_syncs)
        except _NotCapturable as exc:
            self._fall_back(str(exc))

    # ------------------------------------------------------------------ properties
    @property
    def captured(self) -> bool:
        """True when calls replay a CUDA graph; False when they run the eager loop (see ``reason``)."""
        return self._graph is not None

    @property
    def guided(self) -> bool:
        return self.sampler.guided

    @property
    def output(self) -> torch.Tensor | None:
        """The static output buffer of the graph (overwritten by every replay); None when eager."""
        return self._out

    def __repr__(self) -> str:
        state = "captured" if self.captured else f"eager ({self.reason})"
        return f"CapturedLoop({self.sampler!r}, shape={self.shape}, dtype={self.dtype}, {state})"

    # ------------------------------------------------------------------ the loop itself
    def _call_model(self, z_in: torch.Tensor, t: torch.Tensor) -> Any:
        if self._cond_kind == "none":
            return self.model_fn(z_in, t)
        if self._cond_kind == "tensor":
            return self.model_fn(z_in, t, self._cond[0])
        if self._cond_kind == "seq":
            return self.model_fn(z_in, t, *self._cond.values())
        return self.model_fn(z_in, t, **self._cond)

    def _check_output(self, out: Any, i: int) -> None:
        """Metadata checks only (no sync): a wrong shape gets a message naming the stage and the expectation."""
        b, rest = self.shape[0], self.shape[1:]
        if isinstance(out, (tuple, list)):
            if not self.guided:
                raise ValueError(f"model_fn returned a {len(out)}-tuple at stage {i}; an unguided loop needs a tensor")
            if len(out) != 2:
                raise ValueError(f"a guided model_fn must return a (cond, uncond) pair, got {len(out)} items")
            parts = list(out)
            expected = [self.shape, self.shape]
        elif isinstance(out, torch.Tensor):
            parts = [out]
            expected = [(2 * b, *rest) if self.guided else self.shape]
            if self.guided and tuple(out.shape) == self.shape:
                raise ValueError(
                    f"guided model_fn returned batch {b} at stage {i}; return (cond, uncond) or a batch of {2 * b} "
                    "(uncond first)"
                )
        else:
            raise TypeError(
                f"model_fn must return a tensor (or a (cond, uncond) pair), got {type(out).__name__} at stage {i}"
            )
        for part, exp in zip(parts, expected, strict=True):
            if not isinstance(part, torch.Tensor):
                raise TypeError(f"model_fn returned a {type(part).__name__} in its (cond, uncond) pair at stage {i}")
            if tuple(part.shape) != tuple(exp):
                raise ValueError(f"model_fn returned shape {tuple(part.shape)} at stage {i}; expected {tuple(exp)}")
            if part.device != self.device:
                raise ValueError(
                    f"model_fn returned a tensor on {part.device} at stage {i}; the loop is on {self.device}"
                )
            if not part.is_floating_point():
                raise TypeError(f"model_fn returned dtype {part.dtype} at stage {i}; expected a floating dtype")

    def _loop(self, graph_mode: bool, probe: SyncProbe | None = None) -> torch.Tensor:
        """The loop of :func:`fastflow.sample`, from the static initial state; step rows on the device in graph mode."""
        sampler, runner, plan = self.sampler, self._runner, self._runner.plan
        z = self._z0
        z_in = sampler.model_input(z, 0, self.model_dtype)
        for i in range(self.num_stages):
            output = self._call_model(z_in, self._times[i])
            self._check_output(output, i)
            if probe is not None:
                probe.mark(f"the model call at stage {i}")
            cond, uncond, paired = sampler._split_output(output, z)
            z, _, model_in = runner.run(
                i,
                z,
                cond,
                uncond,
                seeds=self._seeds if plan.noise[i] else None,
                model_in_dtype=self.model_dtype,
                step=self._steps[i : i + 1] if graph_mode else None,
                paired=paired,
            )
            if probe is not None:
                probe.mark(f"the {sampler.backend!r} backend's step at stage {i}")
            z_in = model_in
        return z

    def _draw_initial_state(self) -> None:
        """``Sampler.init_noise`` from the seed buffer, into the static initial state (no host sync)."""
        step = self._zero_step if self.device.type == "cuda" else 0
        z = noise_spec.normal(self._seeds, self.shape[1:], step=step, tag=noise_spec.INIT_TAG, dtype=torch.float32)
        self._z0.copy_((z * self._init_scale).to(self.dtype))

    # ------------------------------------------------------------------ capture
    def _capture(self, warmup: int, check_syncs: bool) -> None:
        device = self.device
        with torch.cuda.device(device), torch.no_grad():
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            culprit = None
            with torch.cuda.stream(side):
                for k in range(warmup):
                    if check_syncs and k == warmup - 1:
                        culprit = self._probe_syncs()
                    else:
                        self._loop(graph_mode=True)
                    self._runner.reset()
            torch.cuda.current_stream(device).wait_stream(side)
            torch.cuda.synchronize(device)
            if culprit is not None:
                raise _NotCapturable(culprit)
            graph, out = self._record(side, lambda: self._loop(graph_mode=True))
            self._runner.reset()
            self._graph, self._out = graph, out

    def _probe_syncs(self) -> str | None:
        """One warm-up loop with CUDA sync warnings on; returns which part synced, if any."""
        with probing_syncs() as probe:
            self._loop(graph_mode=True, probe=probe)
        return probe.culprit

    def _record(self, stream: torch.cuda.Stream, body: Callable[[], Any]) -> tuple[torch.cuda.CUDAGraph, Any]:
        """Capture ``body`` into a new graph with its own private pool; failures become _NotCapturable."""
        graph = torch.cuda.CUDAGraph()
        before = torch.cuda.memory_reserved(self.device)
        with torch.cuda.stream(stream):
            graph.capture_begin()
            try:
                result = body()
            except Exception as exc:
                with contextlib.suppress(Exception):  # the capture is already invalid; exc says more
                    graph.capture_end()
                del graph
                _settle(self.device)
                raise _NotCapturable(f"capture failed: {type(exc).__name__}: {exc}") from exc
            try:
                graph.capture_end()
            except Exception as exc:
                del graph
                raise _NotCapturable(f"capture failed: {type(exc).__name__}: {exc}") from exc
        self.memory_bytes += max(0, torch.cuda.memory_reserved(self.device) - before)
        return graph, result

    def _capture_init(self) -> None:
        """Record the seeds-to-initial-state draw (about a hundred small ops) as a second, small graph."""
        with torch.cuda.device(self.device), torch.no_grad():
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._draw_initial_state()
            torch.cuda.current_stream(self.device).wait_stream(side)
            torch.cuda.synchronize(self.device)
            try:
                self._init_graph, _ = self._record(side, self._draw_initial_state)
            except _NotCapturable:
                self._init_graph_failed = True

    def _fall_back(self, reason: str) -> None:
        self.reason = reason
        self._graph = None
        self._out = None
        _warn_once(reason)

    def release(self) -> None:
        """Drop the graphs and their memory pools (later calls run eagerly)."""
        for graph in (self._graph, self._init_graph):
            if graph is not None:
                graph.reset()
        self._graph = self._init_graph = None
        self._out = None
        self.memory_bytes = 0
        if self.reason is None:
            self.reason = "released"

    # ------------------------------------------------------------------ calls
    @staticmethod
    def _check_guidance(sampler: Sampler, scale: Any) -> float:
        if not sampler.guided:
            raise ValueError("guidance_scale given, but the sampler is unguided (build it with guidance_scale=...)")
        if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)):
            raise TypeError(f"guidance_scale must be a float, got {type(scale).__name__}")
        if not math.isfinite(float(scale)):
            raise ValueError(f"guidance_scale must be finite, got {scale}")
        return float(scale)

    def _check_noise(self, noise: torch.Tensor) -> None:
        if not isinstance(noise, torch.Tensor):
            raise TypeError(f"noise must be a tensor, got {type(noise).__name__}")
        if tuple(noise.shape) != self.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}; this loop was captured for {self.shape}")
        if noise.dtype != self.dtype:
            raise TypeError(f"noise has dtype {noise.dtype}; this loop was captured for {self.dtype}")

    def _check_cond(self, cond: Cond) -> list[tuple[Any, torch.Tensor]]:
        kind, items = _cond_items(cond)
        if kind == "tensor" and self._cond_kind == "seq" and len(self._cond) == 1:
            kind = "seq"
        if kind != self._cond_kind or [k for k, _ in items] != list(self._cond):
            raise ValueError(
                f"cond must have the structure it was captured with ({self._describe_cond()}), got {kind} "
                f"with keys {[k for k, _ in items]}"
            )
        for key, t in items:
            ref = self._cond[key]
            if t.shape != ref.shape or t.dtype != ref.dtype:
                raise ValueError(
                    f"cond[{key!r}] has {t.dtype} {tuple(t.shape)}; it was captured with {ref.dtype} {tuple(ref.shape)}"
                )
        return items

    def _load_cond(self, items: list[tuple[Any, torch.Tensor]]) -> None:
        """Checked conditioning (:meth:`_check_cond`) into the static buffers the loop reads."""
        for key, t in items:
            self._cond[key].copy_(t)

    def _describe_cond(self) -> str:
        if self._cond_kind == "none":
            return "no conditioning"
        return f"{self._cond_kind} with keys {list(self._cond)}"

    def _set_seeds(self, seed: Seed) -> None:
        host = noise_spec.as_seed_tensor(seed, self.shape[0], "cpu")
        if self.device.type == "cuda":
            self._seeds.copy_(host.pin_memory(), non_blocking=True)
        else:
            self._seeds.copy_(host)

    def _set_guidance(self, scale: float) -> None:
        """The guidance scale later calls run with (a checked float; written to the table only when it changes)."""
        if scale != self.guidance_scale:
            self._table[:, W].fill_(scale)
            self.guidance_scale = scale

    def __call__(
        self,
        noise: torch.Tensor | None = None,
        seed: Seed | None = None,
        cond: Cond = None,
        guidance_scale: float | None = None,
        *,
        copy: bool = True,
    ) -> torch.Tensor:
        """One loop from ``noise`` (or from the initial noise of ``seed``); returns the final state.

        ``seed`` also seeds the stochastic stages (sample ``b`` gets ``seed + b``).
        Without one, a fresh seed is drawn from torch's default CPU generator, so
        repeated calls give fresh samples. ``cond`` and ``guidance_scale`` replace the
        captured ones (they stay in effect for later calls). With ``copy=False`` the
        result is the static output buffer, overwritten by the next call.
        """
        if noise is not None:
            self._check_noise(noise)
        items = self._check_cond(cond) if cond is not None else None
        scale = self._check_guidance(self.sampler, guidance_scale) if guidance_scale is not None else None
        if scale is not None and abs(scale) > torch.finfo(self._table.dtype).max:
            raise ValueError(  # a scale the table's dtype cannot hold would replay to inf or NaN
                f"guidance_scale {scale:g} is past the range of this loop's {self._table.dtype} coefficient table"
            )
        if seed is None and (noise is None or self.stochastic):
            seed = noise_spec.draw_seed()
        if seed is not None:
            noise_spec.as_seed_tensor(seed, self.shape[0], "cpu")  # validate before any buffer changes
        with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
            if seed is not None:
                self._set_seeds(seed)
            if items is not None:
                self._load_cond(items)
            if scale is not None:
                self._set_guidance(scale)
            if noise is not None:
                self._z0.copy_(noise)
            else:
                self._initial_state()
            if self._graph is not None:
                self._graph.replay()
                out = self._out
            else:
                with torch.no_grad():
                    out = self._loop(graph_mode=False)
                self._runner.reset()
        return out.clone() if copy and self._graph is not None else out

    def _initial_state(self) -> None:
        if self._graph is not None and self._init_graph is None and not self._init_graph_failed:
            self._capture_init()
        if self._init_graph is not None:
            self._init_graph.replay()
        else:
            self._draw_initial_state()

    def eager(
        self,
        noise: torch.Tensor | None = None,
        seed: Seed | None = None,
        cond: Cond = None,
        guidance_scale: float | None = None,
    ) -> torch.Tensor:
        """The same call without the graph (the reference a replay is compared against)."""
        graph, self._graph = self._graph, None
        try:
            return self(noise, seed, cond, guidance_scale)
        finally:
            self._graph = graph


def capture(
    model_fn: Callable[..., Any],
    sampler: Sampler,
    shape: Sequence[int],
    *,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    model_dtype: torch.dtype | None = None,
    cond: Cond = None,
    guidance_scale: float | None = None,
    warmup: int = 2,
    check_syncs: bool = True,
) -> CapturedLoop:
    """Capture a whole loop of ``sampler`` around ``model_fn`` as one CUDA graph.

    ``model_fn(z_in, t, *cond)`` (or ``**cond`` for a dict, ``cond`` itself for a
    tensor) is called as in :func:`fastflow.sample`: ``z_in`` is the model input
    (``model_dtype``), ``t`` a float64 0-d device tensor in the schedule's time, and
    it returns the prediction, or for a guided sampler ``(cond, uncond)`` or a
    doubled batch (uncond first). It must not sync the host or allocate with
    data-dependent shapes; such a model makes the loop fall back to eager with the
    reason in ``.reason``. ``shape`` is the state's shape, ``dtype`` its dtype.
    ``warmup`` eager loops run on a side stream first (the last one with CUDA sync
    warnings on when ``check_syncs``).
    """
    return CapturedLoop(
        model_fn,
        sampler,
        shape,
        device=device,
        dtype=dtype,
        model_dtype=model_dtype,
        cond=cond,
        guidance_scale=guidance_scale,
        warmup=warmup,
        check_syncs=check_syncs,
    )


# ----------------------------------------------------------------------------- many captures, bounded
def _init_scale(sampler: Sampler) -> float:
    """The initial state's scale, ``sqrt(alpha^2 + sigma^2)`` at stage 0 (as :meth:`Sampler.init_noise`)."""
    return math.hypot(sampler.stage_alpha[0], sampler.stage_sigma[0])


def sampler_key(sampler: Sampler) -> str:
    """A digest of everything a capture of ``sampler`` bakes in (all but the guidance scale).

    That is what :meth:`CapturedLoop._loop` and the initial draw read: the plan (its table, less the guidance
    column, and its structure), the timesteps, stage 0's model-input scale (the table holds only the scale of each
    stage's next input), the initial noise scale, the backend and whether the loop is guided.
    """
    plan = sampler.plan
    h = hashlib.sha256()
    coefs = plan.coefs.copy()
    coefs[:, W] = 0.0
    h.update(coefs.tobytes())
    h.update(sampler.timesteps.numpy().tobytes())
    h.update(np.array([sampler.input_scale[0], _init_scale(sampler)], dtype=np.float64).tobytes())
    h.update(
        repr((plan.history, plan.write_x, plan.keep_z, plan.keep_o, plan.noise, plan.clip, sampler.backend,
              sampler.guided)).encode()
    )
    return h.hexdigest()


class GraphCache:
    """Captured loops of one model, one per configuration, least recently used evicted.

    The key is everything a capture bakes in: the sampler's plan and timesteps
    (so steps, solver, schedule, prediction), its model-input and initial noise
    scales (:func:`sampler_key`), the backend, the state shape, device and dtype, the
    model dtype and the conditioning's shapes and dtypes (``device="cuda"``: the current
    CUDA device at each call). At most ``max_graphs``
    captures (each with its own memory pool) are alive: the oldest is evicted before
    a new one is made (a call whose arguments cannot capture is refused first and
    evicts nothing), and evicting one releases its pool to PyTorch's caching
    allocator.
    """

    def __init__(
        self,
        model_fn: Callable[..., Any],
        *,
        device: torch.device | str,
        dtype: torch.dtype = torch.float32,
        model_dtype: torch.dtype | None = None,
        max_graphs: int = 4,
        warmup: int = 2,
        check_syncs: bool = True,
    ):
        if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
            raise ValueError(f"max_graphs must be an int >= 1, got {max_graphs!r}")
        # What every capture reads, refused here rather than at the first call
        if not callable(model_fn):
            raise TypeError(f"model_fn must be callable, got {type(model_fn).__name__}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an int >= 1 (CUDA graphs need an eager run first), got {warmup!r}")
        _check_float_dtype("dtype", dtype)
        _check_float_dtype("model_dtype", model_dtype)
        self.model_fn = model_fn
        self.device = torch.device(device)
        self.dtype = dtype
        self.model_dtype = model_dtype
        self.max_graphs = max_graphs
        self.warmup = warmup
        self.check_syncs = check_syncs
        self._loops: OrderedDict[tuple, CapturedLoop] = OrderedDict()
        self.captures = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._loops)

    def _call_device(self) -> torch.device:
        """The device of this call's capture: ``cuda`` without an index is the current CUDA device at the call, as
        for torch's own tensors, so a process that moves between GPUs (``torch.cuda.set_device``) gets a capture on
        each, each in the key."""
        device = self.device
        if device.type == "cuda" and device.index is None and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return device

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the pools of the captures alive now."""
        return sum(loop.memory_bytes for loop in self._loops.values())

    def get(self, sampler: Sampler, shape: Sequence[int], cond: Cond = None) -> CapturedLoop:
        """The capture for this configuration, made (and the oldest evicted) if needed.

        It comes with ``cond`` (when given) and the sampler's guidance scale loaded: a capture is shared by every
        call with the same key, so without that it would run with the values the last call left in it.
        """
        _check_sampler(sampler)
        shape = _check_shape(shape)
        device = self._call_device()
        key = (sampler_key(sampler), shape, device, self.dtype, self.model_dtype, _cond_signature(cond))
        loop = self._loops.get(key)
        if loop is not None:
            self._loops.move_to_end(key)
            items = loop._check_cond(cond) if cond is not None else None
            with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
                if sampler.guided:  # samplers differing only in their scale share a capture: set this one's
                    loop._set_guidance(float(sampler.guidance_scale))
                if items is not None:
                    loop._load_cond(items)
            return loop
        # Arguments that cannot capture are refused before anything is evicted; the eviction then comes before the
        # capture, so no more than max_graphs pools are ever alive (a model that fails mid-capture costs the oldest).
        _checked_arguments(self.model_fn, sampler, shape, device, self.dtype, self.model_dtype, self.warmup)
        while len(self._loops) >= self.max_graphs:
            _, old = self._loops.popitem(last=False)
            old.release()
            self.evictions += 1
        loop = capture(
            self.model_fn,
            sampler,
            shape,
            device=device,
            dtype=self.dtype,
            model_dtype=self.model_dtype,
            cond=cond,
            warmup=self.warmup,
            check_syncs=self.check_syncs,
        )
        self._loops[key] = loop
        self.captures += 1
        return loop

    def __call__(
        self,
        sampler: Sampler,
        noise: torch.Tensor | None = None,
        seed: Seed | None = None,
        cond: Cond = None,
        guidance_scale: float | None = None,
        *,
        shape: Sequence[int] | None = None,
        copy: bool = True,
    ) -> torch.Tensor:
        """Run ``sampler``'s loop from the matching capture; ``shape`` is needed when ``noise`` is not given.

        The call's arguments are checked before a capture is looked up: one that the loop would refuse costs no
        capture and evicts nothing.
        """
        _check_sampler(sampler)
        if noise is not None:
            if not isinstance(noise, torch.Tensor):
                raise TypeError(f"noise must be a tensor, got {type(noise).__name__}")
            if noise.dtype != self.dtype:
                raise TypeError(f"noise has dtype {noise.dtype}; this cache captures {self.dtype} loops (its dtype=)")
            shape = tuple(noise.shape)
        if shape is None:
            raise ValueError("pass noise= or shape=")
        shape = _check_shape(shape)
        if seed is not None:
            noise_spec.as_seed_tensor(seed, shape[0], "cpu")
        if guidance_scale is None and sampler.guided:
            guidance_scale = sampler.guidance_scale
        elif guidance_scale is not None:
            guidance_scale = CapturedLoop._check_guidance(sampler, guidance_scale)
        loop = self.get(sampler, shape, cond)  # loads cond
        return loop(noise, seed, None, guidance_scale, copy=copy)

    def clear(self) -> None:
        """Release every capture."""
        for loop in self._loops.values():
            loop.release()
        self._loops.clear()
