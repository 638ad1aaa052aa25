"""PNDMScheduler drop-in (PLMS, with and without the Runge-Kutta warm-up): parity with diffusers over full loops,
sync-free."""

from __future__ import annotations

import itertools

import pytest
import torch
from dropin_helpers import (
    SD,
    WELL_CONDITIONED,
    assert_close,
    assert_half_loop_bounded,
    assert_no_further_from_float64,
    assert_unet_loops_match,
    compiled_loops,
    float64_distance,
    meta_loop,
    recompile_limit,
    run_loop,
    stand_in,
    start_noise,
)
from dropin_helpers import pair as dropin_pair
from posterior_model import posterior_model

import fastflow.diffusers as ffd
from fastflow.diffusers.pndm import plms_weights

diffusers = pytest.importorskip("diffusers")

SD15 = dict(SD, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)  # Stable Diffusion 1.x's config


def pair(**config):
    return dropin_pair("PNDMScheduler", **{"skip_prk_steps": True, **config})


def prk_pair(**config):
    """diffusers' default: twelve Runge-Kutta calls before PLMS."""
    return dropin_pair("PNDMScheduler", **{"skip_prk_steps": False, **config})


def test_plms_weights():
    """diffusers keeps every call's output but the second's, at most four, and weighs them by Adams-Bashforth;
    the second call repeats the first step from its sample with the mean of both outputs."""
    assert plms_weights(0) == (0, [(0, 1.0)])
    assert plms_weights(1) == (0, [(1, 0.5), (0, 0.5)])
    assert plms_weights(2) == (2, [(2, 1.5), (0, -0.5)])
    assert plms_weights(3) == (3, [(3, 23 / 12), (2, -16 / 12), (0, 5 / 12)])
    assert plms_weights(4) == (4, [(4, 55 / 24), (3, -59 / 24), (2, 37 / 24), (0, -9 / 24)])
    assert plms_weights(9) == (9, [(9, 55 / 24), (8, -59 / 24), (7, 37 / 24), (6, -9 / 24)])
    for k in range(12):
        assert sum(w for _, w in plms_weights(k)[1]) == pytest.approx(1.0)
    # After twelve Runge-Kutta calls diffusers has kept the outputs of calls 0, 4 and 8.
    assert plms_weights(12, 12) == (12, [(12, 55 / 24), (8, -59 / 24), (4, 37 / 24), (0, -9 / 24)])
    assert plms_weights(13, 12) == (13, [(13, 55 / 24), (12, -59 / 24), (8, 37 / 24), (4, -9 / 24)])
    assert plms_weights(16, 12) == (16, [(16, 55 / 24), (15, -59 / 24), (14, 37 / 24), (13, -9 / 24)])
    with pytest.raises(ValueError, match="Runge-Kutta"):
        plms_weights(11, 12)


def _float64_loop(ref, steps: int, model, **kwargs) -> torch.Tensor:
    """diffusers' loop with its alphas and the sample in float64: the reference both float32 loops round from."""
    ref.alphas_cumprod = ref.alphas_cumprod.double()
    ref.final_alpha_cumprod = ref.final_alpha_cumprod.double()
    x, _ = run_loop(ref, steps, model=model, x=start_noise().double(), **kwargs)
    return x


GRID = [
    (prediction, betas, spacing, steps, alpha_one, prk)
    for prediction, betas, spacing, alpha_one, prk in itertools.product(
        ("epsilon", "v_prediction"), ("linear", "scaled_linear", "squaredcos_cap_v2"),
        ("leading", "linspace", "trailing"), (False, True), (False, True),
    )
    for steps in ((4, 5, 25) if prk else (1, 2, 3, 4, 5, 25))  # diffusers' warm-up needs 4 steps
]  # fmt: skip


def _grid_pair(prediction, betas, spacing, alpha_one, prk):
    return (prk_pair if prk else pair)(prediction_type=prediction, beta_schedule=betas, timestep_spacing=spacing,
                                       set_alpha_to_one=alpha_one, steps_offset=1 if spacing == "leading" else 0)


