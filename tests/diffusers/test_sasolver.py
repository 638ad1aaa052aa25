"""SASolverScheduler drop-in: the fused predictor-corrector against diffusers' float64 loop (to 1e-9) and float32
loop, every algorithm, order pair, tau and sigma family; thresholding, flow sigmas, loops that start part-way,
fastflow's noise, refused options. (Its meta-device, compile and CUDA sync-debug loops are in
test_dropin_api.py.)"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from dropin_helpers import (
    SD,
    WELL_CONDITIONED,
    assert_close,
    assert_independent_standard_normals,
    float32_draws,
    float64_distance,
    pair,
    run_loop,
    start_noise,
)
from posterior_model import posterior_model

import fastflow
import fastflow.diffusers as ffd
import fastflow.diffusers._noise_draws as dropin_noise

diffusers = pytest.importorskip("diffusers")
from diffusers.schedulers import scheduling_sasolver  # noqa: E402

NAME = "SASolverScheduler"
TAUS = {"default": None, "always": lambda t: 1.0, "half": lambda t: 0.5, "never": lambda t: 0}


def _generators(i: int) -> dict:
    return dict(generator=torch.Generator().manual_seed(100 + i))


def _float64_loop(scheduler, steps: int, model, begin: int = 0) -> torch.Tensor:
    """The loop on float64 samples, with the scheduler's sigmas widened where it is diffusers' (its coefficients then
    computed in float64) and the noise drawn as the float32 loops draw it, then widened."""
    scheduler.set_timesteps(steps)
    if not isinstance(scheduler, ffd.FastflowScheduler):
        scheduler.sigmas = scheduler.sigmas.double()
    if begin:
        scheduler.set_begin_index(begin)
    x = start_noise().double()
    with float32_draws(scheduling_sasolver, dropin_noise):
        for i, t in enumerate(scheduler.timesteps[begin:]):
            x = scheduler.step(model(x, t), t, x, **_generators(i)).prev_sample
    return x


def _assert_float32_loop(xb: torch.Tensor, xa: torch.Tensor, x64: torch.Tensor) -> bool:
    """The drop-in's float32 loop is within three times diffusers' float32 distance from diffusers' float64 loop (or
    4e-6 of its scale): the fused step folds the corrector's terms into the predictor's weights, so its rounding
    differs from diffusers' two updates (measured over this grid: the ratio's median 0.37, its largest 2.56). Returns
    whether diffusers' float32 loop is accurate here (the loops are then compared directly)."""
    err32, err_ff = float64_distance(xa, x64), float64_distance(xb, x64)
    assert err_ff <= max(3 * err32, 4e-6), (err_ff, err32)
    return err32 <= WELL_CONDITIONED


def _grid():
    out = []
    sigmas = [{}, dict(use_karras_sigmas=True), dict(use_exponential_sigmas=True), dict(use_beta_sigmas=True)]
    for c, (algorithm, (p, q), tau) in enumerate(itertools.product(
        ("data_prediction", "noise_prediction"), [(1, 1), (2, 2), (3, 2), (2, 4), (3, 4), (1, 3)], TAUS,
    )):
        cfg = dict(SD, algorithm_type=algorithm, predictor_order=p, corrector_order=q, tau_func=TAUS[tau],
                   prediction_type=("epsilon", "v_prediction", "sample")[c % 3], **sigmas[c % 4],
                   lower_order_final=c % 5 != 0)
        out.append((tau, cfg, (5, 12, 25)[c % 3]))
    return out


def _ids(case):
    tau, cfg, steps = case
    keys = ("algorithm_type", "predictor_order", "corrector_order", "prediction_type", "lower_order_final")
    sig = next((k for k in cfg if k.startswith("use_")), "linear-sigmas")
    return "-".join(str(cfg[k]) for k in keys) + f"-{sig}-tau_{tau}-n{steps}"


