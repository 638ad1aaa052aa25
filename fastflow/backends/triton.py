"""Triton backend: the fused step kernel of ``kernels/`` (``fastflow.kernels``).

One launch per stage, no host sync: checks read tensor metadata only, and in graph
mode the step row is read on the device. Runs on CUDA devices, and on the CPU under
``TRITON_INTERPRET=1`` (how CI tests the kernel without a GPU).

Every tensor must be contiguous (a clear ValueError otherwise). Outputs may alias
inputs exactly (``out is z``, ``x_out`` a history tensor): each element is read
before it is written. Partially overlapping buffers are not supported.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch

from ..devices import traced_without_dynamo
from ..noise import check_normal_args
from .base import Backend, check_clip, check_outputs_overlap, check_step_args, kernel_wide_inputs, step_int

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Triton's interpreter (TRITON_INTERPRET=1) keeps a launch's state process-wide (the program ids, triton.language
# patched for the launch), so two launches at once from two threads fail or write wrong blocks: interpreted launches
# take this lock. Compiled (GPU) launches never do.
_INTERPRETER_LOCK = threading.Lock()


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _load_kernels() -> ModuleType:
    """``fastflow.kernels.step``; from a source checkout that is not installed, ``kernels/`` beside ``fastflow/``."""
    try:
        return importlib.import_module("fastflow.kernels.step")
    except ModuleNotFoundError as exc:
        if exc.name not in ("fastflow.kernels", "fastflow.kernels.step"):
            raise
    folder = Path(__file__).resolve().parents[2] / "kernels"
    spec = importlib.util.spec_from_file_location(
        "fastflow.kernels", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError("fastflow.kernels is not installed and no kernels/ folder was found")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fastflow.kernels"] = module
    spec.loader.exec_module(module)
    return importlib.import_module("fastflow.kernels.step")


def _check_layout(name: str, t: torch.Tensor | None, dtypes: tuple[torch.dtype, ...]) -> None:
    if t is None:
        return
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (the Triton kernel reads flat row-major memory)")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {t.dtype}; the Triton kernel takes {names}")


class TritonBackend(Backend):
    """The fused step as one Triton kernel launch."""

    name = "triton"

    def __init__(self) -> None:
        self._unavailable: str | None = None
        self._checked = False
        self._kernels: ModuleType | None = None
        self._interpreted = False  # the kernels run on Triton's interpreter (see _INTERPRETER_LOCK)

    def availability(self) -> str | None:
        if not self._checked:
            self._unavailable = self._probe()
            self._checked = True
        return self._unavailable

    def _probe(self) -> str | None:
        try:
            spec = importlib.util.find_spec("triton")
        except (ImportError, ValueError) as exc:  # a module named triton without a spec, or a broken parent
            return f"Triton cannot be found: {type(exc).__name__}: {exc}"
        if spec is None:
            return "Triton is not installed (pip install triton)"
        if not torch.cuda.is_available() and not _interpret():
            return "no CUDA device (set TRITON_INTERPRET=1 to run the kernel on the CPU interpreter)"
        try:
            kernels = _load_kernels()
        except Exception as exc:  # a broken Triton install must read as "unavailable", not crash dispatch
            return f"the Triton kernels failed to import: {type(exc).__name__}: {exc}"
        # Set before _kernels, which a step reads first: it then knows how to launch.
        self._interpreted = type(getattr(kernels, "fused_step_kernel", None)).__module__ == "triton.runtime.interpreter"
        self._kernels = kernels
        return None

    def supports(self, device: torch.device) -> str | None:
        device = torch.device(device)
        if device.type == "cuda":
            return None
        if device.type == "cpu":
            if _interpret():
                return None
            return "CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter)"
        return f"Triton runs on CUDA devices, not {device.type}"

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
        block: int | None = None,
    ) -> None:
        """Evaluate one plan stage (the contract of :mod:`fastflow.backends.base`) in one launch.

        ``block`` overrides the elements per program (a power of two; tests use it
        to get several programs per sample).
        """
        if traced_without_dynamo():
            raise RuntimeError(
                "torch.export's non-strict tracing (its default) runs the step on fake tensors, which a Triton "
                "launch cannot take: step with backend='cuda' (whose operator it traces) or 'torch' to export"
            )
        check_step_args(
            z, out, model_out, model_out_uncond, history, table, seeds, noise, x_out, model_in_out, use_noise
        )
        check_clip(clip, z.dtype)
        if check_overlap and not torch.compiler.is_compiling():  # fake tensors have no memory to compare
            check_outputs_overlap(out, x_out, model_in_out, z, model_out, model_out_uncond, history,
                                  noise if use_noise else None,
                                  read_by_all=kernel_wide_inputs(table, step, seeds, noise, use_noise))
        kernels = self._kernels
        if kernels is None:
            reason = self.availability()
            if reason is not None:
                raise RuntimeError(f"Triton backend unavailable: {reason}")
            kernels = self._kernels
        if not z.is_cuda:
            reason = self.supports(z.device)
            if reason is not None:
                raise RuntimeError(f"Triton backend cannot run on {z.device}: {reason}")

        # Hot path: one pass over the tensors; the named checks below run only on failure.
        inputs = [model_out, *history]
        if model_out_uncond is not None:
            inputs.append(model_out_uncond)
        if x_out is not None:
            inputs.append(x_out)
        if model_in_out is not None:
            inputs.append(model_in_out)
        if use_noise and noise is not None:
            inputs.append(noise)
        if not (
            z.dtype in _KERNEL_DTYPES
            and z.is_contiguous()
            and out.is_contiguous()
            and all(t.is_contiguous() and t.dtype in _INPUT_DTYPES for t in inputs)
        ):
            self._explain_layout(z, out, model_out, model_out_uncond, history, x_out, model_in_out, noise, use_noise)
        if not table.is_contiguous():  # (its width and dtype: check_step_args)
            raise ValueError(f"coefficient table must be contiguous, got strides {table.stride()}")
        if use_noise and noise is None and not seeds.is_contiguous():
            raise ValueError("seeds must be contiguous")
        if isinstance(step, torch.Tensor):
            if step.numel() != 1 or step.device != z.device:
                raise ValueError(f"step tensor must be one int32/int64 element on {z.device}")
            if step.dtype not in (torch.int32, torch.int64):  # a TypeError, as the other backends raise
                raise TypeError(f"step tensor must be int32 or int64, got {step.dtype}")
        else:
            step = step_int(step)
            if not 0 <= step < table.shape[0]:
                raise IndexError(f"step {step} is outside the coefficient table's {table.shape[0]} rows")
        if z.shape[0] > kernels.MAX_GRID_Y:
            raise ValueError(f"batch {z.shape[0]} exceeds the kernel's {kernels.MAX_GRID_Y} samples per launch")
        args = (z, out, model_out, model_out_uncond, history, table, step, seeds, noise, x_out, model_in_out, clip)
        if self._interpreted:
            with _INTERPRETER_LOCK:
                kernels.launch_fused_step(*args, use_noise, block)
        elif z.is_cuda and z.get_device() != torch.cuda.current_device():
            # Triton launches on the current device; follow the tensors instead.
            with torch.cuda.device(z.device):
                kernels.launch_fused_step(*args, use_noise, block)
        else:
            kernels.launch_fused_step(*args, use_noise, block)

    @staticmethod
    def _explain_layout(z, out, model_out, model_out_uncond, history, x_out, model_in_out, noise, use_noise) -> None:
        """Raise the error that names the tensor the hot-path check rejected."""
        _check_layout("state", z, _KERNEL_DTYPES)
        _check_layout("output state", out, _KERNEL_DTYPES)
        _check_layout("model output", model_out, _INPUT_DTYPES)
        _check_layout("unconditional model output", model_out_uncond, _INPUT_DTYPES)
        for k, h in enumerate(history):
            _check_layout(f"history tensor h{k}", h, _INPUT_DTYPES)
        _check_layout("x_hat output", x_out, _INPUT_DTYPES)
        _check_layout("model input output", model_in_out, _INPUT_DTYPES)
        if use_noise:
            _check_layout("noise", noise, _INPUT_DTYPES)
        raise AssertionError("unreachable: a layout check failed without a reason")

    def noise(
        self, seeds: torch.Tensor, sample_shape: Sequence[int], step: int | torch.Tensor = 0, tag: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """The noise of :func:`fastflow.noise.normal`, drawn by the kernel's own Philox path (a device-tensor
        ``step``, or code being traced, takes the torch spec: the launch takes the row as a host int)."""
        if isinstance(step, torch.Tensor) or torch.compiler.is_compiling():
            return super().noise(seeds, sample_shape, step, tag, dtype)
        check_normal_args(seeds, sample_shape, step, tag, dtype)
        reason = self.availability() or self.supports(seeds.device)
        if reason is not None:
            raise RuntimeError(f"Triton backend unavailable: {reason}")
        out = torch.empty((seeds.shape[0], *sample_shape), dtype=dtype, device=seeds.device)
        if self._interpreted:
            with _INTERPRETER_LOCK:
                self._kernels.launch_noise(out, seeds.contiguous(), int(step), tag)
        else:
            self._kernels.launch_noise(out, seeds.contiguous(), int(step), tag)
        return out
