"""What is benchmarked: solver families, latent sizes, and the bytes a step must move.

Families are chosen to stress different paths of the fused step: deterministic
(no noise, no history), stochastic (in-kernel noise), guided (a conditional and
an unconditional output), multistep (stored predictions read back).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import fastflow
from fastflow.schedules import Schedule

__all__ = ["FAMILIES", "SIZES", "QUICK_CPU_SIZES", "Case", "Family", "parse_size", "step_bytes_per_element"]

# Stable Diffusion 1.5's scaled-linear betas, the schedule most diffusers checkpoints use.
_SD_BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}


def _vp() -> Schedule:
    return fastflow.VP(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def _fm() -> Schedule:
    return fastflow.FlowMatching()


@dataclass(frozen=True)
class Family:
    """One solver configuration, expressed for fastflow, for diffusers, and for the naive baseline."""

    name: str
    kind: str
    solver: str
    prediction: str
    schedule: Callable[[], Schedule]
    diffusers_class: str
    diffusers_config: dict = field(default_factory=dict)
    guidance_scale: float | None = None
    options: dict = field(default_factory=dict)

    @property
    def guided(self) -> bool:
        return self.guidance_scale is not None

    @property
    def stochastic(self) -> bool:
        return self.kind == "stochastic"

    def sampler(self, steps: int, backend: str = "torch") -> fastflow.Sampler:
        return fastflow.Sampler(
            self.schedule(), self.solver, prediction=self.prediction, steps=steps,
            guidance_scale=self.guidance_scale, backend=backend, **self.options,
        )


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family("ddim", "deterministic", "ddim", "eps", _vp, "DDIMScheduler",
               {**_SD_BETAS, "clip_sample": False, "set_alpha_to_one": False}),
        Family("flow-euler", "deterministic", "flow-euler", "flow", _fm, "FlowMatchEulerDiscreteScheduler", {}),
        Family("ddpm", "stochastic", "ddpm", "eps", _vp, "DDPMScheduler", {**_SD_BETAS, "clip_sample": False}),
        Family("euler-ancestral", "stochastic", "euler-ancestral", "eps", _vp,
               "EulerAncestralDiscreteScheduler", dict(_SD_BETAS)),
        Family("sde-dpm++2m", "stochastic", "sde-dpm++2m", "eps", _vp, "DPMSolverMultistepScheduler",
               {**_SD_BETAS, "algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
        Family("cfg-ddim", "guided", "ddim", "eps", _vp, "DDIMScheduler",
               {**_SD_BETAS, "clip_sample": False, "set_alpha_to_one": False}, guidance_scale=7.5),
        Family("dpm++2m", "multistep", "dpm++2m", "eps", _vp, "DPMSolverMultistepScheduler",
               {**_SD_BETAS, "algorithm_type": "dpmsolver++", "solver_order": 2}),
        Family("unipc", "multistep", "unipc", "eps", _vp, "UniPCMultistepScheduler",
               {**_SD_BETAS, "solver_order": 2}),
    ]
}

# SD 1.5 latent, an SD3/Flux-sized latent alone and batched, a video latent alone and batched.
SIZES: tuple[tuple[int, ...], ...] = (
    (1, 4, 64, 64),
    (1, 16, 128, 128),
    (4, 16, 128, 128),
    (1, 16, 21, 90, 160),
    (4, 16, 21, 90, 160),
)
QUICK_CPU_SIZES: tuple[tuple[int, ...], ...] = ((1, 4, 32, 32), (1, 4, 64, 64))


def parse_size(text: str) -> tuple[int, ...]:
    """``"1x16x128x128"`` or ``"1,16,128,128"`` to a shape tuple."""
    parts = text.replace("x", ",").replace("(", "").replace(")", "").split(",")
    shape = tuple(int(p) for p in parts if p.strip())
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"bad size {text!r}")
    return shape


def step_bytes_per_element(
    sampler: fastflow.Sampler, stage: int, state_dtype: torch.dtype, model_dtype: torch.dtype
) -> int:
    """The least traffic of one stage per element: read z and the output(s) and history, write z (and x_hat).

    fp32 state with a bf16 output: 10 bytes; 12 with a guidance pair (two bf16 outputs read);
    +4 per stored prediction read and +4 when the stage also writes its x_hat for later stages.
    The device-time step writes no next model input, so none is counted.
    """
    zs = torch.empty((), dtype=state_dtype).element_size()
    ms = torch.empty((), dtype=model_dtype).element_size()
    plan = sampler.plan
    n = 2 * zs + ms * (2 if sampler.guided else 1)
    n += zs * len(plan.history[stage])
    if plan.write_x[stage]:
        n += zs
    return n


@dataclass
class Case:
    """One family at one size and dtype pair, on one device, with its fixed inputs."""

    family: Family
    shape: tuple[int, ...]
    state_dtype: torch.dtype
    model_dtype: torch.dtype
    device: torch.device
    steps: int
    z0: torch.Tensor = field(init=False)
    o: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        gen = torch.Generator(device="cpu").manual_seed(1234)
        self.z0 = torch.randn(self.shape, generator=gen).to(self.device, self.state_dtype)
        out_shape = (2 * self.shape[0], *self.shape[1:]) if self.family.guided else self.shape
        # A fixed model output: a plain eps / velocity guess, independent of z, so no model runs.
        self.o = torch.randn(out_shape, generator=gen).to(self.device, self.model_dtype)

    @property
    def elements(self) -> int:
        return math.prod(self.shape)

    @property
    def stage(self) -> int:
        """The stage timed alone: mid-loop, where multistep solvers read their full history."""
        return self.steps // 2

    @property
    def label(self) -> str:
        return "x".join(str(s) for s in self.shape)
