"""DEISMultistepScheduler drop-in: exact coefficients, parity with diffusers over full loops, sync-free steps.

diffusers evaluates DEIS's closed-form integrals in float32 at every step, and they cancel:
over 50 steps at order 3 its float32 loop ends ~1e-4 from its own float64 loop. So the
formulas are checked where round-off cannot hide a wrong one, in float64 (the drop-in's
float64 loop against diffusers' float64 loop, to 1e-9), and the float32 loops are held to
diffusers' numbers where diffusers' float32 loop is accurate, elsewhere to no further
than twice diffusers' own distance from its float64 loop.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from dropin_helpers import (
    SD,
    assert_bfloat16_parity,
    assert_close,
    assert_multistep_api,
    assert_no_further_from_float64,
    assert_unet_loops_match,
    begin_index_loops,
    compiled_loops,
    meta_loop,
    pair,
    run_loop,
    start_noise,
)
from posterior_model import posterior_model

import fastflow.diffusers as ffd
from fastflow.diffusers.deis import DEISMultistepScheduler, logrho_coefficients

diffusers = pytest.importorskip("diffusers")
scipy_integrate = pytest.importorskip("scipy.integrate")

NAME = "DEISMultistepScheduler"
SIGMAS = {"lin": {}, "karras": dict(use_karras_sigmas=True), "exp": dict(use_exponential_sigmas=True),
          "beta": dict(use_beta_sigmas=True),
          "flow": dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)}


def _grid():
    out = []
    preds = itertools.cycle(["epsilon", "v_prediction", "sample"])
    spacings = itertools.cycle(
        [{}, dict(timestep_spacing="leading", steps_offset=1), dict(timestep_spacing="trailing")]
    )
    for order, sigmas, steps, lof in itertools.product([1, 2, 3], SIGMAS, [1, 2, 5, 20], [True, False]):
        cfg = dict(SD, solver_order=order, lower_order_final=lof, prediction_type=next(preds), **next(spacings))
        cfg.update(SIGMAS[sigmas])
        out.append((cfg, steps))
    for order, pred in itertools.product([1, 2], ["epsilon", "v_prediction", "sample"]):
        out.append((dict(SD, solver_order=order, prediction_type=pred, thresholding=True, sample_max_value=1.2), 12))
    # A flow prediction on variance-preserving sigmas: diffusers' noise conversion divides by the raw sigma there.
    for order, sigmas in itertools.product([1, 2, 3], ["lin", "karras"]):
        out.append((dict(SD, solver_order=order, prediction_type="flow_prediction", **SIGMAS[sigmas]), 8))
    return out


GRID = _grid()


def _id(case):
    cfg, steps = case
    sig = next((k for k, v in SIGMAS.items() if v and all(cfg.get(a) == b for a, b in v.items())), "lin")
    return (f"o{cfg['solver_order']}-{cfg['prediction_type'][:3]}-{sig}-{cfg.get('timestep_spacing', 'linspace')}"
            f"-lof{int(cfg.get('lower_order_final', True))}{'-thr' if cfg.get('thresholding') else ''}-n{steps}")


def _diffusers_float64(cfg: dict, steps: int, model, begin: int = 0) -> torch.Tensor:
    """diffusers' loop with its float32 sigmas, the sample (so its coefficients too) in float64."""
    ref = diffusers.DEISMultistepScheduler(**cfg)
    ref.set_timesteps(steps)
    ref.sigmas = ref.sigmas.double()
    if begin:
        ref.set_begin_index(begin)
    x = start_noise(0).double()
    for t in ref.timesteps[begin:]:
        x = ref.step(model(x, t), t, x).prev_sample
    return x


def test_logrho_coefficients_are_the_integrals():
    """Each coefficient is the integral of its Lagrange basis polynomial in log rho (adaptive quadrature); they
    sum to the interval's length; order 1 is DEIS's exponential-integrator step."""
    rng = np.random.default_rng(0)
    for order in (1, 2, 3):
        for _ in range(10):
            nodes = sorted(rng.uniform(0.05, 20.0, order + 1), reverse=True)  # a loop's rhos, falling
            points = [nodes[order - 1 - j] for j in range(order)]  # the step's points, newest (its start) first
            rho_from, rho_to = points[0], nodes[order]
            coefs = logrho_coefficients(points, rho_from, rho_to)
            for j, c in enumerate(coefs):
                logs = [math.log(p) for p in points]

                def basis(r, j=j, logs=logs):
                    u = math.log(r)
                    return math.prod((u - logs[m]) / (logs[j] - logs[m]) for m in range(len(logs)) if m != j)
                exact, _ = scipy_integrate.quad(basis, rho_from, rho_to, epsabs=1e-13, epsrel=1e-12)
                assert abs(c - exact) <= 1e-9 * max(1.0, abs(exact)), (order, j, c, exact)
            assert math.isclose(sum(coefs), rho_to - rho_from, rel_tol=1e-12, abs_tol=1e-12)
    assert logrho_coefficients([3.0], 3.0, 1.0) == pytest.approx([-2.0], abs=1e-15)
    assert logrho_coefficients([3.0, 5.0], 3.0, 3.0) == [0.0, 0.0]  # a zero-length step moves nothing


