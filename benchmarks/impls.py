"""The implementations compared: naive eager torch, its ``torch.compile``, diffusers, fastflow's backends.

Each one offers the same three things for a :class:`~benchmarks.cases.Case`:
``prepare()`` (untimed reset before a loop), ``run()`` (a whole loop of steps with
the fixed model output, producing the next model input each step as a pipeline
does) and ``one_step()`` (a callable doing the mid-loop step alone, for device
time), or a reason why one of them does not apply.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable

import torch

from . import naive
from .cases import Case

__all__ = ["BASELINES", "FASTFLOW_BACKENDS", "IMPL_NAMES", "Impl", "make_impl"]

FASTFLOW_BACKENDS = ("triton", "cuda", "torch")
BASELINES = ("naive", "compile", "diffusers")
IMPL_NAMES = (*BASELINES, *(f"fastflow-{b}" for b in FASTFLOW_BACKENDS), "fastflow-dropin")


class Impl:
    """Base: an implementation that cannot run says why in ``reason``."""

    name = "impl"

    def __init__(self, case: Case):
        self.case = case
        self.reason: str | None = None
        self.step_reason: str | None = None
        self.graph_reason: str | None = None
        self.final: torch.Tensor | None = None
        self.setup_s: float | None = None

    def prepare(self) -> None:
        pass

    def run(self) -> None:
        raise NotImplementedError

    def one_step(self) -> Callable[[], object] | None:
        return None


class NaiveImpl(Impl):
    """The straightforward eager step (``compiled``: the same function under ``torch.compile``)."""

    def __init__(self, case: Case, compiled: bool = False):
        super().__init__(case)
        self.name = "compile" if compiled else "naive"
        sampler = case.family.sampler(case.steps, "torch")
        self.stepper = naive.make_stepper(
            case.family.name, sampler.points.alpha, sampler.points.sigma, compiled=compiled
        )
        self.z_mid = case.z0.clone()

    def prepare(self) -> None:
        self.stepper.reset()

    def run(self) -> None:
        c = self.case
        z, o = c.z0, c.o
        for i in range(c.steps):
            z = self.stepper(o, z, i)
            z_in = z.to(c.model_dtype)
            if c.family.guided:
                z_in = torch.cat([z_in, z_in])
        self.final = z

    def one_step(self) -> Callable[[], object]:
        c = self.case
        return lambda: self.stepper(c.o, self.z_mid, c.stage)


class DiffusersImpl(Impl):
    """The matching diffusers scheduler, driven as a pipeline drives it (guidance combined outside ``step``)."""

    name = "diffusers"

    def __init__(self, case: Case):
        super().__init__(case)
        self.step_reason = "stateful scheduler: timed as a loop only"
        try:
            module = importlib.import_module("diffusers")
        except Exception as exc:  # ImportError, or a broken install
            self.reason = f"diffusers is not importable: {exc}"
            return
        fam = case.family
        cls = getattr(module, fam.diffusers_class, None)
        if cls is None:
            self.reason = f"diffusers {module.__version__} has no {fam.diffusers_class}"
            return
        self.scheduler = cls(**fam.diffusers_config)
        self.graph_reason = "not attempted: step() keeps Python-side state and may sync the host (see syncs/loop)"

    def prepare(self) -> None:
        self.scheduler.set_timesteps(self.case.steps, device=self.case.device)

    def run(self) -> None:
        c, sched = self.case, self.scheduler
        z = c.z0
        guided = c.family.guided
        scale_input = getattr(sched, "scale_model_input", None)  # flow-matching schedulers have none
        for t in sched.timesteps:
            z_in = (z if scale_input is None else scale_input(z, t)).to(c.model_dtype)
            if guided:
                z_in = torch.cat([z_in, z_in])
            z = sched.step(self._guided(c.o), t, z, return_dict=False)[0]
        self.final = z

    def _guided(self, o: torch.Tensor) -> torch.Tensor:
        """The model output the step takes: the guidance pair combined as a pipeline combines it."""
        if not self.case.family.guided:
            return o
        uncond, cond = o.chunk(2)
        return uncond + self.case.family.guidance_scale * (cond - uncond)

    def run_steps(self) -> None:
        """The same loop with the scheduler's ``step`` alone: no input scaling, cast or guidance between steps."""
        c, sched = self.case, self.scheduler
        o = self._guided(c.o)  # made once
        z = c.z0
        for t in sched.timesteps:
            z = sched.step(o, t, z, return_dict=False)[0]

    @property
    def loop_steps(self) -> int:
        return len(self.scheduler.timesteps)


