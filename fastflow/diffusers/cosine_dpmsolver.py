"""Drop-in ``CosineDPMSolverMultistepScheduler`` (Stable Audio Open's): SDE-DPM-Solver++ (orders 1-2) on
EDM-preconditioned sigmas (:class:`~fastflow.diffusers.edm_dpmsolver.EDMPreconditioned`).

diffusers draws each step's noise from a Brownian tree over sigma (torchsde), seeded by the
``generator``'s initial seed: the increments over consecutive steps' disjoint intervals are
independent standard normals, which is the distribution fastflow's in-kernel noise has. The
generator's initial seed seeds fastflow's noise too, so a seeded generator reproduces a loop. With
``diffusers_noise``, the drop-in draws from diffusers' own tree (and needs torchsde, as diffusers'
class does), giving diffusers' numbers.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.schedulers import scheduling_cosine_dpmsolver_multistep as _cos

from ._outputs import output_maker
from ._spec import promoted_dtype
from .edm_dpmsolver import EDMPreconditioned

__all__ = ["CosineDPMSolverMultistepScheduler"]
_OUTPUT = output_maker(_cos.SchedulerOutput, "prev_sample")


def _initial_seed(generator: torch.Generator | list[torch.Generator] | None) -> int | list[int] | None:
    """The tree seed diffusers takes from a generator (or one per sample from a list)."""
    if generator is None:
        return None
    if isinstance(generator, list):
        return [g.initial_seed() for g in generator]
    return generator.initial_seed()


class CosineDPMSolverMultistepScheduler(EDMPreconditioned, _cos.CosineDPMSolverMultistepScheduler):
    """diffusers' ``CosineDPMSolverMultistepScheduler`` whose ``step`` is one fused fastflow call.

    ``sde-dpmsolver++`` (diffusers' only algorithm here), orders 1-2, midpoint or Heun, exponential or Karras
    sigmas, ``epsilon`` and ``v_prediction`` outputs.
    """

    _ff_max_order = 2  # diffusers' step defines orders 1 and 2 (at 3 it fails)

    @property
    def _ff_algorithm(self) -> str:
        return "sde-dpmsolver++"

    @property
    def _ff_thresholding(self) -> bool:
        return False

    def _ff_tree_draw(self, generator: Any, model_output: torch.Tensor, idx: int, dtype: torch.dtype) -> torch.Tensor:
        """diffusers' draw for step ``idx``: its tree, made at a loop's first step as diffusers makes it (from the
        converted model output, whose dtype is the sample's promoted with the output's)."""
        if self.noise_sampler is None:
            cfg = self.config
            template = model_output if model_output.dtype is dtype else model_output.to(dtype)
            self.noise_sampler = _cos.BrownianTreeNoiseSampler(
                template, sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max, seed=_initial_seed(generator)
            )
        return self.noise_sampler(self.sigmas[idx], self.sigmas[idx + 1]).to(model_output.device)

    def _ff_seed_from(self, generator: Any) -> None:
        """Seed fastflow's noise from the generator's initial seed at a loop's first noisy step (a list of
        generators: the first one's; samples then take consecutive seeds)."""
        if self._ff_seed is None and generator is not None:
            seed = _initial_seed(generator)
            self._ff_fold_seed(seed[0] if isinstance(seed, list) else seed)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> _cos.SchedulerOutput | tuple:
        """diffusers' step (same arguments and output), in one backend call."""
        idx = self._ff_scheduled_index(timestep)  # sets up the schedule (and its noise seed) on first use
        draw = None
        dtype = promoted_dtype(sample, model_output)
        if self.diffusers_noise:
            draw = lambda: self._ff_tree_draw(generator, model_output, idx, dtype)  # noqa: E731
        else:
            self._ff_seed_from(generator)
        prev = self._ff_multistep_step(
            model_output, timestep, sample, idx, draw=draw, state_dtype=dtype, out_dtype=dtype
        )
        if not return_dict:
            return (prev,)
        return _OUTPUT(prev)
