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
    """Evaluates stage ``i`` of ``plan`` with one backend call, keeping the history later stages read.

    Everything that does not depend on the tensors (history keys, when each stored
    tensor can be dropped, the table and backend per device) is worked out once,
    since ``run`` is on every step's host path.
    """

    def __init__(self, plan: StepPlan, backend: str = "auto"):
        self.plan = plan
        self.backend = backend
        self._tables: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self._dispatch: dict[tuple[str, torch.device, torch.dtype], tuple[torch.Tensor, object]] = {}
        self._store: dict[tuple[str, int], torch.Tensor] = {}
        self._needs = [tuple((ref.kind, ref.stage) for ref in refs) for refs in plan.history]
        last_use: dict[tuple[str, int], int] = {}
        for i, keys in enumerate(self._needs):
            for key in keys:
                last_use[key] = i
        self._free_after: list[list[tuple[str, int]]] = [[] for _ in plan.history]
        for key, i in last_use.items():
            self._free_after[i].append(key)

    def table(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The coefficient table on ``device`` (cached; float64 for float64 states)."""
        key = (torch.device(device), dtype)
        if key not in self._tables:
            self._tables[key] = self.plan.table(device, dtype)
        return self._tables[key]

    def reset(self) -> None:
        """Forget stored history (a new loop starts)."""
        self._store.clear()

    def _table_and_backend(self, z: torch.Tensor):
        key = (self.backend, z.device, z.dtype)
        found = self._dispatch.get(key)
        if found is None:
            table = self.table(z.device, torch.float64 if z.dtype == torch.float64 else torch.float32)
            found = self._dispatch[key] = (table, resolve_backend(self.backend, z.device, z.dtype))
        return found

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
        store = self._store
        if i == 0:
            store.clear()
        try:
            history = [store[key] for key in self._needs[i]]
        except KeyError:
            missing = next(k for k in self._needs[i] if k not in store)
            raise RuntimeError(
                f"stage {i} needs {missing[0]} of stage {missing[1]}; run the stages in order from 0"
            ) from None
        if extra_history:
            history.extend(extra_history)
        use_noise = plan.noise[i]
        if use_noise and noise is None and seeds is None:
            raise ValueError(f"stage {i} draws noise: pass seeds or noise")
        # Kernels read flat row-major memory (the noise is keyed by the row-major index), so inputs
        # in another layout (channels_last model outputs, say) are copied once here, and outputs
        # are allocated row-major. Already contiguous tensors pass through untouched.
        z = z.contiguous()
        cond = cond.contiguous()
        if uncond is not None:
            uncond = uncond.contiguous()
        if noise is not None:
            noise = noise.contiguous()
        if history:
            history = [h.contiguous() for h in history]
        if out is None:
            out = torch.empty(z.shape, dtype=z.dtype, device=z.device)
        write_x = plan.write_x[i]
        x_out = torch.empty(z.shape, dtype=z.dtype, device=z.device) if (write_x or want_x) else None
        table, backend = self._table_and_backend(z)
        backend.fused_step(
            z, out, cond, uncond, history, table, i if step is None else step,
            seeds=seeds, noise=noise, x_out=x_out, model_in_out=model_in, clip=plan.clip, use_noise=use_noise,
        )
        if write_x:
            store[("x", i)] = x_out
        if plan.keep_z[i]:
            store[("z", i)] = z
        for key in self._free_after[i]:
            store.pop(key, None)
        return out, x_out