@pytest.mark.parametrize("prediction,betas,spacing,steps,alpha_one,prk", GRID)
def test_loops_match_diffusers(prediction, betas, spacing, steps, alpha_one, prk):
    """Every prediction type, beta schedule and spacing, 1 to 25 steps (the first calls' special cases), both
    final alphas, with and without the Runge-Kutta warm-up: the drop-in's loop equals diffusers' to float32
    round-off, and where diffusers' own float32 loop strays from its float64 one (its step subtracts large terms
    next to a timestep of 999), the drop-in strays at most twice as far (or 2e-6)."""
    ref, ff = _grid_pair(prediction, betas, spacing, alpha_one, prk)
    model = posterior_model(ref)
    xa, _ = run_loop(ref, steps, model=model)
    xb, _ = run_loop(ff, steps, model=model)
    torch.testing.assert_close(ff.timesteps, ref.timesteps, rtol=0, atol=0)
    if assert_no_further_from_float64(xb, xa, _float64_loop(ref, steps, model)):  # diffusers' loop is accurate
        assert_close(xb, xa)


def test_the_direct_comparison_covers_most_of_the_grid():
    """The direct comparison above is the rule: diffusers' float32 loop is within WELL_CONDITIONED of its float64
    loop in most of the grid, and in every Stable-Diffusion-like case (scaled-linear betas, leading spacing).
    Where it is not, steps leave a timestep of 999 with ``alphas_cumprod`` near 0 (linspace and trailing
    spacings), where diffusers' float32 step subtracts large terms."""
    well = 0
    for prediction, betas, spacing, steps, alpha_one, prk in GRID:
        ref, _ = _grid_pair(prediction, betas, spacing, alpha_one, prk)
        model = posterior_model(ref)
        xa, _ = run_loop(ref, steps, model=model)
        x64 = _float64_loop(ref, steps, model)
        ok = float64_distance(xa, x64) <= WELL_CONDITIONED
        well += ok
        if (betas, spacing) == ("scaled_linear", "leading"):
            assert ok, (prediction, steps, alpha_one, prk)
    assert well >= len(GRID) // 2, well


@pytest.mark.parametrize("steps", [10, 50])
def test_stable_diffusion_config(steps):
    """Stable Diffusion 1.x's scheduler config, with the posterior stand-in and the sample-dependent one: every
    step's output equals diffusers'."""
    for model_of in (posterior_model, lambda ref: None):
        ref, ff = pair(**SD15)
        model = model_of(ref)
        kwargs = {} if model is None else {"model": model}
        xa, oa = run_loop(ref, steps, **kwargs)
        xb, ob = run_loop(ff, steps, **kwargs)
        assert len(oa) == len(ob) == steps + 1  # diffusers' list repeats its second timestep
        for a, b in zip(oa, ob, strict=True):
            assert_close(b.prev_sample, a.prev_sample)


@pytest.mark.parametrize("steps", [4, 10, 50])
def test_diffusers_default_config(steps):
    """diffusers' default ``PNDMScheduler()``, its Runge-Kutta warm-up included: every call's output equals
    diffusers'."""
    for model_of in (posterior_model, lambda ref: None):
        ref, ff = prk_pair()
        model = model_of(ref)
        kwargs = {} if model is None else {"model": model}
        xa, oa = run_loop(ref, steps, **kwargs)
        xb, ob = run_loop(ff, steps, **kwargs)
        assert len(oa) == len(ob) == steps + 9  # twelve Runge-Kutta calls over the last four steps
        for a, b in zip(oa, ob, strict=True):
            assert_close(b.prev_sample, a.prev_sample)


@pytest.mark.parametrize("begin", [1, 2, 5, 13])
def test_a_warm_up_loop_from_a_later_step_counts_its_calls_from_there(begin):
    """img2img with the warm-up: diffusers runs its twelve Runge-Kutta calls first wherever the loop starts (at
    the warm-up's own timesteps, to the given ones less half a ratio or to them); the drop-in does the same. From
    step 13, a PLMS timestep, diffusers' loop grows to hundreds: compared relative to its scale."""
    ref, ff = prk_pair(**SD, steps_offset=1)
    model = posterior_model(ref)
    outs = []
    for s in (ref, ff):
        s.set_timesteps(12)
        if hasattr(s, "set_begin_index"):
            s.set_begin_index(begin)
        x = start_noise(5)
        for t in s.timesteps[begin:]:
            x = s.step(model(x, t), t, x).prev_sample
        outs.append(x)
    assert_close(outs[1], outs[0], atol=1e-5 * max(1.0, float(outs[0].abs().max())))