@pytest.mark.parametrize("case", _grid(), ids=_ids)
def test_grid_against_diffusers(case):
    """Both algorithms, predictor orders 1-3 with corrector orders 1-4, every prediction type and sigma family, four
    tau functions, with and without lower_order_final: the drop-in's float64 loop equals diffusers' float64 loop
    to 1e-9 of the sample's scale (so the folded corrector is diffusers' algebra exactly), and its float32 loop is
    as close to that as diffusers' own float32 loop up to rounding (:func:`_assert_float32_loop`; diffusers'
    monomial moments cancel at high orders, where it is the further one); where diffusers' float32 loop is
    accurate the two agree directly, to 1e-5 of the sample's scale."""
    _, cfg, steps = case
    ref, ff = pair(NAME, **cfg)
    model = posterior_model(ref)
    x64 = _float64_loop(ref, steps, model)
    xb64 = _float64_loop(ff, steps, model)
    scale = float(x64.abs().max())
    torch.testing.assert_close(xb64, x64, rtol=0, atol=1e-9 * scale)
    xa, _ = run_loop(ref, steps, model=model, step_kwargs=_generators)
    xb, _ = run_loop(ff, steps, model=model, step_kwargs=_generators)
    if _assert_float32_loop(xb, xa, x64):
        assert_close(xb, xa, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("config", [
    dict(thresholding=True, sample_max_value=1.2, prediction_type="epsilon"),
    dict(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction"),
    dict(timestep_spacing="trailing", lambda_min_clipped=-5.1),
    dict(timestep_spacing="leading", steps_offset=1, predictor_order=3, corrector_order=3),
], ids=["thresholding", "flow", "trailing-clipped", "leading-order-3"])
def test_options_match_diffusers(config):
    """Dynamic thresholding (of the stored x0), flow sigmas with a flow model, spacings and lambda clipping:
    diffusers' float64 loop to 1e-9."""
    ref, ff = pair(NAME, **SD, **config)
    model = posterior_model(ref)
    x64, xb64 = (_float64_loop(s, 10, model) for s in (ref, ff))
    torch.testing.assert_close(xb64, x64, rtol=0, atol=1e-9 * float(x64.abs().max()))


@pytest.mark.parametrize("begin", [3, 7])
def test_loop_starting_part_way(begin):
    """img2img: the first step taken has no corrector (no sample before it) and the warm-up counts from it."""
    ref, ff = pair(NAME, **SD, predictor_order=3, corrector_order=3)
    model = posterior_model(ref)
    x64, xb64 = (_float64_loop(s, 12, model, begin=begin) for s in (ref, ff))
    torch.testing.assert_close(xb64, x64, rtol=0, atol=1e-9 * float(x64.abs().max()))


@pytest.mark.parametrize("backend", ["torch", "cuda"])
def test_fastflow_noise_has_diffusers_distribution(backend):
    """Without a generator the kernel draws fastflow's noise. With x0 = 0 from the model every prediction term
    vanishes, so a step is ``e^{-tau^2 h} (sigma_t / sigma_s) x + sigma_t sqrt(1 - e^{-2 tau^2 h}) n``: the noise
    taken back is standard normal each step and independent across steps (65536 elements a step)."""
    from fastflow.backends import get_backend

    if get_backend(backend).availability() is not None:
        pytest.skip("the extension is not built")
    _, ff = pair(NAME, backend=backend, **SD, tau_func=lambda t: 1.0, prediction_type="sample")
    ff.set_timesteps(6)
    sig = ff.sigmas.double()
    x = torch.randn(4, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    noises = []
    for i, t in enumerate(ff.timesteps[:4]):
        a_s, a_t = 1 / math.sqrt(float(sig[i]) ** 2 + 1), 1 / math.sqrt(float(sig[i + 1]) ** 2 + 1)
        s_s, s_t = float(sig[i]) * a_s, float(sig[i + 1]) * a_t
        h = math.log(a_t / s_t) - math.log(a_s / s_s)
        y = ff.step(torch.zeros_like(x), t, x).prev_sample
        noises.append((y.double() - math.exp(-h) * s_t / s_s * x.double()) / (s_t * math.sqrt(-math.expm1(-2 * h))))
        x = y
    assert_independent_standard_normals(noises)


@pytest.mark.parametrize(("config", "match"), [
    (dict(predictor_order=4), "predictor_order=4"),
    (dict(algorithm_type="noise_prediction", thresholding=True), "thresholding=True"),
    (dict(variance_type="learned_range"), "variance_type='learned_range'"),
])
def test_unsupported_options_raise_naming_them(config, match):
    """Order 4 would read four stored predictions (the kernel holds three); diffusers' step fails on the other two
    (a noise-prediction conversion that indexes with a timestep it no longer receives; a noise drawn in the doubled
    learned-variance shape)."""
    with pytest.raises(NotImplementedError, match=match):
        ffd.SASolverScheduler(**config)


def test_a_repeated_timestep_raises_where_diffusers_turns_nan():
    """1000 leading steps repeat t=500, so step 500's corrector interpolates through one lambda twice: diffusers'
    step returns NaN there, the drop-in raises. ``set_timesteps`` itself runs (it raised ZeroDivisionError), and
    the steps before agree with diffusers'."""
    ref, ff = pair(NAME)
    for s in (ref, ff):
        s.set_timesteps(1000)
        s.set_begin_index(496)
    xr = xf = start_noise(6)
    for i, t in enumerate(ref.timesteps[496:501], start=496):
        model_output = 0.9 * xr
        xr = ref.step(model_output, t, xr, generator=torch.Generator().manual_seed(i)).prev_sample
        if i < 500:
            xf = ff.step(model_output, t, xf, generator=torch.Generator().manual_seed(i)).prev_sample
            assert torch.isfinite(xr).all()
            torch.testing.assert_close(xf, xr, rtol=1e-5, atol=1e-5)
        else:
            assert not torch.isfinite(xr).all()
            with pytest.raises(fastflow.UndefinedStepError, match="step 500: .*same lambda twice"):
                ff.step(model_output, t, xf, generator=torch.Generator().manual_seed(i))


def test_exp_lagrange_integrals():
    """The weights integrate polynomials through the nodes exactly (the basis sums to 1, so they sum to the
    integral of e^{rate lambda}; with lambda as the data they give that of lambda e^{rate lambda}), and repeated
    nodes are refused."""
    from fastflow.diffusers.sasolver import exp_lagrange_integrals

    lo, hi, rate, nodes = 0.3, 0.9, -1.7, [0.9, 0.3, -0.4]
    weights = exp_lagrange_integrals(nodes, lo, hi, rate)
    assert math.isclose(sum(weights), (math.exp(rate * hi) - math.exp(rate * lo)) / rate, rel_tol=1e-12)

    def lam_exp(v: float) -> float:  # an antiderivative of lambda e^{rate lambda}
        return math.exp(rate * v) * (v / rate - 1 / rate**2)

    moment = sum(w * v for w, v in zip(weights, nodes, strict=True))
    assert math.isclose(moment, lam_exp(hi) - lam_exp(lo), rel_tol=1e-12)
    with pytest.raises(ValueError, match="repeat"):
        exp_lagrange_integrals([0.5, 0.5], lo, hi, rate)
