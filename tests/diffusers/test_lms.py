"""LMSDiscreteScheduler drop-in: parity with diffusers over full loops (every order, img2img starts), sync-free."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch
from dropin_helpers import (
    SD,
    WELL_CONDITIONED,
    assert_close,
    assert_half_loop_bounded,
    assert_no_further_from_float64,
    assert_unet_loops_match,
    begin_index_loops,
    compiled_loops,
    float64_distance,
    meta_loop,
    run_loop,
    stand_in,
    start_noise,
)
from dropin_helpers import pair as dropin_pair
from posterior_model import posterior_model

import fastflow.diffusers as ffd
from fastflow import UndefinedStepError
from fastflow.diffusers.lms import lms_coefficients

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("scipy", reason="diffusers' LMSDiscreteScheduler integrates its coefficients with scipy")


def pair(**config):
    return dropin_pair("LMSDiscreteScheduler", **config)


@pytest.mark.parametrize("betas,spacing,sigmas", list(itertools.product(
    ("linear", "scaled_linear"), ("leading", "linspace", "trailing"), ("plain", "karras", "exponential", "beta"))))
def test_coefficients_are_diffusers_integrals(betas, spacing, sigmas):
    """The exact integrals equal diffusers' ``get_lms_coefficient`` (scipy's quad on a float32 integrand) to float32
    round-off, for every step and order of a 12-step schedule."""
    ref = diffusers.LMSDiscreteScheduler(**dict(SD, beta_schedule=betas), timestep_spacing=spacing,
                                         **({f"use_{sigmas}_sigmas": True} if sigmas != "plain" else {}))
    ref.set_timesteps(12)
    sig = ref.sigmas.double().numpy()
    for i in range(12):
        for order in range(1, min(i + 1, 4) + 1):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # quad reports the float32 integrand's round-off at times
                theirs = np.array([ref.get_lms_coefficient(order, i, j) for j in range(order)])
            mine = np.array(lms_coefficients(sig, i, order))
            assert np.abs(mine - theirs).max() <= 1e-6 * np.abs(theirs).sum(), (i, order, mine, theirs)


def test_coefficients_of_known_steps():
    """Order 1 is the Euler step, ``sigma_next - sigma``; order 2 on equal spacing ``h`` is Adams-Bashforth's
    ``(3h/2, -h/2)``; every order's coefficients sum to the step length (the basis sums to 1)."""
    assert lms_coefficients(np.array([3.0, 2.0]), 0, 1) == pytest.approx([-1.0])
    assert lms_coefficients(np.array([3.0, 2.0, 1.0]), 1, 2) == pytest.approx([-1.5, 0.5])
    sig = np.array([14.6, 9.1, 5.2, 3.3, 1.7, 0.0])
    for order in range(1, 5):
        assert sum(lms_coefficients(sig, 4, order)) == pytest.approx(sig[5] - sig[4])
    with pytest.raises(ValueError, match="order 5"):
        lms_coefficients(sig, 4, 5)
    with pytest.raises(UndefinedStepError, match="repeat a sigma"):
        lms_coefficients(np.array([2.0, 2.0, 1.0]), 1, 2)


def assert_loops(ref, ff, steps: int, **kwargs) -> None:
    """Both loops (posterior stand-in) agree in every step's sample and pred_original_sample, to float32 round-off
    of the sample each step starts from (a step at sigma 14.6 subtracts terms of that size)."""
    model = posterior_model(ref)
    xa, oa = run_loop(ref, steps, model=model, **kwargs)
    xb, ob = run_loop(ff, steps, model=model, **kwargs)
    torch.testing.assert_close(ff.timesteps, ref.timesteps, rtol=0, atol=0)
    assert len(oa) == len(ob)
    scale = 4.0 * float(ref.init_noise_sigma)  # the starting noise's scale
    for a, b in zip(oa, ob, strict=True):
        atol = 1e-5 * max(1.0, scale)
        assert_close(b.prev_sample, a.prev_sample, atol=atol)
        assert_close(b.pred_original_sample, a.pred_original_sample, atol=atol)
        scale = float(a.prev_sample.abs().max())
    assert_close(xb, xa)


