"""UniPCMultistepScheduler drop-in: parity with diffusers over full loops, raises, sync-free steps."""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest
import torch
from dropin_helpers import (
    SD,
    SHAPE,
    assert_bfloat16_parity,
    assert_close,
    assert_multistep_api,
    assert_no_further_from_float64,
    assert_unet_loops_match,
    begin_index_loops,
    compiled_loops,
    doubled_x0_model,
    meta_loop,
    posterior_loops,
    run_loop,
    start_noise,
)
from dropin_helpers import pair as dropin_pair
from posterior_model import posterior_model

import fastflow.diffusers as ffd
from fastflow.diffusers.unipc import UniPCMultistepScheduler, unipc_orders

diffusers = pytest.importorskip("diffusers")


pair = functools.partial(dropin_pair, "UniPCMultistepScheduler")
loops = posterior_loops


_PAIRS = [("bh2", "epsilon"), ("bh1", "v_prediction"), ("bh2", "sample"),
          ("bh1", "epsilon"), ("bh2", "v_prediction"), ("bh1", "sample")]


def _grid():
    out = []
    for order, (c, (karras, final, lof, steps, corr)) in itertools.product(
        [1, 2, 3],
        enumerate(itertools.product([False, True], ["zero", "sigma_min"], [True, False], [6, 20], [(), (0, 3)])),
    ):
        st, pred = _PAIRS[(c + order) % len(_PAIRS)]
        out.append((dict(solver_order=order, solver_type=st, prediction_type=pred, use_karras_sigmas=karras,
                         final_sigmas_type=final, lower_order_final=lof, disable_corrector=list(corr)), steps))
    for (c, (karras, lof, steps)), pred in zip(
        enumerate(itertools.product([False, True], [True, False], [6, 20])),
        itertools.cycle(["epsilon", "v_prediction", "sample"]),
    ):
        for order in (1, 2, 3):
            out.append((dict(solver_order=order, predict_x0=False, solver_type=("bh1", "bh2")[(c + order) % 2],
                             prediction_type=pred, use_karras_sigmas=karras, final_sigmas_type="sigma_min",
                             lower_order_final=lof), steps))
    return out


def _id(case):
    cfg, steps = case
    return (f"o{cfg['solver_order']}-{cfg['solver_type']}-{cfg['prediction_type'][:3]}"
            f"-{'karras' if cfg['use_karras_sigmas'] else 'lin'}-{cfg['final_sigmas_type']}"
            f"-lof{int(cfg['lower_order_final'])}-dc{len(cfg.get('disable_corrector', []))}"
            f"{'-eps' if cfg.get('predict_x0') is False else ''}-n{steps}")


def _float64_loop(cfg: dict, steps: int, model) -> torch.Tensor:
    """diffusers' loop with its float32 sigmas and the sample in float64 (its coefficients then in float64 too):
    the reference both float32 loops round from."""
    ref, _ = pair(**cfg)
    ref.set_timesteps(steps)
    ref.sigmas = ref.sigmas.double()
    x = start_noise(0).double() * float(ref.init_noise_sigma)
    for t in ref.timesteps:
        x = ref.step(model(ref.scale_model_input(x, t), t), t, x).prev_sample
    return x


@pytest.mark.parametrize("case", _grid(), ids=_id)
def test_grid_parity(case):
    """Orders 1-3, bh1/bh2, prediction types, Karras sigmas, final sigma types, lower_order_final,
    disable_corrector, below and above 15 steps, x0 and noise forms: full loops agree with diffusers, or, exactly
    where diffusers returns NaN (bh1 or a high-order step onto sigma = 0 or a zero-length step), the loop's first
    step raises. The noise form (``predict_x0=False``) on 6 steps is ill-conditioned in float32: diffusers' loop
    ends 1e-4 to 2e-3 from its own float64 loop (its coefficients' float32 arithmetic; the drop-in folds them in
    float64); there the drop-in's loop must be within twice diffusers' distance from that float64 loop."""
    cfg, steps = case
    ref, ff = pair(**cfg)
    model = posterior_model(ref)
    try:
        xa, _ = run_loop(ref, steps, model=model)
    except torch.linalg.LinAlgError:  # diffusers' order-3 solve on a zero-length step
        xa = torch.full(SHAPE, float("nan"))
    if not torch.isfinite(xa).all():
        with pytest.raises(ValueError, match="NaN"):
            run_loop(ff, steps, model=model)
        return
    xb, _ = run_loop(ff, steps, model=model)
    if not cfg.get("predict_x0", True) and not assert_no_further_from_float64(xb, xa, _float64_loop(cfg, steps, model)):
        return  # the noise form on few steps: diffusers' float32 coefficients move its loop up to 1e-3 (see below)
    # The bound is float32 round-off of this loop, measured: 1e-5, or 3x the drop-in's own float32-vs-float64
    # distance where the loop amplifies round-off more (order 3 on few steps, whose extrapolation weights are
    # large: up to ~3e-5 in this grid, where diffusers is as far from float64 as the drop-in).
    xb64, _ = run_loop(ff, steps, model=model, x=start_noise(0).double())
    roundoff = (xb.double() - xb64).abs().max().item()
    assert roundoff < 1e-4
    tol = max(1e-5, 3 * roundoff)
    assert_close(xb, xa, rtol=tol, atol=tol)


