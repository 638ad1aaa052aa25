"""UniPC and SA-Solver with a sample edited between steps: diffusers' corrector rebuilds the corrected sample from
the previous step's, so the edit reaches the next step only through the model output; the drop-ins match it."""

from __future__ import annotations

import pytest
import torch
from dropin_helpers import SD, assert_close, pair, stand_in, start_noise

CASES = [
    ("UniPCMultistepScheduler", dict(SD)),
    ("UniPCMultistepScheduler", dict(SD, solver_order=3, solver_type="bh1", prediction_type="v_prediction",
                                            final_sigmas_type="sigma_min")),
    ("UniPCMultistepScheduler", dict(SD, solver_order=3, disable_corrector=[1, 3])),
    ("UniPCMultistepScheduler", dict(SD, predict_x0=False, solver_order=1, final_sigmas_type="sigma_min")),
    ("UniPCMultistepScheduler", dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)),
    ("SASolverScheduler", dict(SD)),
    ("SASolverScheduler", dict(SD, algorithm_type="noise_prediction", predictor_order=3, corrector_order=4)),
    ("SASolverScheduler", dict(SD, tau_func=lambda t: 0.0, prediction_type="v_prediction")),
]


def _edit(x: torch.Tensor, i: int) -> torch.Tensor:
    """A callback's edit: a new tensor, on some steps only."""
    return x + 0.2 * torch.cos(x + i) if i % 3 != 1 else x


def _loop(scheduler, begin: int, steps: int = 8) -> torch.Tensor:
    scheduler.set_timesteps(steps)
    if begin:
        scheduler.set_begin_index(begin)
    x = start_noise(2) * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps[begin:]):
        kw = {"generator": torch.Generator().manual_seed(40 + i)} if "SASolver" in type(scheduler).__name__ else {}
        x = scheduler.step(stand_in(x, t), t, x, **kw).prev_sample
        x = _edit(x, i)
    return x


@pytest.mark.parametrize("begin", [0, 3])
@pytest.mark.parametrize(("name", "config"), CASES, ids=[f"{n[:-9]}-{i}" for i, (n, _) in enumerate(CASES)])
def test_an_edited_sample_steps_as_diffusers(name, config, begin):
    ref, ff = pair(name, **config)
    xa, xb = _loop(ref, begin), _loop(ff, begin)
    assert torch.isfinite(xa).all()
    assert_close(xb, xa, rtol=1e-4, atol=1e-4 * max(1.0, float(xa.abs().max())))


def test_the_returned_sample_is_released_at_the_loop_s_end():
    """The kept sample (the edit test's reference) is dropped after the last step, so no latent outlives the loop."""
    _, ff = pair("UniPCMultistepScheduler", **SD)
    _loop(ff, 0, steps=4)
    assert ff._ff_returned is None


def _written_back_loop(scheduler, begin: int, how: str, steps: int = 8) -> torch.Tensor:
    """A pipeline that writes each step's output into the tensor it passed as the sample: SkyReels-V2's diffusion
    forcing (``latents[:, :, idx] = step(..., latents[:, :, idx])``) or a ``copy_``."""
    scheduler.set_timesteps(steps)
    if begin:
        scheduler.set_begin_index(begin)
    latents = start_noise(2, shape=(2, 8, 8, 8)) * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps[begin:]):
        kw = {"generator": torch.Generator().manual_seed(40 + i)} if "SASolver" in type(scheduler).__name__ else {}
        if how == "slice":
            latents[:, :4] = scheduler.step(stand_in(latents[:, :4], t), t, latents[:, :4], **kw).prev_sample
        else:
            latents.copy_(scheduler.step(stand_in(latents, t), t, latents, **kw).prev_sample)
    return latents


@pytest.mark.parametrize("how", ["slice", "copy_"])
@pytest.mark.parametrize("begin", [0, 3])
@pytest.mark.parametrize(("name", "config"), CASES, ids=[f"{n[:-9]}-{i}" for i, (n, _) in enumerate(CASES)])
def test_a_sample_written_back_in_place_steps_as_diffusers(name, config, begin, how):
    """diffusers keeps the sample of a step without a corrector (a loop's first, one after a disable_corrector
    step) as the next corrector's last_sample, so writing the step's output into it moves that corrector
    (by 8 on SD's UniPC loop): the drop-ins keep a copy and match."""
    ref, ff = pair(name, **config)
    xa, xb = _written_back_loop(ref, begin, how), _written_back_loop(ff, begin, how)
    assert torch.isfinite(xa).all()
    assert_close(xb, xa, rtol=1e-4, atol=1e-4 * max(1.0, float(xa.abs().max())))
