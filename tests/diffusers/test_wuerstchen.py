"""DDPMWuerstchenScheduler drop-in (Stable Cascade): parity with diffusers on the pipelines' calling convention (the
timestep expanded over the batch and cast to the model's dtype), 16-bit samples, fastflow's noise, no sync."""

from __future__ import annotations

import inspect
import itertools

import pytest
import torch
from dropin_helpers import assert_close, assert_independent_standard_normals, assert_sync_free_gpu_loops, pair

import fastflow.diffusers as ffd

diffusers = pytest.importorskip("diffusers")
NAME = "DDPMWuerstchenScheduler"


def _model(x: torch.Tensor, t) -> torch.Tensor:
    return (0.3 * x.float() + 0.2 * torch.sin(x.float()) * float(t)).to(x.dtype)


def _loop(s, steps: int, x: torch.Tensor, t_dtype: torch.dtype, generators: bool = True, begin: int = 0):
    """Stable Cascade's loop: every timestep but the last, each expanded over the batch and cast to ``t_dtype``."""
    s.set_timesteps(steps)
    for i, t in enumerate(s.timesteps[begin:-1]):
        kw = dict(generator=torch.Generator().manual_seed(i)) if generators else {}
        x = s.step(_model(x, t), t.expand(x.size(0)).to(t_dtype), x, **kw).prev_sample
    return x


CASES = list(itertools.product((1.0, 1.5, 0.7), (1, 4, 20), (torch.float32, torch.bfloat16, torch.float16)))


@pytest.mark.parametrize(("scaler", "steps", "t_dtype"), CASES,
                         ids=[f"scaler{a}-n{b}-t_{str(c)[6:]}" for a, b, c in CASES])
def test_loops_match_diffusers(scaler, steps, t_dtype):
    """Every scaler branch, 1 to 20 steps, the timestep in float32 or rounded to a 16-bit model dtype (diffusers
    evaluates its schedule at the rounded value): diffusers' samples, its noise drawn from the same generators."""
    ref, ff = pair(NAME, scaler=scaler)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    xa, xb = (_loop(s, steps, x, t_dtype) for s in (ref, ff))
    assert torch.isfinite(xa).all()
    assert_close(xb, xa, rtol=1e-5, atol=1e-5 * max(1.0, float(xa.abs().max())))


def test_custom_timesteps_and_a_later_start():
    """Custom timesteps, and a loop whose first call (a CPU timestep, rounded to bfloat16) is located at the nearest
    timestep, as diffusers locates it."""
    ref, ff = pair(NAME)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    outs = []
    for s in (ref, ff):
        s.set_timesteps(timesteps=[1.0, 0.8, 0.55, 0.3, 0.0])
        y = x
        for i, t in enumerate(s.timesteps[1:-1]):
            y = s.step(_model(y, t), t.expand(2).to(torch.bfloat16), y,
                       generator=torch.Generator().manual_seed(i)).prev_sample
        outs.append(y)
    assert_close(outs[1], outs[0])


@pytest.mark.parametrize("t_dtype", [torch.float32, torch.bfloat16])
def test_a_cpu_timestep_selects_its_step(t_dtype):
    """diffusers evaluates its schedule at the timestep's value: a CPU timestep taken twice, or every other one, is
    stepped from that value as diffusers steps it; one that is not on the schedule raises instead of being
    rounded to the nearest step."""
    ref, ff = pair(NAME)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    for pattern in ("twice", "every other"):
        outs = []
        for s in (ref, ff):
            s.set_timesteps(8)
            ts = list(s.timesteps[:-1])
            calls = [t for t in ts for _ in (0, 1)] if pattern == "twice" else ts[::2]
            y = x
            for i, t in enumerate(calls):
                y = s.step(_model(y, t), t.expand(2).to(t_dtype), y,
                           generator=torch.Generator().manual_seed(i)).prev_sample
            outs.append(y)
        assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5 * max(1.0, float(outs[0].abs().max())))
    ff.set_timesteps(8)
    t = ff.timesteps[2] + 0.02
    with pytest.raises(NotImplementedError, match="not one its steps start from"):
        ff.step(_model(x, t), t.expand(2), x)


