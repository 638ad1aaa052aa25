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


def _per_token_loop(scheduler, steps: int, mask: torch.Tensor, **step_kwargs) -> torch.Tensor:
    """LTX-Video's conditioning loop: packed latents ``[B, tokens, C]``, conditioning tokens (``mask`` 1) held at a
    lower timestep, ``step`` given each token's timestep and the negated velocity (as the pipeline passes them)."""
    scheduler.set_timesteps(steps)
    x = torch.randn(2, 24, 8, generator=torch.Generator().manual_seed(0))
    for t in scheduler.timesteps:
        per_token = torch.minimum(t.expand(2).unsqueeze(-1).float(), (1 - mask) * 1000.0)
        v = 0.3 * x + 0.2 * torch.sin(x) + per_token[..., None] / 2000.0
        x = scheduler.step(-v, t, x, per_token_timesteps=per_token, return_dict=False, **step_kwargs)[0]
    return x


_CONDITIONING = (torch.arange(24) < 6).float().expand(2, 24) * torch.tensor([[1.0], [0.7]])


@pytest.mark.parametrize("config", [dict(shift=3.0), FLUX | dict(use_dynamic_shifting=False), dict(shift=1.0)])
def test_per_token_timesteps_match_diffusers(config):
    """``per_token_timesteps`` (LTX-Video's conditioning pipeline): each token steps from its own sigma to the
    schedule's next one below it; the drop-in's loop (torch ops on the device) is diffusers', float32 returned."""
    ref, ff = pair("FlowMatchEulerDiscreteScheduler", **config)
    xa, xb = (_per_token_loop(s, 8, _CONDITIONING) for s in (ref, ff))
    assert xb.dtype == xa.dtype == torch.float32
    assert_close(xb, xa, rtol=1e-6, atol=1e-6)


def test_per_token_timesteps_stochastic_sampling():
    """With ``stochastic_sampling``: a generator gives diffusers' numbers; without one the drop-in draws its own
    noise, which ``(prev - (1 - next) x0) / next`` recovers as standard normals, one draw per step."""
    ref, ff = pair("FlowMatchEulerDiscreteScheduler", shift=3.0, stochastic_sampling=True)
    xa = _per_token_loop(ref, 6, _CONDITIONING, generator=torch.Generator().manual_seed(5))
    xb = _per_token_loop(ff, 6, _CONDITIONING, generator=torch.Generator().manual_seed(5))
    assert_close(xb, xa, rtol=1e-6, atol=1e-6)
    ff.set_timesteps(6)
    x = torch.randn(4, 4096, 8, generator=torch.Generator().manual_seed(1))
    per_token = torch.full((4, 4096), float(ff.timesteps[0]))
    v = torch.randn_like(x)
    prev = ff.step(v, ff.timesteps[0], x, per_token_timesteps=per_token).prev_sample
    sigma, sigma_next = float(ff.sigmas[0]), float(ff.sigmas[1])
    noise = (prev - (1 - sigma_next) * (x - sigma * v)) / sigma_next
    assert abs(float(noise.mean())) < 0.01 and abs(float(noise.std()) - 1) < 0.01


def test_per_token_timesteps_read_no_device_data():
    """On meta tensors (no data to read back) the per-token step runs: no host sync."""
    _, ff = pair("FlowMatchEulerDiscreteScheduler", shift=3.0)
    ff.set_timesteps(4)
    x = torch.empty(2, 24, 8, device="meta")
    for t in ff.timesteps:
        per_token = torch.empty(2, 24, device="meta")
        x = ff.step(torch.empty_like(x), t.to("meta"), x, per_token_timesteps=per_token).prev_sample
    assert x.device.type == "meta" and x.shape == (2, 24, 8)


@pytest.mark.gpu
@pytest.mark.parametrize("stochastic", [False, True])
def test_per_token_timesteps_gpu_no_sync(stochastic):
    """LTX-Video's per-token loop on the GPU under sync debug mode "error" (fastflow's noise when stochastic); the
    deterministic loop is diffusers'."""
    ref, ff = pair("FlowMatchEulerDiscreteScheduler", shift=3.0, stochastic_sampling=stochastic)
    mask = _CONDITIONING.cuda()
    x0 = torch.randn(2, 24, 8, generator=torch.Generator().manual_seed(0)).cuda()
    outs = []
    for s in (ref, ff):
        s.set_timesteps(6, device="cuda")
        x = x0
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if s is ff else "default")
        try:
            for t in s.timesteps:
                per_token = torch.minimum(t.expand(2).unsqueeze(-1).float(), (1 - mask) * 1000.0)
                x = s.step(-0.3 * x, t, x, per_token_timesteps=per_token).prev_sample
        finally:
            torch.cuda.set_sync_debug_mode("default")
        outs.append(x)
    assert torch.isfinite(outs[1]).all()
    if not stochastic:
        assert_close(outs[1], outs[0], rtol=1e-6, atol=1e-6)


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


