"""KDPM2DiscreteScheduler and KDPM2AncestralDiscreteScheduler drop-ins: parity with diffusers over full loops (both
calls of every step), loops that start part-way, the ancestral noise. (Their CUDA sync-debug loops are in
test_dropin_api.py.)"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from dropin_helpers import (
    SD,
    WELL_CONDITIONED,
    assert_bfloat16_parity,
    assert_close,
    assert_loops_match,
    assert_no_further_from_float64,
    assert_unet_loops_match,
    compiled_loops,
    float32_draws,
    float64_distance,
    meta_loop,
    pair,
    run_loop,
    start_noise,
)
from posterior_model import posterior_model

import fastflow.diffusers as ffd
from fastflow import UndefinedStepError

diffusers = pytest.importorskip("diffusers")

NAMES = ("KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler")


def _generator_per_call(i: int) -> dict:
    return dict(generator=torch.Generator().manual_seed(1000 + i))


def _step_kwargs(name: str):
    """The ancestral class draws noise: the same generator per call for both loops, so both draw the same."""
    return _generator_per_call if "Ancestral" in name else None


def assert_loops(name, ref, ff, steps, **kwargs):
    """Final samples and every call's ``pred_original_sample`` agree (posterior stand-in, a generator per call
    for the ancestral class); diffusers' loop ran every call and stayed finite."""
    kwargs.setdefault("step_kwargs", _step_kwargs(name))
    (xa, oa), _ = assert_loops_match(ref, ff, model=posterior_model(ref), steps=steps, **kwargs)
    assert len(oa) == len(ref.timesteps) - kwargs.get("begin", 0)
    assert torch.isfinite(xa).all()


