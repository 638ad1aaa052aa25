"""CMStochasticIterativeScheduler drop-in (consistency models): parity with diffusers over its schedules and options,
16-bit samples, diffusers' ConsistencyModelPipeline. (Its meta-device, compile and CUDA sync-debug loops are in
test_dropin_api.py.)"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from dropin_helpers import assert_close, pair

diffusers = pytest.importorskip("diffusers")
NAME = "CMStochasticIterativeScheduler"
SCHEDULES = [dict(num_inference_steps=1), dict(num_inference_steps=2), dict(num_inference_steps=40),
             dict(timesteps=[22, 0]), dict(timesteps=[39, 20, 10, 3])]


def _model(x: torch.Tensor, t) -> torch.Tensor:
    return (0.3 * x.float() + 0.2 * torch.sin(x.float()) + float(t) / 1000).to(x.dtype)


def _loop(s, schedule: dict, x: torch.Tensor, model=_model) -> torch.Tensor:
    s.set_timesteps(**schedule)
    x = x * s.init_noise_sigma
    for i, t in enumerate(s.timesteps):
        x = s.step(model(s.scale_model_input(x, t), t), t, x, generator=torch.Generator().manual_seed(i)).prev_sample
    return x


CASES = list(itertools.product((True, False), (1.0, 0.5), range(len(SCHEDULES))))


@pytest.mark.parametrize(("clip", "s_noise", "schedule"), CASES, ids=[f"clip{c}-s{s}-{k}" for c, s, k in CASES])
def test_loops_match_diffusers(clip, s_noise, schedule):
    """One, two and forty steps and custom timesteps (the sampler's one- and multi-step uses), clipping, s_noise:
    diffusers' samples, its noise drawn from the same generators (no noise for a one-step loop)."""
    ref, ff = pair(NAME, clip_denoised=clip, s_noise=s_noise)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    xa, xb = (_loop(s, SCHEDULES[schedule], x) for s in (ref, ff))
    assert torch.isfinite(xa).all()
    assert_close(xb, xa)


def test_loop_on_the_constructors_schedule_matches_diffusers():
    """Without set_timesteps diffusers steps on the schedule its constructor made (num_train_timesteps steps, no
    trailing sigma: its last step re-noises to the last sigma); the drop-in gives the same samples."""
    ref, ff = pair(NAME)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    outs = []
    for s in (ref, ff):
        y = x
        for i, t in enumerate(s.timesteps):
            y = s.step(_model(y, t), t, y, generator=torch.Generator().manual_seed(i)).prev_sample
        outs.append(y)
    assert_close(outs[1], outs[0])


def test_scale_model_input_is_bit_identical():
    ref, ff = pair(NAME)
    for s in (ref, ff):
        s.set_timesteps(5)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 80
    for i, t in enumerate(ref.timesteps):
        a, b = ref.scale_model_input(x, t), ff.scale_model_input(x, t)
        assert torch.equal(a, b), i
        nxt = ref.step(_model(a, t), t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        ff.step(_model(b, t), t, x, generator=torch.Generator().manual_seed(i))
        x = nxt


def test_16_bit_loops():
    """float16 samples and outputs: diffusers steps in 16 bits, the kernel in float32 and rounds once; both return
    float16 and the drop-in is no further than diffusers from the float32 loop on the same 16-bit outputs."""
    ref, ff = pair(NAME, clip_denoised=False)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2)).half()
    schedule = dict(num_inference_steps=10)
    xa, xb = (_loop(s, schedule, x) for s in (ref, ff))
    x32 = _loop(ref, schedule, x.float(), model=lambda y, t: _model(y.half(), t).float())
    assert xa.dtype == xb.dtype == torch.float16
    assert (xb.float() - x32).abs().max() <= 1.5 * (xa.float() - x32).abs().max()


def test_integer_timestep_raises():
    _, ff = pair(NAME)
    ff.set_timesteps(2)
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="integer"):
        ff.step(x, 0, x)


@pytest.mark.parametrize("schedule", [dict(num_inference_steps=1), dict(num_inference_steps=None, timesteps=[22, 0])],
                         ids=["one-step", "two-steps"])
def test_consistency_model_pipeline(schedule):
    """diffusers' ConsistencyModelPipeline (a tiny random UNet) gives the same images with the drop-in."""
    from posterior_model import tiny_unet

    import fastflow.diffusers as ffd

    unet = tiny_unet()
    ref = diffusers.CMStochasticIterativeScheduler(num_train_timesteps=40)
    images = []
    for scheduler in (ref, ffd.from_scheduler(ref)):
        pipe = diffusers.ConsistencyModelPipeline(unet=unet, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            images.append(pipe(batch_size=2, generator=torch.Generator().manual_seed(0), output_type="np",
                               **schedule).images)
    np.testing.assert_allclose(images[1], images[0], rtol=0, atol=1e-5)