def test_orders_follow_diffusers():
    """lower_order_final caps the order by the steps left at any step count (not only below 15)."""
    assert unipc_orders(20, 0, 3, True) == [1, 2] + [3] * 16 + [2, 1]
    assert unipc_orders(20, 5, 3, False) == [1, 2] + [3] * 13


OPTIONS = [
    dict(SD),
    dict(SD, timestep_spacing="leading", steps_offset=1, solver_order=3),
    dict(SD, timestep_spacing="trailing", prediction_type="v_prediction"),
    dict(SD, use_exponential_sigmas=True, final_sigmas_type="sigma_min"),
    dict(SD, disable_corrector=[0, 1, 2], solver_order=3),
    dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", solver_order=3),
    dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0),
    dict(use_flow_sigmas=True, prediction_type="flow_prediction", solver_order=3, final_sigmas_type="sigma_min"),
    dict(use_flow_sigmas=True, prediction_type="flow_prediction", use_karras_sigmas=True),
    dict(use_flow_sigmas=True, prediction_type="flow_prediction", shift_terminal=0.1, flow_shift=2.0),
]


@pytest.mark.parametrize("config", OPTIONS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items() if k not in SD)
                         or "sd")
@pytest.mark.parametrize("steps", [10, 25])
def test_options_parity(config, steps):
    ref, ff = pair(**config)
    xa, xb = loops(ref, ff, steps)
    assert_close(xb, xa)


