"""Backends and the one dispatch point that picks among them.

Each backend subclasses :class:`fastflow.backends.base.Backend`. Adding one means
adding a module here and a line in ``_FACTORIES``; no solver changes.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

from .base import Backend, check_step_args

__all__ = ["Backend", "BACKEND_NAMES", "check_step_args", "get_backend", "resolve_backend", "backend_report"]

# name -> "module:factory"; imported lazily so a missing Triton or extension costs nothing.
_FACTORIES: dict[str, str] = {
    "torch": "fastflow.backends.reference:TorchBackend",
    "triton": "fastflow.backends.triton:TritonBackend",
    "cuda": "fastflow.backends.cuda:CudaBackend",
}
BACKEND_NAMES = ("auto", *_FACTORIES)
# "auto" tries these in order and takes the first that runs on the tensor's device.
_AUTO_ORDER = ("cuda", "triton", "torch")
_CACHE: dict[str, Backend] = {}
_RESOLVED: dict[tuple[str, torch.device, torch.dtype | None], Backend] = {}


def _load(name: str) -> Backend:
    if name not in _CACHE:
        module, factory = _FACTORIES[name].split(":")
        cls: Callable[[], Backend] = getattr(importlib.import_module(module), factory)
        _CACHE[name] = cls()
    return _CACHE[name]


def get_backend(name: str) -> Backend:
    """The backend called ``name``; a ValueError lists the valid names."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown backend {name!r}; valid: {', '.join(BACKEND_NAMES)}")
    return _load(name)


def resolve_backend(name: str, device: torch.device | str, dtype: torch.dtype | None = None) -> Backend:
    """The backend to use for tensors on ``device``: ``name`` itself, or the best one for ``auto``.

    ``auto`` picks a compiled kernel where one runs (Triton only on CUDA devices: its CPU
    interpreter is a test tool) and the torch reference otherwise. For float64 states it
    always picks the reference, the oracle of the other backends; the C++ extension
    computes them too, in float64 (``backend="cuda"``; it matches the reference to about
    1e-15), Triton does not. An explicit backend that cannot run raises a RuntimeError
    saying why. Results are cached: this sits on the step's hot path.
    """
    device = torch.device(device)
    key = (name, device, dtype)
    backend = _RESOLVED.get(key)
    if backend is not None:
        return backend
    if name == "auto":
        backend = get_backend("torch")
        if dtype != torch.float64:
            for candidate in _AUTO_ORDER:
                if candidate == "triton" and device.type != "cuda":
                    continue
                trial = get_backend(candidate)
                if trial.availability() is None and trial.supports(device) is None:
                    backend = trial
                    break
    else:
        backend = get_backend(name)
        reason = backend.availability() or backend.supports(device)
        if reason is not None:
            raise RuntimeError(f"backend {name!r} cannot run on {device}: {reason}")
    if dtype is None or isinstance(dtype, torch.dtype):
        # not a numpy dtype (a numpy state's, before step names it): torch 2.8's dynamo cannot hash such a key, so
        # every later traced step that reads this cache failed (an "Observed exception", under fullgraph)
        _RESOLVED[key] = backend
    return backend


def backend_report() -> dict[str, str | None]:
    """For each backend, None when it is available, else why it is not."""
    report = {}
    for name in _FACTORIES:
        try:
            report[name] = get_backend(name).availability()
        except Exception as exc:  # a broken optional backend must not break `fastflow info`
            report[name] = f"failed to load: {exc}"
    return report
