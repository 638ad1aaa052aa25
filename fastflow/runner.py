"""Running a compiled plan stage by stage: device tables, history buffers, backend dispatch.

Shared by :class:`fastflow.Sampler`, the diffusers drop-in schedulers and graph
capture, so every front end steps the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .backends import resolve_backend
from .plan import StepPlan


class PlanRunner:
    """Evaluates stage ``i`` of ``plan`` with one backend call, keeping the history later stages read."""

    def __init__(self, plan: StepPlan, backend: str = "auto"):
        self.plan = plan
        self.backend = backend
        self._tables: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self._store: dict[tuple[str, int], torch.Tensor] = {}
        self._last_use: dict[tuple[str, int], int] = {}
        for i, refs in enumerate(plan.history):
            for ref in refs:
                self._last_use[(ref.kind, ref.stage)] = i

    def table(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The coefficient table on ``device`` (cached; float64 for float64 states)."""
        key = (torch.device(device), dtype)
        if key not in self._tables:
            self._tables[key] = self.plan.table(device, dtype)
        return self._tables[key]

    def reset(self) -> None:
        """Forget stored history (a new loop starts)."""
        self._store.clear()

    def run(
        self,
        i: int,
        z: torch.Tensor,
        cond: torch.Tensor,
        uncond: torch.Tensor | None = None,
        *,
        seeds: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
        want_x: bool = False,
        model_in: torch.Tensor | None = None,
        step: int | torch.Tensor | None = None,
        extra_history: Sequence[torch.Tensor] = (),
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stage ``i``; returns ``(z_next, x_hat or None)``. ``step`` overrides the table row (graph mode).

        ``extra_history`` binds caller tensors to the history slots after the plan's own
        (a front end whose table puts coefficients there, e.g. on the raw model output).
        """
        plan = self.plan
        if i == 0:
            self._store.clear()
        history = []
        for ref in plan.history[i]:
            key = (ref.kind, ref.stage)
            if key not in self._store:
                raise RuntimeError(f"stage {i} needs {ref.kind} of stage {ref.stage}; run the stages in order from 0")
            history.append(self._store[key])
        history.extend(extra_history)
        if plan.noise[i] and noise is None and seeds is None:
            raise ValueError(f"stage {i} draws noise: pass seeds or noise")
        # Kernels read flat row-major memory (the noise is keyed by the row-major index), so inputs
        # in another layout (channels_last model outputs, say) are copied once here, and outputs
        # are allocated row-major. Already contiguous tensors pass through untouched.
        z = z.contiguous()
        cond = cond.contiguous()
        uncond = None if uncond is None else uncond.contiguous()
        noise = None if noise is None else noise.contiguous()
        history = [h.contiguous() for h in history]
        out = torch.empty(z.shape, dtype=z.dtype, device=z.device) if out is None else out
        x_out = torch.empty(z.shape, dtype=z.dtype, device=z.device) if (plan.write_x[i] or want_x) else None
        table = self.table(z.device, torch.float64 if z.dtype == torch.float64 else torch.float32)
        resolve_backend(self.backend, z.device, z.dtype).fused_step(
            z, out, cond, uncond, history, table, i if step is None else step,
            seeds=seeds, noise=noise, x_out=x_out, model_in_out=model_in, clip=plan.clip, use_noise=plan.noise[i],
        )
        if plan.write_x[i]:
            self._store[("x", i)] = x_out
        if plan.keep_z[i]:
            self._store[("z", i)] = z
        for key in [k for k in self._store if self._last_use.get(k, -1) <= i]:
            del self._store[key]
        return out, x_out
