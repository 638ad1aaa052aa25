"""CogVideoXDDIMScheduler drop-in: parity with diffusers over full loops; the arguments diffusers ignores stay
ignored."""

from __future__ import annotations

import itertools

import pytest
import torch
from dropin_helpers import (
    assert_bfloat16_parity,
    assert_close,
    assert_no_further_from_float64,
    assert_unet_loops_match,
    pair,
    run_loop,
    start_noise,
)
from posterior_model import posterior_model

import fastflow.diffusers as ffd
from fastflow.diffusers.cogvideox import CogVideoXDDIMScheduler

diffusers = pytest.importorskip("diffusers")

NAME = "CogVideoXDDIMScheduler"


def _grid():
    out = []
    spacings = itertools.cycle(["leading", "trailing", "linspace"])
    for pred, shift, zero_snr, steps in itertools.product(["epsilon", "v_prediction", "sample"], [3.0, 1.0],
                                                          [False, True], [1, 5, 50]):
        if zero_snr and pred == "epsilon":
            continue  # x0 of an epsilon prediction at zero SNR is undefined: test_zero_snr_epsilon_raises
        out.append((dict(prediction_type=pred, snr_shift_scale=shift, rescale_betas_zero_snr=zero_snr,
                         timestep_spacing=next(spacings)), steps))
    return out


def _float64_loop(cfg: dict, steps: int, model) -> torch.Tensor:
    """diffusers' loop on its float32 alphas_cumprod with the sample and coefficients in float64."""
    ref = diffusers.CogVideoXDDIMScheduler(**cfg)
    ref.set_timesteps(steps)
    ref.alphas_cumprod = ref.alphas_cumprod.double()
    ref.final_alpha_cumprod = ref.final_alpha_cumprod.double()
    x = start_noise(0).double()
    for t in ref.timesteps:
        x = ref.step(model(x, t), t, x).prev_sample
    return x


@pytest.mark.parametrize("case", _grid(), ids=lambda c: "-".join(f"{v}" for v in c[0].values()) + f"-n{c[1]}")
def test_loops_match_diffusers(case):
    """Prediction types, SNR shift, zero-terminal-SNR betas, spacings, 1 to 50 steps: the same samples and
    ``pred_original_sample`` at every step where diffusers' float32 loop is accurate; where it is not (epsilon
    from timestep 999 with the SNR shift: x0 divides by sqrt(alphas_cumprod) ~ 0.04), the drop-in's loop is
    within twice diffusers' distance from its float64 loop."""
    cfg, steps = case
    ref, ff = pair(NAME, **cfg)
    model = posterior_model(ref)
    xa, oa = run_loop(ref, steps, model=model)
    xb, ob = run_loop(ff, steps, model=model)
    if not assert_no_further_from_float64(xb, xa, _float64_loop(cfg, steps, model)):
        return
    assert_close(xb, xa)
    z_scale = float(start_noise(0).abs().max())
    for t, a, b in zip(ref.timesteps, oa, ob, strict=True):
        # An epsilon model's x0 cancels the sample against the noise and divides by sqrt(alphas_cumprod) (~0.04 at
        # the first SNR-shifted step): it carries a few float32 ulps of the sample, times that factor.
        epsilon = cfg["prediction_type"] == "epsilon"  # (the others' x0 divides by nothing)
        amplified = 8 * 2.0**-23 * z_scale / float(ref.alphas_cumprod[int(t)]) ** 0.5 if epsilon else 0.0
        assert_close(b.pred_original_sample, a.pred_original_sample, atol=max(1e-5, amplified))


def test_ignored_arguments_stay_ignored():
    """diffusers' CogVideoX DDIM step takes DDIM's ``eta``, ``use_clipped_model_output``, ``generator`` and
    ``variance_noise`` and ignores them, and never applies ``clip_sample``: the drop-in gives the same numbers
    with all of them set as without."""
    cfg = dict(clip_sample=True, clip_sample_range=0.1)
    ref, ff = pair(NAME, **cfg)
    model = posterior_model(ref)
    given = dict(eta=1.0, use_clipped_model_output=True, generator=torch.Generator().manual_seed(0),
                 variance_noise=start_noise(9))
    xa, _ = run_loop(ref, 8, model=model, step_kwargs=given)
    xb, _ = run_loop(ff, 8, model=model, step_kwargs=given)
    xc, _ = run_loop(pair(NAME)[1], 8, model=model)
    assert_close(xb, xa)
    assert torch.equal(xb, xc)


def test_zero_snr_epsilon_raises():
    """Zero terminal SNR with epsilon prediction: x0 at the first step divides by sqrt(alphas_cumprod) = 0
    (diffusers returns a non-finite sample); the drop-in's step there raises."""
    ref, ff = pair(NAME, rescale_betas_zero_snr=True, timestep_spacing="trailing")
    xa, _ = run_loop(ref, 5, model=posterior_model(ref))
    assert not torch.isfinite(xa).all()
    with pytest.raises(ValueError):
        run_loop(ff, 5, model=posterior_model(ref))


def test_api_surface():
    ref, ff = pair(NAME)
    for s in (ref, ff):
        s.set_timesteps(10)
    torch.testing.assert_close(ff.timesteps, ref.timesteps, rtol=0, atol=0)
    torch.testing.assert_close(ff.alphas_cumprod, ref.alphas_cumprod, rtol=0, atol=0)  # the SNR-shifted values
    x = start_noise(2)
    out = ff.step(x, ff.timesteps[0], x, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 2 and ff.step_index == 1
    out = ff.step(x, ff.timesteps[1], x)
    assert type(out) is type(ref.step(x, ref.timesteps[1], x))
    assert type(ffd.from_scheduler(ref)) is CogVideoXDDIMScheduler
    assert not isinstance(ff, diffusers.CogVideoXDPMScheduler)  # CogVideoX's pipelines branch on that


@pytest.mark.parametrize("config", [dict(), dict(prediction_type="v_prediction", timestep_spacing="trailing")])
def test_tiny_unet_loop(config):
    """A real network (tiny random UNet, offline) in diffusers' pipeline loop: the same samples."""
    assert_unet_loops_match(diffusers.CogVideoXDDIMScheduler(**config), 8)


def test_bfloat16_sample():
    ref, ff = pair(NAME, prediction_type="v_prediction")
    assert_bfloat16_parity(ref, ff)
