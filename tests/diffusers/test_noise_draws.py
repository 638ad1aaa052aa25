"""fastflow/diffusers/_noise_draws.py: fastflow's in-kernel noise has the distribution of diffusers' ``torch.randn``;
seeds and counters are made once, and given or drawn noise is used as diffusers uses it.

For one step, the noise component is ``prev_fastflow - prev_diffusers(noise = 0)`` and its
scale is ``prev_diffusers(noise = 1) - prev_diffusers(noise = 0)``; their ratio must be
standard normal, independent across elements, samples and steps.
"""

from __future__ import annotations

import math

import pytest
import torch
from dropin_helpers import pair, stand_in

SHAPE = (2, 4, 64, 64)  # 32768 elements: each statistic is bounded at 4 to 8 of its standard errors

CASES = [
    ("DDIMScheduler", dict(clip_sample=False), dict(eta=1.0), "scheduling_ddim"),
    ("DDPMScheduler", dict(), dict(), "scheduling_ddpm"),
    ("EulerAncestralDiscreteScheduler", dict(), dict(), "scheduling_euler_ancestral_discrete"),
    ("EulerDiscreteScheduler", dict(), dict(s_churn=5.0), "scheduling_euler_discrete"),
    ("FlowMatchEulerDiscreteScheduler", dict(stochastic_sampling=True), dict(), "scheduling_flow_match_euler_discrete"),
    ("LCMScheduler", dict(), dict(), "scheduling_lcm"),
    ("TCDScheduler", dict(), dict(eta=0.5), "scheduling_tcd"),
]


