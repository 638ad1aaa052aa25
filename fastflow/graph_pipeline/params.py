"""Graph parameters: a Python float the pipeline's code multiplies a loop tensor by (a guidance scale) is read by
the graph from device memory, so a new value needs no new capture and replays round as eager calls do."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .recording import Trace

_MULTIPLY = frozenset({torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.Tensor.mul, torch.mul})
_PARAM_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def is_float(value: Any) -> bool:
    return isinstance(value, float)  # bool and int are not floats; numpy's float64 is


def param_position(func: Any, args: tuple, kwargs: dict) -> int | None:
    """Where the float factor is, when the call multiplies a floating-point tensor by a Python float."""
    if func not in _MULTIPLY or kwargs or len(args) != 2:
        return None
    for factor in (1, 0):
        tensor = args[1 - factor]
        if is_float(args[factor]) and isinstance(tensor, torch.Tensor) and tensor.dtype in _PARAM_DTYPES:
            return factor
    return None


def param_mul(tensor: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``tensor * factor`` for a one-element float64 device tensor ``factor``, rounded as eager torch rounds a
    Python float factor: the factor converted to the op's math type (float64 for float64 tensors, else float32),
    one product in that type, one rounding to the tensor's dtype. (A tensor factor of the tensor's own dtype would
    be rounded to it first, 7.3 to 7.3125 in bfloat16; on the CPU a 0-d one would be read as a scalar, which is
    why the factor has one dimension: CPU and CUDA then compute alike.)"""
    wide = tensor.dtype == torch.float64
    product = tensor * factor if wide else (tensor.float() * factor.float()).to(tensor.dtype)
    return product.reshape(()) if tensor.dim() == 0 else product


def make_param_values(trace: Trace) -> None:
    """The device tensor the graph reads the parameters from (one element per parameter)."""
    if trace.params:
        trace.param_values = torch.tensor(trace.params, dtype=torch.float64, device=trace.device)


def write_params(trace: Trace, values: list[float]) -> None:
    """Before a replay: this call's parameter values into the graph's (one host-to-device copy, when changed)."""
    if values != trace.params and trace.param_values is not None:
        host = torch.tensor(values, dtype=torch.float64)
        if trace.param_values.device.type == "cuda":  # pinned and asynchronous: no host sync, as for the seeds
            trace.param_values.copy_(host.pin_memory(), non_blocking=True)
        else:
            trace.param_values.copy_(host)
        trace.params = list(values)