@pytest.mark.parametrize("case", GRID, ids=_id)
def test_float64_loops_match_diffusers(case):
    """Orders 1-3, every prediction type, sigma family, spacing, lower_order_final, thresholding, 1 to 20 steps:
    in float64 the two loops agree to 1e-9, so every coefficient is diffusers' formula."""
    cfg, steps = case
    ref, ff = pair(NAME, **cfg)
    model = posterior_model(ref)
    x64 = _diffusers_float64(cfg, steps, model)
    xb64, _ = run_loop(ff, steps, model=model, x=start_noise(0).double())
    assert xb64.dtype == torch.float64
    torch.testing.assert_close(xb64, x64, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("case", GRID[::3], ids=_id)
def test_float32_loops(case):
    """float32 loops: diffusers' numbers to 1e-5 where its float32 loop is accurate; elsewhere (its float32
    coefficients cancel) within twice its distance from its float64 loop."""
    cfg, steps = case
    ref, ff = pair(NAME, **cfg)
    model = posterior_model(ref)
    xa, _ = run_loop(ref, steps, model=model)
    xb, _ = run_loop(ff, steps, model=model)
    assert xb.dtype == xa.dtype == torch.float32
    if assert_no_further_from_float64(xb, xa, _diffusers_float64(cfg, steps, model)):
        assert_close(xb, xa)


def test_float32_accuracy_on_long_loops():
    """50 steps at order 3: diffusers' float32 loop is ~1e-4 from its float64 loop; the drop-in's within 1e-5."""
    cfg = dict(SD, solver_order=3)
    ref, ff = pair(NAME, **cfg)
    model = posterior_model(ref)
    x64 = _diffusers_float64(cfg, 50, model)
    xa, _ = run_loop(ref, 50, model=model)
    xb, _ = run_loop(ff, 50, model=model)
    assert (xa.double() - x64).abs().max() > 3e-5
    assert (xb.double() - x64).abs().max() < 1e-5


@pytest.mark.parametrize("begin", [3, 8])
def test_begin_index_partial_loop(begin):
    """img2img: set_begin_index and the remaining steps (warm-up counted from the first step taken)."""
    cfg = dict(SD, solver_order=3)
    ref, ff = pair(NAME, **cfg)
    model = posterior_model(ref)
    xb64, _ = run_loop(ff, 12, model=model, x=start_noise(0).double(), begin=begin)
    torch.testing.assert_close(xb64, _diffusers_float64(cfg, 12, model, begin=begin), rtol=1e-9, atol=1e-9)
    outs = begin_index_loops(ref, ff, 12, begin, start_noise(1))
    assert_close(outs[1], outs[0])


def test_api_surface():
    ref, ff = pair(NAME, **SD, solver_order=3)
    x = assert_multistep_api(ref, ff)
    out = ff.step(x, ff.timesteps[0], x, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1 and ff.step_index == 1
    assert type(ff.step(x, ff.timesteps[1], x)).__name__ == "SchedulerOutput"
    assert type(ffd.from_scheduler(ref)) is DEISMultistepScheduler


@pytest.mark.parametrize(
    "config, match",
    [
        (dict(thresholding=True, solver_order=3), "thresholding=True with solver_order=3"),
        (dict(solver_order=4), "solver_order=4"),
    ],
)
def test_unsupported_options_raise(config, match):
    with pytest.raises(NotImplementedError, match=match):
        DEISMultistepScheduler(**config)


def test_a_repeated_sigma_under_a_higher_order_step_raises():
    """More steps than training timesteps repeat a rounded timestep, so a sigma: the step after the zero-length
    one divides by their log rho distance (diffusers returns NaN); the drop-in's step there raises."""
    cfg = dict(num_train_timesteps=10)
    ref, ff = pair(NAME, **cfg)
    model = posterior_model(ref)
    xa, _ = run_loop(ref, 15, model=model)
    assert not torch.isfinite(xa).all()
    with pytest.raises(ValueError, match="same log-SNR"):
        run_loop(ff, 15, model=model)


def test_meta_device_step():
    ff = DEISMultistepScheduler(**SD, solver_order=3)
    ff.backend = "torch"
    x, _ = meta_loop(ff, 6)
    assert x.device.type == "meta"


def test_torch_compile_fullgraph():
    ref, ff = pair(NAME, **SD, solver_order=3)
    xb, xa = compiled_loops(ref, ff, posterior_model(ref), 4)
    assert_close(xb, xa)


@pytest.mark.parametrize("config", [dict(SD), dict(SD, solver_order=3, prediction_type="v_prediction")])
def test_tiny_unet_loop(config):
    """A real network (tiny random UNet, offline) in diffusers' pipeline loop: the same samples."""
    assert_unet_loops_match(diffusers.DEISMultistepScheduler(**config), 8)


def test_bfloat16_sample():
    ref, ff = pair(NAME, **SD)
    assert_bfloat16_parity(ref, ff)