def test_a_sample_changed_inside_a_warm_up_group():
    """diffusers' Runge-Kutta calls step from their group's first sample: a sample changed before the group's
    second or third call is ignored by both; before the fourth, which the drop-in recovers the group's sample
    from, it raises naming the option, and an in-place change counts as a change."""
    ref, ff = prk_pair(**SD)
    model = posterior_model(ref)
    loops = []
    for s in (ref, ff):
        s.set_timesteps(6)
        x = start_noise(2)
        for k, t in enumerate(s.timesteps[:3]):
            x = s.step(model(x, t), t, x).prev_sample
            if k == 0:
                x = x * 0.5  # a new tensor before the second call
        loops.append(x)
    assert_close(loops[1], loops[0])
    t = ff.timesteps[3]
    with pytest.raises(NotImplementedError, match="skip_prk_steps=True"):
        ff.step(model(x, t), t, x * 1.0)
    x.mul_(1.0)  # the same tensor, changed in place
    with pytest.raises(NotImplementedError, match="Runge-Kutta call 3"):
        ff.step(model(x, t), t, x)


def test_warm_up_under_inference_mode():
    """Inference-mode tensors keep no version counter: the warm-up's check of its fourth calls' samples does
    without it, and the loop is diffusers'."""
    ref, ff = prk_pair(**SD)
    with torch.inference_mode():
        xa, _ = run_loop(ref, 5)
        xb, _ = run_loop(ff, 5)
    assert_close(xb, xa)


def test_warm_up_meta_compile_and_unet():
    """The warm-up's calls read no tensor data, trace with fullgraph=True (one graph per call: 12 after the first
    of a 4-step loop) and run diffusers' UNet loop."""
    _, ff = prk_pair(**SD)
    x, out = meta_loop(ff, 5)
    assert x.device.type == "meta" and out.prev_sample is x
    ref, ff = prk_pair(**SD)
    with recompile_limit(16):
        xb, xa = compiled_loops(ref, ff, posterior_model(ref), 4)
    assert_close(xb, xa)
    assert_unet_loops_match(diffusers.PNDMScheduler(**SD, steps_offset=1), 5)


@pytest.mark.parametrize("begin", [1, 2, 5])
def test_a_loop_from_a_later_step_counts_its_calls_from_there(begin):
    """img2img: a loop that starts part-way (the drop-in told by ``set_begin_index``, as pipelines do; diffusers'
    PNDM has none and counts calls from its loop's first) takes the first-call steps there too, also from either
    copy of the repeated timestep."""
    ref, ff = pair(**SD15)
    model = posterior_model(ref)
    x0 = start_noise(5)
    outs = []
    for s in (ref, ff):
        s.set_timesteps(12)
        if hasattr(s, "set_begin_index"):
            s.set_begin_index(begin)
        x = x0
        for t in s.timesteps[begin:]:
            x = s.step(model(x, t), t, x).prev_sample
        outs.append(x)
    assert not hasattr(diffusers.PNDMScheduler, "set_begin_index")
    assert_close(outs[1], outs[0])


def test_unet_pipeline_loop():
    assert_unet_loops_match(diffusers.PNDMScheduler(**SD15), 8)


def test_meta_device_loop():
    """No step reads tensor data."""
    _, ff = pair(**SD15)
    x, out = meta_loop(ff, 6)
    assert x.device.type == "meta" and out.prev_sample is x


def test_torch_compile_fullgraph():
    ref, ff = pair(**SD15)
    xb, xa = compiled_loops(ref, ff, posterior_model(ref), 8)
    assert_close(xb, xa)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_sample_and_output(dtype):
    """16-bit in, 16-bit out (diffusers' dtype promotion). diffusers combines the kept outputs and steps in the
    16-bit dtype, the kernel in float32 with one rounding: both sit within its round-off of the float32 loop
    (the model's 16-bit outputs alike), fastflow no further than diffusers."""
    assert_half_loop_bounded(*pair(**SD15), dtype)


