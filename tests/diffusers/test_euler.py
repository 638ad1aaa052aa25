"""Euler, Euler ancestral and EDM Euler drop-ins: parity with diffusers over full loops."""

from __future__ import annotations

import pytest
import torch
from dropin_helpers import SD, assert_close, assert_loops_match, pair, run_loop, stand_in, start_noise

import fastflow.diffusers as ffd


def _gen(seed=11):
    g = torch.Generator().manual_seed(seed)
    return lambda i: dict(generator=g)


EULER = [
    dict(SD),
    dict(SD, timestep_spacing="leading", steps_offset=1),
    dict(SD, timestep_spacing="trailing", prediction_type="v_prediction"),
    dict(SD, use_karras_sigmas=True),
    dict(SD, use_exponential_sigmas=True, final_sigmas_type="sigma_min"),
    dict(SD, interpolation_type="log_linear", prediction_type="sample"),
    dict(SD, timestep_type="continuous", prediction_type="v_prediction"),
    dict(beta_schedule="squaredcos_cap_v2", use_karras_sigmas=True, sigma_min=0.05, sigma_max=20.0),
]


@pytest.mark.parametrize("config", EULER, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items() if k not in SD))
def test_euler_grid(config):
    ref, ff = pair("EulerDiscreteScheduler", **config)
    assert_loops_match(ref, ff, steps=12)


