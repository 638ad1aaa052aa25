"""The drop-ins' lane (FastflowScheduler._ff_lane_step): a loop's default step calls after the first run from what
the first bound, and give the same bits as the same calls through _ff_step; any call, tensor or state the lane was
not bound for leaves it."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from dropin_helpers import SHAPE, pair, stand_in, start_noise

from fastflow.backends import get_backend
from fastflow.diffusers._base import FastflowScheduler

# Every class whose step calls the lane, with a config that its pipelines use.
LANE_CLASSES = [
    ("DDIMScheduler", dict()),
    ("DDIMScheduler", dict(prediction_type="v_prediction", clip_sample=False)),
    ("DDPMScheduler", dict()),
    ("EulerDiscreteScheduler", dict()),
    ("EulerAncestralDiscreteScheduler", dict()),
    ("EDMEulerScheduler", dict()),
    ("FlowMatchEulerDiscreteScheduler", dict()),
    ("FlowMatchEulerDiscreteScheduler", dict(stochastic_sampling=True)),
    ("DPMSolverMultistepScheduler", dict()),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++")),
    ("UniPCMultistepScheduler", dict()),
    ("DEISMultistepScheduler", dict()),
    ("EDMDPMSolverMultistepScheduler", dict()),
    ("SASolverScheduler", dict()),
    ("CMStochasticIterativeScheduler", dict()),
    ("CogVideoXDDIMScheduler", dict()),
    ("DDIMInverseScheduler", dict()),
    ("LTXEulerAncestralRFScheduler", dict()),
    ("SCMScheduler", dict()),
    ("LCMScheduler", dict()),
    ("LCMScheduler", dict(clip_sample=True, prediction_type="v_prediction")),
    ("HeunDiscreteScheduler", dict()),
    ("FlowMatchHeunDiscreteScheduler", dict()),
    ("KDPM2DiscreteScheduler", dict()),
    ("KDPM2AncestralDiscreteScheduler", dict()),
    ("IPNDMScheduler", dict()),
    ("PNDMScheduler", dict(skip_prk_steps=True)),
    ("LMSDiscreteScheduler", dict()),
    ("LMSDiscreteScheduler", dict(prediction_type="sample")),
    ("TCDScheduler", dict()),
    ("DPMSolverSinglestepScheduler", dict()),
    ("DPMSolverSinglestepScheduler", dict(algorithm_type="sde-dpmsolver++")),
    ("DPMSolverMultistepInverseScheduler", dict()),
]
SET_KWARGS = {"SCMScheduler": dict(intermediate_timesteps=None)}
STEPS = 8


def _backends() -> list[str]:
    cpu = torch.device("cpu")
    names = ["torch"]
    cuda = get_backend("cuda")
    if cuda.availability() is None and cuda.supports(cpu) is None:
        names.append("cuda")  # the C++ extension's CPU build
    return names


@pytest.fixture
def counts(monkeypatch) -> dict[str, int]:
    """How often a step ran through _ff_step and through the lane."""
    found = {"step": 0, "lane": 0}
    step, lane = FastflowScheduler._ff_step, FastflowScheduler._ff_lane_step

    def counted_step(self, *args, **kwargs):
        found["step"] += 1
        return step(self, *args, **kwargs)

    def counted_lane(self, *args, **kwargs):
        done = lane(self, *args, **kwargs)
        found["lane"] += done is not None
        return done

    monkeypatch.setattr(FastflowScheduler, "_ff_step", counted_step)
    monkeypatch.setattr(FastflowScheduler, "_ff_lane_step", counted_lane)
    return found


def _without_lane(monkeypatch) -> None:
    monkeypatch.setattr(FastflowScheduler, "_ff_lane_step", lambda self, *args, **kwargs: None)


def _loop(ff, *, steps: int = STEPS, x: torch.Tensor | None = None, call: Callable | None = None,
          set_timesteps: bool = True) -> list:
    """A pipeline-style loop of default calls (``call(i, ff, o, t, x)`` replaces step ``i``'s call where it
    returns something); every step's output, as tuples of tensors or None."""
    if set_timesteps:
        ff.set_timesteps(steps, **SET_KWARGS.get(type(ff).__name__, {}))
    x = start_noise(3) * getattr(ff, "init_noise_sigma", 1.0) if x is None else x
    timesteps = ff.timesteps[:-1] if type(ff).__name__ == "SCMScheduler" else ff.timesteps
    outs = []
    for i, t in enumerate(timesteps):
        inp = ff.scale_model_input(x, t) if hasattr(ff, "scale_model_input") else x
        o = stand_in(inp, t)
        out = call(i, ff, o, t, x) if call is not None else None
        if out is None:
            out = ff.step(o, t, x, return_dict=False)
        outs.append(tuple(out))
        x = out[0]
    return outs


