"""The torch reference backend: a step plan evaluated with plain torch ops.

It runs on any device and dtype (float64 included), is the oracle every kernel is
tested against, and never syncs the host: the coefficient row is indexed on the
device, so it also runs under CUDA-graph capture and on the meta device. Like the
kernels, it records nothing for autograd, so backends are interchangeable there too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import noise as noise_spec
from ..plan import AO, AZ, CIN, CN, CX, CZ, H0, W
from .base import (
    Backend,
    check_clip,
    check_outputs_overlap,
    check_step_args,
    kernel_wide_inputs,
    refuse_leaked_fakes,
    step_int,
)


class TorchBackend(Backend):
    name = "torch"

    def availability(self) -> str | None:
        return None

    def supports(self, device: torch.device) -> str | None:
        return None

    @torch.no_grad()  # a step is an inference op on every backend: the kernels record nothing for autograd
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
        check_step_args(
            z, out, model_out, model_out_uncond, history, table, seeds, noise, x_out, model_in_out, use_noise
        )
        check_clip(clip, z.dtype)
        if check_overlap and z.device.type != "meta" and not torch.compiler.is_compiling():  # (fake: no memory)
            # whole-tensor ops would get these right; the kernels refuse them, and the backends must agree
            check_outputs_overlap(out, x_out, model_in_out, z, model_out, model_out_uncond, history,
                                  noise if use_noise else None,
                                  read_by_all=kernel_wide_inputs(table, step, seeds, noise, use_noise))
        if not torch.compiler.is_compiling():
            refuse_leaked_fakes(z, history, model_out=model_out, model_out_uncond=model_out_uncond, table=table,
                                seeds=seeds if use_noise else None, noise=noise if use_noise else None)
        cdt = torch.float64 if z.dtype == torch.float64 else torch.float32
        row = _row(table, step).to(cdt)
        o = model_out.to(cdt)
        if model_out_uncond is not None:
            ou = model_out_uncond.to(cdt)
            o = ou + row[W] * (o - ou)
        zc = z.to(cdt)
        x = row[AZ] * zc + row[AO] * o
        if clip is not None:
            x = x.clamp(-clip, clip)
        z_next = row[CZ] * zc + row[CX] * x
        for k, h in enumerate(history):
            z_next = z_next + row[H0 + k] * h.to(cdt)
        if use_noise:
            xi = noise_spec.normal(seeds, z.shape[1:], step=step, dtype=cdt) if noise is None else noise.to(cdt)
            z_next = z_next + row[CN] * xi
        if x_out is not None:
            x_out.copy_(x)
        if model_in_out is not None:
            mi = (row[CIN] * z_next).to(model_in_out.dtype)
            if model_in_out.shape[0] == z.shape[0]:
                model_in_out.copy_(mi)
            else:
                model_in_out.copy_(torch.cat([mi, mi]))
        out.copy_(z_next)


def _row(table: torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
    """The coefficient row of ``step``: an int in range (``table[-1]`` would be the last row, which the kernels
    refuse), or a one-element integer tensor (a float one would be truncated)."""
    if isinstance(step, torch.Tensor):
        if step.numel() != 1:  # a ValueError, a dtype a TypeError: the kernels' checks, in their order
            raise ValueError(f"a step tensor must hold one element, got shape {tuple(step.shape)}")
        if step.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"a step tensor must be int32 or int64, got {step.dtype}")
        return table.index_select(0, step.reshape(1).to(torch.int64)).reshape(-1)
    i = step_int(step)
    if not 0 <= i < table.shape[0]:
        raise IndexError(f"step {i} is outside the coefficient table's {table.shape[0]} rows")
    return table[i]
