"""Gaussian-mixture data with its exact denoiser: a model with known answers.

For ``x ~ sum_k w_k N(mu_k, diag(s_k^2))`` and ``z = alpha x + sigma eps``,
``E[x | z]`` is the responsibility-weighted sum of the per-component posterior
means ``mu_k + alpha s_k^2 / (alpha^2 s_k^2 + sigma^2) (z - alpha mu_k)``. Tests use it
to check solver orders and stochastic samplers without a trained network; the demo
samples it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .predictions import canonical_prediction, from_x_eps
from .schedules import Schedule

__all__ = ["GaussianMixture", "sliced_wasserstein"]


class GaussianMixture:
    """A diagonal Gaussian mixture in ``D`` dimensions (float64)."""

    def __init__(self, means: Sequence[Sequence[float]], stds: Sequence[float] | Sequence[Sequence[float]],
                 weights: Sequence[float] | None = None):
        means = np.asarray(means, dtype=np.float64)
        if means.ndim != 2 or 0 in means.shape:
            raise ValueError(f"means must be [K, D] with K, D >= 1, got shape {means.shape}")
        if not np.all(np.isfinite(means)):
            raise ValueError("means must be finite")
        self.means = torch.as_tensor(means)
        k, d = self.means.shape
        stds = np.asarray(stds, dtype=np.float64)
        if stds.shape not in ((k,), (k, 1), (k, d)):
            raise ValueError(f"stds must be one per component ({k},) or [K, D] ({k}, {d}), got shape {stds.shape}")
        if not np.all((stds > 0) & np.isfinite(stds)):
            raise ValueError("stds must be positive and finite")
        self.stds = torch.as_tensor(np.broadcast_to(stds.reshape(k, -1), (k, d)).copy())
        w = np.full(k, 1.0 / k) if weights is None else np.asarray(weights, dtype=np.float64)
        if w.shape != (k,):
            raise ValueError(f"weights must be one per component ({k},), got shape {w.shape}")
        if np.any(w < 0) or not np.isclose(w.sum(), 1.0):
            raise ValueError("weights must be non-negative and sum to 1")
        self.weights = torch.as_tensor(w)

    @classmethod
    def ring(cls, k: int = 8, radius: float = 2.0, std: float = 0.15) -> GaussianMixture:
        ang = 2 * np.pi * np.arange(k) / k
        return cls(np.stack([radius * np.cos(ang), radius * np.sin(ang)], 1), np.full(k, std))

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        e = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        return self.means[comp] + self.stds[comp] * e

    def denoise(self, z: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
        """``E[x | z]`` for ``z = alpha x + sigma eps`` (float64; ``z`` is ``[N, D]``)."""
        z = z.to(torch.float64)
        mu, s2 = self.means.to(z.device), (self.stds**2).to(z.device)
        var = alpha**2 * s2 + sigma**2  # [K, D]
        diff = z[:, None, :] - alpha * mu[None]  # [N, K, D]
        logp = -0.5 * ((diff**2) / var + torch.log(2 * np.pi * var)).sum(-1) + torch.log(self.weights.to(z.device))
        resp = torch.softmax(logp, dim=1)  # [N, K]
        post = mu[None] + (alpha * s2 / var)[None] * diff
        return (resp[..., None] * post).sum(1)

    def model(self, schedule: Schedule, prediction: str):
        """An exact model ``fn(z, t)`` with the given prediction type under ``schedule``."""
        prediction = canonical_prediction(prediction)  # refused here, not at the first model call

        def fn(z: torch.Tensor, t) -> torch.Tensor:
            tt = float(t)
            a, s = float(schedule.alpha(tt)), float(schedule.sigma(tt))
            x = self.denoise(z, a, s)
            eps = (z.to(torch.float64) - a * x) / s
            ox, oe = from_x_eps(prediction, a, s, schedule.d_alpha(tt), schedule.d_sigma(tt))
            return (float(ox) * x + float(oe) * eps).to(z.dtype)

        return fn


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = 64, seed: int = 0) -> float:
    """Mean 1-D Wasserstein-1 distance over random projections (equal sample counts)."""
    if a.shape != b.shape:
        raise ValueError("sliced_wasserstein needs equal shapes")
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], projections, generator=g, dtype=torch.float64)
    dirs /= dirs.norm(dim=0, keepdim=True)
    pa = torch.sort(a.to(torch.float64) @ dirs, dim=0).values
    pb = torch.sort(b.to(torch.float64) @ dirs, dim=0).values
    return float((pa - pb).abs().mean())
