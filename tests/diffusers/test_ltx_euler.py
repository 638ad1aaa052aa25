"""LTXEulerAncestralRFScheduler drop-in (LTX-Video's): parity with diffusers over whole loops on both of its schedule
paths, half-precision samples, fastflow's ancestral noise, the calls diffusers refuses. (Its meta-device, compile
and CUDA sync-debug loops are in test_dropin_api.py.)"""

from __future__ import annotations

import math

import pytest
import torch
from dropin_helpers import assert_close, assert_independent_standard_normals, meta_loop, pair

import fastflow.diffusers as ffd

diffusers = pytest.importorskip("diffusers")
NAME = "LTXEulerAncestralRFScheduler"
COMFY_SIGMAS = [1.0, 0.9937, 0.9875, 0.9812, 0.975, 0.9094, 0.725, 0.4219, 0.0]  # LTX's distilled schedule

pytestmark = pytest.mark.filterwarnings("ignore:The config attributes")  # diffusers builds a flow scheduler from it


def _velocity(x: torch.Tensor, t) -> torch.Tensor:
    """A stand-in velocity model of the sample and the timestep."""
    tau = float(t) / 1000.0
    return (0.3 * x.float() + 0.2 * torch.sin(x.float()) - (1 - tau) * 0.5).to(x.dtype)


def _loop(s, schedule: dict, x: torch.Tensor, generators: bool) -> tuple[torch.Tensor, int]:
    """A pipeline's loop over ``timesteps``; a fresh generator per step, seeded by the step, when ``generators``."""
    s.set_timesteps(**schedule)
    for i, t in enumerate(s.timesteps):
        kw = dict(generator=torch.Generator().manual_seed(100 + i)) if generators else {}
        x = s.step(_velocity(x, t), t, x, **kw).prev_sample
    return x, len(s.timesteps)


SCHEDULES = [dict(num_inference_steps=1), dict(num_inference_steps=8), dict(num_inference_steps=30),
             dict(sigmas=COMFY_SIGMAS), dict(timesteps=torch.linspace(1, 0, 11))]


@pytest.mark.parametrize(("eta", "s_noise"), [(0.0, 1.0), (0.5, 1.0), (1.0, 1.0), (1.0, 0.0), (0.7, 0.4)])
@pytest.mark.parametrize("schedule", SCHEDULES, ids=["n1", "n8", "n30", "comfy-sigmas", "timesteps-as-sigmas"])
def test_loops_match_diffusers(schedule, eta, s_noise):
    """Both schedule paths (diffusers' flow-matching sigmas; explicit sigmas, whose timesteps end with the terminal
    0 so the loop's last call returns the sample), any eta and s_noise: diffusers' samples, its noise drawn from the
    same generators."""
    ref, ff = pair(NAME, eta=eta, s_noise=s_noise)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    (xa, na), (xb, nb) = (_loop(s, schedule, x, generators=True) for s in (ref, ff))
    assert na == nb
    assert torch.isfinite(xa).all()
    assert_close(xb, xa)


def test_a_step_up_the_noise_levels_adds_no_noise_as_in_diffusers():
    """Explicit sigmas may rise (a re-noising schedule): there the ancestral variance is negative, and diffusers
    clamps it to 0. Loops over the other schedules never reach that clamp."""
    ref, ff = pair(NAME, eta=1.0, s_noise=1.0)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    (xa, _), (xb, _) = (_loop(s, dict(sigmas=[1.0, 0.6, 0.8, 0.3, 0.0]), x, generators=True) for s in (ref, ff))
    assert torch.isfinite(xa).all()
    assert_close(xb, xa)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_samples_are_stepped_in_float32_and_rounded_once(dtype):
    """diffusers upcasts a 16-bit sample and output, steps in float32 and casts back: the kernel computes in float32
    and rounds once, the same bits but where float32 round-off of the folded update crosses a 16-bit rounding
    boundary (a last bit, in under 1 % of the elements)."""
    ref, ff = pair(NAME)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)).to(dtype)
    (xa, _), (xb, _) = (_loop(s, dict(num_inference_steps=6), x, generators=True) for s in (ref, ff))
    assert xa.dtype == xb.dtype == dtype
    ulp = 2.0**-10 if dtype == torch.float16 else 2.0**-7
    assert_close(xb.float(), xa.float(), rtol=ulp, atol=ulp)
    assert float((xb != xa).float().mean()) < 0.01


