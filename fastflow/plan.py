"""Step plans: the per-step scalar coefficients every backend evaluates.

One model evaluation ("stage") ``i`` of any solver is, per element::

    o      = o_uncond + W * (o_cond - o_uncond)        # when guided, else o = o_cond
    x_hat  = AZ * z + AO * o                           # output conversion
    x_hat  = clamp(x_hat, -clip, clip)                 # optional, the one nonlinearity
    z_next = CZ * z + CX * x_hat + H0 * h0 + H1 * h1 + H2 * h2 + CN * xi
    model_in_next = CIN * z_next  (cast to the model's dtype)

``h0..h2`` are stored tensors of earlier stages (a data prediction ``x_hat`` or a
state ``z``), ``xi`` is the noise of :mod:`fastflow.noise` for this stage (or a
tensor the caller passes). Solvers only produce these coefficients; kernels only
evaluate them. This module is the single source of truth for the table layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# Column layout of a coefficient table row. Kernels index rows by these numbers.
W, AZ, AO, CZ, CX, H0, H1, H2, CN, CIN = range(10)
NUM_COEFS = 10
MAX_HISTORY = 3
COLUMN_NAMES = ("W", "AZ", "AO", "CZ", "CX", "H0", "H1", "H2", "CN", "CIN")


@dataclass(frozen=True)
class HistoryRef:
    """A tensor an earlier stage produced: ``kind`` is ``"x"`` (its x_hat) or ``"z"`` (its input state)."""

    kind: str
    stage: int


@dataclass(frozen=True)
class StepPlan:
    """Everything a backend needs to run every stage of a sampling loop.

    ``coefs`` is float64 ``[stages, NUM_COEFS]``; ``history[i]`` lists the tensors
    bound to slots ``h0, h1, ...`` at stage ``i``; ``write_x[i]`` and ``keep_z[i]``
    say whether a later stage reads stage ``i``'s x_hat or input state;
    ``noise[i]`` whether stage ``i`` draws noise (``CN != 0``).
    """

    coefs: np.ndarray
    history: tuple[tuple[HistoryRef, ...], ...]
    write_x: tuple[bool, ...]
    keep_z: tuple[bool, ...]
    noise: tuple[bool, ...]
    clip: float | None = None

    def __post_init__(self) -> None:
        n = self.coefs.shape[0]
        if self.coefs.shape != (n, NUM_COEFS):
            raise ValueError(f"coefficient table must be [stages, {NUM_COEFS}], got {self.coefs.shape}")
        if not np.all(np.isfinite(self.coefs)):
            bad = np.argwhere(~np.isfinite(self.coefs))[0]
            raise ValueError(f"non-finite plan coefficient {COLUMN_NAMES[bad[1]]} at stage {bad[0]}")
        for i, refs in enumerate(self.history):
            if len(refs) > MAX_HISTORY:
                raise ValueError(f"stage {i} needs {len(refs)} stored tensors; at most {MAX_HISTORY} are supported")

    @property
    def stages(self) -> int:
        return self.coefs.shape[0]

    def with_guidance(self, scale: float | None) -> StepPlan:
        """The same plan with guidance scale ``scale`` in every stage (None: unguided)."""
        coefs = self.coefs.copy()
        coefs[:, W] = 1.0 if scale is None else float(scale)
        return StepPlan(coefs, self.history, self.write_x, self.keep_z, self.noise, self.clip)

    def table(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The coefficient table on ``device`` (copied without a host sync where the device allows)."""
        host = torch.from_numpy(self.coefs).to(dtype)
        device = torch.device(device)
        if device.type == "cuda":
            return host.pin_memory().to(device, non_blocking=True)
        return host.to(device)