def _same_bits(a: list, b: list) -> None:
    assert len(a) == len(b)
    for i, (sa, sb) in enumerate(zip(a, b, strict=True)):
        for va, vb in zip(sa, sb, strict=True):
            if va is None or vb is None:
                assert va is None and vb is None, f"step {i}: one output is None"
                continue
            assert va.dtype == vb.dtype and va.shape == vb.shape, f"step {i}"
            assert torch.equal(va, vb), f"step {i}: {(va - vb).abs().max()}"


def _both(monkeypatch, make: Callable, run: Callable) -> tuple[list, list]:
    """``run(make())`` with the lane and without it, the global generator seeded alike (fastflow's noise seed)."""
    torch.manual_seed(0)
    with_lane = run(make())
    with monkeypatch.context() as m:
        _without_lane(m)
        torch.manual_seed(0)
        without = run(make())
    return with_lane, without


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("name,config", LANE_CLASSES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(LANE_CLASSES)])
def test_lane_runs_the_loop_with_the_same_bits(monkeypatch, counts, name, config, backend):
    """After a loop's first call, every step of a default loop runs from the lane, with the bits of _ff_step."""
    _, ff = pair(name, backend=backend, **config)
    torch.manual_seed(0)
    with_lane = _loop(ff)
    assert counts["step"] <= 2 and counts["lane"] >= len(with_lane) - 2, counts  # (a noisy stage may rebind once)
    assert counts["step"] + counts["lane"] == len(with_lane)
    with monkeypatch.context() as m:
        _without_lane(m)
        torch.manual_seed(0)
        without = _loop(ff)
    _same_bits(with_lane, without)


def _switch_at(k: int, change: Callable) -> Callable:
    """A step call that, from step ``k`` on, calls step with ``change(o, t, x)``'s (o, t, x, kwargs)."""

    def call(i, ff, o, t, x):
        if i < k:
            return None
        o, t, x, kwargs = change(o, t, x)
        return ff.step(o, t, x, return_dict=False, **kwargs)

    return call


CHANGES = {
    "float64 sample": lambda o, t, x: (o, t, x.double(), {}),
    "float16 model output": lambda o, t, x: (o.half(), t, x, {}),
    "bfloat16 sample and output": lambda o, t, x: (o.bfloat16(), t, x.bfloat16(), {}),
    "strided model output": lambda o, t, x: (o.transpose(2, 3).contiguous().transpose(2, 3), t, x, {}),
    "larger batch": lambda o, t, x: (torch.cat([o, o]), t, torch.cat([x, x]), {}),
}


@pytest.mark.parametrize("change", list(CHANGES))
@pytest.mark.parametrize("name", ["DDIMScheduler", "DDPMScheduler", "EulerAncestralDiscreteScheduler",
                                  "DPMSolverMultistepScheduler", "FlowMatchEulerDiscreteScheduler"])
def test_tensors_unlike_the_lanes_leave_it(monkeypatch, name, change):
    """Mid-loop, a state or model output in another dtype, layout or batch than the lane was bound for: the step
    runs as _ff_step runs it (the lane rebinds for the new tensors)."""
    if name == "DPMSolverMultistepScheduler" and change == "larger batch":
        pytest.skip("its stored history has the first batch")
    call = _switch_at(3, CHANGES[change])
    with_lane, without = _both(monkeypatch, lambda: pair(name)[1], lambda ff: _loop(ff, call=call))
    _same_bits(with_lane, without)


def test_prediction_flag_set_mid_loop_is_read(monkeypatch):
    """compute_pred_original_sample set on the instance mid-loop takes effect at once, both ways."""

    def toggling(i, ff, o, t, x):
        if i in (2, 5):
            ff.compute_pred_original_sample = i == 5
        return None

    with_lane, without = _both(monkeypatch, lambda: pair("EulerAncestralDiscreteScheduler")[1],
                               lambda ff: _loop(ff, call=toggling))
    _same_bits(with_lane, without)
    assert [out[1] is None for out in with_lane] == [False, False, True, True, True, False, False, False]


