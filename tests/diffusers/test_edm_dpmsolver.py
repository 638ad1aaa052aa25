"""EDMDPMSolverMultistepScheduler drop-in: parity with diffusers over whole loops, undefined steps, no sync."""

from __future__ import annotations

import itertools

import pytest
import torch
from dropin_helpers import assert_close, compiled_loops, meta_loop, pair, run_loop, stand_in, start_noise

diffusers = pytest.importorskip("diffusers")

NAME = "EDMDPMSolverMultistepScheduler"


def _loops(config: dict, steps: int, begin: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' loop and the drop-in's, stochastic steps drawing from equally seeded generators."""
    ref, ff = pair(NAME, **config)
    sde = config.get("algorithm_type") == "sde-dpmsolver++"
    outs = []
    for scheduler in (ref, ff):
        generator = torch.Generator().manual_seed(3)
        kwargs = {"generator": generator} if sde else {}
        outs.append(run_loop(scheduler, steps, step_kwargs=kwargs, begin=begin)[0])
    return outs[0], outs[1]


GRID = [
    dict(solver_order=order, algorithm_type=algorithm, solver_type=solver, sigma_schedule=sigmas,
         prediction_type=prediction)
    for order, algorithm, solver, sigmas, prediction in itertools.product(
        (1, 2, 3), ("dpmsolver++", "sde-dpmsolver++"), ("midpoint", "heun"), ("karras", "exponential"),
        ("epsilon", "v_prediction"),
    )
    if not (order == 3 and algorithm == "sde-dpmsolver++")
]


@pytest.mark.parametrize("steps", [5, 20])  # below and above the 15-step rule for the last orders
@pytest.mark.parametrize("config", GRID, ids=["-".join(str(v) for v in c.values()) for c in GRID])
def test_loop_matches_diffusers(config, steps):
    xa, xb = _loops(config, steps)
    assert torch.isfinite(xa).all()
    assert_close(xb, xa, rtol=2e-6, atol=2e-6 * xa.abs().max().item())


@pytest.mark.parametrize(
    "config",
    [dict(final_sigmas_type="sigma_min", euler_at_final=True), dict(lower_order_final=False, solver_order=3),
     dict(thresholding=True, sample_max_value=1.5), dict(sigma_data=1.0, sigma_min=0.02, sigma_max=20.0, rho=3.0)],
    ids=["sigma_min-euler_at_final", "no-lower-order-final", "thresholding", "sigma-range"],
)
def test_options_match_diffusers(config):
    xa, xb = _loops(config, 12)
    assert_close(xb, xa, rtol=2e-6, atol=2e-6 * xa.abs().max().item())


def test_img2img_loop_from_a_later_step_matches_diffusers():
    xa, xb = _loops(dict(solver_order=3), 12, begin=4)
    assert_close(xb, xa, rtol=2e-6, atol=2e-6 * xa.abs().max().item())


def test_sde_third_order_step_raises_when_run():
    """diffusers defines no sde-dpmsolver++ step of order 3 for EDM (its step fails there); the drop-in's step
    says so when that step runs, and a loop whose orders stay below 3 runs."""
    config = dict(solver_order=3, algorithm_type="sde-dpmsolver++")
    ref, ff = pair(NAME, **config)
    with pytest.raises(UnboundLocalError):
        run_loop(ref, 8, step_kwargs={"generator": torch.Generator().manual_seed(3)})
    with pytest.raises(ValueError, match="step 2 is of order 3.*use solver_order=2"):
        run_loop(ff, 8, step_kwargs={"generator": torch.Generator().manual_seed(3)})
    xa, xb = _loops(config, 2)  # orders 1 and 1: nothing undefined
    assert_close(xb, xa, rtol=2e-6, atol=2e-6 * xa.abs().max().item())


def test_zero_length_last_step_raises_where_diffusers_returns_nan():
    """final_sigmas_type='sigma_min' ends with a step from sigma_min to itself: second order divides 0 by 0."""
    ref, ff = pair(NAME, final_sigmas_type="sigma_min", solver_type="heun")
    xa, _ = run_loop(ref, 20)
    assert not torch.isfinite(xa).all()
    with pytest.raises(ValueError, match="zero length"):
        run_loop(ff, 20)


def test_default_noise_and_meta_device():
    """Without a generator the kernel draws fastflow's noise (finite, not diffusers' numbers); on meta tensors the
    loop reads no tensor data."""
    _, ff = pair(NAME, algorithm_type="sde-dpmsolver++")
    x, _ = run_loop(ff, 10)
    assert torch.isfinite(x).all()
    for config in (dict(), dict(algorithm_type="sde-dpmsolver++")):
        _, ff = pair(NAME, **config)
        x, out = meta_loop(ff, 10, scale_input=True)
        assert x.device.type == "meta" and out.prev_sample.shape == x.shape


def test_scale_model_input_is_diffusers():
    ref, ff = pair(NAME)
    ref.set_timesteps(10)
    ff.set_timesteps(10)
    x = start_noise() * ref.init_noise_sigma
    for t in ref.timesteps:
        assert torch.equal(ff.scale_model_input(x, t), ref.scale_model_input(x, t))
        ff._step_index += 1
        ref._step_index += 1


def test_compiled_steps_match_diffusers():
    ref, ff = pair(NAME, solver_order=3)
    xb, xa = compiled_loops(ref, ff, stand_in, 8, scale_input=True)
    assert_close(xb, xa, rtol=2e-6, atol=2e-6 * xa.abs().max().item())


def test_from_scheduler_picks_the_drop_in():
    import fastflow.diffusers as ffd

    ff = ffd.from_scheduler(diffusers.EDMDPMSolverMultistepScheduler(sigma_schedule="exponential"))
    assert type(ff) is ffd.EDMDPMSolverMultistepScheduler and ff.config.sigma_schedule == "exponential"
