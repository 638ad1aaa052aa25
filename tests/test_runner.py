"""PlanRunner: the plain-stage and bound history paths equal the general one; a new backend name resolves afresh."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastflow as ff
from fastflow.backends import get_backend
from fastflow.plan import H0, HistoryRef, StepPlan, compile_plan
from fastflow.runner import HistoryShapeError, PlanRunner, run_bound
from fastflow.solvers.base import Lin, Points, Stage


def _backends() -> list[str]:
    names = ["torch"]
    cuda = get_backend("cuda")
    if cuda.availability() is None and cuda.supports(torch.device("cpu")) is None:
        names.append("cuda")  # the extension's CPU kernel
    return names


def _sampler(solver: str, backend: str) -> ff.Sampler:
    sampler = ff.Sampler(ff.VP(), solver, prediction="eps", steps=6, backend=backend)
    sampler.prepare(torch.device("cpu"))
    return sampler


def test_which_stages_are_plain():
    """Single-step stages after the first are plain; a multistep stage that keeps its x_hat for later is not."""
    ddpm = _sampler("ddpm", "torch").runner
    assert not ddpm.is_plain(0)
    assert all(ddpm.is_plain(i) for i in range(1, ddpm.plan.coefs.shape[0]))
    dpm = _sampler("dpm++2m", "torch").runner
    assert any(not dpm.is_plain(i) for i in range(1, dpm.plan.coefs.shape[0]))


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("solver", ["ddim", "ddpm"])
@pytest.mark.parametrize("want_x", [False, True])
def test_run_plain_equals_run(backend, solver, want_x):
    """Same stage, same inputs (seeds for in-kernel noise, a caller tensor on a free history slot with a zero
    coefficient): run_plain's outputs, and those of run_bound through the runner's binding, are run's, bit for
    bit."""
    runner = _sampler(solver, backend).runner
    gen = torch.Generator().manual_seed(0)
    z, o, extra = (torch.randn(2, 3, 5, 7, generator=gen) for _ in range(3))
    seeds = torch.tensor([11, 12], dtype=torch.int64)
    for i in range(1, runner.plan.coefs.shape[0]):
        assert runner.is_plain(i)
        general = runner.run(i, z, o, seeds=seeds, want_x=want_x, extra_history=(extra,))
        plain = runner.run_plain(i, z, o, seeds, None, want_x, [extra], None, None)
        bound = run_bound(runner.bind(z.device, z.dtype, want_x, None), i, z, o, [extra],
                          seeds if runner.plan.noise[i] else None, bool(runner.plan.noise[i]))
        for result in (plain, bound):
            assert torch.equal(result[0], general[0])
            assert (result[1] is None) == (general[1] is None) == (not want_x)
            if want_x:
                assert torch.equal(result[1], general[1])


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("solver", ["dpm++2m", "sde-dpm++2m", "unipc", "heun"])
@pytest.mark.parametrize("want_x", [False, True])
def test_run_kept_equals_run(backend, solver, want_x):
    """A whole loop through run_kept and a binding, the history stored and read between its stages, gives run's
    outputs bit for bit, and leaves the same tensors stored after each stage."""
    general, kept = _sampler(solver, backend).runner, _sampler(solver, backend).runner
    bound = kept.bind(torch.device("cpu"), torch.float32, want_x, None)
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(2, 3, 5, 7, generator=gen)
    seeds = torch.tensor([21, 22], dtype=torch.int64)
    za = zb = z
    assert any(general._stages[i][0] for i in range(general.plan.coefs.shape[0]))  # some stage reads history
    for i in range(general.plan.coefs.shape[0]):
        o = torch.randn(2, 3, 5, 7, generator=gen)
        noisy = bool(general.plan.noise[i])
        a = general.run(i, za, o, seeds=seeds if noisy else None, want_x=want_x)
        b = kept.run_kept(bound, i, i, zb, o, [], seeds if noisy else None)
        assert torch.equal(a[0], b[0])
        assert (a[1] is None) == (b[1] is None)
        if a[1] is not None:
            assert torch.equal(a[1], b[1])
        assert general._store.keys() == kept._store.keys()
        assert all(torch.equal(general._store[key], kept._store[key]) for key in general._store)
        za, zb = a[0], b[0]


def test_run_kept_names_a_missing_stored_tensor():
    runner = _sampler("dpm++2m", "torch").runner
    reads = next(i for i in range(runner.plan.coefs.shape[0]) if runner._stages[i][0])
    z = torch.zeros(1, 2, 3, 3)
    bound = runner.bind(z.device, z.dtype, False, None)
    with pytest.raises(RuntimeError, match="run the stages in order from 0"):
        runner.run_kept(bound, reads, reads, z, z, [], None)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("path", ["run", "run_kept"])
def test_a_state_that_changed_shape_mid_loop_is_named_so(backend, path):
    """A stage whose state has another shape than the history its loop kept raises HistoryShapeError naming both
    shapes (the backends' own error named a history tensor and left the cause to guess)."""
    runner = _sampler("dpm++2m", backend).runner
    reads = next(i for i in range(runner.plan.coefs.shape[0]) if runner._stages[i][0])
    z = torch.randn(1, 4, 5, 6)
    bound = runner.bind(z.device, z.dtype, False, None)
    for i in range(reads):
        z = runner.run(i, z, torch.randn_like(z))[0] if path == "run" else runner.run_kept(
            bound, i, i, z, torch.randn_like(z), [], None)[0]
    trimmed = z[:, :, [0, -1]].contiguous()
    with pytest.raises(HistoryShapeError, match=r"state has shape \(1, 4, 2, 6\).*have shape \(1, 4, 5, 6\)"):
        if path == "run":
            runner.run(reads, trimmed, torch.randn_like(trimmed))
        else:
            runner.run_kept(bound, reads, reads, trimmed, torch.randn_like(trimmed), [], None)
    # another bad input of the same stage keeps the backend's own error
    with pytest.raises(ValueError, match="model output") as info:
        runner.run(reads, z, torch.randn(1, 4, 5, 7))
    assert not isinstance(info.value, HistoryShapeError)


def test_run_plain_of_a_noisy_stage_needs_seeds_or_noise():
    runner = _sampler("ddpm", "torch").runner
    z = torch.zeros(1, 2, 3, 3)
    with pytest.raises(ValueError, match="draws noise"):
        runner.run_plain(1, z, z, None, None, False, [], None, None)


def test_a_new_backend_name_is_resolved_afresh():
    runner = _sampler("ddim", "torch").runner
    z = torch.zeros(1, 2, 3, 3)
    runner.run(0, z, z)
    assert {type(b).__name__ for _, b, _ in runner._dispatch.values()} == {"TorchBackend"}
    runner.backend = "auto"
    assert runner._dispatch == {}
    runner.run(0, z, z)
    assert runner.backend == "auto" and len(runner._dispatch) == 1


@pytest.mark.parametrize("backend", _backends())
def test_a_kept_model_output_is_the_callers_tensor(backend):
    """A stage that keeps its model output stores the tensor it was given (no copy) and a later stage reads it as
    the history slot it names: the bits of the same step given that tensor on a free slot; a guided call of such a
    stage raises before it runs."""
    point = Points(*(np.array([v]) for v in (1.0, 1.0, 1.0, 0.0, 0.0)))  # x0 prediction
    first = Stage(point, Lin({("z", 0): 0.9, ("x", 0): 0.1}))
    runner = PlanRunner(compile_plan([first, Stage(point, Lin({("z", 1): 0.8, ("x", 1): 0.3, ("o", 0): -0.2}))],
                                     "x0"), backend)
    gen = torch.Generator().manual_seed(1)
    z, o0, o1 = (torch.randn(2, 3, 5, 7, generator=gen) for _ in range(3))
    z1, x0, _ = runner.run(0, z, o0)
    assert x0 is None and runner.stored("o", 0) is o0
    z2, _, _ = runner.run(1, z1, o1)

    plan = compile_plan([first, Stage(point, Lin({("z", 1): 0.8, ("x", 1): 0.3}))], "x0")
    coefs = plan.coefs.copy()
    coefs[1, H0] = -0.2  # on the caller's tensor
    given = PlanRunner(StepPlan(coefs, plan.history, plan.write_x, plan.keep_z, plan.noise, plan.clip), backend)
    given.run(0, z, o0)
    assert torch.equal(given.run(1, z1, o1, extra_history=(o0,))[0], z2)
    with pytest.raises(ValueError, match="keeps its model output, which a guided call does not have"):
        runner.run(0, z, o0, o1)


def test_kept_tensors_broadcast_to_a_larger_batch_not_to_another_shape():
    """History kept at batch 1 serves a state of batch 3 as its broadcast (each kept tensor copied once to the new
    shape); a state whose shape it does not broadcast to still raises HistoryShapeError."""
    def loop(switch_to: tuple[int, ...]) -> torch.Tensor:
        sampler = ff.Sampler(ff.VP(), "dpm++2m", steps=4, backend="torch")
        z = sampler.init_noise((1, 2, 3), seed=0)
        z = sampler.step(torch.tanh(z), z, 0)
        if switch_to[0] > 1:
            z = z.expand(switch_to).clone()
        elif switch_to != tuple(z.shape):
            z = torch.randn(switch_to)
        for i in range(1, 4):
            z = sampler.step(torch.tanh(z), z, i)
        return z

    wide = loop((3, 2, 3))
    one = loop((1, 2, 3))
    torch.testing.assert_close(wide, one.expand(3, 2, 3), rtol=0, atol=0)
    with pytest.raises(HistoryShapeError, match=r"state has shape \(1, 2, 5\)"):
        loop((1, 2, 5))


def test_a_smaller_batch_than_the_kept_history_is_named_so():
    """History kept at batch 3 does not serve a state trimmed to batch 1 (a broadcast runs the other way): the
    step raises HistoryShapeError, naming both shapes, not the backend's error."""
    sampler = ff.Sampler(ff.VP(), "dpm++2m", steps=4, backend="torch")
    z = sampler.init_noise((3, 2, 3), seed=0)
    z = sampler.step(torch.tanh(z), z, 0)[:1].clone()
    with pytest.raises(HistoryShapeError, match=r"state has shape \(1, 2, 3\).*shape \(3, 2, 3\)"):
        sampler.step(torch.tanh(z), z, 1)


@pytest.mark.parametrize("backend", _backends())
def test_run_kept_puts_stored_history_before_the_callers_slots(backend):
    """A stage that reads a stored tensor and takes a caller's tensor on the slot after the plan's (a drop-in's raw
    model output): run_kept binds them in run's order, so both give the same bits."""
    point = Points(*(np.array([v]) for v in (1.0, 1.0, 1.0, 0.0, 0.0)))  # x0 prediction
    first = Stage(point, Lin({("z", 0): 0.9, ("x", 0): 0.1}))
    plan = compile_plan([first, Stage(point, Lin({("z", 1): 0.8, ("x", 1): 0.3, ("x", 0): 0.5}))], "x0")
    assert len(plan.history[1]) == 1  # stage 1 reads stage 0's x_hat from slot h0
    coefs = plan.coefs.copy()
    coefs[1, H0 + 1] = -0.7  # the caller's tensor, on the next slot
    plan = StepPlan(coefs, plan.history, plan.write_x, plan.keep_z, plan.noise, plan.clip)
    general, kept = PlanRunner(plan, backend), PlanRunner(plan, backend)
    bound = kept.bind(torch.device("cpu"), torch.float32, False, None)
    gen = torch.Generator().manual_seed(3)
    z, o0, o1, extra = (torch.randn(2, 3, 5, 7, generator=gen) for _ in range(4))
    z1 = general.run(0, z, o0)[0]
    assert torch.equal(kept.run_kept(bound, 0, 0, z, o0, [], None)[0], z1)
    a = general.run(1, z1, o1, extra_history=(extra,))[0]
    b = kept.run_kept(bound, 1, 1, z1, o1, [extra], None)[0]
    assert torch.equal(a, b)


def test_run_kept_of_stage_0_forgets_an_abandoned_loop():
    """A loop through run_kept that starts again at stage 0 forgets what the abandoned loop kept: a later stage
    run out of order then raises, as through run, instead of reading the old loop's tensors."""
    for path in ("run", "run_kept"):
        runner = _sampler("dpm++2m", "torch").runner
        z = torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(4))
        bound = runner.bind(z.device, z.dtype, False, None)

        def stage(i, z, path=path, runner=runner, bound=bound):
            o = torch.tanh(z)
            return runner.run(i, z, o)[0] if path == "run" else runner.run_kept(bound, i, i, z, o, [], None)[0]

        x = z
        for i in range(3):  # the abandoned loop: stage 2 keeps its x_hat for stage 3
            x = stage(i, x)
        assert ("x", 2) in runner._store
        stage(0, z)
        assert ("x", 2) not in runner._store, path
        with pytest.raises(RuntimeError, match="run the stages in order from 0"):
            stage(3, z)


