"""FlowMatchEulerDiscreteScheduler drop-in: parity with diffusers (SD3 / Flux style configs)."""

from __future__ import annotations

import math

import pytest
import torch
from dropin_helpers import assert_close, pair, run_loop, stand_in, start_noise

FLUX = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, shift=3.0)


@pytest.mark.parametrize(
    "config,set_kwargs",
    [
        (dict(), {}),
        (dict(shift=3.0), {}),  # SD3
        (FLUX, dict(mu=0.9)),
        (dict(FLUX, time_shift_type="linear"), dict(mu=1.1)),
        (dict(shift=3.0, shift_terminal=0.1), {}),
        (dict(shift=2.0, use_karras_sigmas=True), {}),
        (dict(shift=2.0, use_exponential_sigmas=True), {}),
        (dict(invert_sigmas=True), {}),
        (dict(shift=3.0), dict(sigmas=[1.0, 0.8, 0.55, 0.3, 0.12])),
        (dict(shift=3.0), dict(sigmas=[1.0, 0.7, 0.4, 0.1], timesteps=[1000.0, 700.0, 400.0, 100.0])),
    ],
    ids=["default", "sd3", "flux-mu", "linear-shift", "terminal", "karras", "exponential", "invert",
         "custom-sigmas", "custom-both"],
)
def test_parity(config, set_kwargs):
    ref, ff = pair("FlowMatchEulerDiscreteScheduler", **config)
    steps = None if ("sigmas" in set_kwargs or "timesteps" in set_kwargs) else 10
    xa, _ = run_loop(ref, steps, set_kwargs=set_kwargs)
    xb, outs = run_loop(ff, steps, set_kwargs=set_kwargs)
    assert torch.equal(ff.timesteps, ref.timesteps) and torch.equal(ff.sigmas, ref.sigmas)
    assert_close(xb, xa, rtol=1e-6, atol=1e-6)
    assert not hasattr(outs[0], "pred_original_sample") or outs[0].pred_original_sample is None


def test_stochastic_sampling_generator():
    ref, ff = pair("FlowMatchEulerDiscreteScheduler", shift=3.0, stochastic_sampling=True)
    ga, gb = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    xa, _ = run_loop(ref, 8, step_kwargs=lambda i: dict(generator=ga))
    xb, _ = run_loop(ff, 8, step_kwargs=lambda i: dict(generator=gb))
    assert_close(xb, xa)


def test_bf16_model_output():
    ref, ff = pair("FlowMatchEulerDiscreteScheduler", shift=3.0)
    bf = lambda x, t: stand_in(x.float(), t).bfloat16()  # noqa: E731
    x = start_noise().bfloat16()
    xa, _ = run_loop(ref, 6, model=bf, x=x)
    xb, _ = run_loop(ff, 6, model=bf, x=x)
    assert xa.dtype == xb.dtype == torch.bfloat16
    # diffusers rounds dt * v to bfloat16 before adding; the kernel adds in float32: bf16 ulps apart
    assert_close(xb.float(), xa.float(), rtol=2e-2, atol=2e-2)


def test_return_tuple_and_set_shift():
    ref, ff = pair("FlowMatchEulerDiscreteScheduler")
    for s in (ref, ff):
        s.set_shift(2.5)
        s.set_timesteps(5)
    x = start_noise()
    t = ref.timesteps[0]
    a = ref.step(stand_in(x, t), t, x, return_dict=False)
    b = ff.step(stand_in(x, t), t, x, return_dict=False)
    assert len(b) == 1
    assert_close(b[0], a[0])


def test_scale_noise_and_mu_required_are_diffusers():
    ref, ff = pair("FlowMatchEulerDiscreteScheduler", **FLUX)
    with pytest.raises(ValueError, match="mu"):
        ff.set_timesteps(4)
    for s in (ref, ff):
        s.set_timesteps(4, mu=math.log(3.0))
    x, n = start_noise(1), start_noise(2)
    t = ref.timesteps[1:2]
    assert torch.equal(ff.scale_noise(x, t, n), ref.scale_noise(x, t, n))


def test_per_token_timesteps_raises():
    _, ff = pair("FlowMatchEulerDiscreteScheduler")
    ff.set_timesteps(4)
    x = start_noise()
    with pytest.raises(NotImplementedError, match="per_token_timesteps"):
        ff.step(x, ff.timesteps[0], x, per_token_timesteps=torch.ones(2, 16))


def test_from_scheduler_keeps_set_shift():
    import diffusers

    import fastflow.diffusers as ffd

    src = diffusers.FlowMatchEulerDiscreteScheduler()
    src.set_shift(2.5)  # an instance setting, not in the config
    ff = ffd.from_scheduler(src)
    assert ff.shift == 2.5
    src.set_timesteps(6)
    ff.set_timesteps(6)
    assert torch.equal(ff.sigmas, src.sigmas)