def test_zero_snr():
    """Zero terminal SNR starts at sigma ~ 4096: the first step's float32 terms dwarf the result, so 1e-4."""
    ref, ff = pair(**SD, rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction")
    xa, xb = loops(ref, ff, 12)
    assert_close(xb, xa, rtol=1e-4, atol=1e-4)


def test_dynamic_shifting_mu():
    ref, ff = pair(use_flow_sigmas=True, prediction_type="flow_prediction", use_dynamic_shifting=True)
    xa, xb = loops(ref, ff, None, set_kwargs=dict(num_inference_steps=12, mu=0.7))
    assert_close(xb, xa)


def test_custom_flow_sigmas():
    ref, ff = pair(use_flow_sigmas=True, prediction_type="flow_prediction", solver_order=3)
    xa, xb = loops(ref, ff, None, set_kwargs=dict(sigmas=np.array([1.0, 0.9, 0.75, 0.6, 0.4, 0.25, 0.1])))
    assert_close(xb, xa)


def test_begin_index_partial_loop():
    """img2img: no corrector on the first step taken and warm-up from there, as diffusers."""
    ref, ff = pair(**SD, solver_order=3)
    outs = begin_index_loops(ref, ff, 20, 6, start_noise(1))
    assert_close(outs[1], outs[0])


@pytest.mark.parametrize("config", [dict(solver_order=3), dict(solver_order=2, prediction_type="v_prediction"),
                                    dict(solver_order=1, predict_x0=False, final_sigmas_type="sigma_min")])
@pytest.mark.parametrize("sample_max_value", [1.0, 1.5])
def test_dynamic_thresholding(config, sample_max_value):
    """thresholding=True: per-sample quantile clamp of x0 predictions, as diffusers (which skips it when
    predict_x0=False)."""
    ref, ff = pair(**SD, **config, thresholding=True, sample_max_value=sample_max_value)
    model = doubled_x0_model(ref)
    xa, _ = run_loop(ref, 12, model=model)
    xb, _ = run_loop(ff, 12, model=model)
    assert_close(xb, xa)


def test_api_surface():
    ref, ff = pair(**SD, solver_order=3)
    x = assert_multistep_api(ref, ff)
    out = ff.step(x, ff.timesteps[0], x, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1 and ff.step_index == 1
    assert type(ffd.from_scheduler(ref)) is UniPCMultistepScheduler


@pytest.mark.parametrize(
    "config, match",
    [
        (dict(solver_p=diffusers.DDIMScheduler()), "solver_p"),
    ],
)
def test_unsupported_options_raise(config, match):
    with pytest.raises(NotImplementedError, match=match):
        UniPCMultistepScheduler(**config)


def test_meta_device_step():
    ff = UniPCMultistepScheduler(solver_order=3)
    ff.backend = "torch"
    x, _ = meta_loop(ff, 6)
    assert x.device.type == "meta" and x.shape == SHAPE


@pytest.mark.parametrize("disable_corrector", [[], [1, 3]], ids=["all-corrected", "disable_corrector"])
def test_torch_compile_fullgraph(disable_corrector):
    """After the first (eager) step has built the plan, each step traces with fullgraph=True (steps without a
    corrector too, whose eager call keeps the sample the next corrector reads)."""
    ref, ff = pair(**SD, solver_order=3, disable_corrector=disable_corrector)
    xb, xa = compiled_loops(ref, ff, posterior_model(ref), 6)
    assert_close(xb, xa)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_gpu_no_sync(backend):
    ref, ff = pair(**SD, solver_order=3)
    ff.backend = backend
    model = posterior_model(ref)
    ref.set_timesteps(12)
    ff.set_timesteps(12, device="cuda")
    x0 = start_noise(0).cuda()
    xa = x0.clone()
    for t in ref.timesteps:
        xa = ref.step(model(xa, t), t, xa).prev_sample
    ff.set_begin_index(0)
    outs = [model(x0, ff.timesteps[0].cpu())]
    xb = x0.clone()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i, t in enumerate(ff.timesteps):
            xb = ff.step(outs[-1], t, xb).prev_sample
            torch.cuda.set_sync_debug_mode("default")
            if i + 1 < len(ff.timesteps):
                outs.append(model(xb, ref.timesteps[i + 1]))
            torch.cuda.set_sync_debug_mode("error")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_close(xb, xa, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("config", [dict(solver_order=2), dict(solver_order=3, prediction_type="v_prediction")])
def test_tiny_unet_loop(config):
    """A real network (tiny random UNet, offline) in diffusers' pipeline loop: the same samples."""
    assert_unet_loops_match(diffusers.UniPCMultistepScheduler(**config), 12)


def test_bfloat16_sample():
    """A bfloat16 loop returns bfloat16 as diffusers does and agrees to a few bfloat16 ulps (diffusers rounds
    intermediates to bfloat16; the drop-in computes in float32 and rounds once per output)."""
    ref, ff = pair(solver_order=3)
    assert_bfloat16_parity(ref, ff)


@pytest.mark.parametrize("prediction", ["v_prediction", "sample"])
def test_noise_form_on_flow_sigmas_converts_as_diffusers(prediction):
    """``predict_x0=False`` takes its noise prediction straight from the output (v: ``alpha o + sigma z``), which
    on flow sigmas is not the noise of its x0. Near sigma 1 this loop amplifies float32 round-off past any useful
    bound (diffusers' own float32 loop ends far from its float64 one), so it is compared in float64: to 1e-7 of
    the sample's scale (diffusers builds UniPC's step ratios as float32 tensors even then)."""
    cfg = dict(predict_x0=False, use_flow_sigmas=True, flow_shift=3.0, prediction_type=prediction,
               final_sigmas_type="sigma_min", solver_order=2)
    x64 = _float64_loop(cfg, 8, model := posterior_model(pair(**cfg)[0]))
    _, ff = pair(**cfg)
    xb, _ = run_loop(ff, 8, model=model, x=start_noise(0).double())
    assert float((xb - x64).abs().max()) <= 1e-7 * float(x64.abs().max())
