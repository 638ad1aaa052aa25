"""Host-overhead benchmarks that run anywhere (CPU is enough), so per-step Python regressions show without a GPU.

Run: ``pytest benchmarks/test_host_overhead.py --benchmark-only``. Tensors are tiny
(1x4x16x16), so the figures are the Python and dispatch work around a step, not
memory traffic. Groups: plan building per solver; one ``Sampler.step`` per backend;
a whole 10-step loop per family, fastflow's backends beside diffusers' scheduler.
Speed is read from the report, never asserted.
"""

from __future__ import annotations

import pytest
import torch

import fastflow
from benchmarks.cases import FAMILIES, Case
from benchmarks.impls import DiffusersImpl, FastflowImpl, NaiveImpl
from fastflow.backends import get_backend

SHAPE = (1, 4, 16, 16)
LOOP_STEPS = 10
CPU = torch.device("cpu")
PLAN_SOLVERS = ("ddim", "ddpm", "flow-euler", "euler-ancestral", "heun", "dpm++2m", "sde-dpm++2m", "unipc")
LOOP_FAMILIES = ("ddim", "flow-euler", "ddpm", "euler-ancestral", "cfg-ddim", "dpm++2m", "unipc")
# diffusers' schedulers warn about numpy 2's copy keyword on every set_timesteps; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _backend_reason(name: str) -> str | None:
    try:
        b = get_backend(name)
        return b.availability() or b.supports(CPU)
    except Exception as exc:  # a half-built extension: skip, do not fail the run
        return f"failed to load: {exc}"


def _schedule(solver: str):
    return fastflow.FlowMatching() if solver == "flow-euler" else fastflow.VP()


@pytest.mark.benchmark(group="plan: Sampler(...) with 30 steps")
@pytest.mark.parametrize("solver", PLAN_SOLVERS)
def test_plan_build(benchmark, solver: str) -> None:
    """Building a Sampler compiles every coefficient on the host; it happens once per loop configuration."""
    schedule = _schedule(solver)
    prediction = "flow" if solver == "flow-euler" else "eps"
    sampler = benchmark(lambda: fastflow.Sampler(schedule, solver, prediction=prediction, steps=30, backend="torch"))
    assert sampler.num_stages >= 30


@pytest.mark.benchmark(group="step: one Sampler.step, 1x4x16x16")
@pytest.mark.parametrize("backend", ("torch", "cuda", "triton"))
@pytest.mark.parametrize("family", ("ddim", "ddpm", "cfg-ddim"))
def test_sampler_step(benchmark, backend: str, family: str) -> None:
    """Stage 0 alone: the per-call host cost of the front end plus one backend call."""
    reason = _backend_reason(backend)
    if reason is not None:
        pytest.skip(f"backend {backend}: {reason}")
    case = Case(FAMILIES[family], SHAPE, torch.float32, torch.bfloat16, CPU, LOOP_STEPS)
    sampler = case.family.sampler(LOOP_STEPS, backend)
    sampler.prepare(CPU)
    sampler.init_noise(SHAPE, seed=0)
    out = benchmark(lambda: sampler.step(case.o, case.z0, 0))
    assert out.shape == SHAPE


def _loop_impl(kind: str, family: str):
    case = Case(FAMILIES[family], SHAPE, torch.float32, torch.bfloat16, CPU, LOOP_STEPS)
    if kind == "diffusers":
        impl = DiffusersImpl(case)
    elif kind == "naive":
        impl = NaiveImpl(case)
    else:
        reason = _backend_reason(kind)
        if reason is not None:
            pytest.skip(f"backend {kind}: {reason}")
        impl = FastflowImpl(case, kind)
    if impl.reason is not None:
        pytest.skip(impl.reason)
    return impl


@pytest.mark.benchmark(group="loop: 10 steps, 1x4x16x16 (divide by 10 for per step)")
@pytest.mark.parametrize("kind", ("torch", "cuda", "naive", "diffusers"))
@pytest.mark.parametrize("family", LOOP_FAMILIES)
def test_loop(benchmark, kind: str, family: str) -> None:
    """A whole loop with the model replaced by a fixed output, as a pipeline drives each implementation."""
    impl = _loop_impl(kind, family)

    def loop() -> None:
        impl.prepare()
        impl.run()

    benchmark(loop)
    assert impl.final is not None and torch.isfinite(impl.final.float()).all()
