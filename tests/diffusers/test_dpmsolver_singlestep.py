"""DPMSolverSinglestepScheduler drop-in: every algorithm, solver type and order against diffusers, sync-free.

The formulas are checked in float64 (the drop-in's float64 loop against diffusers' loop on
its float32 sigmas with a float64 sample, to 1e-9), where round-off cannot hide a wrong
coefficient; float32 loops are held to diffusers' numbers where its float32 loop is
accurate, elsewhere to no further than twice its distance from its float64 loop.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from dropin_helpers import (
    SD,
    assert_bfloat16_parity,
    assert_close,
    assert_multistep_api,
    assert_no_further_from_float64,
    assert_unet_loops_match,
    compiled_loops,
    float32_draws,
    meta_loop,
    pair,
    run_loop,
    start_noise,
)
from posterior_model import posterior_model

import fastflow.diffusers as ffd
from fastflow.diffusers.dpmsolver_singlestep import DPMSolverSinglestepScheduler

diffusers = pytest.importorskip("diffusers")

NAME = "DPMSolverSinglestepScheduler"
ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++", "dpmsolver")
SIGMAS = ({}, dict(use_karras_sigmas=True), dict(use_exponential_sigmas=True),
          dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0))


def _grid():
    out = []
    preds = itertools.cycle(["epsilon", "v_prediction", "sample"])
    sigmas = itertools.cycle(SIGMAS)
    for alg, solver, order, steps, lof in itertools.product(ALGORITHMS, ("midpoint", "heun"), (1, 2, 3), (1, 5, 12),
                                                           (False, True)):
        cfg = dict(SD, algorithm_type=alg, solver_type=solver, solver_order=order, lower_order_final=lof,
                   prediction_type=next(preds))
        cfg.update(next(sigmas))
        if alg == "dpmsolver":
            cfg["final_sigmas_type"] = "sigma_min"  # diffusers rejects 'zero' for it
            if cfg["prediction_type"] == "flow_prediction":
                cfg["prediction_type"] = "v_prediction"
        out.append((cfg, steps))
    return out


GRID = _grid()


def _id(case):
    cfg, steps = case
    sig = "karras" if cfg.get("use_karras_sigmas") else "exp" if cfg.get("use_exponential_sigmas") else (
        "flow" if cfg.get("use_flow_sigmas") else "lin")
    return (f"{cfg['algorithm_type']}-{cfg['solver_type'][:3]}-o{cfg['solver_order']}-{cfg['prediction_type'][:3]}"
            f"-{sig}-lof{int(cfg['lower_order_final'])}-n{steps}")


def _generator(cfg: dict):
    """Step keywords: an SDE loop draws from a generator, the same in both loops."""
    if not cfg.get("algorithm_type", "dpmsolver++").startswith("sde"):
        return None
    g = torch.Generator().manual_seed(11)
    return lambda i: dict(generator=g)


def _diffusers_float64(cfg: dict, steps: int, model, begin: int = 0) -> torch.Tensor:
    import diffusers.schedulers.scheduling_dpmsolver_singlestep as module

    ref = diffusers.DPMSolverSinglestepScheduler(**cfg)
    ref.set_timesteps(steps)
    ref.sigmas = ref.sigmas.double()
    if begin:
        ref.set_begin_index(begin)
    x = start_noise(0).double()
    kw = _generator(cfg)
    with float32_draws(module):
        for i, t in enumerate(ref.timesteps[begin:]):
            x = ref.step(model(x, t), t, x, **(kw(i) if kw else {})).prev_sample
    return x


def _fastflow_float64(ff, cfg: dict, steps: int, model, begin: int = 0) -> torch.Tensor:
    import fastflow.diffusers._noise_draws as module

    with float32_draws(module):
        x, _ = run_loop(ff, steps, model=model, x=start_noise(0).double(), step_kwargs=_generator(cfg), begin=begin)
    return x


@pytest.mark.filterwarnings("ignore:Changing scheduler")
@pytest.mark.parametrize("case", GRID, ids=_id)
def test_float64_loops_match_diffusers(case):
    """Every algorithm, solver type and order, lower_order_final, prediction types and sigma families (flow ones
    too), 1 to 12 steps: in float64 the loops agree to 1e-9, so every coefficient is diffusers' formula."""
    cfg, steps = case
    ref, ff = pair(NAME, **cfg)
    model = posterior_model(ref)
    x64 = _diffusers_float64(cfg, steps, model)
    xb64 = _fastflow_float64(ff, cfg, steps, model)
    torch.testing.assert_close(xb64, x64, rtol=1e-9, atol=1e-9)