def _noise_of_step(s, i: int, x: torch.Tensor) -> torch.Tensor:
    """Step ``i``'s noise, taken back from a velocity that makes x0 = 0 (``v = x / sigma``): the update is then
    ``c r x + q n`` with diffusers' coefficients (float64 from its float32 sigmas)."""
    sig = s.sigmas.double()
    sigma, sigma_next = float(sig[i]), float(sig[i + 1])
    eta, s_noise = float(s.config.eta), float(s.config.s_noise)
    down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
    c = (1 - sigma_next) / (1 - down)
    q = math.sqrt(max(sigma_next**2 - down**2 * (1 - sigma_next) ** 2 / (1 - down) ** 2, 0.0)) * s_noise
    s._step_index = i
    y = s.step(x / sigma, s.timesteps[i], x).prev_sample
    return (y.double() - c * (down / sigma) * x.double()) / q


@pytest.mark.parametrize("backend", ["torch", "cuda"])
def test_fastflow_noise_has_diffusers_distribution(backend):
    """Without a generator the kernel draws fastflow's noise: standard normal at every step, independent across
    steps (65536 elements a step)."""
    from fastflow.backends import get_backend

    if get_backend(backend).availability() is not None:
        pytest.skip("the extension is not built")
    _, ff = pair(NAME, backend=backend)
    ff.set_timesteps(6)
    x = torch.randn(4, 4, 64, 64, generator=torch.Generator().manual_seed(2))
    noises = [_noise_of_step(ff, i, x) for i in range(4)]
    assert_independent_standard_normals(noises)


def test_calls_diffusers_refuses_raise():
    """An integer index as timestep, a step before set_timesteps: diffusers' errors."""
    _, ff = pair(NAME)
    x = torch.randn(1, 4, 4, 4)
    with pytest.raises(ValueError, match="set_timesteps"):
        ff.step(x, torch.tensor(1000.0), x)
    ff.set_timesteps(4)
    with pytest.raises(ValueError, match="integer"):
        ff.step(x, 0, x)


def test_meta_loop_and_from_scheduler():
    ref = diffusers.LTXEulerAncestralRFScheduler(eta=0.5)
    ff = ffd.from_scheduler(ref)
    assert type(ff) is ffd.LTXEulerAncestralRFScheduler and dict(ff.config) == dict(ref.config)
    x, out = meta_loop(ff, 5)
    assert x.device.type == "meta" and out.prev_sample.device.type == "meta"


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("generator", [True, False], ids=["generator", "lane"])
def test_sigmas_not_ending_at_zero_stop_the_step_index_as_diffusers(generator):
    """With explicit sigmas that do not end at 0 the last step returns its sample and diffusers' step_index stays at
    the last sigma's index (the drop-in's ran one past it); a call after it repeats that step, as diffusers'."""
    ref, ff = pair(NAME, eta=0.0)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    runs = []
    for sched in (ref, ff):
        sched.set_timesteps(sigmas=[1.0, 0.7, 0.4, 0.2])
        y, seen = x, []
        for i, t in enumerate([*sched.timesteps, sched.timesteps[-1]]):
            kw = {"generator": torch.Generator().manual_seed(i)} if generator else {}
            y = sched.step(0.5 * y, t, y, **kw).prev_sample
            seen.append((sched.step_index, y))
        runs.append(seen)
    for (index, got), (want_index, want) in zip(runs[1], runs[0], strict=True):
        assert index == want_index
        assert_close(got, want)
    assert runs[0][-1][0] == 3