def _grid():
    sigmas = [{}, dict(use_karras_sigmas=True), dict(use_exponential_sigmas=True), dict(use_beta_sigmas=True)]
    spacing = [{}, dict(timestep_spacing="leading", steps_offset=1), dict(timestep_spacing="trailing")]
    betas = [SD, {}, dict(beta_schedule="squaredcos_cap_v2")]
    out = []
    for c, (name, pred, sig, steps) in enumerate(
        itertools.product(NAMES, ["epsilon", "v_prediction"], sigmas, [1, 2, 5, 20])
    ):
        cfg = dict(betas[c % len(betas)], **spacing[(c // 3) % len(spacing)], **sig, prediction_type=pred)
        if cfg.get("beta_schedule") == "squaredcos_cap_v2":
            cfg["prediction_type"] = "v_prediction"  # epsilon there starts at sigma ~ 2e4: see the Heun tests
        out.append((name, cfg, steps))
    return out


def _float64_loop(name: str, ref, steps: int, model) -> torch.Tensor:
    """diffusers' loop with its float32 sigmas, the sample and the model in float64 (the ancestral noise drawn as
    the float32 loop draws it, then widened): the reference both float32 loops round from."""
    import diffusers.schedulers.scheduling_k_dpm_2_ancestral_discrete as ancestral

    ref.set_timesteps(steps)
    for attr in ("sigmas", "sigmas_interpol", "sigmas_up", "sigmas_down"):
        if hasattr(ref, attr):
            setattr(ref, attr, getattr(ref, attr).double())
    x = start_noise().double() * float(ref.init_noise_sigma)
    with float32_draws(ancestral):
        for i, t in enumerate(ref.timesteps):
            kw = _generator_per_call(i) if "Ancestral" in name else {}
            x = ref.step(model(ref.scale_model_input(x, t), t), t, x, **kw).prev_sample
    return x


@pytest.mark.parametrize("case", _grid(), ids=lambda c: c[0][:13] + "-" + "-".join(
    f"{k}={v}" for k, v in c[1].items() if k != "beta_start" and k != "beta_end") + f"-n{c[2]}")
def test_grid_parity(case):
    """Both classes, both prediction types, every sigma family, spacings, beta schedules, 1 to 20 steps: every
    call's outputs are diffusers' where diffusers' float32 loop is accurate (within WELL_CONDITIONED of its float64
    loop); where it is not (cosine betas start at sigma ~ 2e4, where diffusers' slope cancels terms of that size),
    the drop-in's loop is within twice diffusers' own distance from diffusers' float64 loop."""
    name, cfg, steps = case
    ref, ff = pair(name, **cfg)
    ref.set_timesteps(steps)
    if not torch.isfinite(ref.timesteps).all():  # see test_a_schedule_diffusers_breaks
        _assert_raises_where_diffusers_breaks(name, ref, ff, steps)
        return
    model = posterior_model(ref)
    xa, _ = run_loop(ref, steps, model=model, step_kwargs=_step_kwargs(name))
    xb, _ = run_loop(ff, steps, model=model, step_kwargs=_step_kwargs(name))
    if assert_no_further_from_float64(xb, xa, _float64_loop(name, ref, steps, model)):
        ref, ff = pair(name, **cfg)
        assert_loops(name, ref, ff, steps)


def _timeless(x: torch.Tensor, t) -> torch.Tensor:
    """A stand-in model that ignores the timestep (diffusers hands it NaN timesteps where its schedule breaks)."""
    return 0.3 * x + 0.5 * torch.sin(x)


def _assert_raises_where_diffusers_breaks(name: str, ref, ff, steps: int) -> None:
    """Where diffusers' loop turns non-finite, the drop-in's raises an UndefinedStepError that says why;
    elsewhere (only a timestep handed to the model is NaN) both loops agree."""
    kw = _step_kwargs(name)
    xa, _ = run_loop(ref, steps, model=_timeless, step_kwargs=kw)
    if torch.isfinite(xa).all():
        xb, _ = run_loop(ff, steps, model=_timeless, step_kwargs=kw)
        assert_close(xb, xa)
    else:
        with pytest.raises(UndefinedStepError, match="not finite"):
            run_loop(ff, steps, model=_timeless, step_kwargs=kw)


def test_the_direct_comparison_covers_most_of_the_grid():
    """The direct comparison is the rule: diffusers' float32 loop is accurate in most of the grid."""
    well = finite = 0
    for name, cfg, steps in _grid():
        ref, _ = pair(name, **cfg)
        ref.set_timesteps(steps)
        if not torch.isfinite(ref.timesteps).all():
            continue
        finite += 1
        model = posterior_model(ref)
        xa, _ = run_loop(ref, steps, model=model, step_kwargs=_step_kwargs(name))
        well += float64_distance(xa, _float64_loop(name, ref, steps, model)) <= WELL_CONDITIONED
    assert well >= finite // 2, (well, finite)


def test_a_schedule_diffusers_breaks():
    """Cosine betas, Karras sigmas, 2 steps: diffusers' ancestral ``sigmas_down[0]`` rounds to 0, and its midpoint
    sigma, interpolated toward log 0, is NaN: its first call returns NaN (and a later timestep is NaN). The
    drop-in's first call raises an UndefinedStepError that says why, instead of returning NaN."""
    ref, ff = pair("KDPM2AncestralDiscreteScheduler", beta_schedule="squaredcos_cap_v2", use_karras_sigmas=True,
                   timestep_spacing="trailing", prediction_type="v_prediction")
    for s in (ref, ff):
        s.set_timesteps(2)
    assert float(ff.sigmas_down[0]) == 0.0 and math.isnan(float(ff.sigmas_interpol[0]))
    x = start_noise(0) * ff.init_noise_sigma
    assert not torch.isfinite(ref.step(_timeless(x, 0), ref.timesteps[0], x).prev_sample).all()
    with pytest.raises(UndefinedStepError, match="not finite"):
        ff.step(_timeless(x, 0), ff.timesteps[0], x)
    _assert_raises_where_diffusers_breaks("KDPM2AncestralDiscreteScheduler", ref, ff, 2)


@pytest.mark.parametrize(("name", "begin"), [(n, b) for n in NAMES for b in (2, 6)] + [(NAMES[0], 3)])
def test_loop_starting_part_way(name, begin):
    """img2img: ``set_begin_index(t_start * order)`` and the remaining calls. The first call taken is first-order
    whatever its index, as in diffusers, so an odd start (no pipeline makes one) shifts every call's order."""
    ref, ff = pair(name, **SD)
    assert_loops(name, ref, ff, 8, begin=begin)


def test_ancestral_odd_start_reaches_a_zero_midpoint():
    """From an odd index the ancestral loop's last call is second-order at a midpoint sigma diffusers set to 0:
    its slope divides by it (diffusers returns a non-finite sample); the drop-in raises there, naming it."""
    name = "KDPM2AncestralDiscreteScheduler"
    ref, ff = pair(name, **SD)
    xa, _ = run_loop(ref, 4, model=posterior_model(ref), begin=3, step_kwargs=_generator_per_call)
    assert not torch.isfinite(xa).all()
    with pytest.raises(ValueError, match="sigma_interpol = 0"):
        run_loop(ff, 4, model=posterior_model(ref), begin=3, step_kwargs=_generator_per_call)


@pytest.mark.parametrize("name", NAMES)
def test_custom_training_schedule(name):
    """Trained betas and another training length (diffusers' own schedule arithmetic, read back)."""
    betas = [1e-4 + (0.02 - 1e-4) * (i / 499) ** 1.5 for i in range(500)]
    ref, ff = pair(name, trained_betas=betas, num_train_timesteps=500)
    assert_loops(name, ref, ff, 7)


@pytest.mark.parametrize("name", NAMES)
def test_scale_model_input_and_order_flag_bit_identical(name):
    """Each call's scaled input is diffusers' to the bit (first-order calls divide by the sigma's, second-order ones
    by the midpoint's: the ancestral class reads it one index back), and ``state_in_first_order`` agrees."""
    ref, ff = pair(name, **SD, use_karras_sigmas=True)
    for s in (ref, ff):
        s.set_timesteps(6)
    x = start_noise(5)
    model = posterior_model(ref)
    for i, t in enumerate(ref.timesteps):
        assert ff.state_in_first_order == ref.state_in_first_order, i
        a, b = ref.scale_model_input(x, t), ff.scale_model_input(x, t)
        assert torch.equal(a, b), i
        kw = _generator_per_call(i) if "Ancestral" in name else {}
        xa = ref.step(model(a, t), t, x, **kw).prev_sample
        ff.step(model(b, t), t, x, **kw)
        x = xa


@pytest.mark.parametrize("name", NAMES)
def test_api_surface(name):
    ref, ff = pair(name, **SD)
    for s in (ref, ff):
        s.set_timesteps(10)
    assert ff.order == ref.order == 2
    assert ff.init_noise_sigma == ref.init_noise_sigma
    for attr in ("sigmas", "sigmas_interpol", "timesteps"):  # diffusers' own (sigmas_interpol[0] is its NaN)
        torch.testing.assert_close(getattr(ff, attr), getattr(ref, attr), rtol=0, atol=0, equal_nan=True)
    x, noise = start_noise(2), start_noise(3)
    assert_close(ff.add_noise(x, noise, ff.timesteps[2:3]), ref.add_noise(x, noise, ref.timesteps[2:3]))
    out = ff.step(x, ff.timesteps[0], x, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 2 and ff.step_index == 1 and not ff.state_in_first_order
    out = ff.step(x, ff.timesteps[1], x)
    assert type(out).__name__ == type(ref).__name__ + "Output" and ff.state_in_first_order
    assert type(ffd.from_scheduler(ref)) is getattr(ffd, name)


@pytest.mark.parametrize("name", NAMES)
def test_unsupported_prediction_raises(name):
    with pytest.raises(NotImplementedError, match="prediction_type='sample'"):
        getattr(ffd, name)(prediction_type="sample")


@pytest.mark.parametrize("name", NAMES)
def test_meta_device_step(name):
    ff = getattr(ffd, name)(**SD)
    ff.backend = "torch"
    x, out = meta_loop(ff, 4, scale_input=True)
    assert x.device.type == "meta" and out.pred_original_sample.device.type == "meta"


def test_torch_compile_fullgraph():
    """After the first (eager) call has built the plan, each call traces with fullgraph=True."""
    ref, ff = pair("KDPM2DiscreteScheduler", **SD)
    xb, xa = compiled_loops(ref, ff, posterior_model(ref), 4, scale_input=True)
    assert_close(xb, xa)


def test_ancestral_in_kernel_noise_distribution():
    """Without a generator the second-order call adds ``sigma_up`` times fastflow's own noise: the difference from
    diffusers' call with zero noise, over ``sigma_up``, is standard normal (and a first-order call adds none)."""
    name = "KDPM2AncestralDiscreteScheduler"
    torch.manual_seed(3)
    ref, ff = pair(name, **SD)
    for s in (ref, ff):
        s.set_timesteps(5)
    x = torch.randn(2, 4, 64, 64, generator=torch.Generator().manual_seed(0)) * 5
    model = posterior_model(ref)
    ts = ref.timesteps
    o0 = model(x, ts[0])
    first_ref, first_ff = ref.step(o0, ts[0], x).prev_sample, ff.step(o0, ts[0], x).prev_sample
    assert_close(first_ff, first_ref)
    o1 = model(first_ref, ts[1])
    zero = torch.zeros_like(x)
    import diffusers.schedulers.scheduling_k_dpm_2_ancestral_discrete as mod

    original = mod.randn_tensor
    try:
        mod.randn_tensor = lambda shape, **kw: zero.to(kw.get("dtype") or zero.dtype)
        deterministic = ref.step(o1, ts[1], first_ref).prev_sample
    finally:
        mod.randn_tensor = original
    up = float(ref.sigmas_up[0])
    xi = (ff.step(o1, ts[1], first_ff).prev_sample - deterministic) / up
    assert up > 0.1
    assert abs(float(xi.mean())) < 4 / math.sqrt(xi.numel())
    assert abs(float(xi.std()) - 1.0) < 0.03
    assert abs(float((xi**3).mean())) < 0.1 and abs(float((xi**4).mean()) - 3.0) < 0.27


@pytest.mark.parametrize("config", [dict(SD), dict(SD, use_karras_sigmas=True, prediction_type="v_prediction")])
def test_tiny_unet_loop(config):
    """A real network (tiny random UNet, offline) in diffusers' pipeline loop: the same samples."""
    assert_unet_loops_match(diffusers.KDPM2DiscreteScheduler(**config), 8)


def test_bfloat16_sample():
    """A bfloat16 loop returns bfloat16 as diffusers does and agrees to a few bfloat16 ulps (diffusers rounds
    intermediates to bfloat16; the drop-in computes in float32 and rounds once per output)."""
    ref, ff = pair("KDPM2DiscreteScheduler")
    assert_bfloat16_parity(ref, ff)
