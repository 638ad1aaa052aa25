"""DDIMScheduler drop-in: parity with diffusers over full loops and a grid of configs."""

from __future__ import annotations

import itertools

import pytest
import torch
from dropin_helpers import (
    SD,
    assert_close,
    assert_half_loop_bounded,
    assert_loops_match,
    pair,
    run_loop,
    stand_in,
    start_noise,
)

from fastflow import UndefinedStepError
from fastflow.diffusers.ddim import ddim_noise_and_direction, row_quantile

GRID = [
    dict(prediction_type=p, clip_sample=c, timestep_spacing=s, **extra)
    for p, c, (s, extra) in itertools.product(
        ("epsilon", "sample", "v_prediction"),
        (False, True),
        (("leading", dict(steps_offset=1)), ("trailing", {}), ("linspace", dict(set_alpha_to_one=False))),
    )
]


@pytest.mark.parametrize("config", GRID, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_grid(config):
    ref, ff = pair("DDIMScheduler", **config)
    assert_loops_match(ref, ff, steps=10)


@pytest.mark.parametrize(
    "config",
    [
        dict(SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1),  # Stable Diffusion 1.x
        dict(SD, clip_sample=False, timestep_spacing="trailing", rescale_betas_zero_snr=True,
             prediction_type="v_prediction"),
        dict(beta_schedule="squaredcos_cap_v2", clip_sample_range=0.5),
        dict(trained_betas=torch.linspace(1e-4, 0.02, 1000).tolist()),
    ],
    ids=["sd", "zero-snr-v", "cosine-clip", "trained-betas"],
)
def test_configs(config):
    ref, ff = pair("DDIMScheduler", **config)
    assert_loops_match(ref, ff, steps=25)


@pytest.mark.parametrize("use_clipped", [False, True])
def test_eta_generator(use_clipped):
    ref, ff = pair("DDIMScheduler")  # clip_sample=True by default

    def kwargs(key):
        g = torch.Generator().manual_seed(7)
        return lambda i: dict(eta=0.7, generator=g, use_clipped_model_output=use_clipped)

    xa, _ = run_loop(ref, 10, step_kwargs=kwargs("a"))
    xb, _ = run_loop(ff, 10, step_kwargs=kwargs("b"))
    assert_close(xb, xa)


def test_eta_variance_noise():
    ref, ff = pair("DDIMScheduler", **SD, clip_sample=False)
    noises = [start_noise(100 + i) for i in range(10)]
    kw = lambda i: dict(eta=1.0, variance_noise=noises[i])  # noqa: E731
    assert_loops_match(ref, ff, steps=10, step_kwargs=kw)


def test_generator_and_variance_noise_is_an_error():
    _, ff = pair("DDIMScheduler")
    ff.set_timesteps(5)
    x = start_noise()
    with pytest.raises(ValueError, match="generator or variance_noise"):
        ff.step(x, ff.timesteps[0], x, eta=1.0, generator=torch.Generator(), variance_noise=x)


def test_return_tuple_and_int_timesteps():
    ref, ff = pair("DDIMScheduler", **SD, clip_sample=False)
    for s in (ref, ff):
        s.set_timesteps(6)
    x = start_noise()
    xa = xb = x
    for t in ref.timesteps.tolist():  # plain ints, as some callers pass
        a = ref.step(stand_in(xa, t), t, xa, return_dict=False)
        b = ff.step(stand_in(xb, t), t, xb, return_dict=False)
        assert isinstance(b, tuple) and len(b) == 2
        assert_close(b[1], a[1])
        xa, xb = a[0], b[0]
    assert_close(xb, xa)


def test_partial_loop_from_begin_index():
    """img2img: the loop starts mid-schedule; set_begin_index or a host timestep locates the start."""
    ref, ff = pair("DDIMScheduler", **SD, clip_sample=False)
    for s in (ref, ff):
        s.set_timesteps(10)
    x = start_noise()
    for locate in ("begin_index", "timestep"):
        if locate == "begin_index":
            ff.set_begin_index(4)
        xa = xb = x
        for t in ref.timesteps[4:]:
            xa = ref.step(stand_in(xa, t), t, xa).prev_sample
            xb = ff.step(stand_in(xb, t), t, xb).prev_sample
        assert_close(xb, xa)
        ff.set_timesteps(10)  # resets the begin index


def test_second_loop_without_set_timesteps():
    ref, ff = pair("DDIMScheduler", **SD, clip_sample=False)
    ref.set_timesteps(5)
    ff.set_timesteps(5)
    results = []
    for s in (ref, ff):
        x = start_noise()
        for _ in range(2):
            y = x
            for t in s.timesteps:
                y = s.step(stand_in(y, t), t, y).prev_sample
        results.append(y)
    assert_close(results[1], results[0])


@pytest.mark.parametrize("use_clipped", [False, True])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_dynamic_thresholding(prediction_type, use_clipped):
    """Imagen's per-sample quantile threshold (torch ops before the fused step); some samples exceed 1."""
    ref, ff = pair("DDIMScheduler", thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.6,
                   prediction_type=prediction_type)
    model = lambda x, t: 1.5 * stand_in(x, t)  # noqa: E731
    kw = lambda i: dict(use_clipped_model_output=use_clipped)  # noqa: E731
    assert_loops_match(ref, ff, steps=10, model=model, step_kwargs=kw)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("q", [0.0, 0.5, 0.9, 0.995, 1 / 3, 1.0])
def test_row_quantile_is_torch_quantile_bit_for_bit(q, dtype, device):
    """Thresholding's quantile, written out so that older torch traces it, is torch.quantile's (which diffusers
    calls) exactly: ties, a single element, NaN (the row's quantile is NaN) and inf."""
    g = torch.Generator().manual_seed(0)
    for shape in [(1, 1), (2, 2), (3, 7), (4, 256), (2, 3 * 17 * 19)]:
        for kind in ("plain", "ties", "nan"):
            a = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(device, dtype).abs()
            if kind == "ties":
                a = a.round()
            elif kind == "nan" and shape[0] > 1:
                a[0, 0], a[-1, -1] = float("nan"), float("inf")
            want, got = torch.quantile(a, q, dim=1), row_quantile(a, q)
            assert got.dtype == want.dtype and got.shape == want.shape
            assert torch.equal(got.nan_to_num(-1.0), want.nan_to_num(-1.0)) and torch.equal(got.isnan(), want.isnan())


def test_row_quantile_follows_the_running_torchs_ranks(monkeypatch):
    """torch 2.14 forms a float32 input's ranks in float64, earlier releases in float32: the probe at import tells
    which this torch does (a quantile both formulas give differently), and a torch doing neither is called itself."""
    from fastflow.diffusers import ddim

    assert ddim.QUANTILE_RANK_DTYPE in ("input", torch.float64)
    a = (torch.arange(1001) >= 900).float().unsqueeze(0).repeat(2, 1)  # the probe's input: rank 899.99998 or 900
    assert torch.equal(ddim._row_quantile(a, 0.9, "input"), torch.ones(2))
    assert torch.equal(ddim._row_quantile(a, 0.9, torch.float64), torch.full((2,), 0.99997616))
    real = torch.quantile
    monkeypatch.setattr(torch, "quantile", lambda a, q, dim: real(a, q, dim=dim).nextafter(torch.tensor(2.0)))
    assert ddim._quantile_rank_dtype() is None
    monkeypatch.setattr(ddim, "QUANTILE_RANK_DTYPE", None)
    assert torch.equal(row_quantile(a, 0.9), torch.quantile(a, 0.9, dim=1))


def test_row_quantile_traces():
    """fullgraph torch.compile and fake tensors (the tracing of torch.export): torch.quantile of torch 2.6 and 2.8
    failed both (a data-dependent aten.equal)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    torch._dynamo.reset()
    a = torch.randn(3, 256, generator=torch.Generator().manual_seed(0)).abs()
    compiled = torch.compile(lambda a: row_quantile(a, 0.995), fullgraph=True, backend="eager")
    assert torch.equal(compiled(a), torch.quantile(a, 0.995, dim=1))
    with FakeTensorMode():
        assert row_quantile(torch.empty(3, 256), 0.9).shape == (3,)


def test_step_before_set_timesteps_raises():
    _, ff = pair("DDIMScheduler")
    x = start_noise()
    with pytest.raises(ValueError, match="set_timesteps"):
        ff.step(x, 999, x)


def test_pred_original_sample_can_be_skipped():
    _, ff = pair("DDIMScheduler")
    ff.compute_pred_original_sample = False
    ff.set_timesteps(4)
    x = start_noise()
    out = ff.step(stand_in(x, ff.timesteps[0]), ff.timesteps[0], x)
    assert out.pred_original_sample is None and out.prev_sample.shape == x.shape


def test_undefined_steps_raise_instead_of_nan():
    """Where diffusers' DDIM would return NaN or inf (or clip an infinite x0), the drop-in raises an
    UndefinedStepError that names the options and says why."""
    _, ff = pair("DDIMScheduler", **SD, rescale_betas_zero_snr=True, timestep_spacing="trailing", clip_sample=False)
    with pytest.raises(UndefinedStepError, match="prediction_type='epsilon'.*rescale_betas_zero_snr=True"):
        run_loop(ff, 10)  # epsilon prediction has no x0 where alphas_cumprod = 0 (the first timestep)
    _, ff = pair("DDIMScheduler", **SD, clip_sample=False)
    ff.set_timesteps(10)
    x = start_noise()
    t = ff.timesteps[0]
    with pytest.raises(UndefinedStepError, match="eta=3.0 makes the noise variance.*use eta <= 1"):
        ff.step(stand_in(x, t), t, x, eta=3.0)



@pytest.mark.parametrize("name", ["DDIMScheduler", "DDPMScheduler", "LCMScheduler"])
def test_epsilon_at_zero_snr_with_clipping_matches_diffusers(name):
    """Epsilon prediction at a zero-SNR end with clip_sample=True: diffusers' x0 = (x - eps) / 0 is +-inf and is
    clipped to +-clip_sample_range; the drop-in gives the same x0 and the same loop."""
    ref, ff = pair(name, **SD, rescale_betas_zero_snr=True, timestep_spacing="trailing", clip_sample=True,
                   clip_sample_range=1.5)
    kw = lambda i: dict(generator=torch.Generator().manual_seed(i))  # noqa: E731
    xa, oa = run_loop(ref, 6, step_kwargs=kw)
    xb, ob = run_loop(ff, 6, step_kwargs=kw)
    field = "denoised" if name == "LCMScheduler" else "pred_original_sample"
    if name != "LCMScheduler":
        assert set(oa[0].pred_original_sample.abs().unique().tolist()) == {1.5}  # the clipped infinite x0
    assert torch.isfinite(xa).all()
    assert_close(xb, xa)
    for a, b in zip(oa, ob, strict=True):
        assert_close(getattr(b, field), getattr(a, field))


@pytest.mark.parametrize("name", ["DDIMScheduler", "LCMScheduler"])
def test_an_undefined_step_raises_only_when_it_runs(name):
    """Epsilon prediction at a zero-SNR first timestep, unclipped, is undefined (diffusers: inf or NaN), but an
    img2img loop that starts after it (set_begin_index) never runs it: the drop-in matches diffusers there."""
    ref, ff = pair(name, **SD, rescale_betas_zero_snr=True, timestep_spacing="trailing", clip_sample=False)
    kw = {"generator": torch.Generator().manual_seed(3)} if name == "LCMScheduler" else {}
    xa, _ = run_loop(ref, 8, begin=2, step_kwargs=kw)
    kw = {"generator": torch.Generator().manual_seed(3)} if name == "LCMScheduler" else {}
    xb, _ = run_loop(ff, 8, begin=2, step_kwargs=kw)
    assert torch.isfinite(xa).all()
    assert_close(xb, xa)
    with pytest.raises(UndefinedStepError, match="no x0 at a timestep with alphas_cumprod = 0"):
        run_loop(ff, 8)

def _eta_one(steps: int):
    noises = [start_noise(100 + i) for i in range(steps)]
    return lambda i: dict(eta=1.0, variance_noise=noises[i])


def test_eta_one_where_the_variance_is_a_few_ulps_from_zero():
    """eta=1 next to a zero-SNR end, where ``1 - a_prev - std**2`` is a few float32 ulps from zero, on either side
    depending on how this machine's torch rounds diffusers' rescaled schedule: the drop-in evaluates ``std`` and
    the noise estimate's coefficient in diffusers' float32 order (torch's ``x ** 0.5`` on a 0-d tensor, not
    ``sqrt``): each step's coefficients and output are diffusers' wherever diffusers' are finite (and finite
    where diffusers' float32 gives NaN), and so is the whole loop when diffusers' is finite."""
    config = dict(beta_schedule="squaredcos_cap_v2", rescale_betas_zero_snr=True, timestep_spacing="trailing",
                  prediction_type="v_prediction")
    ref, ff = pair("DDIMScheduler", **config)
    ref.set_timesteps(9)
    near_zero = 0
    for t in ref.timesteps.tolist():
        prev_t = t - ref.config.num_train_timesteps // 9
        a_t = ref.alphas_cumprod[t]
        a_p = ref.alphas_cumprod[prev_t] if prev_t >= 0 else ref.final_alpha_cumprod
        std = 1.0 * ref._get_variance(t, prev_t) ** 0.5  # diffusers' own float32 evaluation
        rest = 1 - a_p - std**2
        got_std, got_direction = ddim_noise_and_direction(float(a_t), float(a_p), 1.0)
        assert got_std == float(std), t
        if rest >= 0:
            assert got_direction == pytest.approx(float(rest**0.5), rel=2e-7, abs=1e-12), t
        else:  # diffusers' NaN: the exact value, zero or a hair above
            assert 0.0 <= got_direction < 1e-3, t
        near_zero += abs(float(rest)) < 1e-6
    assert near_zero >= 1  # the case this test is about occurs in this schedule
    ff.set_timesteps(9)
    for i, t in enumerate(ref.timesteps):  # DDIM steps are addressed by their timestep: each one alone
        x = start_noise(i)
        kwargs = _eta_one(9)(i)
        want = ref.step(stand_in(x, t), t, x, **kwargs).prev_sample
        got = ff.step(stand_in(x, t), t, x, **kwargs).prev_sample
        if torch.isfinite(want).all():
            assert_close(got, want)
        else:  # diffusers' NaN where float32 rounds the variance below zero
            assert torch.isfinite(got).all()
    x32, _ = run_loop(ref, 9, step_kwargs=_eta_one(9))
    if torch.isfinite(x32).all():
        assert_loops_match(ref, ff, steps=9, step_kwargs=_eta_one(9))


def test_eta_one_where_float32_rounds_the_variance_negative():
    """Where diffusers' float32 evaluation rounds ``1 - a_prev - std**2`` below zero (its step returns NaN), the
    drop-in takes the exact, non-negative value: its loop matches diffusers' loop run in float64."""
    config = dict(beta_schedule="scaled_linear", clip_sample=False, rescale_betas_zero_snr=True,
                  timestep_spacing="trailing", prediction_type="v_prediction")
    ref, ff = pair("DDIMScheduler", **config)
    x32, _ = run_loop(ref, 5, step_kwargs=_eta_one(5))
    assert torch.isnan(x32).all()  # what diffusers' float32 arithmetic gives here
    ref.alphas_cumprod = ref.alphas_cumprod.double()
    ref.final_alpha_cumprod = ref.final_alpha_cumprod.double()
    x64, _ = run_loop(ref, 5, step_kwargs=_eta_one(5), x=start_noise().double())
    xb, _ = run_loop(ff, 5, step_kwargs=_eta_one(5))
    assert torch.isfinite(xb).all()
    assert_close(xb, x64.float())


def test_half_precision_sample_and_output():
    """float16 in, float16 out (diffusers' dtype promotion). diffusers computes in float16, the kernel in
    float32: both sit within float16 round-off of the float32 loop, fastflow no further than diffusers."""
    assert_half_loop_bounded(*pair("DDIMScheduler", **SD, clip_sample=False), torch.float16, model=stand_in)


@pytest.mark.parametrize("name", ["DDIMScheduler", "DDIMInverseScheduler", "CogVideoXDDIMScheduler"])
def test_a_begin_index_left_from_an_earlier_loop_does_not_override_the_timestep(name):
    """diffusers' DDIM family has no begin index: each step is its timestep's. A begin index from an img2img loop
    (a pipeline calls set_begin_index where the drop-in has it) placed the next loop's first step there instead."""
    ref, ff = pair(name)
    for s in (ref, ff):
        s.set_timesteps(10)
    ff.set_begin_index(5)
    x0 = start_noise(0)

    def loop(s, ts):
        x = x0
        for t in ts:
            x = s.step(stand_in(x, t), t, x).prev_sample
        return x

    assert_close(loop(ff, ff.timesteps[5:]), loop(ref, ref.timesteps[5:]))
    assert_close(loop(ff, ff.timesteps), loop(ref, ref.timesteps))  # no set_timesteps between: begin index stays
    ff.set_begin_index(3)
    t = ff.timesteps[0]
    assert_close(ff.step(stand_in(x0, t), t, x0).prev_sample, ref.step(stand_in(x0, t), t, x0).prev_sample)


def test_an_off_schedule_timestep_says_diffusers_steps_it():
    _, ff = pair("DDIMScheduler")
    ff.set_timesteps(10)
    x = start_noise(0)
    with pytest.raises(ValueError, match=r"timestep 7.0 is not in .*\(diffusers' DDIMScheduler steps from any"):
        ff.step(x, 7, x)
