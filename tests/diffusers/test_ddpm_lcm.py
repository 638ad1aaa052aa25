"""DDPMScheduler and LCMScheduler drop-ins: parity with diffusers (noise from the same generator)."""

from __future__ import annotations

import pytest
import torch
from dropin_helpers import assert_close, pair, run_loop, stand_in

import fastflow.diffusers as ffd


def _gen_loops(ref, ff, steps=10, seed=3, **loop):
    ga, gb = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    xa, oa = run_loop(ref, steps, step_kwargs=lambda i: dict(generator=ga), **loop)
    xb, ob = run_loop(ff, steps, step_kwargs=lambda i: dict(generator=gb), **loop)
    return (xa, oa), (xb, ob)


@pytest.mark.parametrize(
    "config",
    [
        dict(),
        dict(prediction_type="v_prediction", clip_sample=False, timestep_spacing="trailing"),
        dict(prediction_type="sample", variance_type="fixed_large", timestep_spacing="linspace"),
        dict(variance_type="fixed_small_log", beta_schedule="squaredcos_cap_v2", steps_offset=1),
        dict(beta_schedule="sigmoid", clip_sample_range=2.0),
        dict(beta_schedule="scaled_linear", rescale_betas_zero_snr=True, prediction_type="v_prediction",
             timestep_spacing="trailing", clip_sample=False),
    ],
    ids=["default", "v-trailing", "sample-large", "small-log-cos", "sigmoid", "zero-snr"],
)
def test_ddpm_generator(config):
    ref, ff = pair("DDPMScheduler", **config)
    (xa, oa), (xb, ob) = _gen_loops(ref, ff)
    assert_close(xb, xa)
    for a, b in zip(oa, ob, strict=True):
        assert_close(b.pred_original_sample, a.pred_original_sample)


def test_ddpm_custom_timesteps():
    ref, ff = pair("DDPMScheduler")
    ts = [901, 700, 433, 200, 57, 3, 0]
    (xa, _), (xb, _) = _gen_loops(ref, ff, steps=None, set_kwargs=dict(timesteps=ts))
    assert_close(xb, xa)


def test_ddpm_without_set_timesteps():
    """diffusers steps over its 1000 training timesteps when set_timesteps was never called."""
    ref, ff = pair("DDPMScheduler", num_train_timesteps=40)
    x = torch.randn(1, 3, 4, 4)
    ga, gb = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    xa = xb = x
    for t in ref.timesteps:
        xa = ref.step(0.1 * xa, t, xa, generator=ga).prev_sample
        xb = ff.step(0.1 * xb, t, xb, generator=gb).prev_sample
    assert_close(xb, xa)


def test_ddpm_fixed_large_log_raises():
    with pytest.raises(NotImplementedError, match="variance_type"):
        ffd.DDPMScheduler(variance_type="fixed_large_log")


def _with_variance(kind: str):
    """A stand-in that also predicts a variance channel half (DeepFloyd IF's layout)."""

    def model(x, t):
        eps = stand_in(x, t)
        v = torch.tanh(x) if kind == "learned_range" else 1e-3 * torch.sigmoid(x)
        return torch.cat([eps, v], dim=1)

    return model


@pytest.mark.parametrize("variance_type", ["learned", "learned_range"])
def test_ddpm_learned_variance(variance_type):
    ref, ff = pair("DDPMScheduler", variance_type=variance_type)
    (xa, _), (xb, _) = _gen_loops(ref, ff, model=_with_variance(variance_type))
    assert_close(xb, xa)


def test_ddpm_deepfloyd_if_config():
    """IF stage I: cosine betas, learned_range variance and dynamic thresholding together."""
    config = dict(beta_schedule="squaredcos_cap_v2", clip_sample=True, dynamic_thresholding_ratio=0.95,
                  sample_max_value=1.5, thresholding=True, variance_type="learned_range")
    ref, ff = pair("DDPMScheduler", **config)
    model = _with_variance("learned_range")
    (xa, oa), (xb, ob) = _gen_loops(ref, ff, model=lambda x, t: model(x, t) * 1.5)
    assert_close(xb, xa)
    for a, b in zip(oa, ob, strict=True):
        assert_close(b.pred_original_sample, a.pred_original_sample)


def test_ddpm_learned_variance_default_noise_runs():
    _, ff = pair("DDPMScheduler", variance_type="learned_range")
    x, _ = run_loop(ff, 4, model=_with_variance("learned_range"))
    assert torch.isfinite(x).all()


@pytest.mark.parametrize(
    "config,set_kwargs",
    [
        (dict(), dict(num_inference_steps=4)),
        (dict(prediction_type="v_prediction", timestep_spacing="trailing"), dict(num_inference_steps=6)),
        (dict(clip_sample=True, clip_sample_range=1.5, set_alpha_to_one=False), dict(num_inference_steps=4)),
        (dict(prediction_type="sample"), dict(num_inference_steps=8, original_inference_steps=40)),
        (dict(), dict(timesteps=[999, 759, 499, 259])),
        (dict(), dict(num_inference_steps=4, strength=0.5)),
        (dict(), dict(timesteps=[999, 759, 499, 259, 119], strength=0.6)),
        # timestep_scaling 10 makes c_skip under 1e-5 at every timestep but 0; a small one weighs the boundary terms
        (dict(timestep_scaling=0.01), dict(num_inference_steps=4)),
    ],
    ids=["default", "v", "clip", "sample-orig40", "custom", "strength", "custom-strength", "small-scaling"],
)
def test_lcm_generator(config, set_kwargs):
    ref, ff = pair("LCMScheduler", **config)
    (xa, oa), (xb, ob) = _gen_loops(ref, ff, steps=None, set_kwargs=set_kwargs)
    assert_close(xb, xa)
    for a, b in zip(oa, ob, strict=True):
        assert_close(b.denoised, a.denoised)


def test_lcm_thresholding():
    ref, ff = pair("LCMScheduler", thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.4)
    (xa, oa), (xb, ob) = _gen_loops(ref, ff, steps=4)
    assert_close(xb, xa)
    for a, b in zip(oa, ob, strict=True):
        assert_close(b.denoised, a.denoised)


def test_lcm_sigma_data_is_diffusers_after_a_step():
    """diffusers' step sets ``sigma_data`` (the constant of its boundary scalings); the drop-in lacked it."""
    ref, ff = pair("LCMScheduler")
    _gen_loops(ref, ff, steps=4)
    assert ff.sigma_data == ref.sigma_data == 0.5
    assert ff.get_scalings_for_boundary_condition_discrete(499) == ref.get_scalings_for_boundary_condition_discrete(499)
