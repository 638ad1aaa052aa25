"""CosineDPMSolverMultistepScheduler drop-in (Stable Audio Open's): parity with diffusers given its Brownian-tree
noise, the distribution and seeding of fastflow's own noise, the options diffusers refuses. (Its meta-device,
compile and CUDA sync-debug loops are in test_dropin_api.py.)"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from dropin_helpers import (
    assert_independent_standard_normals,
    assert_loops_match,
    pair,
    run_loop,
    stand_in,
    start_noise,
)

import fastflow.diffusers as ffd

pytest.importorskip("torchsde", reason="diffusers' CosineDPMSolverMultistepScheduler needs torchsde")
diffusers = pytest.importorskip("diffusers")
NAME = "CosineDPMSolverMultistepScheduler"

pytestmark = pytest.mark.filterwarnings("ignore:Should have:UserWarning")  # torchsde, at diffusers' last sigma 0


def cosine_pair(backend: str = "torch", diffusers_noise: bool = True, **config):
    ref, ff = pair(NAME, backend=backend, **config)
    ff.diffusers_noise = diffusers_noise
    return ref, ff


def _seeded(seed: int = 11):
    """A fresh generator per loop: diffusers seeds its tree with the generator's initial seed."""
    return lambda i: dict(generator=torch.Generator().manual_seed(seed))


GRID = [
    dict(prediction_type=pred, sigma_schedule=sched, solver_order=order, solver_type=solver, **extra)
    for pred, sched, order, solver, extra in itertools.product(
        ("epsilon", "v_prediction"), ("exponential", "karras"), (1, 2), ("midpoint", "heun"),
        ({}, dict(sigma_min=0.1, sigma_max=100.0, sigma_data=0.5, rho=5.0)),
    )
]


@pytest.mark.parametrize("steps", [4, 20])  # below and above diffusers' 15-step lower-order rule
@pytest.mark.parametrize("config", GRID, ids=["-".join(str(v) for v in c.values()) for c in GRID])
def test_grid_parity_with_diffusers_noise(config, steps):
    """Both prediction types, both sigma schedules, orders 1 and 2, midpoint and Heun, two sigma ranges: with
    ``diffusers_noise`` the loops are diffusers' (its tree, seeded from the generator's initial seed)."""
    ref, ff = cosine_pair(**config)
    (xa, _), _ = assert_loops_match(ref, ff, steps=steps, step_kwargs=_seeded())
    assert torch.isfinite(xa).all()


@pytest.mark.parametrize("config", [dict(lower_order_final=False), dict(euler_at_final=True)])
def test_options_match_diffusers(config):
    ref, ff = cosine_pair(**config)
    assert_loops_match(ref, ff, steps=10, step_kwargs=_seeded())


def test_img2img_loop_from_a_later_step_matches_diffusers():
    ref, ff = cosine_pair()
    assert_loops_match(ref, ff, steps=12, begin=4, step_kwargs=_seeded())


def test_unsupported_options_raise_naming_them():
    """diffusers' step defines orders 1 and 2 only (at 3 it fails) and no ``sample`` preconditioning."""
    with pytest.raises(NotImplementedError, match="solver_order=3"):
        ffd.CosineDPMSolverMultistepScheduler(solver_order=3)
    with pytest.raises(NotImplementedError, match="prediction_type='sample'"):
        ffd.CosineDPMSolverMultistepScheduler(prediction_type="sample")


def test_final_sigma_min_runs_on_fastflow_noise():
    """``final_sigmas_type='sigma_min'`` ends with a step from sigma_min to itself (to float32 round-off):
    diffusers' tree recurses without end on that near-empty interval; fastflow's noise runs it."""
    ref, ff = cosine_pair(diffusers_noise=False, final_sigmas_type="sigma_min")
    ff.set_timesteps(6)
    assert math.isclose(float(ff.sigmas[-1]), float(ff.sigmas[-2]), rel_tol=1e-6)
    with pytest.raises(RecursionError):
        run_loop(ref, 6, step_kwargs=_seeded())
    x, _ = run_loop(ff, 6, step_kwargs=_seeded())
    assert torch.isfinite(x).all()


