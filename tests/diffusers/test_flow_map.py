"""FlowMapEulerDiscreteScheduler drop-in (AnyFlow's flow-map sampler): schedule loops against diffusers, dtypes, the
value-addressed step (the same call twice), any-step calls, device timesteps never read. (Its meta-device, compile and
CUDA sync-debug loops are in test_dropin_api.py.)"""

from __future__ import annotations

import pytest
import torch
from dropin_helpers import assert_close, pair, run_loop, start_noise

diffusers = pytest.importorskip("diffusers")
NAME = "FlowMapEulerDiscreteScheduler"


def _velocity(x: torch.Tensor, t) -> torch.Tensor:
    """A stand-in of the sample and the timestep."""
    return 0.3 * x + 0.2 * torch.sin(x) + float(t) / 2000.0


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("schedule", [dict(num_inference_steps=1), dict(num_inference_steps=4),
                                      dict(num_inference_steps=30), dict(sigmas=[1.0, 0.7, 0.3, 0.05]),
                                      dict(timesteps=[999.0, 600.0, 250.0])])
def test_loops_match_diffusers(shift, schedule):
    """Default, custom-sigma and custom-timestep schedules, with and without shift: whole loops agree to float32
    round-off (diffusers computes in float64 and rounds once; the kernel in float32)."""
    ref, ff = pair(NAME, shift=shift)
    (xa, _), (xb, _) = (run_loop(s, None, set_kwargs=schedule, model=_velocity) for s in (ref, ff))
    torch.testing.assert_close(ff.timesteps, ref.timesteps, rtol=0, atol=0)
    assert xb.dtype == xa.dtype == torch.float32
    assert_close(xb, xa, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sample_dtype,output_dtype", [
    (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
    (torch.float16, torch.float32),
])
def test_dtypes(sample_dtype, output_dtype):
    """diffusers returns the model output's dtype, rounded once from float64: a float32 sample with a bfloat16
    output comes back bfloat16, a float16 one with a float32 output float32 (the drop-in then steps the sample
    upcast, not in float16). The loops agree to the output dtype's last bit or better."""
    ref, ff = pair(NAME, shift=3.0)
    model = lambda x, t: _velocity(x.float(), t).to(output_dtype)  # noqa: E731
    x = start_noise().to(sample_dtype)
    (xa, _), (xb, _) = (run_loop(s, 12, model=model, x=x) for s in (ref, ff))
    assert xb.dtype == xa.dtype == output_dtype
    ulp = torch.finfo(output_dtype).eps
    assert_close(xb.float(), xa.float(), rtol=ulp, atol=ulp)


def test_the_same_call_twice_gives_the_same_sample():
    """diffusers finds each call's sigmas from its timestep's value, so repeating a call repeats its result (its
    step counter is only observable state); so does the drop-in's, given a Python number or a CPU tensor."""
    ref, ff = pair(NAME, shift=3.0)
    x = start_noise()
    for s in (ref, ff):
        s.set_timesteps(6)
    for t in (ref.timesteps[2], float(ref.timesteps[2])):
        outs = [s.step(_velocity(x, t), t, x).prev_sample for s in (ref, ff, ref, ff)]
        assert_close(outs[1], outs[0], rtol=1e-6, atol=1e-6)
        assert torch.equal(outs[3], outs[1]) and torch.equal(outs[2], outs[0])
    assert ff.step_index == ref.step_index == 6  # both counted four calls from index 2


@pytest.mark.parametrize("r", ["schedule", "zero", "off", "tensor"])
def test_any_step_sampling(r):
    """An explicit ``r_timestep``: one of the schedule's, 0 (the terminal sigma), a value off the schedule, a CPU
    tensor; and a timestep off the schedule with an explicit target. The sample is diffusers'."""
    ref, ff = pair(NAME, shift=3.0)
    for s in (ref, ff):
        s.set_timesteps(8)
    x = start_noise()
    targets = {"schedule": float(ref.timesteps[5]), "zero": 0.0, "off": 123.4, "tensor": ref.timesteps[6].clone()}
    for t in (ref.timesteps[1], 777.7):
        outs = [s.step(_velocity(x, t), t, x, r_timestep=targets[r]).prev_sample for s in (ref, ff)]
        assert_close(outs[1], outs[0], rtol=1e-6, atol=1e-6)


def test_off_schedule_timestep_without_a_target_raises():
    """A timestep off the schedule has no next one: diffusers and the drop-in both raise, saying so."""
    ref, ff = pair(NAME)
    for s in (ref, ff):
        s.set_timesteps(4)
    x = start_noise()
    for s in (ref, ff):
        with pytest.raises(ValueError, match="not on the current schedule"):
            s.step(_velocity(x, 500.5), 500.5, x)


def test_device_timesteps_are_not_read():
    """Meta tensors have no data: a loop over device copies of the timesteps (located by the step counter), and
    any-step calls with device tensors (computed on the device as ``t / num_train_timesteps``), one with a target
    the host knows, all run."""
    _, ff = pair(NAME, shift=3.0)
    ff.set_timesteps(5)
    x = torch.empty(2, 4, 8, 8, device="meta")
    for t in ff.timesteps.to("meta"):
        x = ff.step(torch.empty_like(x), t, x).prev_sample
    assert ff.step_index == 5
    t_off = torch.empty((), device="meta", dtype=torch.float64)
    x = ff.step(torch.empty_like(x), t_off, x, r_timestep=torch.empty((), device="meta")).prev_sample
    x = ff.step(torch.empty_like(x), t_off, x, r_timestep=ff.timesteps[3]).prev_sample
    assert x.device.type == "meta" and x.shape == (2, 4, 8, 8)


@pytest.mark.parametrize("schedule", [dict(num_inference_steps=8), dict(sigmas=[1.0, 0.6, 0.2])])
def test_schedule_timesteps_are_sigmas_times_the_training_length(schedule):
    """The assumption behind the device path (a tensor it cannot locate is taken as ``t / N``): diffusers' timesteps
    are its shifted sigmas times ``num_train_timesteps``, so for a schedule timestep ``t / N`` is its sigma to
    float64 round-off."""
    ref = diffusers.FlowMapEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(**schedule)
    n = ref.config.num_train_timesteps
    for i, t in enumerate(ref.timesteps.tolist()):
        assert abs(t / n - float(ref.sigmas[i])) < 1e-15


def test_any_step_with_per_sample_tensor_timesteps():
    """Off the schedule, diffusers divides a tensor timestep by the training length element by element: a batch of
    timesteps gives each sample its own sigma; the drop-in does the same."""
    ref, ff = pair(NAME, shift=3.0)
    for s in (ref, ff):
        s.set_timesteps(8)
    x = start_noise()
    t = torch.tensor([[812.5], [640.25]], dtype=torch.float64).expand(2, 3)[:, 0]  # per-sample, off the schedule
    r = torch.tensor([300.0, 100.0], dtype=torch.float64)
    outs = [s.step(_velocity(x, 0), t, x, r_timestep=r).prev_sample for s in (ref, ff)]
    assert_close(outs[1], outs[0], rtol=1e-6, atol=1e-6)
    # the first sample's timesteps for both: the second sample's result moves (its own sigmas were used above)
    shared = ff.step(_velocity(x, 0), float(t[0]), x, r_timestep=float(r[0])).prev_sample
    assert_close(shared[0], outs[1][0], rtol=1e-6, atol=1e-6)
    assert (shared[1] - outs[1][1]).abs().max() > 1e-2
