"""HeunDiscreteScheduler drop-in: parity with diffusers over full loops (both calls of every step), sync-free."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
from dropin_helpers import (
    SD,
    assert_bfloat16_parity,
    assert_close,
    assert_loops_match,
    assert_unet_loops_match,
    begin_index_loops,
    compiled_loops,
    meta_loop,
    run_loop,
    start_noise,
)
from dropin_helpers import pair as dropin_pair
from posterior_model import posterior_model

import fastflow.diffusers as ffd
from fastflow.diffusers.heun import HeunDiscreteScheduler

diffusers = pytest.importorskip("diffusers")


pair = functools.partial(dropin_pair, "HeunDiscreteScheduler")


def assert_loops(ref, ff, steps, **kwargs):
    """Final samples and every call's ``pred_original_sample`` agree (posterior stand-in)."""
    assert_loops_match(ref, ff, model=posterior_model(ref), steps=steps, **kwargs)


def _grid():
    sigmas = [{}, dict(use_karras_sigmas=True), dict(use_exponential_sigmas=True)]
    spacing = [{}, dict(timestep_spacing="leading", steps_offset=1), dict(timestep_spacing="trailing")]
    betas = [SD, {}, dict(beta_schedule="squaredcos_cap_v2"), dict(beta_schedule="exp")]
    out = []
    for c, (pred, sig, steps, clip) in enumerate(
        itertools.product(["epsilon", "v_prediction", "sample"], sigmas, [5, 20], [False, True])
    ):
        cfg = dict(betas[c % len(betas)], **spacing[(c // 2) % len(spacing)], **sig, prediction_type=pred)
        if clip:
            cfg.update(clip_sample=True, clip_sample_range=1.5)
        if cfg.get("beta_schedule") in ("squaredcos_cap_v2", "exp") and pred == "epsilon":
            cfg["prediction_type"] = "v_prediction"  # see test_cosine_epsilon_accuracy
        out.append((cfg, steps))
    return out


@pytest.mark.parametrize("case", _grid(), ids=lambda c: "-".join(f"{k}={v}" for k, v in c[0].items()
                                                                   if k not in SD) + f"-n{c[1]}")
def test_grid_parity(case):
    """Prediction types, sigma options, spacings, beta schedules, clip_sample, short and long loops."""
    cfg, steps = case
    ref, ff = pair(**cfg)
    assert_loops(ref, ff, steps)


def test_cosine_epsilon_accuracy():
    """squaredcos_cap_v2 starts at sigma ~ 2e4, where float32 loses ~1e-3 absolute per operation: there diffusers'
    own float32 loop ends ~0.6 from the same loop in float64, so parity to round-off of the result is not
    defined. The drop-in (coefficients folded in float64, one rounding per output) must be closer to float64."""
    ref, ff = pair(beta_schedule="squaredcos_cap_v2")
    model = posterior_model(ref)
    x0 = start_noise(0)
    exact, _ = run_loop(ff, 10, model=model, x=x0.double())
    ours, _ = run_loop(ff, 10, model=model, x=x0)
    theirs, _ = run_loop(ref, 10, model=model, x=x0)
    err_ours = (ours.double() - exact).abs().max().item()
    err_theirs = (theirs.double() - exact).abs().max().item()
    assert err_ours < 0.02 and err_ours < err_theirs


def test_custom_timesteps():
    ref, ff = pair(**SD)
    assert_loops(ref, ff, None, set_kwargs=dict(timesteps=[999, 800, 600, 420, 250, 120, 30]))


def test_scale_model_input_bit_identical():
    ref, ff = pair(**SD, use_karras_sigmas=True)
    ref.set_timesteps(8)
    ff.set_timesteps(8)
    x = start_noise(5)
    model = posterior_model(ref)
    for t in ref.timesteps:
        a, b = ref.scale_model_input(x, t), ff.scale_model_input(x, t)
        assert torch.equal(a, b)
        assert ff.state_in_first_order == ref.state_in_first_order
        xa = ref.step(model(a, t), t, x).prev_sample
        ff.step(model(b, t), t, x)
        x = xa


@pytest.mark.parametrize("name", ["HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "DPMSolverSDEScheduler"])
@pytest.mark.parametrize("begin", [None, 2])
def test_order_flag_after_the_loop_s_last_call(name, begin):
    """After a loop's last call ``state_in_first_order`` is diffusers': False for Heun and KDPM2, whose last
    (first-order) call to sigma 0 saves its sample; True for DPM-Solver SDE, whose does not."""
    ref, ff = dropin_pair(name, **SD)
    model = posterior_model(ref)
    for s in (ref, ff):
        s.set_timesteps(4)
        if begin is not None:
            s.set_begin_index(begin)
    x = start_noise(5)
    for t in ref.timesteps[begin or 0 :]:
        xa = ref.step(model(x, t), t, x).prev_sample
        ff.step(model(x, t), t, x)
        x = xa
    assert ff.step_index == ref.step_index == len(ref.timesteps)
    assert ff.state_in_first_order == ref.state_in_first_order


@pytest.mark.parametrize("name", ["HeunDiscreteScheduler", "KDPM2DiscreteScheduler"])
def test_scale_model_input_before_set_timesteps(name):
    """diffusers' constructor sets a schedule of every training step: a pipeline that never calls set_timesteps
    scales its first input (the first call a scheduler gets) and steps as diffusers does."""
    ref, ff = dropin_pair(name, **SD)
    x = start_noise(0)
    outs = []
    for s in (ref, ff):
        t = s.timesteps[0]
        x_in = s.scale_model_input(x, t)
        outs.append((x_in, s.step(posterior_model(ref)(x_in, t), t, x).prev_sample))
    assert torch.equal(outs[1][0], outs[0][0])
    assert_close(outs[1][1], outs[0][1])


def test_begin_index_partial_loop():
    """img2img: set_begin_index(t_start * order), then the remaining calls, as diffusers."""
    ref, ff = pair(**SD)
    outs = begin_index_loops(ref, ff, 12, 8, start_noise(1) * 3, scale_input=True)
    assert_close(outs[1], outs[0])


def test_api_surface():
    ref, ff = pair(**SD)
    ref.set_timesteps(10)
    ff.set_timesteps(10)
    assert ff.order == ref.order == 2
    assert ff.init_noise_sigma == ref.init_noise_sigma
    torch.testing.assert_close(ff.sigmas, ref.sigmas, rtol=0, atol=0)
    x = start_noise(2)
    noise = start_noise(3)
    assert_close(ff.add_noise(x, noise, ff.timesteps[2:3]), ref.add_noise(x, noise, ref.timesteps[2:3]))
    t = ff.timesteps[0]
    out = ff.step(x, t, x, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 2 and ff.step_index == 1 and not ff.state_in_first_order
    assert type(ffd.from_scheduler(ref)) is HeunDiscreteScheduler


def test_unsupported_prediction_raises():
    with pytest.raises(NotImplementedError, match="prediction_type"):
        HeunDiscreteScheduler(prediction_type="flow_prediction")


def test_meta_device_step():
    ff = HeunDiscreteScheduler(**SD)
    ff.backend = "torch"
    x, out = meta_loop(ff, 4, scale_input=True)
    assert x.device.type == "meta" and out.pred_original_sample.device.type == "meta"


def test_torch_compile_fullgraph():
    """After the first (eager) call has built the plan, each call traces with fullgraph=True."""
    ref, ff = pair(**SD)
    xb, xa = compiled_loops(ref, ff, posterior_model(ref), 4, scale_input=True)
    assert_close(xb, xa)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_gpu_no_sync(backend):
    ref, ff = pair(**SD, use_karras_sigmas=True)
    ff.backend = backend
    model = posterior_model(ref)
    ref.set_timesteps(8)
    ff.set_timesteps(8, device="cuda")
    x0 = start_noise(0).cuda() * ref.init_noise_sigma
    xa = x0.clone()
    for t in ref.timesteps:
        xa = ref.step(model(ref.scale_model_input(xa, t), t), t, xa).prev_sample
    ff.set_begin_index(0)
    xb = x0.clone()
    host_t = ff.timesteps.cpu()
    for i, t in enumerate(ff.timesteps):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            inp = ff.scale_model_input(xb, t)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        o = model(inp, host_t[i])
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            xb = ff.step(o, t, xb).prev_sample
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert_close(xb, xa, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("config", [dict(SD), dict(SD, use_karras_sigmas=True, prediction_type="v_prediction")])
def test_tiny_unet_loop(config):
    """A real network (tiny random UNet, offline) in diffusers' pipeline loop: the same samples."""
    assert_unet_loops_match(diffusers.HeunDiscreteScheduler(**config), 8)


def test_bfloat16_sample():
    """A bfloat16 loop returns bfloat16 as diffusers does and agrees to a few bfloat16 ulps (diffusers rounds
    intermediates to bfloat16; the drop-in computes in float32 and rounds once per output)."""
    ref, ff = pair()
    assert_bfloat16_parity(ref, ff)