@pytest.mark.filterwarnings("ignore:Changing scheduler")
@pytest.mark.parametrize("case", GRID[::4], ids=_id)
def test_float32_loops(case):
    """float32 loops (SDE ones with a generator): diffusers' numbers to 1e-5 where its float32 loop is accurate,
    elsewhere within twice its distance from its float64 loop."""
    cfg, steps = case
    ref, ff = pair(NAME, **cfg)
    model = posterior_model(ref)
    xa, _ = run_loop(ref, steps, model=model, step_kwargs=_generator(cfg))
    xb, _ = run_loop(ff, steps, model=model, step_kwargs=_generator(cfg))
    assert xb.dtype == xa.dtype == torch.float32
    if assert_no_further_from_float64(xb, xa, _diffusers_float64(cfg, steps, model)):
        assert_close(xb, xa)


@pytest.mark.parametrize("begin", [1, 2, 4])
@pytest.mark.parametrize("solver_order", [2, 3])
def test_loop_starting_part_way(begin, solver_order):
    """img2img (set_begin_index): a call's order drops where fewer predictions exist since the loop's start, and
    a group then starts at the first call, as diffusers counts them."""
    cfg = dict(SD, solver_order=solver_order, solver_type="heun")
    ref, ff = pair(NAME, **cfg)
    model = posterior_model(ref)
    x64 = _diffusers_float64(cfg, 9, model, begin=begin)
    torch.testing.assert_close(_fastflow_float64(ff, cfg, 9, model, begin=begin), x64, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("config", [dict(solver_order=2), dict(solver_order=3, algorithm_type="sde-dpmsolver++")])
def test_dynamic_thresholding(config):
    """thresholding=True (x0 algorithms): the per-sample quantile clamp runs before the fused step, as diffusers'."""
    cfg = dict(SD, **config, thresholding=True, sample_max_value=1.2, prediction_type="sample")
    ref, ff = pair(NAME, **cfg)
    model = posterior_model(ref)
    xa, _ = run_loop(ref, 8, model=model, step_kwargs=_generator(cfg))
    xb, _ = run_loop(ff, 8, model=model, step_kwargs=_generator(cfg))
    assert_close(xb, xa)


def test_learned_variance_keeps_the_noise_channels():
    """variance_type='learned_range' with epsilon: diffusers keeps the output's first three channels as the
    noise (its 3-channel pixel models); the drop-in does the same."""
    cfg = dict(variance_type="learned_range")
    ref, ff = pair(NAME, **cfg)
    shape = (1, 3, 8, 8)
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    outs = []
    for s in (ref, ff):
        s.set_timesteps(5)
        x = x0
        for t in s.timesteps:
            o = torch.cat([0.5 * x, torch.ones_like(x)], dim=1) * (1 + float(t) / 1000)
            x = s.step(o, t, x).prev_sample
        outs.append(x)
    assert_close(outs[1], outs[0])


def test_api_surface():
    ref, ff = pair(NAME, **SD, solver_order=3)
    x = assert_multistep_api(ref, ff)
    assert list(ff.order_list) == list(ref.order_list)
    out = ff.step(x, ff.timesteps[0], x, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1 and ff.step_index == 1
    assert type(ff.step(x, ff.timesteps[1], x)).__name__ == "SchedulerOutput"
    assert type(ffd.from_scheduler(ref)) is DPMSolverSinglestepScheduler


@pytest.mark.parametrize(
    "config, match",
    [
        (dict(algorithm_type="dpmsolver", thresholding=True, final_sigmas_type="sigma_min"), "thresholding"),
        (dict(algorithm_type="dpmsolver", prediction_type="flow_prediction", final_sigmas_type="sigma_min"),
         "flow_prediction"),
    ],
)
def test_unsupported_options_raise(config, match):
    with pytest.raises(NotImplementedError, match=match):
        DPMSolverSinglestepScheduler(**config)


def test_meta_device_step():
    ff = DPMSolverSinglestepScheduler(**SD, solver_order=3)
    ff.backend = "torch"
    x, _ = meta_loop(ff, 7)
    assert x.device.type == "meta"


def test_torch_compile_fullgraph():
    ref, ff = pair(NAME, **SD, solver_order=3)
    xb, xa = compiled_loops(ref, ff, posterior_model(ref), 4)
    assert_close(xb, xa)


@pytest.mark.parametrize("config", [dict(SD), dict(SD, solver_order=3, prediction_type="v_prediction")])
def test_tiny_unet_loop(config):
    """A real network (tiny random UNet, offline) in diffusers' pipeline loop: the same samples."""
    assert_unet_loops_match(diffusers.DPMSolverSinglestepScheduler(**config), 8)


def test_bfloat16_sample():
    ref, ff = pair(NAME, **SD)
    assert_bfloat16_parity(ref, ff)
