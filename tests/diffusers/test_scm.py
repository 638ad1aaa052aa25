"""SCMScheduler drop-in (Sana Sprint's): parity with diffusers on every schedule it makes, 16-bit inputs, fastflow's
noise, the refused prediction type. (Its meta-device, compile and CUDA sync-debug loops are in
test_dropin_api.py.)"""

from __future__ import annotations

import math

import pytest
import torch
from dropin_helpers import assert_close, assert_independent_standard_normals, assert_sync_free_gpu_loops, pair

import fastflow.diffusers as ffd

diffusers = pytest.importorskip("diffusers")
NAME = "SCMScheduler"

SCHEDULES = [
    dict(num_inference_steps=2),  # Sana Sprint's default: max 1.5708, intermediate 1.3
    dict(num_inference_steps=1, intermediate_timesteps=None),
    dict(num_inference_steps=4, intermediate_timesteps=None, max_timesteps=1.2),
    dict(num_inference_steps=3, timesteps=[1.5, 1.1, 0.6, 0.0], max_timesteps=None, intermediate_timesteps=None),
]


def _trigflow_model(x: torch.Tensor, t) -> torch.Tensor:
    return (0.3 * x.float() + 0.2 * torch.sin(x.float()) * float(t)).to(x.dtype)


def _loop(s, schedule: dict, x: torch.Tensor, generators: bool = True, model=_trigflow_model):
    """Sana Sprint's loop: set_begin_index(0), a step at every angle but the last; returns the last sample and
    every step's x0."""
    s.set_timesteps(**schedule)
    s.set_begin_index(0)
    preds = []
    for i, t in enumerate(s.timesteps[:-1]):
        kw = dict(generator=torch.Generator().manual_seed(10 + i)) if generators else {}
        x, x0 = s.step(model(x, t), t, x, return_dict=False, **kw)
        preds.append(x0)
    return x, preds


@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
@pytest.mark.parametrize("schedule", SCHEDULES, ids=["sprint", "one-step", "four-steps", "custom"])
def test_loops_match_diffusers(schedule, sigma_data):
    """Every schedule diffusers' set_timesteps makes, two sigma_data: diffusers' samples and x0 predictions, its
    noise drawn from the same generators."""
    ref, ff = pair(NAME, sigma_data=sigma_data)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    (xa, pa), (xb, pb) = (_loop(s, schedule, x) for s in (ref, ff))
    assert_close(xb, xa)
    for a, b in zip(pa, pb, strict=True):
        assert_close(b, a)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_inputs(dtype):
    """16-bit sample and output: diffusers forms x0 in 16 bits and adds its float32 noise, returning float32; the
    drop-in returns the same dtypes, its x0 rounded once, and its samples are no further than diffusers' from the
    same loop computed in float32 (to a margin of 1.2)."""
    ref, ff = pair(NAME)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)).to(dtype)
    schedule = dict(num_inference_steps=4, intermediate_timesteps=None)
    (xa, pa), (xb, pb) = (_loop(s, schedule, x) for s in (ref, ff))
    x32, _ = _loop(ref, schedule, x.float(), model=lambda x, t: _trigflow_model(x.to(dtype), t).float())
    assert xa.dtype == xb.dtype == torch.float32 and pa[0].dtype == pb[0].dtype == dtype
    assert (xb - x32).abs().max() <= 1.2 * (xa - x32).abs().max()


@pytest.mark.parametrize("backend", ["torch", "cuda"])
def test_fastflow_noise_has_diffusers_distribution(backend):
    """Without a generator the kernel draws fastflow's noise: taken back from a model that makes x0 = 0, each
    step's is standard normal and the steps are independent (65536 elements a step)."""
    from fastflow.backends import get_backend

    if get_backend(backend).availability() is not None:
        pytest.skip("the extension is not built")
    _, ff = pair(NAME, backend=backend)
    ff.set_timesteps(4, intermediate_timesteps=None)
    ff.set_begin_index(0)
    x = torch.randn(4, 4, 64, 64, generator=torch.Generator().manual_seed(2))
    angles = ff.timesteps.double()
    noises = []
    for i, t in enumerate(ff.timesteps[:-2]):  # (the last step's noise has weight sin(0) = 0)
        s = float(angles[i])
        y, _ = ff.step(x * (math.cos(s) / math.sin(s)), t, x, return_dict=False)  # cos(s) x - sin(s) F = 0
        noises.append(y.double() / (math.sin(float(angles[i + 1])) * ff.config.sigma_data))
        x = y
    assert_independent_standard_normals(noises)


def test_other_parametrization_raises_and_meta_loop():
    """diffusers implements only ``trigflow`` (its step raises otherwise); the drop-in refuses at construction.
    A loop on meta tensors reads no data."""
    with pytest.raises(NotImplementedError, match="prediction_type='epsilon'"):
        ffd.SCMScheduler(prediction_type="epsilon")
    ff = ffd.from_scheduler(diffusers.SCMScheduler())
    ff.set_timesteps(2)
    ff.set_begin_index(0)
    x = torch.empty(2, 4, 8, 8, device="meta")
    for t in ff.timesteps[:-1]:
        x = ff.step(torch.empty_like(x), t, x).prev_sample
    assert x.device.type == "meta"


def test_torch_compile_fullgraph():
    """After a first eager step, a step traces with fullgraph=True (no graph break); Sana Sprint's loop calls
    ``set_begin_index(0)``, so the first step traces too."""
    torch._dynamo.reset()
    ref, ff = pair(NAME)
    schedule = dict(num_inference_steps=4, intermediate_timesteps=None)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))

    @torch.compile(fullgraph=True, backend="eager")
    def step(o, t, x, generator):
        return ff.step(o, t, x, generator=generator).prev_sample

    ff.set_timesteps(**schedule)
    ff.set_begin_index(0)
    xb = x
    for i, t in enumerate(ff.timesteps[:-1]):
        o = _trigflow_model(xb, t)
        xb = ff.step(o, t, xb).prev_sample if i == 0 else step(o, t, xb, None)
    assert torch.isfinite(xb).all() and xb.shape == x.shape


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_gpu_loop_no_sync(backend):
    """Sana Sprint's loop on the GPU under sync debug mode "error", with a CUDA generator (diffusers' samples) and
    with fastflow's noise."""
    ref, ff = pair(NAME, backend=backend)
    schedule = dict(num_inference_steps=2, device="cuda")
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(4)).cuda()

    def set_schedule(s):
        s.set_timesteps(**schedule)
        s.set_begin_index(0)

    def loop(s, generators: bool):
        y = x
        for t in s.timesteps[:-1]:
            kw = dict(generator=torch.Generator("cuda").manual_seed(1)) if generators else {}
            y = s.step(_trigflow_model(y, 1.0), t, y, **kw).prev_sample
        return y

    assert_sync_free_gpu_loops(ref, ff, set_schedule, loop)
