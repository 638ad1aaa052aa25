"""Do the naive baselines compute the same update as fastflow? Checked in float64 before any timing.

Each naive loop runs against fastflow's torch backend on the same grid, with the
noise switched off on both sides (``torch.randn_like`` patched to zeros for the
naive steps, an explicit zero noise tensor for fastflow), so stochastic
families are compared too. A figure near 1e-15 means the rows of the tables
time the same computation.
"""

from __future__ import annotations

from unittest import mock

import torch

from . import naive
from .cases import FAMILIES, Case

__all__ = ["naive_agreement"]


def naive_agreement(steps: int = 12, shape: tuple[int, ...] = (2, 4, 8, 8)) -> dict[str, float | str]:
    """Max relative difference of the final state, naive vs fastflow (torch backend), per family."""
    out: dict[str, float | str] = {}
    cpu = torch.device("cpu")
    for name, fam in FAMILIES.items():
        try:
            case = Case(fam, shape, torch.float64, torch.float64, cpu, steps)
            sampler = fam.sampler(steps, "torch")
            stepper = naive.make_stepper(name, sampler.points.alpha, sampler.points.sigma)
            zeros = torch.zeros_like(case.z0)
            z_naive = z_ff = case.z0
            with mock.patch.object(torch, "randn_like", torch.zeros_like):
                for i in range(steps):
                    z_naive = stepper(case.o, z_naive, i)
            for i in range(sampler.num_stages):
                z_ff = sampler.step(case.o, z_ff, i, noise=zeros if sampler.plan.noise[i] else None)
            out[name] = float((z_naive - z_ff).abs().max() / z_ff.abs().max())
        except Exception as exc:  # a check that cannot run says why; it never stops the benchmark
            out[name] = f"{type(exc).__name__}: {exc}"
    return out
