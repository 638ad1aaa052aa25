"""Host-overhead benchmarks that run anywhere (CPU is enough), so per-step Python regressions show without a GPU.

Run: ``pytest benchmarks/test_host_overhead.py --benchmark-only``. Tensors are tiny
(1x4x16x16, or 1x4 for the entry points), so the figures are the Python and dispatch
work around a step, not memory traffic. Groups: the C++ extension's entry points;
plan building per solver; one ``Sampler.step`` per backend; 10 calls of a diffusers
drop-in's ``step`` beside diffusers' own; a whole 10-step loop per family, fastflow's
backends beside diffusers' scheduler (``set_timesteps`` and history resets untimed, before each loop);
and a 30-step ``Sampler.step`` loop at (1,16,128,128) that also writes the next model input, the loop
and size of the CUDA extension's host-time target.
``FASTFLOW_HOST_BENCH_DEVICE=cuda`` puts the tensors on the GPU: each call is then
timed as the host spends it (queued, not waited for; a loop waits for its last
step), which splits the GPU's per-step host time between the layers of the call.
Speed is read from the report, never asserted.
"""

from __future__ import annotations

import math
import os
import time

import pytest
import torch

import fastflow
from benchmarks.cases import FAMILIES, Case
from benchmarks.host_ab import DROPIN_CONFIG, DROPIN_LOOPS, DROPINS, SET_KWARGS
from benchmarks.impls import DiffusersImpl, FastflowImpl, NaiveImpl
from fastflow.backends import get_backend

SHAPE = (1, 4, 16, 16)
LOOP_STEPS = 10
DEVICE = torch.device(os.environ.get("FASTFLOW_HOST_BENCH_DEVICE", "cpu"))
if DEVICE.type == "cuda" and not torch.cuda.is_available():
    pytest.skip("FASTFLOW_HOST_BENCH_DEVICE=cuda, but no CUDA device", allow_module_level=True)
PLAN_SOLVERS = ("ddim", "ddpm", "flow-euler", "euler-ancestral", "heun", "dpm++2m", "sde-dpm++2m", "unipc")
LOOP_FAMILIES = ("ddim", "flow-euler", "ddpm", "euler-ancestral", "cfg-ddim", "dpm++2m", "unipc")
# diffusers' schedulers warn about numpy 2's copy keyword on every set_timesteps; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _backend_reason(name: str) -> str | None:
    try:
        b = get_backend(name)
        return b.availability() or b.supports(DEVICE)
    except Exception as exc:  # a half-built extension: skip, do not fail the run
        return f"failed to load: {exc}"


ENTRY_POINTS = ("direct binding", "allocating binding", "backend.fused_step", "backend.fused_step_alloc",
                "torch.ops overload", "check_step_args")


@pytest.mark.benchmark(group="entry: one call into the C++ extension, 1x4")
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_extension_entry(benchmark, entry: str) -> None:
    """What each way into the compiled step costs per call: the bindings, the backend methods, the operator."""
    from fastflow.backends import cuda as cuda_mod
    from fastflow.backends.base import check_step_args
    from fastflow.plan import NUM_COEFS

    reason = _backend_reason("cuda")
    if reason is not None:
        pytest.skip(f"backend cuda: {reason}")
    cb = get_backend("cuda")
    z = torch.randn(1, 4, device=DEVICE)
    mo, out, h = torch.randn_like(z), torch.empty_like(z), [torch.randn_like(z)]
    table = torch.randn(5, NUM_COEFS, device=DEVICE)
    args = (z, out, mo, None, h, table, 2, None, None, None, None, None, None, False)
    alloc_args = (z, None, mo, None, h, table, 2, None, None, False, None, None, False, None, False, False)
    calls = {
        "direct binding": lambda: cuda_mod._STATE["direct"](*args),
        "allocating binding": lambda: cuda_mod._STATE["alloc"](*alloc_args),
        "backend.fused_step": lambda: cb.fused_step(z, out, mo, None, h, table, 2),
        "backend.fused_step_alloc": lambda: cb.fused_step_alloc(z, mo, None, h, table, 2),
        "torch.ops overload": lambda: torch.ops.fastflow.fused_step.default(*args),
        "check_step_args": lambda: check_step_args(z, out, mo, None, h, table, None, None, None, None, False),
    }
    result = benchmark(calls[entry])
    if "alloc" in entry:
        assert torch.isfinite(result[0]).all()
    elif entry != "check_step_args":
        assert torch.isfinite(out).all()




@pytest.mark.benchmark(group="dropin: a set_timesteps(10) loop of step calls alone, 1x4x16x16 "
                             "(10 calls, Heun, flow Heun, KDPM2 and DPM-Solver SDE 19, PNDM 11)")
