"""C++/CUDA backend: the compiled extension of ``csrc/`` (``fastflow._C``)."""

from __future__ import annotations

import torch


class CudaBackend:
    name = "cuda"

    def availability(self) -> str | None:
        return "the C++/CUDA extension is not implemented yet"

    def supports(self, device: torch.device) -> str | None:
        return self.availability()

    def fused_step(self, *args, **kwargs) -> None:
        raise RuntimeError(self.availability())