def test_tables_and_dispatch_are_made_once_per_device_and_dtype():
    """The coefficient table and the backend's entry are built on a device's first step and reused after (every step
    reads them; a new table per call would be an upload per step off the CPU)."""
    runner = _sampler("dpm++2m", "torch").runner
    cpu = torch.device("cpu")
    assert runner.table(cpu) is runner.table(cpu)
    assert runner.table(cpu, torch.float64) is runner.table(cpu, torch.float64)
    assert runner.table(cpu).dtype == torch.float32 and runner.table(cpu, torch.float64).dtype == torch.float64
    z = torch.zeros(1, 2, 3, 3)
    runner.run(0, z, z)
    entry = runner._dispatch[(cpu, torch.float32)]
    assert (cpu, torch.float64) not in runner._dispatch
    runner.run(0, z.double(), z.double())
    runner.run(0, z, z)
    assert runner._dispatch[(cpu, torch.float32)] is entry
    assert runner._dispatch[(cpu, torch.float64)][0] is runner.table(cpu, torch.float64)


@pytest.mark.parametrize("backend", _backends())
def test_out_may_be_the_stored_x0_its_stage_reads_last(backend):
    """DPM-Solver++(3M)'s stage ``i`` reads the x0 of stages ``i - 1`` and ``i - 2``, the latter for the last time:
    writing its next state over that tensor (``out=``) overwrites nothing a later stage reads, so it is allowed,
    and the loop is the one without ``out=``. Over the x0 of stage ``i - 1``, which stage ``i + 1`` reads too, it
    is refused (first at stage 1, over stage 0's)."""
    sampler = _sampler("dpm++3m", backend)
    assert sampler.plan.history[2] == (HistoryRef("x", 1), HistoryRef("x", 0))

    def loop(out_from: int | None) -> torch.Tensor:
        z = sampler.init_noise((1, 2, 4, 4), seed=1)
        x0s: list[torch.Tensor] = []
        for i in range(sampler.num_stages):
            out = x0s[i - out_from] if out_from is not None and i >= out_from else None
            z, x0 = sampler.step(torch.tanh(z) * 0.5, z, i, out=out, return_x0=True)
            assert out is None or z is out
            x0s.append(x0)
        return z

    assert torch.equal(loop(2), loop(None))
    with pytest.raises(ValueError, match="x0 of stage 0, which is kept"):
        loop(1)
