"""The core solvers against diffusers' schedulers: the same loop on the same grid gives the same numbers.

The solvers' coefficients are derived here from the schedule (``fastflow/solvers``); diffusers
writes each scheduler's update by hand. A ``Sampler`` on diffusers' own timesteps, with a
model stand-in that depends on the input and the timestep, must end where diffusers' loop
ends, to diffusers' float32 coefficient round-off: three beta schedules with Stable
Diffusion's leading spacing (diffusers' DDIM steps to ``t - 1000 // steps``, which on its
other spacings is not the next timestep), and flow matching with two shifts. Stochastic
solvers get the noise diffusers draws from the same generator. (The drop-ins in
``fastflow.diffusers`` reproduce diffusers' quirks too; this checks the core's own math.)
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch

import fastflow as ff

diffusers = pytest.importorskip("diffusers")

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
# Beta schedules, each with the round-off diffusers' float32 sigmas and alphas leave in its loops (of the
# result's size): larger for the cosine schedule, whose largest sigmas are in the hundreds.
SCHEDULES = {
    "scaled_linear": (SD, 2e-6),
    "linear": (dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02), 5e-6),
    "squaredcos_cap_v2": (dict(beta_schedule="squaredcos_cap_v2"), 2e-5),
}
LEADING = dict(timestep_spacing="leading", steps_offset=1)  # Stable Diffusion's spacing
SHAPE = (2, 4, 8, 8)
SEED = 7


def stand_in(x: torch.Tensor, tau: float) -> torch.Tensor:
    a = 0.3 + 0.2 * math.cos(tau / 300.0)
    b = 0.5 * math.sin(tau / 500.0 + 1.0)
    return a * x + b * torch.sin(x)


def start() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def diffusers_loop(scheduler, steps: int, step_kwargs: dict) -> torch.Tensor:
    scheduler.set_timesteps(steps)
    x = start() * getattr(scheduler, "init_noise_sigma", 1.0)
    if "generator" in inspect.signature(scheduler.step).parameters:
        step_kwargs = dict(step_kwargs, generator=torch.Generator().manual_seed(SEED))
    scale = getattr(scheduler, "scale_model_input", None)
    for t in scheduler.timesteps:
        o = stand_in(scale(x, t) if scale else x, float(t))
        x = scheduler.step(o, t, x, **step_kwargs).prev_sample
    return x


def core_loop(sampler: ff.Sampler, noise_dtype: torch.dtype, model_times: torch.Tensor) -> torch.Tensor:
    """``sampler``'s loop, its model called at diffusers' timesteps (``model_times``: the schedule's times, or
    1000 sigma for flow matching, which DPM-Solver and UniPC round to integers); every stage draws from the
    generator as diffusers' every step does (a stage that adds no noise discards its draw), in the dtype
    diffusers draws in."""
    assert len(model_times) == sampler.num_stages
    generator = torch.Generator().manual_seed(SEED)
    z = start()
    for i, t in enumerate(model_times):
        o = stand_in(sampler.model_input(z, i), float(t))
        draw = torch.randn(SHAPE, generator=generator, dtype=noise_dtype).double()
        z = sampler.step(o, z, i, noise=draw if sampler.plan.noise[i] else None)
    return z


CASES = [
    # (core solver, its options, prediction, diffusers class, its config, step keywords)
    ("ddim", {}, "eps", "DDIMScheduler", dict(clip_sample=False), {}),
    ("ddim", {}, "v", "DDIMScheduler", dict(clip_sample=False, prediction_type="v_prediction"), {}),
    ("ddim", {}, "x0", "DDIMScheduler", dict(clip_sample=False, prediction_type="sample"), {}),
    ("ddim", {"eta": 1.0}, "eps", "DDIMScheduler", dict(clip_sample=False), {"eta": 1.0}),
    ("ddim", {"eta": 0.5}, "eps", "DDIMScheduler", dict(clip_sample=False), {"eta": 0.5}),  # 0, 1: their own squares
    ("ddpm", {}, "eps", "DDPMScheduler", dict(clip_sample=False), {}),
    ("euler", {}, "eps", "EulerDiscreteScheduler", {}, {}),
    ("euler-ancestral", {}, "eps", "EulerAncestralDiscreteScheduler", {}, {}),
    ("heun", {}, "eps", "HeunDiscreteScheduler", {}, {}),
    ("dpm++1", {}, "eps", "DPMSolverMultistepScheduler", dict(solver_order=1), {}),
    ("dpm++2m", {}, "eps", "DPMSolverMultistepScheduler", dict(solver_order=2), {}),
    ("dpm++2m", {}, "v", "DPMSolverMultistepScheduler", dict(solver_order=2, prediction_type="v_prediction"), {}),
    ("dpm++3m", {"diffusers_3m": True}, "eps", "DPMSolverMultistepScheduler", dict(solver_order=3), {}),
    ("sde-dpm++2m", {}, "eps", "DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++"), {}),
    ("unipc", {"order": 1}, "eps", "UniPCMultistepScheduler", dict(solver_order=1), {}),
    ("unipc", {"order": 2}, "eps", "UniPCMultistepScheduler", dict(solver_order=2), {}),
    ("unipc", {"order": 3}, "eps", "UniPCMultistepScheduler", dict(solver_order=3), {}),
]


# 8 and 20 steps: below and above DPM-Solver's 15-step rule for its last orders (UniPC lowers them at any length)
@pytest.mark.parametrize("steps", [8, 20])
@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize(("solver", "options", "prediction", "name", "config", "step_kwargs"), CASES)
def test_vp_solver_matches_diffusers(solver, options, prediction, name, config, step_kwargs, schedule, steps):
    betas, rtol = SCHEDULES[schedule]
    ref = getattr(diffusers, name)(**betas, **LEADING, **config)
    x_ref = diffusers_loop(ref, steps, step_kwargs)
    times = ref.timesteps.double().numpy()
    if name == "HeunDiscreteScheduler":  # diffusers lists each time of a two-call step twice
        times = np.unique(times)[::-1].copy()
    sampler = ff.Sampler(ff.VP(**betas), solver, prediction=prediction, steps=steps, grid=times, backend="torch",
                         **options)
    x = core_loop(sampler, _noise_dtype(name), ref.timesteps)
    torch.testing.assert_close(x, x_ref, rtol=0, atol=rtol * x_ref.abs().max().item())


@pytest.mark.parametrize("steps", [8, 20])
@pytest.mark.parametrize("sigmas", ["use_karras_sigmas", "use_exponential_sigmas"])
@pytest.mark.parametrize(("solver", "name"), [("euler", "EulerDiscreteScheduler"), ("heun", "HeunDiscreteScheduler")])
def test_fractional_times_match_diffusers_sigma_grids(solver, name, sigmas, steps):
    """Karras and exponential sigmas sit at fractional training times: a VP schedule read between its integer
    times (log sigma interpolated linearly, diffusers' sigma-to-timestep mapping) gives back diffusers' sigmas."""
    ref = getattr(diffusers, name)(**SD, **LEADING, **{sigmas: True})
    x_ref = diffusers_loop(ref, steps, {})
    times = ref.timesteps.double().numpy()
    if name == "HeunDiscreteScheduler":
        times = np.unique(times)[::-1].copy()
    sampler = ff.Sampler(ff.VP(**SD), solver, prediction="eps", steps=steps, grid=times, backend="torch")
    x = core_loop(sampler, _noise_dtype(name), ref.timesteps)
    torch.testing.assert_close(x, x_ref, rtol=0, atol=2e-6 * x_ref.abs().max().item())


FLOW_CASES = [
    ("flow-euler", {}, "FlowMatchEulerDiscreteScheduler", {}),
    ("dpm++1", {}, "DPMSolverMultistepScheduler", dict(solver_order=1)),
    ("dpm++2m", {}, "DPMSolverMultistepScheduler", dict(solver_order=2)),
    ("dpm++3m", {"diffusers_3m": True}, "DPMSolverMultistepScheduler", dict(solver_order=3)),
    ("unipc", {"order": 2}, "UniPCMultistepScheduler", dict(solver_order=2)),
    ("unipc", {"order": 3}, "UniPCMultistepScheduler", dict(solver_order=3)),
]


@pytest.mark.parametrize("steps", [8, 20])
@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize(("solver", "options", "name", "config"), FLOW_CASES)
def test_flow_matching_solver_matches_diffusers(solver, options, name, config, shift, steps):
    if name == "FlowMatchEulerDiscreteScheduler":
        ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    else:
        ref = getattr(diffusers, name)(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift,
                                       **config)
    x_ref = diffusers_loop(ref, steps, {})
    sampler = ff.Sampler(ff.FlowMatching(), solver, prediction="flow", steps=steps,
                         grid=ref.sigmas[:-1].double().numpy(), backend="torch", **options)
    x = core_loop(sampler, _noise_dtype(name), ref.timesteps)
    torch.testing.assert_close(x, x_ref, rtol=0, atol=2e-6 * x_ref.abs().max().item())


def _noise_dtype(name: str) -> torch.dtype:
    """diffusers draws DPM-Solver's noise in float32 and the others' in the sample's dtype (float64 here)."""
    return torch.float32 if name.startswith("DPM") else torch.float64


@pytest.mark.parametrize("steps", [14, 15])
def test_dpm_solver_lowers_its_last_orders_below_15_steps_only(steps):
    """diffusers lowers DPM-Solver's last orders in loops of fewer than 15 steps: the 8 and 20 steps above sit on
    either side of that rule, not on its edge. 3M shows it (its next-to-last step); 2M's last step, to sigma 0, is
    first order either way."""
    ref = diffusers.DPMSolverMultistepScheduler(**SD, **LEADING, solver_order=3)
    x_ref = diffusers_loop(ref, steps, {})
    sampler = ff.Sampler(ff.VP(**SD), "dpm++3m", prediction="eps", steps=steps, grid=ref.timesteps.double().numpy(),
                         backend="torch", diffusers_3m=True)
    x = core_loop(sampler, torch.float32, ref.timesteps)
    torch.testing.assert_close(x, x_ref, rtol=0, atol=2e-6 * x_ref.abs().max().item())


@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_bh1_matches_diffusers(order):
    """UniPC's bh1 variant (B(h) = h) on a loop ending at sigma_min (diffusers' bh1 step to sigma 0 is NaN): the
    convergence test measures its order, which any B(h) = h + O(h^2) keeps."""
    ref = diffusers.UniPCMultistepScheduler(**SD, **LEADING, solver_order=order, solver_type="bh1",
                                            final_sigmas_type="sigma_min")
    x_ref = diffusers_loop(ref, 8, {})
    times = np.append(ref.timesteps.double().numpy(), 0.0)  # sigma_min: the schedule's sigma at t = 0
    sampler = ff.Sampler(ff.VP(**SD), "unipc", prediction="eps", steps=8, grid=times, final="t_min", backend="torch",
                         order=order, variant="bh1")
    x = core_loop(sampler, torch.float64, ref.timesteps)
    torch.testing.assert_close(x, x_ref, rtol=0, atol=2e-6 * x_ref.abs().max().item())