def test_euler_zero_snr():
    """Zero terminal SNR starts at sigma = 4096: diffusers' float32 step there loses ~12 bits to cancellation
    (``sample - x0`` of magnitude 4096), so parity holds to that round-off, not to 1e-5."""
    config = dict(SD, rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction")
    ref, ff = pair("EulerDiscreteScheduler", **config)
    assert_loops_match(ref, ff, steps=12, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "set_kwargs",
    [dict(timesteps=[999, 800, 500, 250, 90, 10]), dict(sigmas=[14.0, 6.0, 2.5, 1.0, 0.3, 0.05, 0.0])],
    ids=["timesteps", "sigmas"],
)
def test_euler_custom_schedule(set_kwargs):
    ref, ff = pair("EulerDiscreteScheduler", **SD)
    assert_loops_match(ref, ff, steps=None, set_kwargs=set_kwargs)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_euler_churn_generator(prediction_type):
    ref, ff = pair("EulerDiscreteScheduler", **SD, prediction_type=prediction_type)
    churn = dict(s_churn=4.0, s_tmin=0.5, s_tmax=8.0, s_noise=1.003)
    ga, gb = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    xa, oa = run_loop(ref, 10, step_kwargs=lambda i: dict(churn, generator=ga))
    xb, ob = run_loop(ff, 10, step_kwargs=lambda i: dict(churn, generator=gb))
    assert_close(xb, xa)
    for a, b in zip(oa, ob, strict=True):  # churned steps return x0 of the churned sample
        assert_close(b.pred_original_sample, a.pred_original_sample)


def test_euler_churn_window_includes_its_ends():
    """diffusers churns a step whose sigma lies in [s_tmin, s_tmax], ends included: a window of one sigma churns
    that step in both (the window above holds several sigmas, none of them on its ends)."""
    ref, ff = pair("EulerDiscreteScheduler", **SD)
    ref.set_timesteps(10)
    level = float(ref.sigmas[4])  # a float32 value, compared exactly in both
    churn = dict(s_churn=4.0, s_tmin=level, s_tmax=level)
    ga, gb = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    xa, _ = run_loop(ref, 10, step_kwargs=lambda i: dict(churn, generator=ga))
    xb, _ = run_loop(ff, 10, step_kwargs=lambda i: dict(churn, generator=gb))
    assert_close(xb, xa)
    plain, _ = run_loop(ref, 10)
    assert not torch.allclose(xa, plain)  # the window did churn a step


@pytest.mark.parametrize(
    "name,config", [("EulerDiscreteScheduler", SD), ("EDMEulerScheduler", {})], ids=["euler", "edm"]
)
@pytest.mark.parametrize(
    "churn",
    [dict(s_churn=-3.0), dict(s_churn=0.0, s_tmin=2.0, s_noise=0.5), dict(s_churn=2.0, s_tmin=100.0)],
    ids=["negative", "zero-with-others", "out-of-range"],
)
def test_euler_churn_arguments_without_noise(name, config, churn):
    """Churn arguments that add no noise: a negative s_churn steps from diffusers' sigma_hat below sigma (the
    drop-in stepped from sigma before), no churn makes the others irrelevant (the default plan), a range that
    holds no sigma churns nothing."""
    ref, ff = pair(name, **config)
    xa, oa = run_loop(ref, 8, step_kwargs=lambda i: dict(churn))
    xb, ob = run_loop(ff, 8, step_kwargs=lambda i: dict(churn))
    assert_close(xb, xa)
    for a, b in zip(oa, ob, strict=True):
        assert_close(b.pred_original_sample, a.pred_original_sample)


def test_euler_half_precision_output_dtype():
    ref, ff = pair("EulerDiscreteScheduler", **SD)
    half = lambda x, t: stand_in(x.float(), t).half()  # noqa: E731
    xa, _ = run_loop(ref, 6, model=half)
    xb, _ = run_loop(ff, 6, model=half)
    assert xb.dtype == xa.dtype == torch.float16
    assert_close(xb.float(), xa.float(), rtol=4e-3, atol=4e-3)  # a few float16 ulps


@pytest.mark.parametrize(
    "name,config",
    [("EulerDiscreteScheduler", dict(SD, use_karras_sigmas=True)), ("EulerAncestralDiscreteScheduler", SD),
     ("EDMEulerScheduler", dict(sigma_data=0.7))],
    ids=["euler", "ancestral", "edm"],
)
def test_scale_model_input_bit_identical(name, config):
    ref, ff = pair(name, **config)
    for s in (ref, ff):
        s.set_timesteps(8)
    x = start_noise()
    for t in ref.timesteps:
        assert torch.equal(ff.scale_model_input(x, t), ref.scale_model_input(x, t))
        ref.step(x, t, x)
        ff.step(x, t, x)


def test_euler_img2img_begin_index():
    ref, ff = pair("EulerDiscreteScheduler", **SD)
    for s in (ref, ff):
        s.set_timesteps(10)
        s.set_begin_index(3)
    x = start_noise()
    xa = xb = x
    for t in ref.timesteps[3:]:
        xa = ref.step(stand_in(ref.scale_model_input(xa, t), t), t, xa).prev_sample
        xb = ff.step(stand_in(ff.scale_model_input(xb, t), t), t, xb).prev_sample
    assert ff.step_index == ref.step_index == 10
    assert_close(xb, xa)


def test_integer_timestep_rejected_like_diffusers():
    _, ff = pair("EulerDiscreteScheduler")
    ff.set_timesteps(4)
    x = start_noise()
    with pytest.raises(ValueError, match="timestep"):
        ff.step(x, 3, x)


@pytest.mark.parametrize(
    "config",
    [dict(SD), dict(prediction_type="v_prediction", timestep_spacing="trailing"),
     dict(SD, timestep_spacing="leading", steps_offset=1, rescale_betas_zero_snr=True)],
    ids=["sd", "v-trailing", "leading-zero-snr"],
)
def test_euler_ancestral_generator(config):
    if config.get("rescale_betas_zero_snr"):
        config = dict(config, prediction_type="v_prediction")
    ref, ff = pair("EulerAncestralDiscreteScheduler", **config)
    xa, oa = run_loop(ref, 10, step_kwargs=_gen())
    xb, ob = run_loop(ff, 10, step_kwargs=_gen())
    assert_close(xb, xa)
    for a, b in zip(oa, ob, strict=True):
        assert_close(b.pred_original_sample, a.pred_original_sample)


def test_euler_ancestral_takes_the_exact_variance_where_float32_rounds_it_negative():
    """From sigma ~2e4 (the first step of a trailing squaredcos_cap_v2 loop), diffusers' float32
    ``sigma_to**2 - sigma_up**2`` rounds below zero and its step returns NaN; the drop-in's step is the float64
    evaluation of the same formulas."""
    ref, ff = pair("EulerAncestralDiscreteScheduler", beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing")
    outs = []
    for sched in (ref, ff):
        sched.set_timesteps(3)
        x = start_noise() * sched.init_noise_sigma
        t = sched.timesteps[0]
        o = stand_in(sched.scale_model_input(x, t), t)
        outs.append(sched.step(o, t, x, generator=torch.Generator().manual_seed(7)).prev_sample)
    assert torch.isnan(outs[0]).all()
    sig, sig_to = float(ff.sigmas[0]), float(ff.sigmas[1])
    up = (sig_to**2 * (sig**2 - sig_to**2) / sig**2) ** 0.5
    down = (sig_to**2 - up**2) ** 0.5
    x64, o64 = x.double(), o.double()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)).double()
    expected = x64 + o64 * (down - sig) + noise * up  # epsilon prediction: (x - x0) / sigma is the output
    assert torch.isfinite(outs[1]).all()
    assert_close(outs[1].double(), expected, rtol=1e-5, atol=1e-3)