GRID = list(itertools.product(
    ("epsilon", "v_prediction", "sample"), ("linear", "scaled_linear"), ("leading", "linspace", "trailing"),
    ("plain", "karras"), (1, 5),
))  # fmt: skip


def _float64_loop(ref, steps: int, model) -> torch.Tensor:
    """diffusers' loop with its sigmas and the sample in float64: the reference both float32 loops round from."""
    ref.set_timesteps(steps)
    ref.sigmas = ref.sigmas.double()
    x = start_noise().double() * float(ref.init_noise_sigma)
    for t in ref.timesteps:
        x = ref.step(model(ref.scale_model_input(x, t), t), t, x).prev_sample
    return x


@pytest.mark.parametrize("prediction,betas,spacing,sigmas,steps", GRID)
def test_loops_match_diffusers(prediction, betas, spacing, sigmas, steps):
    """Every prediction type, two beta schedules, every spacing, plain and Karras sigmas, 1 and 5 steps (the first
    calls run lower orders): every step's outputs are diffusers' where diffusers' float32 loop is accurate; where
    it is not (a few steps from sigma_max = 157 or 14.6, whose first step subtracts terms of that size to leave a
    sample near 0), the drop-in's loop is within twice diffusers' own distance from diffusers' float64 loop."""
    ref, ff = pair(prediction_type=prediction, beta_schedule=betas, timestep_spacing=spacing,
                   use_karras_sigmas=sigmas == "karras", steps_offset=1 if spacing == "leading" else 0)  # fmt: skip
    model = posterior_model(ref)
    xa, _ = run_loop(ref, steps, model=model)
    xb, _ = run_loop(ff, steps, model=model)
    if assert_no_further_from_float64(xb, xa, _float64_loop(ref, steps, model)):
        ref, ff = pair(**dict(ref.config))
        assert_loops(ref, ff, steps)


def test_the_direct_comparison_covers_most_of_the_grid():
    """The direct comparison above is the rule: diffusers' float32 loop is within WELL_CONDITIONED of its float64
    loop in most of the grid, and in every Stable-Diffusion-like case (scaled-linear betas, leading spacing)."""
    well = 0
    for prediction, betas, spacing, sigmas, steps in GRID:
        ref, _ = pair(prediction_type=prediction, beta_schedule=betas, timestep_spacing=spacing,
                      use_karras_sigmas=sigmas == "karras", steps_offset=1 if spacing == "leading" else 0)  # fmt: skip
        model = posterior_model(ref)
        xa, _ = run_loop(ref, steps, model=model)
        x64 = _float64_loop(ref, steps, model)
        ok = float64_distance(xa, x64) <= WELL_CONDITIONED
        well += ok
        if (betas, spacing) == ("scaled_linear", "leading"):
            assert ok, (prediction, sigmas, steps)
    assert well >= len(GRID) // 2, well


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_every_order(order):
    """``order`` is a step argument: each value is diffusers' loop."""
    ref, ff = pair(**SD)
    assert_loops(ref, ff, 10, step_kwargs={"order": order})


def test_exponential_and_beta_sigmas():
    for option in ("use_exponential_sigmas", "use_beta_sigmas"):
        ref, ff = pair(**SD, **{option: True})
        assert_loops(ref, ff, 8)


@pytest.mark.parametrize("begin", [1, 2, 6])
def test_a_loop_from_a_later_step(begin):
    """img2img: diffusers counts its derivatives from the loop's first call but takes the order from the step
    index, so the first calls of a late start combine fewer derivatives with higher-order coefficients."""
    ref, ff = pair(**SD)
    xa, xb = begin_index_loops(ref, ff, 10, begin, start_noise(5), scale_input=True)
    assert_close(xb, xa)


def test_unet_pipeline_loop():
    assert_unet_loops_match(diffusers.LMSDiscreteScheduler(**SD), 8)


