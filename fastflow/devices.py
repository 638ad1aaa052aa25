"""Host data on a device without a host sync.

A copy from pageable CPU memory to a GPU waits for the GPU to finish its queued work
(torch synchronizes the stream), which would stall a sampling loop that runs ahead of
the device. Tables, timesteps and seeds go through pinned memory instead, asynchronously.
"""

from __future__ import annotations

import torch

__all__ = ["to_device", "traced_without_dynamo"]


def traced_without_dynamo() -> bool:
    """Whether this Python runs under torch.export's non-strict tracing (its default): on fake tensors, outside
    torch.compile's tracer. A tensor made then is a fake: a device cache must not keep it for later eager steps,
    which would read no data from it, and a kernel launch cannot take it."""
    exporting = getattr(torch.compiler, "is_exporting", None)
    if exporting is None:
        # torch 2.6 has no is_exporting (it said False there: tables made of fakes were kept); its non-strict tracing
        # sets is_compiling, which is otherwise dynamo's (torch.compile, strict export)
        return torch.compiler.is_compiling() and not torch.compiler.is_dynamo_compiling()
    return exporting() and not torch.compiler.is_dynamo_compiling()


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` on ``device``: from the CPU to a GPU through pinned memory, without a host sync; otherwise a
    plain ``.to`` (the tensor itself when it is there already). Code torch.compile traces, and a CUDA graph
    capture, copy plainly too: a captured copy from a temporary pinned buffer would read that buffer again at
    every replay, after it is freed, so there a copy from the host stays the error it is."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu" and not torch.compiler.is_compiling():
        try:
            capturing = torch.cuda.is_current_stream_capturing()
        except RuntimeError:  # a torch without CUDA ("dummy base class"): the plain copy raises torch's own error
            capturing = True
        if not capturing:
            return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