def test_euler_ancestral_sample_prediction_raises():
    with pytest.raises(NotImplementedError, match="prediction_type"):
        ffd.EulerAncestralDiscreteScheduler(prediction_type="sample")


@pytest.mark.parametrize(
    "config",
    [dict(), dict(prediction_type="v_prediction", sigma_schedule="exponential"),
     dict(final_sigmas_type="sigma_min", rho=5.0, sigma_data=1.0)],
    ids=["karras", "v-exp", "sigma-min"],
)
def test_edm_euler(config):
    ref, ff = pair("EDMEulerScheduler", **config)
    assert_loops_match(ref, ff, steps=12)


def test_edm_euler_churn_and_given_x0():
    ref, ff = pair("EDMEulerScheduler")
    churn = dict(s_churn=10.0, s_tmin=0.1, s_tmax=30.0)
    ga, gb = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    xa, oa = run_loop(ref, 8, step_kwargs=lambda i: dict(churn, generator=ga))
    xb, ob = run_loop(ff, 8, step_kwargs=lambda i: dict(churn, generator=gb))
    assert_close(xb, xa)
    for a, b in zip(oa, ob, strict=True):
        assert_close(b.pred_original_sample, a.pred_original_sample)
    # a caller-supplied x0 replaces the model's
    for s in (ref, ff):
        s.set_timesteps(5)
    x = start_noise()
    xa = xb = x
    for t in ref.timesteps:
        x0a, x0b = torch.tanh(xa), torch.tanh(xb)
        a = ref.step(stand_in(xa, t), t, xa, pred_original_sample=x0a)
        b = ff.step(stand_in(xb, t), t, xb, pred_original_sample=x0b)
        assert b.pred_original_sample is x0b
        xa, xb = a.prev_sample, b.prev_sample
    assert_close(xb, xa)


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "FlowMatchEulerDiscreteScheduler"])
def test_beta_sigmas(name):
    pytest.importorskip("scipy")  # diffusers' beta sigmas need it
    config = dict(SD, use_beta_sigmas=True) if name.startswith("Euler") else dict(use_beta_sigmas=True, shift=3.0)
    ref, ff = pair(name, **config)
    assert_loops_match(ref, ff, steps=10)


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "EDMEulerScheduler", "EulerAncestralDiscreteScheduler"])
def test_generator_advances_like_diffusers(name):
    """Noise diffusers draws with weight 0 (s_noise = 0, the last ancestral step) still advances the generator."""
    ref, ff = pair(name)
    kw = {} if name.startswith("EulerAncestral") else dict(s_churn=2.0, s_noise=0.0)
    ga, gb = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    xa, _ = run_loop(ref, 6, step_kwargs=lambda i: dict(kw, generator=ga))
    xb, _ = run_loop(ff, 6, step_kwargs=lambda i: dict(kw, generator=gb))
    assert_close(xb, xa)
    assert torch.equal(ga.get_state(), gb.get_state())


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "EDMEulerScheduler"])
@pytest.mark.parametrize("sample_dtype", [torch.float32, torch.float64])
def test_a_float64_model_output_steps_in_float64(name, sample_dtype):
    """diffusers' Euler steps upcast the sample to float32 and promote it with the model output: a float64 output
    gives float64 fields computed in float64, and the drop-in's are the same dtype and values."""
    ref, ff = pair(name, **({} if name == "EDMEulerScheduler" else SD))
    outs = []
    for s in (ref, ff):
        s.set_timesteps(4)
        x = (start_noise(0) * s.init_noise_sigma).to(sample_dtype)
        t = s.timesteps[1]
        s.set_begin_index(1)
        o = stand_in(s.scale_model_input(x, t), t).double()
        outs.append(s.step(o, t, x, generator=torch.Generator().manual_seed(1)))
    a, b = outs
    for field in ("prev_sample", "pred_original_sample"):
        fa, fb = getattr(a, field), getattr(b, field)
        assert fb.dtype == fa.dtype == torch.float64, field
        torch.testing.assert_close(fb, fa, rtol=1e-6, atol=1e-6 * float(fa.abs().max()))