def test_bfloat16_samples():
    """bfloat16 latents and outputs (Stable Cascade's): diffusers computes in float32 and returns bfloat16; so does
    the kernel, rounding once: the same bits but where float32 round-off of the folded update crosses a rounding
    boundary (a last bit, in under 1 % of the elements)."""
    ref, ff = pair(NAME)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2)).bfloat16()
    xa, xb = (_loop(s, 10, x, torch.bfloat16) for s in (ref, ff))
    assert xa.dtype == xb.dtype == torch.bfloat16
    ulp = 2.0**-7
    assert_close(xb.float(), xa.float(), rtol=ulp, atol=ulp)
    assert float((xb != xa).float().mean()) < 0.01


def test_per_sample_timesteps_that_differ_raise():
    _, ff = pair(NAME)
    ff.set_timesteps(4)
    x = torch.randn(2, 4, 4, 4)
    with pytest.raises(ValueError, match="same timestep"):
        ff.step(x, torch.tensor([1.0, 0.75]), x)


def test_fastflow_noise_has_diffusers_distribution():
    """Without a generator the kernel draws fastflow's noise: each step's, taken back with diffusers as the oracle
    (its step with a known generator gives the noise-free part), is standard normal and the steps independent."""
    ref, ff = pair(NAME)
    for s in (ref, ff):
        s.set_timesteps(5)
    x = torch.randn(64, 1024, generator=torch.Generator().manual_seed(3))
    noises = []
    for i, t in enumerate(ref.timesteps[:-2]):  # (no noise into the last timestep, 0)
        tr = t.expand(x.size(0))
        o = _model(x, t)
        theirs = ref.step(o, tr, x, generator=torch.Generator().manual_seed(i)).prev_sample
        drawn = torch.randn(x.shape, generator=torch.Generator().manual_seed(i))
        a_t, a_p = (float(ref._alpha_cumprod(v.reshape(1), "cpu")) for v in (t, ref.timesteps[i + 1]))
        std = ((1 - a_t / a_p) * (1 - a_p) / (1 - a_t)) ** 0.5
        mine = ff.step(o, tr, x).prev_sample
        noises.append((mine - (theirs - std * drawn)) / std)
    assert_independent_standard_normals(noises)


def test_meta_loop_compile_and_signature():
    """A loop on meta tensors reads no data; a later step traces with fullgraph=True; the API is diffusers'."""
    ref = diffusers.DDPMWuerstchenScheduler()
    ff = ffd.from_scheduler(ref)
    assert type(ff) is ffd.DDPMWuerstchenScheduler
    assert list(inspect.signature(ff.step).parameters) == list(inspect.signature(ref.step).parameters)
    ff.set_timesteps(4)
    x = torch.empty(2, 4, 8, 8, device="meta")
    for t in ff.timesteps[:-1].to("meta"):
        x = ff.step(torch.empty_like(x), t.expand(2).to(torch.bfloat16), x).prev_sample
    assert x.device.type == "meta"
    torch._dynamo.reset()
    ff.set_timesteps(4)
    x = torch.randn(2, 4, 8, 8)
    ts = ff.timesteps
    x = ff.step(_model(x, ts[0]), ts[0].expand(2), x).prev_sample
    step = torch.compile(lambda o, t, y: ff.step(o, t, y).prev_sample, fullgraph=True, backend="eager")
    assert torch.isfinite(step(_model(x, ts[1]), ts[1].expand(2), x)).all()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_gpu_loop_no_sync(backend):
    """Stable Cascade's loop on the GPU under sync debug mode "error" (a bfloat16 timestep, never read), with a
    CUDA generator (diffusers' samples) and with fastflow's noise."""
    ref, ff = pair(NAME, backend=backend)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(4)).cuda()

    def loop(s, generators: bool):
        y = x
        for t in s.timesteps[:-1]:
            kw = dict(generator=torch.Generator("cuda").manual_seed(1)) if generators else {}
            y = s.step(_model(y, 0.5), t.expand(2).to(torch.bfloat16), y, **kw).prev_sample
        return y

    assert_sync_free_gpu_loops(ref, ff, lambda s: s.set_timesteps(6, device="cuda"), loop)