class DropinImpl(DiffusersImpl):
    """fastflow's drop-in for the same diffusers scheduler, driven by the same pipeline-style loop."""

    name = "fastflow-dropin"

    def __init__(self, case: Case):
        super().__init__(case)
        if self.reason is not None:
            return
        try:
            from fastflow.diffusers import from_scheduler

            self.scheduler = from_scheduler(self.scheduler)
        except Exception as exc:  # an unsupported class or config: say so, keep the other columns
            self.reason = f"no drop-in: {exc}"


class FastflowImpl(Impl):
    """fastflow's Sampler on one backend; device time is the backend's fused step alone."""

    def __init__(self, case: Case, backend: str):
        super().__init__(case)
        self.name = f"fastflow-{backend}"
        self.backend_name = backend
        try:
            from fastflow.backends import get_backend

            backend_obj = get_backend(backend)
            self.reason = backend_obj.availability() or backend_obj.supports(case.device)
        except Exception as exc:  # a half-built extension must not stop the other columns
            self.reason = f"backend failed to load: {exc}"
        if self.reason is not None:
            return
        self.backend = backend_obj
        self.sampler = case.family.sampler(case.steps, backend)
        self.sampler.prepare(case.device, case.state_dtype)
        self.sampler.init_noise(case.shape, seed=0, device=case.device)
        self._step_buffers()

    def _step_buffers(self) -> None:
        c, plan, i = self.case, self.sampler.plan, self.case.stage
        gen = torch.Generator(device="cpu").manual_seed(99)
        self.hist = [
            torch.randn(c.shape, generator=gen).to(c.device, c.state_dtype) for _ in plan.history[i]
        ]
        self.out = torch.empty_like(c.z0)
        self.x_out = torch.empty_like(c.z0) if plan.write_x[i] else None
        if c.family.guided:
            self.uncond, self.cond = c.o.chunk(2)
        else:
            self.cond, self.uncond = c.o, None
        self.table = self.sampler.table(c.device, torch.float32)

    def run(self) -> None:
        c, s = self.case, self.sampler
        z = c.z0
        # Two state buffers take turns, as in fastflow.sample (no solver here keeps an earlier state). They are
        # this loop's own, so its last state is kept as it is: a copy of it would be timed with the steps (the
        # other implementations keep theirs without one).
        buffers = None if any(s.plan.keep_z) else [torch.empty_like(z), torch.empty_like(z)]
        for i in range(s.num_stages):
            z, _ = s.step(
                c.o, z, i, out=None if buffers is None else buffers[i % 2], return_model_input=True,
                model_input_dtype=c.model_dtype, duplicate_model_input=c.family.guided,
            )
        self.final = z

    def one_step(self) -> Callable[[], object]:
        c, plan, i = self.case, self.sampler.plan, self.case.stage
        fused = self.backend.fused_step
        seeds = self.sampler.seeds
        noise = plan.noise[i]

        def step() -> None:
            fused(
                c.z0, self.out, self.cond, self.uncond, self.hist, self.table, i,
                seeds=seeds, x_out=self.x_out, clip=plan.clip, use_noise=noise,
            )

        return step


def make_impl(name: str, case: Case) -> Impl:
    """The implementation called ``name`` (one of :data:`IMPL_NAMES`) for ``case``; it times its own setup."""
    t0 = time.perf_counter()
    if name in ("naive", "compile"):
        impl: Impl = NaiveImpl(case, compiled=name == "compile")
    elif name == "diffusers":
        impl = DiffusersImpl(case)
    elif name == "fastflow-dropin":
        impl = DropinImpl(case)
    elif name.startswith("fastflow-"):
        impl = FastflowImpl(case, name.removeprefix("fastflow-"))
    else:
        raise ValueError(f"unknown implementation {name!r}; valid: {', '.join(IMPL_NAMES)}")
    impl.setup_s = time.perf_counter() - t0
    return impl