@pytest.mark.parametrize("kind", ("fastflow", "diffusers"))
@pytest.mark.parametrize("name", DROPINS)  # every drop-in (host_ab's list)
def test_dropin_steps(benchmark, name: str, kind: str) -> None:
    """A loop of ``step`` calls as a pipeline makes them, the drop-in (its default backend) beside diffusers'
    own scheduler; ``set_timesteps`` runs untimed before each loop, a CUDA loop waits for its last step."""
    diffusers = pytest.importorskip("diffusers")
    sched = getattr(diffusers, name)(**DROPIN_CONFIG.get(name, {}))
    if kind == "fastflow":
        from fastflow.diffusers import from_scheduler

        sched = from_scheduler(sched)
    z0 = torch.randn(SHAPE, device=DEVICE)
    o = torch.randn_like(z0)
    timesteps: list[torch.Tensor] = []
    final: list[torch.Tensor] = []
    # Classes whose pipelines call step otherwise run their pipeline's loop (host_ab's), iterating as it does.
    pipeline_loop = DROPIN_LOOPS.get(name)

    def setup() -> None:
        sched.set_timesteps(LOOP_STEPS, device=DEVICE, **SET_KWARGS.get(name, {}))
        timesteps[:] = list(sched.timesteps)

    def loop() -> None:
        if pipeline_loop is not None:
            z = pipeline_loop(sched, z0, o)
        else:
            z = z0
            for t in timesteps:
                z = sched.step(o, t, z, return_dict=False)[0]
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)
        final[:] = [z]

    benchmark.pedantic(loop, setup=setup, rounds=100, warmup_rounds=3)
    assert torch.isfinite(final[0]).all()


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
    case = Case(FAMILIES[family], SHAPE, torch.float32, torch.bfloat16, DEVICE, LOOP_STEPS)
    sampler = case.family.sampler(LOOP_STEPS, backend)
    sampler.prepare(DEVICE)
    sampler.init_noise(SHAPE, seed=0, device=DEVICE)
    out = benchmark(lambda: sampler.step(case.o, case.z0, 0))
    assert out.shape == SHAPE


def _loop_impl(kind: str, family: str, shape: tuple[int, ...] = SHAPE, steps: int = LOOP_STEPS):
    case = Case(FAMILIES[family], shape, torch.float32, torch.bfloat16, DEVICE, steps)
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


def _time_loops(benchmark, request, impl) -> None:
    """Time whole loops of ``impl``: each round runs the loop and on a GPU waits for its last step; ``prepare()``
    (diffusers' ``set_timesteps``, a naive solver's history reset) runs untimed before each round, as in
    ``python -m benchmarks``, so the per-step figure is the steps'. Rounds fill ``--benchmark-max-time`` (at least
    ``--benchmark-min-rounds``), as ``benchmark(...)`` would choose them."""

    def loop() -> None:
        impl.run()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)

    impl.prepare()
    loop()  # untimed: compiles and warms the allocator
    impl.prepare()
    t0 = time.perf_counter()
    loop()  # untimed: sizes the rounds
    once = max(time.perf_counter() - t0, 1e-9)
    max_time = float(request.config.getoption("benchmark_max_time", 1.0))
    min_rounds = int(request.config.getoption("benchmark_min_rounds", 5))
    rounds = max(min_rounds, min(10_000, math.ceil(max_time / once)))
    benchmark.pedantic(loop, setup=impl.prepare, rounds=rounds, warmup_rounds=1)


@pytest.mark.benchmark(group="loop: 10 steps, 1x4x16x16 (divide by 10 for per step; set_timesteps untimed)")
@pytest.mark.parametrize("kind", ("torch", "cuda", "naive", "diffusers"))
@pytest.mark.parametrize("family", LOOP_FAMILIES)
def test_loop(benchmark, request, kind: str, family: str) -> None:
    """A whole loop with the model replaced by a fixed output, as a pipeline drives each implementation."""
    impl = _loop_impl(kind, family)
    _time_loops(benchmark, request, impl)
    assert impl.final is not None and torch.isfinite(impl.final.float()).all()


SD_LATENT = (1, 16, 128, 128)
SD_LOOP_STEPS = 30


@pytest.mark.benchmark(group="sd_latent: a 30-step Sampler.step loop with the next model input, 1x16x128x128 "
                             "(divide by 30 for per step)")
@pytest.mark.parametrize("backend", ("cuda", "triton"))
@pytest.mark.parametrize("family", LOOP_FAMILIES)
def test_sd_latent_loop(benchmark, request, backend: str, family: str) -> None:
    """The benchmark suite's host-inclusive loop (float32 state, bfloat16 model input written by the step), timed
    over many rounds: on a GPU its per-step time is the host's, since the step's device time is shorter."""
    impl = _loop_impl(backend, family, SD_LATENT, SD_LOOP_STEPS)
    _time_loops(benchmark, request, impl)
    assert torch.isfinite(impl.final).all()
