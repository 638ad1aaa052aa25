"""Triton kernels of fastflow, installed as ``fastflow.kernels``.

Triton is optional: nothing here imports it until a kernel is asked for, so
``import fastflow`` works on machines without Triton.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["launch_fused_step", "launch_noise"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module(f"{__name__}.step"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