def test_meta_device_loop():
    """No step reads tensor data."""
    _, ff = pair(**SD)
    x, out = meta_loop(ff, 6, scale_input=True)
    assert x.device.type == "meta" and out.pred_original_sample.device.type == "meta"


def test_torch_compile_fullgraph():
    ref, ff = pair(**SD)
    xb, xa = compiled_loops(ref, ff, posterior_model(ref), 8, scale_input=True)
    assert_close(xb, xa)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_sample_and_output(dtype):
    """16-bit in, 16-bit out: diffusers converts, keeps derivatives and steps in the 16-bit dtype, the kernel in
    float32 with one rounding; both sit within its round-off of the float32 loop, fastflow no further than
    diffusers."""
    assert_half_loop_bounded(*pair(**SD), dtype)


def test_sample_prediction_returns_the_model_output():
    """diffusers returns the model output itself as ``pred_original_sample`` for ``prediction_type='sample'``, in
    its own dtype beside a float32 sample; the step is diffusers'."""
    ref, ff = pair(prediction_type="sample")
    for s in (ref, ff):
        s.set_timesteps(3)
    for o in (start_noise(1), start_noise(1).half()):
        x = start_noise()
        out, want = ff.step(o, ff.timesteps[0], x), ref.step(o, ref.timesteps[0], x)
        assert out.pred_original_sample is o and want.pred_original_sample is o
        assert_close(out.prev_sample, want.prev_sample)
        assert out.prev_sample.dtype == want.prev_sample.dtype == torch.float32
        for s in (ref, ff):
            s._step_index = None


def test_a_repeated_sigma_raises_where_diffusers_returns_nan():
    """diffusers' constructor schedule with leading spacing and ``steps_offset=1`` clamps timestep 1000 to 999: the
    first two sigmas are equal, and the second step's order-2 basis divides by their difference."""
    ref, ff = pair(**SD, timestep_spacing="leading", steps_offset=1)
    x = start_noise()
    ts = ff.timesteps
    assert float(ff.sigmas[0]) == float(ff.sigmas[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        xa = ref.step(start_noise(1), ts[0], x).prev_sample
        assert not torch.isfinite(ref.step(start_noise(2), ts[1], xa).prev_sample).all()
    xb = ff.step(start_noise(1), ts[0], x).prev_sample
    assert_close(xb, xa)
    with pytest.raises(UndefinedStepError, match="repeat a sigma"):
        ff.step(start_noise(2), ts[1], xb)


def test_errors():
    """An order beyond the kernel's history, an order changed mid-loop and a prediction type diffusers' LMS lacks
    raise, naming them."""
    _, ff = pair(**SD)
    ff.set_timesteps(4)
    with pytest.raises(NotImplementedError, match="order=5"):
        ff.step(start_noise(1), ff.timesteps[0], start_noise(), order=5)
    ff.step(start_noise(1), ff.timesteps[0], start_noise(), order=3)
    with pytest.raises(NotImplementedError, match="order=2 after order=3"):  # the plan fixes the derivatives read
        ff.step(start_noise(1), ff.timesteps[1], start_noise(), order=2)
    with pytest.raises(NotImplementedError, match="prediction_type"):
        ffd.LMSDiscreteScheduler(prediction_type="flow_prediction")
    assert isinstance(ffd.from_scheduler(diffusers.LMSDiscreteScheduler(**SD)), ffd.LMSDiscreteScheduler)


def test_an_integer_timestep_is_a_value():
    """diffusers' LMS, unlike its Euler steps, takes an integer timestep (a Python int or an int64 tensor): the
    loop's first is located by value, the rest follow the counter, and the drop-in matches it."""
    for conv in (int, torch.Tensor.long):
        ref, ff = pair(**SD)
        outs = []
        for s in (ref, ff):
            s.set_timesteps(6)
            x = start_noise() * s.init_noise_sigma
            for t in s.timesteps:
                x = s.step(stand_in(s.scale_model_input(x, t), t), conv(t), x).prev_sample
            outs.append(x)
        assert_close(outs[1], outs[0])