@pytest.mark.parametrize("name", ["EulerAncestralDiscreteScheduler", "DDPMScheduler"])
def test_diffusers_noise_set_mid_loop_draws_diffusers_noise(monkeypatch, name):
    """diffusers_noise set on the instance mid-loop: the next steps draw from torch's global generator, as
    _ff_step does, not the lane's in-kernel noise."""

    def toggling(i, ff, o, t, x):
        if i == 3:
            ff.diffusers_noise = True
        return None

    with_lane, without = _both(monkeypatch, lambda: pair(name)[1], lambda ff: _loop(ff, call=toggling))
    _same_bits(with_lane, without)


def test_options_and_generators_mid_loop_leave_the_lane(monkeypatch):
    """A non-default call mid-loop (eta, a generator, given noise) runs as _ff_step runs it, and the default calls
    after it return to the lane's bits."""

    def options(i, ff, o, t, x):
        if i == 2:
            return ff.step(o, t, x, eta=0.5, generator=torch.Generator().manual_seed(5), return_dict=False)
        if i == 4:
            return ff.step(o, t, x, eta=1.0, variance_noise=torch.ones_like(x), return_dict=False)
        return None

    with_lane, without = _both(monkeypatch, lambda: pair("DDIMScheduler")[1], lambda ff: _loop(ff, call=options))
    _same_bits(with_lane, without)


def test_host_timesteps_that_skip_relocate_the_step(monkeypatch):
    """DDIM finds its step by the timestep's value: a Python-number timestep that skips a step is located, not
    taken from the lane's counter."""

    def skipping(i, ff, o, t, x):
        values = [int(v) for v in ff.timesteps]
        return ff.step(o, values[min(i + (i >= 3), len(values) - 1)], x, return_dict=False)

    with_lane, without = _both(monkeypatch, lambda: pair("DDIMScheduler")[1], lambda ff: _loop(ff, call=skipping))
    _same_bits(with_lane, without)


@pytest.mark.parametrize("name", ["DDPMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler"])
def test_loops_again_and_from_a_begin_index(monkeypatch, name):
    """A second loop without set_timesteps, and an img2img loop from set_begin_index, run as _ff_step runs them."""

    def loops(ff):
        first = _loop(ff)
        again = _loop(ff, set_timesteps=False)
        ff.set_timesteps(STEPS)
        ff.set_begin_index(3)
        x = start_noise(4)
        outs = []
        for t in ff.timesteps[3:]:
            out = ff.step(stand_in(x, t), t, x, return_dict=False)
            outs.append(tuple(out))
            x = out[0]
        return first + again + outs

    with_lane, without = _both(monkeypatch, lambda: pair(name)[1], loops)
    _same_bits(with_lane, without)


def test_learned_variance_ddpm_keeps_to_its_step(counts):
    """DDPM with a learned variance gives the noise at some steps only: its calls never use the lane."""
    _, ff = pair("DDPMScheduler", variance_type="learned_range")
    ff.set_timesteps(STEPS)
    x = start_noise(5)
    for t in ff.timesteps:
        o = torch.cat([stand_in(x, t), torch.zeros(SHAPE)], dim=1)
        x = ff.step(o, t, x, return_dict=False)[0]
    assert counts["lane"] == 0 and counts["step"] == STEPS


def test_an_undefined_step_raises_from_the_lane_too():
    """A step diffusers leaves undefined raises where it runs, also when the lane holds the loop around it (here an
    img2img loop past it, then its counter set back to it)."""
    _, ff = pair("DDIMScheduler", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                 rescale_betas_zero_snr=True, timestep_spacing="trailing", clip_sample=False)
    ff.set_timesteps(STEPS)
    ff.set_begin_index(2)
    x = start_noise(6)
    for t in ff.timesteps[2:5]:
        x = ff.step(stand_in(x, t), t, x, return_dict=False)[0]
    assert ff._ff_lane is not None
    ff._step_index = 0
    t = ff.timesteps[0]
    with pytest.raises(ValueError, match="no x0 at a timestep with alphas_cumprod = 0"):
        ff.step(stand_in(x, t), t, x)


