"""CogVideoXDDIMScheduler drop-in: parity with diffusers over full loops; the arguments diffusers ignores stay
ignored."""

from __future__ import annotations

import contextlib
import inspect
import itertools

import pytest
import torch
from dropin_helpers import (
    SHAPE,
    assert_bfloat16_parity,
    assert_close,
    assert_no_further_from_float64,
    assert_unet_loops_match,
    float32_draws,
    fullgraph_seed_draws,
    pair,
    recompile_limit,
    run_loop,
    stand_in,
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


# ------------------------------------------------------------------ CogVideoXDPMScheduler
DPM = "CogVideoXDPMScheduler"
DPM_CONFIGS = [dict(), dict(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing"),
               dict(prediction_type="sample", set_alpha_to_one=False),
               dict(prediction_type="v_prediction", timestep_spacing="trailing", snr_shift_scale=1.0)]


def _dpm_loop(s, steps: int, model, x=None, begin: int = 0, float32_noise: bool = False):
    """CogVideoX's pipeline loop: each call gets the previous call's prediction and timestep, and a generator.
    ``float32_noise``: draw the noise as in float32 and widen it (a float64 loop then adds the float32 loop's)."""
    import diffusers.schedulers.scheduling_dpm_cogvideox as module

    import fastflow.diffusers._noise_draws as base

    s.set_timesteps(steps)
    ts = s.timesteps[begin:]  # (both address a step by its timestep's value, read on the host here)
    g = torch.Generator().manual_seed(5)
    x = start_noise(0) if x is None else x
    with float32_draws(module, base) if float32_noise else contextlib.nullcontext():
        old = None
        for i, t in enumerate(ts):
            x, old = s.step(model(x, t), old, t, ts[i - 1] if i > 0 else None, x, generator=g, return_dict=False)
    return x


def _dpm_float64(cfg: dict, steps: int, model, begin: int = 0) -> torch.Tensor:
    ref = diffusers.CogVideoXDPMScheduler(**cfg)
    set_timesteps = ref.set_timesteps

    def widened(*args, **kwargs):  # diffusers' float32 alphas, its arithmetic in float64
        set_timesteps(*args, **kwargs)
        ref.alphas_cumprod = ref.alphas_cumprod.double()
        ref.final_alpha_cumprod = ref.final_alpha_cumprod.double()

    ref.set_timesteps = widened
    return _dpm_loop(ref, steps, model, x=start_noise(0).double(), begin=begin, float32_noise=True)


@pytest.mark.parametrize("steps", [1, 2, 5, 20, 50])
@pytest.mark.parametrize("config", DPM_CONFIGS, ids=["default", "v-zero-snr", "sample", "v-no-shift"])
def test_dpm_loops_match_diffusers(config, steps):
    """CogVideoX's pipeline loop (SDE noise from the same generator): in float64 the loops agree to 1e-12 of the
    sample's scale (every multiplier is diffusers' formula, zero-SNR limits included); in float32 each is within
    1e-5 of that scale of diffusers' float64 loop, and within 1e-5 of diffusers' float32 loop up to 20 steps (at
    50 the SDE steps keep the round-off of the epsilon-to-x0 conversion at the noisy end, which the kernel folds
    into two coefficients: about twice diffusers' there)."""
    ref, ff = pair(DPM, **config)
    model = posterior_model(ref)
    x64 = _dpm_float64(config, steps, model)
    scale = float(x64.abs().max())
    xb64 = _dpm_loop(ff, steps, model, x=start_noise(0).double(), float32_noise=True)
    assert float((xb64 - x64).abs().max()) <= 1e-12 * scale
    xa, xb = _dpm_loop(ref, steps, model), _dpm_loop(ff, steps, model)
    assert float((xb.double() - x64).abs().max()) <= 1e-5 * scale
    if steps <= 20:
        assert_close(xb, xa)


@pytest.mark.parametrize("begin", [3, 10])
def test_dpm_loop_starting_part_way(begin):
    """video2video: the remaining calls from a later timestep, the first of them first-order as in diffusers."""
    ref, ff = pair(DPM)
    model = posterior_model(ref)
    x64 = _dpm_float64({}, 20, model, begin=begin)
    xb64 = _dpm_loop(ff, 20, model, x=start_noise(0).double(), begin=begin, float32_noise=True)
    assert float((xb64 - x64).abs().max()) <= 1e-12 * float(x64.abs().max())
    assert_close(_dpm_loop(ff, 20, model, begin=begin), _dpm_loop(ref, 20, model, begin=begin))


def test_dpm_history_must_be_the_schedulers_own():
    """The drop-in keeps the history itself: a prediction given at a loop's first call, another tensor or None
    mid-loop, or a host-readable timestep_back other than the previous call's raise instead of stepping from
    values the caller did not mean."""
    _, ff = pair(DPM)
    ff.set_timesteps(5)
    ts = ff.timesteps
    x = start_noise(0)
    with pytest.raises(NotImplementedError, match="first call"):
        ff.step(x, x, ts[0], None, x)
    ff.set_timesteps(5)
    x1, pred = ff.step(x, None, ts[0], None, x)
    for old, back, match in ((pred.clone(), ts[0], "returned"), (None, ts[0], "returned"),
                             (pred, int(ts[0]) - 1, "previous call's timestep")):
        with pytest.raises(NotImplementedError, match=match):
            ff.step(x1, old, ts[1], back, x1)
    x2, _ = ff.step(x1, pred, ts[1], int(ts[0]), x1)  # a Python number equal to the previous timestep is fine
    assert torch.isfinite(x2).all()


def test_dpm_set_timesteps_lets_the_last_loops_prediction_go():
    """A long-lived scheduler keeps no tensor of a finished loop once set_timesteps starts the next: the prediction
    it returned last (kept to check the caller hands it back) is freed with the caller's references, and the next
    loop steps as a fresh scheduler's does."""
    import gc
    import weakref

    _, ff = pair(DPM)
    model = posterior_model(ff)
    _dpm_loop(ff, 4, model)
    ff.set_timesteps(4)
    x, old = start_noise(0), None
    for i, t in enumerate(ff.timesteps):
        x, old = ff.step(model(x, t), old, t, ff.timesteps[i - 1] if i > 0 else None, x, return_dict=False)
    last = weakref.ref(old)
    del x, old
    ff.set_timesteps(3)
    gc.collect()
    assert last() is None
    _, fresh = pair(DPM)
    assert torch.equal(_dpm_loop(ff, 3, model), _dpm_loop(fresh, 3, model))


def test_dpm_pipeline_loop_traces_with_fullgraph():
    """CogVideoX's pipeline loop, its step under torch.compile(fullgraph=True) from the first call
    (set_begin_index(0)): a CPU timestep_back was read with .item(), and the step's timestep taken from a numpy
    array, both data-dependent in a graph (an error at the second call); now every call traces, with eager's bits."""
    _, ff = pair(DPM)

    def loop(step):
        ff.set_timesteps(5)
        ff.set_begin_index(0)
        ts, x, old = list(ff.timesteps), start_noise(0), None
        for i, t in enumerate(ts):
            x, old = step(stand_in(x, t), old, t, ts[i - 1] if i > 0 else None, x)
        return x

    def eager(o, old, t, back, x):
        return ff.step(o, old, t, back, x, return_dict=False)

    torch.manual_seed(0)
    want = loop(eager)
    torch._dynamo.reset()
    compiled = torch.compile(eager, fullgraph=True, backend="eager")
    torch.manual_seed(0)
    with recompile_limit(8), fullgraph_seed_draws():  # its first noisy step draws the loop's seed with .item()
        got = loop(compiled)
    assert torch.equal(got, want)


def test_dpm_prediction_cannot_be_switched_off():
    """Its caller hands each returned prediction to the next step, so the prediction is always computed."""
    _, ff = pair(DPM)
    assert ff.compute_pred_original_sample
    with pytest.raises(ValueError, match="next step"):
        ff.compute_pred_original_sample = False
    ff.compute_pred_original_sample = True


def test_dpm_returns_what_diffusers_returns():
    """diffusers returns a tuple from a first-order call whatever ``return_dict`` says, and its output object
    from a second-order one with ``return_dict=True``; so does the drop-in."""
    outs = []
    for s in pair(DPM):
        s.set_timesteps(4)
        ts, x = s.timesteps, start_noise(1)
        first = s.step(x, None, ts[0], None, x, return_dict=True)
        second = s.step(first[0], first[1], ts[1], ts[0], first[0], return_dict=True)
        outs.append((type(first), type(second).__name__))
    assert outs[0] == outs[1] == (tuple, "DDIMSchedulerOutput")


def test_dpm_in_kernel_noise_distribution():
    """Without a generator the kernel draws fastflow's noise: a first call's sample minus diffusers' with zero
    noise, over diffusers' noise scale, is standard normal."""
    import diffusers.schedulers.scheduling_dpm_cogvideox as module

    torch.manual_seed(3)
    ref, ff = pair(DPM)
    for s in (ref, ff):
        s.set_timesteps(10)
    x = torch.randn(2, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    t = ref.timesteps[2]
    o = posterior_model(ref)(x, t)
    draw = module.randn_tensor
    try:
        module.randn_tensor = lambda shape, dtype=None, **kw: torch.zeros(shape, dtype=dtype)
        quiet = ref.step(o, None, t, None, x)[0]
        module.randn_tensor = lambda shape, dtype=None, **kw: torch.ones(shape, dtype=dtype)
        scale = ref.step(o, None, t, None, x)[0] - quiet
    finally:
        module.randn_tensor = draw
    xi = (ff.step(o, None, t, None, x)[0] - quiet) / scale
    assert float(scale.abs().min()) > 1e-3
    assert abs(float(xi.mean())) < 4 / xi.numel() ** 0.5 and abs(float(xi.std()) - 1.0) < 0.03


def test_dpm_meta_device_loop():
    """A loop on tensors with no data (timesteps too): no step reads one back."""
    _, ff = pair(DPM)
    ff.backend = "torch"
    ff.set_timesteps(5)
    ts = ff.timesteps.to("meta")
    x = torch.empty(SHAPE, device="meta")
    old = None
    for i, t in enumerate(ts):
        x, old = ff.step(torch.empty_like(x), old, t, ts[i - 1] if i else None, x)
    assert x.device.type == "meta" and old.device.type == "meta"


def test_dpm_api_surface():
    ref, ff = pair(DPM)
    assert type(ffd.from_scheduler(ref)) is ffd.CogVideoXDPMScheduler
    assert isinstance(ff, diffusers.CogVideoXDPMScheduler)  # CogVideoX's pipelines branch on that
    assert list(inspect.signature(ff.step).parameters) == list(inspect.signature(ref.step).parameters)


@pytest.mark.gpu
def test_dpm_gpu_loop_no_sync():
    """CogVideoX's pipeline loop on the GPU under sync debug mode "error" (timestep_back a device tensor, never
    read), matching diffusers' loop with the same CUDA generator."""
    ref, ff = pair(DPM)
    outs = []
    for s in (ref, ff):
        s.set_timesteps(8, device="cuda")
        ts, g = s.timesteps, torch.Generator("cuda").manual_seed(1)
        x, old = start_noise(0).cuda(), None
        if s is ff:
            s.set_begin_index(0)  # its first call is then located without reading the device timestep
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if s is ff else "default")
        try:
            for i, t in enumerate(ts):
                x, old = s.step(stand_in(x, 0.0) + 0.01 * x, old, t, ts[i - 1] if i else None, x, generator=g)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        outs.append(x)
    assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_dpm_copied_with_its_history_continues(how):
    """Saved mid-loop together with the history its caller holds (one deepcopy or pickle of both, so the copied
    prediction is the copied scheduler's own), the copy continues as the original does."""
    import copy
    import pickle

    _, ff = pair(DPM)
    ff.set_timesteps(6)
    ts, g = ff.timesteps, torch.Generator().manual_seed(5)
    x, old = start_noise(0), None
    for i in range(3):
        x, old = ff.step(torch.randn(SHAPE, generator=g), old, ts[i], ts[i - 1] if i else None, x)
    state = (ff, x, old)
    twin, x2, old2 = copy.deepcopy(state) if how == "deepcopy" else pickle.loads(pickle.dumps(state))
    o = torch.randn(SHAPE, generator=g)
    torch.manual_seed(0)
    expected = ff.step(o, old, ts[3], ts[2], x)[0]
    torch.manual_seed(0)
    torch.testing.assert_close(twin.step(o, old2, ts[3], ts[2], x2)[0], expected, rtol=0, atol=0)


def test_dpm_prediction_edited_before_it_is_handed_back_is_stepped_as_diffusers():
    """CogVideoX's DPM caller passes each returned prediction to the next call, so an edit of it in place reaches
    diffusers' next step; the drop-in returns the tensor its next call reads (not a copy), so it reaches it too."""
    ref, ff = pair(DPM)
    model = posterior_model(ref)
    finals = []
    for s in (ref, ff):
        s.set_timesteps(6)
        g = torch.Generator().manual_seed(5)
        x, old = start_noise(0), None
        for i, t in enumerate(s.timesteps):
            x, old = s.step(model(x, t), old, t, s.timesteps[i - 1] if i > 0 else None, x, generator=g,
                            return_dict=False)
            old.mul_(0.9)
        finals.append(x)
    assert_close(finals[1], finals[0])
