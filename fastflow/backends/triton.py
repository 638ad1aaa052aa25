"""Triton backend: the fused step kernel of ``kernels/`` (``fastflow.kernels``)."""

from __future__ import annotations

import torch


class TritonBackend:
    name = "triton"

    def availability(self) -> str | None:
        return "the Triton step kernel is not implemented yet"

    def supports(self, device: torch.device) -> str | None:
        return self.availability()

    def fused_step(self, *args, **kwargs) -> None:
        raise RuntimeError(self.availability())