# ------------------------------------------------------------------ FlowMatchHeunDiscreteScheduler
HEUN = "FlowMatchHeunDiscreteScheduler"


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 2, 8, 20, 50])
def test_heun_calls_are_exact_and_diffusers(shift, steps):
    """Each call given diffusers' own sample and output: within 4 float32 ulps of the sample's scale of the exact
    (float64) Heun step on flow sigmas, whose slopes are the outputs themselves; and within 1e-5 of that scale
    of diffusers', plus the float32 cancellation of diffusers' slope ``(z - x0) / sigma`` (a few ulps of the sample
    over sigma, times the step), which dominates at the last sigma of 1e-3."""
    ref, ff = pair(HEUN, shift=shift)
    for s in (ref, ff):
        s.set_timesteps(steps)
    sig = ref.sigmas
    x = start_noise(0)
    first = None  # (sample, slope, dt) of the pending first-order call
    for i, t in enumerate(ref.timesteps):
        o = stand_in(x, t)
        xa, xb = ref.step(o, t, x).prev_sample, ff.step(o, t, x).prev_sample
        scale = float(x.abs().max())
        if first is None:
            dt = float(sig[i + 1] - sig[i])  # diffusers' float32 step
            exact = x.double() + o.double() * dt
            first = (x.double(), o.double(), dt)
            sigma = float(sig[i])
        else:
            z, slope, dt = first
            exact = z + 0.5 * (slope + o.double()) * dt
            first, sigma = None, float(sig[i])
        cancellation = 4 * 2.0**-23 * scale / sigma * abs(dt)
        assert float((xb.double() - exact).abs().max()) <= 4 * 2.0**-23 * scale, i
        assert float((xb - xa).abs().max()) <= 1e-5 * scale + cancellation, i
        x = xa


@pytest.mark.parametrize("config", [dict(), dict(shift=3.0)])
def test_heun_loops_match_diffusers(config):
    """Whole 50-step loops: diffusers' samples to 1e-5 (its float32 slope's cancellation is small there)."""
    ref, ff = pair(HEUN, **config)
    xa, _ = run_loop(ref, 50)
    xb, _ = run_loop(ff, 50)
    assert_close(xb, xa)


def test_heun_api_surface():
    import fastflow.diffusers as ffd

    ref, ff = pair(HEUN, shift=3.0)
    for s in (ref, ff):
        s.set_timesteps(6)
    assert torch.equal(ff.timesteps, ref.timesteps) and torch.equal(ff.sigmas, ref.sigmas)
    assert not hasattr(ff, "scale_model_input") and not hasattr(ref, "scale_model_input")
    x = start_noise(1)
    out = ff.step(x, ff.timesteps[0], x, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1 and not ff.state_in_first_order
    assert type(ff.step(x, ff.timesteps[1], x)).__name__ == "FlowMatchHeunDiscreteSchedulerOutput"
    assert ff.state_in_first_order
    assert type(ffd.from_scheduler(ref)) is ffd.FlowMatchHeunDiscreteScheduler
    with pytest.raises(ValueError, match="integer"):
        ff.step(x, 3, x)


def test_heun_churn_raises_where_it_applies():
    """``s_churn`` (positive or negative) changes diffusers' step only where a sigma lies in ``[s_tmin, s_tmax]``:
    there the drop-in raises, naming it; elsewhere the step is the unchurned one, as in diffusers."""
    ref, ff = pair(HEUN)
    for s in (ref, ff):
        s.set_timesteps(4)
    x = start_noise(2)
    for s_churn in (1.0, -1.0):  # a negative one moves diffusers' sigma_hat below sigma
        with pytest.raises(NotImplementedError, match="s_churn"):
            ff.step(stand_in(x, ff.timesteps[0]), ff.timesteps[0], x, s_churn=s_churn)
    t = ref.timesteps[0]
    outside = dict(s_churn=1.0, s_tmin=5.0)  # no sigma reaches 5
    assert_close(ff.step(stand_in(x, t), t, x, **outside).prev_sample,
                 ref.step(stand_in(x, t), t, x, **outside).prev_sample)


def test_heun_bf16_model_output():
    """bfloat16 outputs and samples come back bfloat16, as diffusers' (it upcasts the sample and casts back)."""
    ref, ff = pair(HEUN)
    outs = []
    for s in (ref, ff):
        s.set_timesteps(6)
        x = start_noise(0).to(torch.bfloat16)
        for t in s.timesteps:
            x = s.step(stand_in(x.float(), t).to(torch.bfloat16), t, x).prev_sample
        outs.append(x)
    assert outs[0].dtype == outs[1].dtype == torch.bfloat16
    assert_close(outs[1].float(), outs[0].float(), rtol=0, atol=0.05)


def test_euler_has_no_scale_model_input_as_diffusers():
    """Pipelines branch on ``hasattr(scheduler, "scale_model_input")`` (EasyAnimate, Stable Diffusion's): the flow
    Euler drop-in has none, as diffusers' class has none."""
    ref, ff = pair("FlowMatchEulerDiscreteScheduler")
    assert not hasattr(ref, "scale_model_input")
    assert not hasattr(ff, "scale_model_input") and not hasattr(type(ff), "scale_model_input")
    with pytest.raises(AttributeError, match="scale_model_input"):
        ff.scale_model_input(start_noise(1), 1.0)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("begin", [None, 0])
def test_a_mu_the_schedule_cannot_take_is_named_in_the_error(begin):
    """A resolution shift far past the config's range (Qwen-Image edit's ~1024^2 image on a small
    max_image_seq_len) makes NaN sigmas: diffusers steps to NaN, the drop-in's error says where they came from."""
    config = dict(use_dynamic_shifting=True, shift_terminal=0.02, time_shift_type="exponential")
    ref, ff = pair("FlowMatchEulerDiscreteScheduler", **config)
    for s in (ref, ff):
        s.set_timesteps(4, mu=100.0)
    assert torch.isnan(ref.sigmas[:-1]).all()
    x = start_noise(0)
    if begin is not None:
        ref.set_begin_index(begin)
        ff.set_begin_index(begin)
        assert torch.isnan(ref.step(stand_in(x, 0.0), ref.timesteps[0], x).prev_sample).all()
    with pytest.raises(ValueError, match="set_timesteps made timesteps that are not finite .*mu"):
        ff.step(stand_in(x, 0.0), ff.timesteps[0], x)
