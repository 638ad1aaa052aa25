"""What the multistep drop-ins (DPM-Solver, UniPC, DEIS, SA-Solver) share: fastflow/diffusers/_multistep.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dropin_helpers import assert_close, compiled_loops, pair, run_loop, stand_in, start_noise

from fastflow import UndefinedStepError


@pytest.mark.parametrize(
    ("name", "sigmas"),
    [("DPMSolverMultistepScheduler", "use_karras_sigmas"), ("DPMSolverMultistepScheduler", "use_exponential_sigmas"),
     ("UniPCMultistepScheduler", "use_exponential_sigmas")],
)
def test_flow_sigmas_past_one_raise(name, sigmas):
    """These sigmas with use_flow_sigmas are variance-exploding values (up to ~157) that diffusers takes as flow
    sigmas (alpha = 1 - sigma < 0): its loop returns NaN, and the drop-in's first step says why."""
    ref, ff = pair(name, use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction", **{sigmas: True})
    xa, _ = run_loop(ref, 6)
    assert torch.isnan(xa).all()
    with pytest.raises(ValueError, match="use_flow_sigmas=True, but this schedule's sigmas reach 157"):
        run_loop(ff, 6)


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_flow_sigmas_past_one_before_a_loop_s_start_are_not_its_concern(name):
    """The same schedule, from the first step whose sigma is at most 1 (an img2img loop): every sigma it reads is a
    flow sigma, diffusers' loop is finite, and the drop-in runs it as diffusers does."""
    ref, ff = pair(name, use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction",
                   use_exponential_sigmas=True)
    ref.set_timesteps(8)
    begin = next(i for i, s in enumerate(ref.sigmas.tolist()) if s <= 1.0)
    assert 0 < begin < 6 and ref.sigmas.max() > 1.0
    xa, _ = run_loop(ref, 8, begin=begin)
    assert torch.isfinite(xa).all()
    xb, _ = run_loop(ff, 8, begin=begin)
    assert_close(xb, xa)


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_thresholded_steps_trace_with_fullgraph(name):
    """Dynamic thresholding reads the step's x0 conversion as Python numbers (torch.compile traces numpy scalars
    as tensors, and a branch on one broke the graph): a thresholded step traces with fullgraph=True and matches
    diffusers."""
    ref, ff = pair(name, thresholding=True, sample_max_value=1.0, prediction_type="v_prediction")
    xb, xa = compiled_loops(ref, ff, stand_in, 6)
    assert_close(xb, xa)


@pytest.mark.parametrize(
    ("name", "config", "schedule"),
    [
        # Custom timesteps past the training range: diffusers clamps their sigmas to its last one.
        ("DPMSolverMultistepScheduler", dict(num_train_timesteps=500), dict(timesteps=[997, 960, 938, 300, 100])),
        ("DPMSolverMultistepScheduler", dict(solver_order=3), dict(timesteps=[800, 600, 600, 300, 100])),
        ("UniPCMultistepScheduler", dict(use_flow_sigmas=True, prediction_type="flow_prediction"),
         dict(sigmas=np.array([1.0, 0.6, 0.6, 0.3, 0.1]))),
        ("UniPCMultistepScheduler", dict(use_flow_sigmas=True, prediction_type="flow_prediction", solver_order=3),
         dict(sigmas=np.array([1.0, 0.6, 0.6, 0.3, 0.1]))),
    ],
)
def test_step_after_a_repeated_sigma_raises_when_run(name, config, schedule):
    """A higher-order step divides by the length of the steps before it: after a zero-length step diffusers returns
    NaN, and the drop-in raises saying why when that step runs (not in set_timesteps, which could not know where an
    img2img loop starts); a loop that starts past the repeat matches diffusers."""
    schedule = dict(num_inference_steps=None, **schedule)
    ref, ff = pair(name, **config)
    xa, _ = run_loop(ref, None, set_kwargs=schedule)
    assert not torch.isfinite(xa).all()
    with pytest.raises(ValueError, match="same log-SNR|follows a zero-length step"):
        run_loop(ff, None, set_kwargs=schedule)
    xa, _ = run_loop(ref, None, set_kwargs=schedule, begin=3)
    xb, _ = run_loop(ff, None, set_kwargs=schedule, begin=3)
    assert torch.isfinite(xa).all()
    assert_close(xb, xa)


@pytest.mark.parametrize(
    ("name", "config", "bad"),
    [
        # Karras sigmas ending on sigma_min twice: the last step has zero length, which a second-order heun step
        # divides by (the loop's last step, 7 of 8).
        ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True, final_sigmas_type="sigma_min",
                                             solver_type="heun", lower_order_final=False), 7),
        ("DPMSolverMultistepInverseScheduler", dict(use_karras_sigmas=True, solver_type="heun",
                                                    lower_order_final=False), 7),
        ("EDMDPMSolverMultistepScheduler", dict(final_sigmas_type="sigma_min", solver_type="heun",
                                                lower_order_final=False), 7),
        # bh1's B(h) is infinite on a step to sigma 0, which diffusers multiplies by zero.
        ("UniPCMultistepScheduler", dict(solver_type="bh1", final_sigmas_type="zero"), 7),
    ],
)
def test_an_undefined_step_raises_when_it_runs_not_before(name, config, bad):
    """A loop meets a step diffusers leaves undefined (NaN) only when it gets there: the drop-in's steps before it
    give diffusers' samples (a pipeline that stops early, as SDXL's ``denoising_end`` does, runs as diffusers' does),
    and that step raises saying why."""
    ref, ff = pair(name, **config)
    for sched in (ref, ff):
        sched.set_timesteps(8)
    xa = xb = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3)) * ref.init_noise_sigma
    for i, t in enumerate(ref.timesteps):
        oa, ob = stand_in(ref.scale_model_input(xa, t), t), stand_in(ff.scale_model_input(xb, t), t)
        xa = ref.step(oa, t, xa).prev_sample
        if i == bad:
            assert not torch.isfinite(xa).all()
            with pytest.raises(UndefinedStepError, match=f"step {bad} "):
                ff.step(ob, ff.timesteps[i], xb)
            break
        xb = ff.step(ob, ff.timesteps[i], xb).prev_sample
        assert torch.isfinite(xa).all()
        assert_close(xb, xa, atol=1e-5 * float(xa.abs().max()))  # float32 round-off of samples far from 1
    else:
        pytest.fail("the loop never reached the undefined step")


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(
    "name",
    ["UniPCMultistepScheduler", "DPMSolverMultistepScheduler", "DEISMultistepScheduler",
     "DPMSolverSinglestepScheduler", "SASolverScheduler"],
)
def test_more_steps_than_training_timesteps_raise_where_diffusers_turns_nan(name):
    """2000 steps over 1000 training timesteps repeat timesteps, so a zero-length step makes a coefficient infinite:
    the first steps run as diffusers' and the step diffusers turns NaN raises (the first step raised a ValueError
    about a non-finite plan coefficient)."""
    ref, ff = pair(name)
    for s in (ref, ff):
        s.set_timesteps(2000)
    xr = xf = start_noise(1)
    for i, t in enumerate(ref.timesteps[:3]):
        kw = {"generator": torch.Generator().manual_seed(i)} if "SASolver" in name else {}
        out_r, out_f = 0.9 * xr, 0.9 * xf
        xr = ref.step(out_r, t, xr, **kw).prev_sample
        if not torch.isfinite(xr).all():
            assert i == 2
            with pytest.raises(UndefinedStepError):
                ff.step(out_f, t, xf, **kw)
            return
        kw = {"generator": torch.Generator().manual_seed(i)} if "SASolver" in name else {}
        xf = ff.step(out_f, t, xf, **kw).prev_sample
        assert_close(xf, xr)
    raise AssertionError("diffusers' loop stayed finite")


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(
    "name",
    ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler", "PNDMScheduler",
     "DPMSolverSinglestepScheduler", "SASolverScheduler"],
)
def test_a_loop_continued_on_a_larger_batch_broadcasts_its_history(name):
    """Text2Video-Zero steps frame 0 alone, deep-copies the scheduler and continues the copy on every frame:
    diffusers' batch-1 history broadcasts against the larger batch, and so does the drop-in's (it raised that the
    sample's shape changed mid-loop)."""
    import copy

    config = {"skip_prk_steps": True} if name == "PNDMScheduler" else {}
    outs = []
    for sched in pair(name, **config):
        sched.set_timesteps(10)
        ts = sched.timesteps
        x = start_noise(0, shape=(1, 4, 8, 8)) * sched.init_noise_sigma
        kw = (lambda i: {"generator": torch.Generator().manual_seed(i)}) if "SASolver" in name else (lambda i: {})
        for i, t in enumerate(ts[:2]):
            x = sched.step(stand_in(x, t), t, x, **kw(i)).prev_sample
        frames = copy.deepcopy(sched)
        x = torch.cat([x, x * 0.9 + 0.1, x * 1.1])
        for i, t in enumerate(ts[2:], start=2):
            x = frames.step(stand_in(x, t), t, x, **kw(i)).prev_sample
        outs.append(x)
    assert outs[0].shape == (3, 4, 8, 8)
    assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4 * max(1.0, float(outs[0].abs().max())))