def test_output_and_errors():
    """``return_dict=False`` gives diffusers' one-tuple; stepping before ``set_timesteps`` is diffusers' error;
    prediction types diffusers' PNDM does not implement raise, naming the option."""
    _, ff = pair(**SD15)
    with pytest.raises(ValueError, match="set_timesteps"):
        ff.step(start_noise(), 981, start_noise())
    ff.set_timesteps(4)
    out = ff.step(start_noise(1), ff.timesteps[0], start_noise(), return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1 and out[0].shape == start_noise().shape
    assert isinstance(ffd.from_scheduler(diffusers.PNDMScheduler()), ffd.PNDMScheduler)
    with pytest.raises(NotImplementedError, match="prediction_type"):
        ffd.PNDMScheduler(skip_prk_steps=True, prediction_type="sample")
    assert isinstance(ffd.from_scheduler(diffusers.PNDMScheduler(**SD15)), ffd.PNDMScheduler)


def test_zero_snr_step_raises_where_diffusers_divides_by_zero():
    """Trained betas that end at 1 make ``alphas_cumprod`` 0 at the last training timestep: diffusers' step from
    there divides by it; the drop-in's raises saying so, and a loop that starts after it runs."""
    betas = torch.linspace(0.0001, 0.02, 1000)
    betas[-1] = 1.0
    ref, ff = pair(trained_betas=betas.tolist(), timestep_spacing="trailing")
    ff.set_timesteps(5)
    assert int(ff.timesteps[0]) == 999
    with pytest.raises(ValueError, match="zero SNR"):
        ff.step(start_noise(1), ff.timesteps[0], start_noise())
    ref.set_timesteps(5)
    assert not torch.isfinite(ref.step(start_noise(1), ref.timesteps[0], start_noise()).prev_sample).all()


@pytest.mark.parametrize("make", [pair, prk_pair], ids=["plms", "warm-up"])
def test_earlier_model_outputs_are_kept_by_reference(make):
    """The calls' model outputs that later calls combine are kept as given (diffusers keeps them so too), not
    written again as x_hat: no stage writes one, and the kept tensors are the loop's own model outputs."""
    _, ff = make(**SD15)
    ff.set_timesteps(8)
    runner = ff._ff_get(0, None).runner
    assert not any(runner.plan.write_x) and any(runner.plan.keep_o)
    x, given, kept = start_noise(2), [], 0
    for t in ff.timesteps:
        o = torch.sin(x) * 0.5 + 0.1 * float(t) / 1000.0
        given.append(o)
        x = ff.step(o, t, x).prev_sample
        for j in range(len(given)):
            if ("o", j) in runner._store:
                assert runner.stored("o", j) is given[j]
                kept += 1
    assert kept >= len(given)


def test_a_converted_tensor_in_place_of_the_kept_outputs_raises():
    """The kept outputs are the raw model outputs: a step that would have the kernel convert another tensor (as
    thresholding drop-ins do) raises rather than keep that one."""
    _, ff = pair(**SD15)
    ff.set_timesteps(8)
    x = start_noise(2)
    t = ff.timesteps[0]
    with pytest.raises(ValueError, match="keeps earlier model outputs cannot convert another tensor"):
        ff._ff_step(torch.sin(x), t, x, kernel_output=torch.cos(x))


@pytest.mark.parametrize("timestep_kind", ["tensor element", "python number"])
@pytest.mark.parametrize("begin", [1, 2])
def test_a_loop_from_a_repeated_timestep_without_set_begin_index(timestep_kind, begin):
    """diffusers' PNDM counts its calls and never locates a step: a loop that starts part-way (without
    set_begin_index, which diffusers' class lacks) starts its PLMS sequence at its first call. The schedule
    [1999, 999, 999] repeats a timestep: an element of the scheduler's timesteps is located by its position, a
    number by its first occurrence (the second call of the repeat then follows it)."""
    ref, ff = pair(num_train_timesteps=2000, timestep_spacing="trailing")
    for sched in (ref, ff):
        sched.set_timesteps(2)
    assert ref.timesteps.tolist() == [1999, 999, 999]
    xa = xb = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    for t_ref, t_ff in zip(ref.timesteps[begin:], ff.timesteps[begin:], strict=True):
        xa = ref.step(stand_in(xa, t_ref), t_ref, xa).prev_sample
        xb = ff.step(stand_in(xb, t_ff), t_ff if timestep_kind == "tensor element" else int(t_ff), xb).prev_sample
    assert_close(xb, xa, atol=1e-5 * float(xa.abs().max()))
