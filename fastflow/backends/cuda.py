"""C++/CUDA backend: the compiled extension of ``csrc/`` (``fastflow._C``).

The extension registers the operators ``torch.ops.fastflow.fused_step``, ``noise``
and ``philox`` with a CPU kernel (always built) and a CUDA kernel (built when torch
has CUDA and nvcc is found). This module loads it lazily, refuses an extension
built for another torch (loading it could crash the process), records why the
backend is missing, and registers fake (meta) implementations so
``torch.compile(fullgraph=True)`` traces the operators.

Per-call host cost is part of the product. Eager calls go straight to the
extension's Python entries, ``fastflow._C.fused_step`` (pybind11) and ``fused_step_alloc``
(a CPython fast call with its arguments parsed by hand): the same C++ function the
operator runs, without the dispatcher's Python argument parsing (the second also
allocates the outputs, in C++), and the C++ side does the
argument checks of :func:`fastflow.backends.base.check_step_args` with the same
exception types, so there is no second Python-side check. The runner's per-step call
(:meth:`CudaBackend.alloc_entry`) is ``fused_step_alloc`` itself, no Python frame
between. On tiny CPU tensors
(``benchmarks/test_host_overhead.py``, group "entry") the operator
``torch.ops.fastflow.fused_step.default`` costs about 2.5x ``CudaBackend.fused_step``
and ``check_step_args`` about 1.8x, so the operator path would cost several times the
binding path. Code being traced by ``torch.compile`` calls the operator (and
``check_step_args``, which tracing folds away), so graphs see the op: the binding is
registered with ``torch.compiler.substitute_in_graph``, so the tracer enters
:meth:`CudaBackend.fused_step_alloc_args` where eager code calls the binding, and the
front ends call one entry without asking whether they are being traced (on a torch
before 2.5, which lacks it, their entry is that Python method, traced and run alike).
Tensors that only torch's Python dispatch can run (the fake tensors of ``torch.export``'s default, non-strict
tracing or of a ``FakeTensorMode``, functional tensors, other subclasses) or a call under a
``TorchDispatchMode`` go from either binding to the operator, so they trace or run as it does.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Sequence
from typing import Any

import torch

from ..noise import STEP_TAG, check_normal_args
from .base import AllocEntry, Backend, OutputTriple, check_step_args, refuse_leaked_fakes
from .base import step_int as host_step

_STATE: dict[str, Any] = {}
_FAKES_REGISTERED: list[bool] = []  # kept apart from _STATE: a fake may be registered only once per process
_TRACED_ALLOC: set[int] = set()  # id of each binding given a traceable stand-in (once per process, as fakes)
# Held while the extension is loaded: threads that first use the backend at once (a server's pool) load it once, not
# each its own (a second traceable stand-in for the same binding raises). Steps never take it once loaded.
_LOAD_LOCK = threading.RLock()


def build_info() -> dict[str, Any] | None:
    """How the extension was built (written by setup.py), or None when nothing was built."""
    try:
        from .._build_info import BUILD_INFO
    except ImportError:
        return None
    return dict(BUILD_INFO)


def _load() -> str | None:
    """Import ``fastflow._C`` once; None on success, else why it is unavailable."""
    if "reason" in _STATE:
        return _STATE["reason"]
    with _LOAD_LOCK:
        if "reason" in _STATE:  # loaded by another thread while this one waited
            return _STATE["reason"]
        reason = _try_load()
        if reason is None:
            _register_fakes()
        _STATE["reason"] = reason  # last: another thread reading it finds the fakes registered
    return reason


def _try_load() -> str | None:
    info = build_info()
    if info is None or not info.get("extension"):
        why = "" if info is None else f" ({info.get('reason')})"
        return (
            "the C++/CUDA extension fastflow._C is not built"
            f"{why}; install the binary wheel built for this torch, or build it where torch is installed: "
            "`pip install --no-build-isolation .` in a checkout or on the sdist"
        )
    if info.get("torch") != torch.__version__:
        return (
            f"fastflow._C was built for torch {info.get('torch')} but torch {torch.__version__} is running; "
            "install the binary wheel built for this torch, or rebuild it (`pip install --no-build-isolation .` "
            "in a checkout or on the sdist)"
        )
    try:
        module = importlib.import_module("fastflow._C")
    except (ImportError, OSError) as exc:
        return f"fastflow._C failed to import: {type(exc).__name__}: {exc}"
    if not hasattr(torch.ops.fastflow, "fused_step"):
        return "fastflow._C imported but registered no operators"
    _STATE["direct"] = module.fused_step
    _STATE["alloc"] = _traceable(getattr(module, "fused_step_alloc", None))
    set_python_entry = getattr(module, "set_python_entry", None)
    if set_python_entry is not None:
        set_python_entry(_python_alloc)
    _STATE["op"] = torch.ops.fastflow.fused_step.default
    _STATE["cuda"] = bool(getattr(module, "with_cuda", False))
    return None


def _traceable(alloc: AllocEntry | None) -> AllocEntry | None:
    """``alloc``, once torch.compile's tracer is told to trace :meth:`Backend.fused_step_alloc_args` (the operator)
    in its place, so a front end calls the binding unconditionally and asks no ``is_compiling()`` per step.
    None on a torch without ``torch.compiler.substitute_in_graph`` (before 2.5): the front ends then take the
    Python entry, traceable but slower per call."""
    substitute = getattr(torch.compiler, "substitute_in_graph", None)
    if alloc is None or substitute is None:
        return None
    if id(alloc) not in _TRACED_ALLOC:
        substitute(alloc, skip_signature_check=True)(_traced_alloc)
        _TRACED_ALLOC.add(id(alloc))
    return alloc


def _traced_alloc(*args: Any) -> OutputTriple:
    """What torch.compile traces for a call of the binding (a module-level backend: tracing reads it by name)."""
    return _TRACING_BACKEND.fused_step_alloc_args(*args)


def _python_alloc(
    z: torch.Tensor, out: torch.Tensor | None, model_out: torch.Tensor, model_out_uncond: torch.Tensor | None,
    history: list[torch.Tensor], table: torch.Tensor, step: int | torch.Tensor, seeds: torch.Tensor | None,
    noise: torch.Tensor | None, want_x: bool, x_dtype: torch.dtype | None, model_in_dtype: torch.dtype | None,
    model_in_double: bool, clip: float | None, use_noise: bool, paired: bool,
) -> OutputTriple:
    """What the allocating binding calls for tensors it cannot step itself (fake, functional or subclassed, or under
    a TorchDispatchMode): the outputs made with torch, the stage run through :meth:`CudaBackend.fused_step`, whose
    binding passes such tensors on to the operator."""
    refuse_leaked_fakes(z, history, model_out=model_out, model_out_uncond=model_out_uncond, seeds=seeds,
                        noise=noise, out=out, table=table)
    return Backend.fused_step_alloc(
        _TRACING_BACKEND, z, model_out, model_out_uncond, list(history), table, step, out=out, seeds=seeds,
        noise=noise, want_x=want_x, model_in_dtype=model_in_dtype, model_in_double=model_in_double, clip=clip,
        use_noise=use_noise, paired=paired, x_dtype=x_dtype,
    )


def has_cuda_kernels() -> bool:
    """Whether the loaded extension has CUDA kernels (it was built with nvcc)."""
    return _load() is None and _STATE["cuda"]


def _parse_arch(arch: str) -> tuple[int, int, bool, bool] | None:
    """``(major, minor, arch-specific, PTX)`` of a recorded arch (``9.0``, ``9.0a``, ``12.0f``, ``8.0+PTX``; also
    ``90a`` as older builds recorded it), or None for a spelling it does not know."""
    ptx = arch.endswith("+PTX")
    core = arch.removesuffix("+PTX").lower()
    letter = core[-1:] if core[-1:] in ("a", "f") else ""
    core = core.removesuffix(letter) if letter else core
    if "." not in core:
        core = f"{core[:-1]}.{core[-1:]}"
    major, _, minor = core.partition(".")
    if not (major.isdigit() and minor.isdigit()):
        return None
    return int(major), int(minor), letter == "a", ptx


def _arch_reason(device: torch.device) -> str | None:
    """None when the build's CUDA archs can run on ``device``, else why not (cached per device)."""
    cache = _STATE.setdefault("arch", {})
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in cache:
        major, minor = torch.cuda.get_device_capability(index)
        archs = (build_info() or {}).get("cuda_archs") or []
        ok = not archs  # unknown: let the launch report it
        for arch in archs:
            found = _parse_arch(arch)
            if found is None:  # a spelling this check does not know: let the launch report it
                ok = True
                continue
            a_major, a_minor, specific, ptx = found
            # SASS runs on the same major version with an equal or newer minor (an arch-specific "a" build on that
            # arch only); PTX on anything newer.
            if (a_major == major and (a_minor == minor if specific else a_minor <= minor)) or (
                ptx and (a_major, a_minor) <= (major, minor)
            ):
                ok = True
        cache[index] = (
            None
            if ok
            else (
                f"fastflow._C was built for CUDA archs {', '.join(archs)}, the device is sm_{major}{minor} "
                "(rebuild with FASTFLOW_CUDA_ARCHS)"
            )
        )
    return cache[index]