@pytest.mark.parametrize("name,config", [("DDPMScheduler", {}), ("EulerAncestralDiscreteScheduler", {}),
                                         ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++"))])
def test_noise_counters_off_the_cpu_are_those_of_step(monkeypatch, counts, name, config):
    """Off the CPU a noisy step's counter is a one-element device view (no host-to-device copy): on the meta device
    the lane gives the kernel the views _ff_step gives it, step by step, with the same seeds."""
    backend = get_backend("torch")
    calls: list[tuple] = []
    real = backend.fused_step_alloc

    def recording(z, model_out, model_out_uncond, history, table, step, **kwargs):
        counter = step.storage_offset() if isinstance(step, torch.Tensor) else ("int", step)
        seeds = kwargs.get("seeds")
        calls.append((counter, None if seeds is None else (seeds.device.type, tuple(seeds.shape)),
                      kwargs.get("use_noise")))
        return real(z, model_out, model_out_uncond, history, table, step, **kwargs)

    monkeypatch.setattr(backend, "fused_step_alloc", recording)
    runs = []
    for lane in (True, False):
        with monkeypatch.context() as m:
            if not lane:
                _without_lane(m)
            calls.clear()
            _, ff = pair(name, **config)
            torch.manual_seed(0)
            ff.set_timesteps(STEPS)
            x = torch.empty(SHAPE, device="meta")
            for t in ff.timesteps:
                x = ff.step(torch.empty_like(x), t, x, return_dict=False)[0]
            runs.append(list(calls))
    assert counts["lane"] >= STEPS - 2
    assert runs[0] == runs[1]
    assert any(isinstance(c[0], int) for c in runs[0])  # device views were given


def test_pndm_warm_up_runs_its_runge_kutta_calls_through_step(monkeypatch, counts):
    """PNDM with its Runge-Kutta warm-up: those calls (which recover their group's sample) run through _ff_step;
    the Adams-Bashforth calls after them run from the lane, with the same bits."""
    make = lambda: pair("PNDMScheduler", skip_prk_steps=False)[1]  # noqa: E731
    torch.manual_seed(0)
    ff = make()
    with_lane = _loop(ff)
    prk_calls = len(ff.prk_timesteps)
    plms_calls = len(with_lane) - prk_calls
    assert prk_calls == 12 and plms_calls > 2
    assert counts == {"step": prk_calls + 1, "lane": plms_calls - 1}, counts
    with monkeypatch.context() as m:
        _without_lane(m)
        torch.manual_seed(0)
        without = _loop(make())
    _same_bits(with_lane, without)


def test_pndm_warm_up_of_a_second_loop_keeps_its_sample_check(monkeypatch):
    """A second warm-up loop without set_timesteps (the lane still bound from the first loop's last calls) runs
    its Runge-Kutta calls as _ff_step does: the same bits, and a fourth call given another sample raises."""
    with_lane, without = _both(monkeypatch, lambda: pair("PNDMScheduler", skip_prk_steps=False)[1],
                               lambda ff: _loop(ff) + _loop(ff, set_timesteps=False))
    _same_bits(with_lane, without)

    def renoised(i, ff, o, t, x):
        return ff.step(o, t, x + 1.0, return_dict=False) if i == 3 else None

    _, ff = pair("PNDMScheduler", skip_prk_steps=False)
    _loop(ff)
    assert ff._ff_lane is not None
    with pytest.raises(NotImplementedError, match="Runge-Kutta call 3 was given a sample other than"):
        _loop(ff, call=renoised, set_timesteps=False)


def test_lms_order_is_the_lanes_variant(monkeypatch, counts):
    """LMS's order argument selects its plan: a loop at order 2 runs from a lane bound for order 2, and another
    order mid-loop raises as it does without the lane."""

    def order_two(i, ff, o, t, x):
        return ff.step(o, t, x, order=2, return_dict=False)

    with_lane, without = _both(monkeypatch, lambda: pair("LMSDiscreteScheduler")[1],
                               lambda ff: _loop(ff, call=order_two))
    _same_bits(with_lane, without)
    assert counts["lane"] == STEPS - 1
    _, ff = pair("LMSDiscreteScheduler")
    with pytest.raises(NotImplementedError, match="order=3 after order=2"):
        _loop(ff, call=lambda i, ff, o, t, x: ff.step(o, t, x, order=2 if i < 4 else 3, return_dict=False))


def test_tcd_eta_is_the_lanes_variant(monkeypatch, counts):
    """TCD's eta selects its plan: a new eta mid-loop runs its own plan (and rebinds the lane), with the bits of
    the run without the lane; a call with a generator draws diffusers' noise."""

    def etas(i, ff, o, t, x):
        if i == 5:
            return ff.step(o, t, x, eta=0.7, generator=torch.Generator().manual_seed(1), return_dict=False)
        return ff.step(o, t, x, eta=0.3 if i < 3 else 0.7, return_dict=False)

    with_lane, without = _both(monkeypatch, lambda: pair("TCDScheduler")[1], lambda ff: _loop(ff, call=etas))
    _same_bits(with_lane, without)
    assert counts["lane"] == STEPS - 3  # all but the first call, the new eta's first and the generator's


@pytest.mark.parametrize("name", ["DPMSolverSinglestepScheduler", "DPMSolverMultistepInverseScheduler"])
def test_learned_variance_dpm_solvers_keep_to_their_step(counts, name):
    """A learned variance's model output is sliced to its noise channels by the step: those calls never use the
    lane."""
    _, ff = pair(name, variance_type="learned_range")
    ff.set_timesteps(STEPS)
    x = start_noise(5, shape=(2, 3, 16, 16))  # diffusers keeps the first three channels as the noise
    for t in ff.timesteps:
        o = torch.cat([stand_in(x, t), torch.zeros_like(x)], dim=1)
        x = ff.step(o, t, x, return_dict=False)[0]
    assert counts["lane"] == 0 and counts["step"] == STEPS


@pytest.mark.parametrize("name", ["HeunDiscreteScheduler", "LMSDiscreteScheduler", "KDPM2DiscreteScheduler"])
def test_no_prediction_field_when_it_is_off(monkeypatch, name):
    """With compute_pred_original_sample False every step returns None there: the lane returned the x_hat a
    stage writes for a later one to read (Heun's first calls, LMS's steps) on both ways."""

    def off(i, ff, o, t, x):
        ff.compute_pred_original_sample = False
        return None

    with_lane, without = _both(monkeypatch, lambda: pair(name)[1], lambda ff: _loop(ff, call=off))
    assert all(out[1] is None for out in with_lane + without)


@pytest.mark.parametrize("lane", [True, False], ids=["lane", "general"])
def test_an_edit_of_a_returned_prediction_changes_no_later_step(monkeypatch, lane):
    """Heun's first call returns the x0 its second call reads; a callback that edited it in place (diffusers'
    stored derivative is another tensor) moved the second call's result. The drop-in returns a copy there."""
    ref, ff = pair("HeunDiscreteScheduler")
    if not lane:
        _without_lane(monkeypatch)
    finals = []
    for sched in (ref, ff):
        sched.set_timesteps(5)
        x = start_noise(3) * sched.init_noise_sigma
        for t in sched.timesteps:
            out = sched.step(stand_in(sched.scale_model_input(x, t), t), t, x)
            out.pred_original_sample.mul_(0.5)
            x = out.prev_sample
        finals.append(x)
    torch.testing.assert_close(finals[1], finals[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name", ["DDIMScheduler", "LCMScheduler", "DDPMScheduler"])
def test_a_copy_keeps_the_lane(counts, name, how):
    """A copy made mid-loop (Text2Video-Zero deep-copies its DDIM scheduler and finishes the loop with the copy)
    knows its own timesteps' elements by their addresses, so the classes that locate a step by its timestep keep
    the lane (the copy held the original's address: every step took _ff_step), and step as the original does."""
    import copy
    import pickle

    ff = pair(name)[1]
    ff.set_timesteps(STEPS)
    x = start_noise(3)
    for t in ff.timesteps[:3]:
        x = ff.step(stand_in(x, t), t, x).prev_sample
    twin = copy.deepcopy(ff) if how == "deepcopy" else pickle.loads(pickle.dumps(ff))
    counts.update(step=0, lane=0)
    xt = x
    for t in twin.timesteps[3:]:
        xt = twin.step(stand_in(xt, t), t, xt).prev_sample
    assert counts == {"step": 0, "lane": STEPS - 3}
    for t in ff.timesteps[3:]:
        x = ff.step(stand_in(x, t), t, x).prev_sample
    assert torch.equal(xt, x)


@pytest.mark.parametrize("how", ["skip", "repeat"])
@pytest.mark.parametrize("name", ["DDIMScheduler", "DDPMScheduler"])
def test_timestep_elements_off_the_counter_relocate_the_step(monkeypatch, counts, name, how):
    """DDIM and DDPM find their step by the timestep: an element of ``timesteps`` that is not the counter's step (a
    loop that skips one, a step taken again) is located by its position, not taken from the lane's counter."""

    def off(i, ff, o, t, x):
        j = i + (i >= 3) if how == "skip" else i - (i == 4)
        return ff.step(o, ff.timesteps[min(j, len(ff.timesteps) - 1)], x, return_dict=False)

    with_lane, without = _both(monkeypatch, lambda: pair(name)[1], lambda ff: _loop(ff, call=off))
    _same_bits(with_lane, without)
    assert counts["lane"] > 0  # the on-counter steps still run from it