def _ref_step(monkeypatch, ref, module: str, fill: float, o, t, x, kw):
    import diffusers.schedulers as ds

    mod = getattr(ds, module)

    def constant(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.full(shape, fill, device=device, dtype=dtype)

    monkeypatch.setattr(mod, "randn_tensor", constant)
    step_index = getattr(ref, "_step_index", None)
    out = ref.step(o, t, x, **kw).prev_sample
    if step_index is not None or hasattr(ref, "_step_index"):
        ref._step_index = step_index  # replay the same step
    return out


@pytest.mark.parametrize("name,config,kw,module", CASES, ids=[c[0] for c in CASES])
def test_noise_distribution(monkeypatch, name, config, kw, module):
    torch.manual_seed(7)  # the kernel's seed comes from the global generator: fix it, whatever ran before
    ref, ff = pair(name, **config)
    for s in (ref, ff):
        s.set_timesteps(6)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    draws = []
    for i in (1, 3):  # two steps: noise must differ between them
        t = ref.timesteps[i]
        for s in (ref, ff):
            s._step_index = i
        o = stand_in(x, t)
        zero = _ref_step(monkeypatch, ref, module, 0.0, o, t, x, kw)
        one = _ref_step(monkeypatch, ref, module, 1.0, o, t, x, kw)
        scale = one - zero
        assert float(scale.abs().min()) > 1e-3, "this step adds no noise"
        xi = (ff.step(o, t, x, **kw).prev_sample - zero) / scale
        assert abs(float(xi.mean())) < 4 / math.sqrt(xi.numel())
        assert abs(float(xi.std()) - 1.0) < 0.03
        # skewness and kurtosis have standard errors sqrt(15/n) = 0.021 and sqrt(96/n) = 0.054
        assert abs(float((xi**3).mean())) < 0.1 and abs(float((xi**4).mean()) - 3.0) < 0.27
        draws.append(xi)
    a, b = draws
    assert abs(float((a * b).mean())) < 0.05, "steps must draw independent noise"
    assert abs(float((a[0] * a[1]).mean())) < 0.05, "samples of a batch must draw independent noise"


def test_seed_drawn_from_global_generator_lazily():
    """Reproducible under torch.manual_seed, and set_timesteps does not consume the global generator."""
    _, ff = pair("DDPMScheduler")
    x = torch.randn(1, 3, 8, 8)

    def run():
        torch.manual_seed(123)
        ff.set_timesteps(3)
        after_set = torch.randn(1)  # what a pipeline would draw for its latents
        out = ff.step(stand_in(x, ff.timesteps[0]), ff.timesteps[0], x).prev_sample
        return after_set, out

    (a0, a), (b0, b) = run(), run()
    torch.manual_seed(123)
    assert torch.equal(a0, torch.randn(1)) and torch.equal(a0, b0)
    assert torch.equal(a, b)


def test_noise_counters_are_made_once_per_step_count():
    """Off the CPU the kernel reads each step's noise counter from a one-element device view; a later loop with
    as many steps reuses the first loop's views (no view made per step), and a longer loop gets longer counters,
    holding its step indices."""
    _, ff = pair("DDPMScheduler")

    def loop(steps: int) -> dict:
        ff.set_timesteps(steps)
        x = torch.empty(2, 4, 8, 8, device="meta")
        for t in ff.timesteps.to("meta"):
            x = ff.step(torch.empty_like(x), t, x).prev_sample
        return dict(ff._ff_rows[x.device][1])

    first = loop(5)
    assert sorted(first) == [0, 1, 2, 3]  # DDPM's last step draws no noise
    again = loop(5)
    assert all(again[k] is first[k] for k in first)
    other = loop(7)
    assert sorted(other) == list(range(6)) and all(v.shape == (1,) for v in other.values())
    _, cpu = pair("DDPMScheduler")
    cpu.set_timesteps(4)
    assert cpu._ff_row(2, torch.device("cpu")).item() == 2  # the view holds its index


def test_noise_counters_do_not_grow_with_the_step_counts_seen():
    """A server runs loops of many lengths on one scheduler: the noise counter views are shared by every length (a
    view holds its index whatever the schedule's length), so they number the longest loop's steps, not a set per
    length (which grew quadratically with the lengths seen)."""
    _, ff = pair("DDPMScheduler")
    meta = torch.device("meta")

    def loop(steps: int) -> None:
        ff.set_timesteps(steps)
        x = torch.empty(1, 2, 2, 2, device="meta")
        for t in ff.timesteps.to("meta"):
            x = ff.step(torch.empty_like(x), t, x).prev_sample

    def kept_tensors(value) -> int:
        if isinstance(value, torch.Tensor):
            return 1
        items = value.values() if isinstance(value, dict) else value if isinstance(value, (tuple, list)) else ()
        return sum(kept_tensors(v) for v in items)

    loop(12)
    view = ff._ff_row(3, meta)
    for steps in range(2, 13):
        loop(steps)
        assert ff._ff_row(3, meta) is view  # a shorter loop reuses the longest one's views
    assert kept_tensors(ff.__dict__["_ff_rows"]) <= 12 + 1  # the views and their counter (a set per length before)
    assert ff._ff_row(7, meta).shape == (1,)


STOCHASTIC = [
    *((name, config, kw) for name, config, kw, _ in CASES),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++"), dict()),
]


@pytest.mark.parametrize("name,config,kw", STOCHASTIC, ids=[c[0] for c in STOCHASTIC])
def test_diffusers_noise_without_a_generator_is_diffusers_draw(name, config, kw):
    """With ``diffusers_noise``, a step given no generator draws from torch's global generator exactly as diffusers
    does, so a loop seeded with torch.manual_seed matches diffusers' (FLUX.1 and SD3 pipelines pass no generator);
    without it, the drop-in's own noise gives other numbers from the same seed."""
    from dropin_helpers import run_loop

    import fastflow.diffusers as ffd

    ref, ff = pair(name, **config)
    ff = ffd.from_scheduler(ff, diffusers_noise=True)
    loops = []
    for scheduler in (ref, ff, pair(name, **config)[1]):
        torch.manual_seed(11)
        loops.append(run_loop(scheduler, 6, step_kwargs=kw)[0])
        loops[-1] = (loops[-1], torch.randn(3))  # and the global generator is left where diffusers leaves it
    (x_ref, after_ref), (x_ff, after_ff), (x_own, _) = loops
    torch.testing.assert_close(x_ff, x_ref, rtol=1e-4, atol=1e-4)  # float32 round-off of the SDE solver's loop
    assert torch.equal(after_ff, after_ref)
    assert (x_own - x_ref).abs().max() > 0.1


@pytest.mark.parametrize("shape", [(1, 4, 8, 8), (4, 8, 8), (2, 4, 1, 1), (2, 4, 8, 8)])
def test_variance_noise_broadcasts_as_diffusers_adds_it(shape):
    """A ``variance_noise`` that broadcasts to the sample (one noise for the whole batch) steps as diffusers'."""
    ref, ff = pair("DDIMScheduler", clip_sample=False)
    for s in (ref, ff):
        s.set_timesteps(4)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    want, got = (s.step(0.9 * x, s.timesteps[1], x, eta=1.0, variance_noise=noise).prev_sample for s in (ref, ff))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_variance_noise_that_does_not_broadcast_is_refused():
    """Noise with the sample's element count in another shape is refused (it was silently reshaped)."""
    _, ff = pair("DDIMScheduler", clip_sample=False)
    ff.set_timesteps(4)
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match=r"noise has shape \(2, 256\), which does not broadcast"):
        ff.step(0.9 * x, ff.timesteps[1], x, eta=1.0, variance_noise=torch.randn(2, 256))