def _register_fakes() -> None:
    """Meta implementations: shapes only, so tracing needs no kernel."""
    if _FAKES_REGISTERED:
        return
    _FAKES_REGISTERED.append(True)

    @torch.library.register_fake("fastflow::fused_step")
    def _fused_step_fake(
        z,
        out,
        model_out,
        model_out_uncond,
        history,
        table,
        step,
        step_tensor,
        seeds,
        noise,
        x_out,
        model_in_out,
        clip,
        use_noise,
    ) -> None:
        return None

    @torch.library.register_fake("fastflow::noise")
    def _noise_fake(seeds, sample_shape, step, step_tensor, tag) -> torch.Tensor:
        return seeds.new_empty((seeds.shape[0], *sample_shape), dtype=torch.float32)

    @torch.library.register_fake("fastflow::philox")
    def _philox_fake(counter, key, rounds=10) -> torch.Tensor:
        return counter.new_empty(counter.shape)


class CudaBackend(Backend):
    """The fused step as one call into the compiled extension (CPU or CUDA kernel by device)."""

    name = "cuda"

    def availability(self) -> str | None:
        return _load()

    def supports(self, device: torch.device) -> str | None:
        reason = _load()
        if reason is not None:
            return reason
        device = torch.device(device)
        if device.type == "cpu":
            return None
        if device.type == "cuda":
            if has_cuda_kernels():
                if not torch.cuda.is_available():
                    return "no CUDA device is available"
                return _arch_reason(device)
            info = build_info() or {}
            why = info.get("cuda_skipped") or "it was built without nvcc"
            return f"fastflow._C has no CUDA kernels: {why}"
        return f"fastflow._C has kernels for cpu and cuda, not {device.type}"

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
        """Evaluate one plan stage (the contract of :mod:`fastflow.backends.base`) in one C++ call (its entry
        checks overlaps itself, at no measurable cost: ``check_overlap`` changes nothing here)."""
        direct = _STATE.get("direct")
        if direct is None:
            reason = _load()
            if reason is not None:
                raise RuntimeError(f"cuda backend unavailable: {reason}")
            direct = _STATE["direct"]
        if isinstance(step, torch.Tensor):
            step_int, step_tensor = 0, step
        else:
            step_int, step_tensor = host_step(step), None
        if clip is not None:
            clip = float(clip)
        if not isinstance(history, list):
            history = list(history)
        if torch.compiler.is_compiling():
            check_step_args(
                z, out, model_out, model_out_uncond, history, table, seeds, noise, x_out, model_in_out, use_noise
            )
            direct = _STATE["op"]
        direct(
            z,
            out,
            model_out,
            model_out_uncond,
            history,
            table,
            step_int,
            step_tensor,
            seeds,
            noise,
            x_out,
            model_in_out,
            clip,
            bool(use_noise),
        )

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
        """The allocating form (:class:`~fastflow.backends.base.Backend`) in one C++ call, outputs made there
        (a paired model output is split there too)."""
        alloc = _STATE.get("alloc")
        if alloc is None or torch.compiler.is_compiling():
            return super().fused_step_alloc(
                z, model_out, model_out_uncond, history, table, step, out=out, seeds=seeds, noise=noise,
                want_x=want_x, model_in_dtype=model_in_dtype, model_in_double=model_in_double, clip=clip,
                use_noise=use_noise, paired=paired, x_dtype=x_dtype,
            )
        return alloc(
            z, out, model_out, model_out_uncond, history if type(history) is list else list(history), table, step,
            seeds, noise, bool(want_x), x_dtype, model_in_dtype, bool(model_in_double),
            None if clip is None else float(clip), bool(use_noise), bool(paired),
        )

    def alloc_entry(self) -> AllocEntry:
        """The extension's allocating binding itself: it takes :data:`~fastflow.backends.base.AllocEntry`'s
        arguments as they are (a step int or tensor, dtypes as torch dtypes) and checks them in C++."""
        if _load() is not None or _STATE["alloc"] is None:
            return super().alloc_entry()
        return _STATE["alloc"]

    def noise(
        self,
        seeds: torch.Tensor,
        sample_shape: Sequence[int],
        step: int | torch.Tensor = 0,
        tag: int = STEP_TAG,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """The noise of :func:`fastflow.noise.normal`, drawn by the extension's kernel."""
        check_normal_args(seeds, sample_shape, step, tag, dtype)
        reason = self.supports(seeds.device)
        if reason is not None:
            raise RuntimeError(f"cuda backend unavailable: {reason}")
        if isinstance(step, torch.Tensor):
            out = torch.ops.fastflow.noise.default(seeds, list(sample_shape), 0, step, int(tag))
        else:
            out = torch.ops.fastflow.noise.default(seeds, list(sample_shape), int(step), None, int(tag))
        return out if dtype == torch.float32 else out.to(dtype)


def philox_words(counter: torch.Tensor, key: torch.Tensor, rounds: int = 10) -> torch.Tensor:
    """Raw Philox4x32 words from the extension (int64 holding uint32): counter [..., 4], key [..., 2]."""
    reason = _load()
    if reason is not None:
        raise RuntimeError(f"cuda backend unavailable: {reason}")
    return torch.ops.fastflow.philox.default(counter, key, rounds)


_TRACING_BACKEND = CudaBackend()