def _noises(s, steps: int, x: torch.Tensor, generator_seed: int | None) -> list[torch.Tensor]:
    """Each step's noise, taken back from a loop whose model predicts x0 = 0: then diffusers' first-order update
    is ``(sigma_t / sigma_s)^2 x + sigma_t sqrt(1 - (sigma_t / sigma_s)^2) n`` (orders 1 and 2 agree, every x0
    being 0)."""
    s.set_timesteps(steps)
    sig = s.sigmas.double()
    data = float(s.config.sigma_data)
    out = []
    for i, t in enumerate(s.timesteps[:-1]):
        sigma, sigma_t = float(sig[i]), float(sig[i + 1])
        c_skip = data**2 / (sigma**2 + data**2)
        c_out = -sigma * data / (sigma**2 + data**2) ** 0.5  # v_prediction
        kw = {} if generator_seed is None else dict(generator=torch.Generator().manual_seed(generator_seed))
        y = s.step(x * (-c_skip / c_out), t, x, **kw).prev_sample
        ratio = sigma_t / sigma
        out.append((y.double() - ratio**2 * x.double()) / (sigma_t * math.sqrt(1 - ratio**2)))
        x = y
    return out


@pytest.mark.parametrize("backend", ["torch", "cuda"])
def test_noise_has_diffusers_distribution(backend):
    """fastflow's in-kernel noise is what diffusers' tree gives on its disjoint per-step intervals: standard
    normal each step, independent across steps. Measured on both, 65536 elements a step."""
    from fastflow.backends import get_backend

    if get_backend(backend).availability() is not None:
        pytest.skip("the extension is not built")
    ref, ff = cosine_pair(backend, diffusers_noise=False, prediction_type="v_prediction", solver_order=2)
    x = torch.randn(4, 4, 64, 64, generator=torch.Generator().manual_seed(0)) * 100
    for noises in (_noises(ref, 6, x, 5), _noises(ff, 6, x, 5)):
        assert_independent_standard_normals(noises)


def test_generator_seeds_fastflow_noise():
    """The generator's initial seed seeds fastflow's noise (diffusers seeds its tree with it): the same seed gives
    the same loop, another seed another one; without a generator torch's global generator seeds it."""
    finals = []
    for seed in (5, 5, 6):
        _, ff = cosine_pair(diffusers_noise=False)
        finals.append(run_loop(ff, 6, step_kwargs=_seeded(seed))[0])
    assert torch.equal(finals[0], finals[1]) and not torch.allclose(finals[0], finals[2])
    _, ff = cosine_pair(diffusers_noise=False)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(run_loop(ff, 6, )[0])
    assert torch.equal(runs[0], runs[1])


def test_scale_model_input_is_bit_identical():
    """Each step's scaled input (``c_in`` on diffusers' float32 sigma) is diffusers' to the bit."""
    ref, ff = cosine_pair(sigma_schedule="karras")
    for s in (ref, ff):
        s.set_timesteps(9)
    x = start_noise(3) * float(ref.init_noise_sigma)
    model = stand_in
    for i, t in enumerate(ref.timesteps):
        a, b = ref.scale_model_input(x, t), ff.scale_model_input(x, t)
        assert torch.equal(a, b), i
        o = model(a, t)
        x_next = ref.step(o, t, x, generator=torch.Generator().manual_seed(1)).prev_sample
        ff.step(o, t, x, generator=torch.Generator().manual_seed(1))
        x = x_next


@pytest.mark.parametrize(("sample_dtype", "output_dtype"), [(torch.float64, torch.float32),
                                                            (torch.float32, torch.float16)])
def test_diffusers_tree_of_a_mixed_dtype_step(sample_dtype, output_dtype):
    """diffusers makes its tree from the converted model output (the sample's dtype promoted with the output's), so
    its draws are those of that dtype's tree: the drop-in's tree is the same."""
    ref, ff = cosine_pair()
    outs = []
    for s in (ref, ff):
        s.set_timesteps(6)
        x = (start_noise(0) * s.init_noise_sigma).to(sample_dtype)
        t = s.timesteps[0]
        o = stand_in(s.scale_model_input(x, t).float(), t).to(output_dtype)
        outs.append(s.step(o, t, x, generator=torch.Generator().manual_seed(5)).prev_sample.double())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5 * float(outs[0].abs().max()))