GENERATOR_DRAWS = ["DDPMScheduler", "EulerAncestralDiscreteScheduler", "LCMScheduler", "TCDScheduler",
                   "SASolverScheduler", "SCMScheduler", "UnCLIPScheduler", "CMStochasticIterativeScheduler"]


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", GENERATOR_DRAWS)
def test_model_output_of_another_shape_with_a_generator_names_the_model_output(name):
    """diffusers draws a generator's noise in the model output's shape: a model output that would broadcast (batch
    1 on a batch-2 sample) is refused as it is without a generator, naming the model output, not the noise."""
    _, ff = pair(name)
    ff.set_timesteps(2)
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match=r"model output has shape \(1, 4, 8, 8\), state has \(2, 4, 8, 8\)"):
        ff.step(torch.randn(1, 4, 8, 8), ff.timesteps[0], x, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ["DDPMScheduler", "EulerAncestralDiscreteScheduler"])
def test_each_set_timesteps_draws_a_new_seed(name):
    """A new schedule seeds fastflow's noise afresh from the global generator: after another torch.manual_seed the
    next loop's noise differs (per-batch seed tensors of the last schedule are not reused), after the same one it
    repeats."""
    _, ff = pair(name)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))

    def loop(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        ff.set_timesteps(4)
        z = x * getattr(ff, "init_noise_sigma", 1.0)
        for t in ff.timesteps:
            z = ff.step(stand_in(z, t), t, z).prev_sample
        return z

    first = loop(0)
    other = loop(1)
    again = loop(0)
    assert not torch.equal(first, other)
    assert torch.equal(first, again)


@pytest.mark.parametrize("timestep", ["element", "number"])
def test_a_step_taken_again_draws_fresh_noise(timestep):
    """DDPM steps from the timestep's value: a step taken again (its timestep passed a second time) draws new
    in-kernel noise, as diffusers' draws a new tensor, not the noise it drew the first time."""
    _, ff = pair("DDPMScheduler")
    torch.manual_seed(0)
    ff.set_timesteps(6)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for i in range(3):
        x = ff.step(stand_in(x, ff.timesteps[i]), ff.timesteps[i], x).prev_sample
    t = ff.timesteps[2] if timestep == "element" else int(ff.timesteps[2])
    o = stand_in(x, t)
    again, twice = ff.step(o, t, x).prev_sample, ff.step(o, t, x).prev_sample
    assert ff.step_index == 3
    assert not torch.equal(again, twice)
