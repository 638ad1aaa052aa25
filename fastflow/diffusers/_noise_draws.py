"""The noise of a drop-in's stochastic steps.

``variance_noise`` (where the original takes it) is used as given, broadcast to the
sample as diffusers adds it; a ``generator`` draws exactly the tensor diffusers would
draw (same call, shape, device, dtype and order), so outputs match diffusers'. A model
output must have the sample's shape. With neither, the kernel draws fastflow's
counter-based noise (:mod:`fastflow.noise`), seeded from torch's global CPU generator at
the first noisy step after each ``set_timesteps`` (so ``torch.manual_seed`` reproduces
it and a pipeline's initial latents are unchanged): the same distribution as diffusers'
``torch.randn``, not the same numbers; or, with ``diffusers_noise``, diffusers' own draw
from torch's global generator.

Under ``torch.compile``, a ``generator`` draw is diffusers' ``randn_tensor`` with it, which dynamo cannot trace.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch._subclasses.fake_tensor import is_fake

from .. import noise as noise_spec
from ..backends import resolve_backend
from ..runner import PlanRunner, broadcasts_to

__all__ = ["KernelNoise", "generator_draw"]


def generator_draw(
    generator: torch.Generator | None, like: torch.Tensor, dtype: torch.dtype | None = None, always: bool = False
) -> Callable[[], torch.Tensor] | None:
    """diffusers' noise draw of a step: ``randn_tensor`` of ``like``'s shape on its device (``dtype``, by default
    ``like``'s) from ``generator``; without a generator, from torch's global generator when ``always``, else None
    (the kernel then draws its own noise)."""
    if generator is None and not always:
        return None
    shape, device, dtype = like.shape, like.device, like.dtype if dtype is None else dtype

    def draw() -> torch.Tensor:
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)

    return draw


def fit_noise(noise: torch.Tensor, model_output: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """A step's noise of another shape than its state, broadcast as diffusers adds it (a ``variance_noise`` of
    batch 1 serves every sample). Noise drawn in a model output's shape that is not the state's means that model
    output broadcasts, which fastflow refuses: that is named, not the draw."""
    if model_output.shape != z.shape:
        raise ValueError(f"model output has shape {tuple(model_output.shape)}, state has {tuple(z.shape)}")
    if not broadcasts_to(noise.shape, z.shape):
        raise ValueError(f"the noise has shape {tuple(noise.shape)}, which does not broadcast to the sample's "
                         f"{tuple(z.shape)}")
    return noise.expand(z.shape)


class KernelNoise:
    """The seeds and counters of fastflow's in-kernel noise, and diffusers' draws (a mixin of
    :class:`~fastflow.diffusers._base.FastflowScheduler`, whose ``_ff_reset`` gives each schedule fresh seeds)."""

    def _ff_noise_counter(self, k: int, device: torch.device) -> int | torch.Tensor:
        """The in-kernel noise counter of stage ``k``: an int on the CPU, elsewhere a one-element device view
        (an int would be copied to the device: a host sync)."""
        return k if device.type == "cpu" else self._ff_row(k, device)

    def _ff_noise_inputs(self, k: int, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The seeds and the noise counter of stage ``k``'s in-kernel draw for state ``z``: the counter a device
        view (None on the CPU, where the stage index is the counter). Every noisy step asks: a schedule lists
        the views it has used per device."""
        device, batch = z.device, z.shape[0]
        seeds = self._ff_seeds.get((device, batch))
        if seeds is None:
            seeds = self._ff_seed_tensor(batch, device)
        if device.type == "cpu":
            return seeds, None
        views = self._ff_counter_views.get(device)
        if views is None:
            views = self._ff_counter_views[device] = [None] * self._ff_steps
        view = views[k]
        if view is None:
            view = views[k] = self._ff_row(k, device)
        return seeds, view

    def _ff_row(self, k: int, device: torch.device) -> torch.Tensor:
        """Row ``k`` of ``arange(steps)`` on ``device`` as a one-element view: the noise counter a kernel reads
        there. Each view is made on first use and kept for later schedules (its value, ``k``, is the same whatever
        their number of steps), so loops after the first make none (a view costs about a microsecond of host time).
        One counter tensor per device, as long as the longest schedule yet: a server running loops of ever other
        lengths keeps that many views, not a set per length."""
        rows = self.__dict__.setdefault("_ff_rows", {})
        found = rows.get(device)
        length = max(self._ff_steps, k + 1)
        if found is None or len(found[0]) < length:
            # a longer schedule: the views of the shorter counters go with them (a loop holding one keeps it)
            found = rows[device] = (torch.arange(length, dtype=torch.int64, device=device), {})
        counters, views = found
        view = views.get(k)
        if view is None:
            view = views[k] = counters[k : k + 1]
        return view

    def _ff_draw(
        self, generator: torch.Generator | None, like: torch.Tensor, dtype: torch.dtype | None = None
    ) -> Callable[[], torch.Tensor] | None:
        """This step's diffusers noise draw (:func:`generator_draw`), from the global generator too with
        ``diffusers_noise``; None where the kernel draws fastflow's noise."""
        if generator is None and not self.diffusers_noise:  # the usual call, answered without a second one
            return None
        return generator_draw(generator, like, dtype, always=self.diffusers_noise)

    def _ff_fold_seed(self, seed: int) -> None:
        """Seed fastflow's noise for this schedule from another generator's seed (a config's, a generator's)."""
        self._ff_seed = int(seed) % noise_spec.DRAWN_SEED_RANGE

    def _ff_kernel_noise(self, runner: PlanRunner, k: int, like: torch.Tensor) -> torch.Tensor:
        """The noise stage ``k`` of ``runner``'s plan draws in its kernel (float32, ``like``'s shape), drawn outside
        it through the runner's backend: for a step that needs it scaled per element or combined with another."""
        device = like.device
        backend = resolve_backend(runner.backend, device, torch.float32)
        seeds = self._ff_seed_tensor(like.shape[0], device)
        return backend.noise(seeds, like.shape[1:], step=self._ff_noise_counter(k, device))

    def _ff_loop_seed(self) -> int:
        """This loop's seed of fastflow's noise: a fixed one (a config's, a generator's), else drawn from torch's
        global CPU generator at the loop's first noisy step, not in set_timesteps, so that a pipeline's initial
        latents drawn from the global generator stay what diffusers draws. Graph replays take it here too."""
        if self._ff_seed is None:
            self._ff_seed = noise_spec.draw_seed()
        return self._ff_seed

    def _ff_seed_tensor(self, batch: int, device: torch.device) -> torch.Tensor:
        key = (device, batch)
        seeds = self._ff_seeds.get(key)
        if seeds is None:
            if self._ff_seed is None and not torch.compiler.is_dynamo_compiling():
                drawn = noise_spec.draw_seed_tensor()
                if is_fake(drawn):
                    # torch.export's non-strict tracing (or a FakeTensorMode): the draw has no value to take int()
                    # of, so the seeds stay ops on it (the exported program draws as eager does), and are not kept:
                    # a fake tensor in the schedule's state would outlive the trace.
                    return (drawn + torch.arange(batch, dtype=torch.int64)).to(device)
                self._ff_seed = int(drawn.item())
            seed = self._ff_loop_seed()
            seeds = torch.arange(seed, seed + batch, dtype=torch.int64, device=device)
            self._ff_seeds[key] = seeds
        return seeds
