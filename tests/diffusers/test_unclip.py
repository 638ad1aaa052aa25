"""UnCLIPScheduler drop-in (Kandinsky 2.x priors): parity with diffusers for every ``prev_timestep`` convention, both
variances, clipping; a device ``prev_timestep`` located without a read; fastflow's noise. (Its meta-device, compile
and CUDA sync-debug loops are in test_dropin_api.py.)"""

from __future__ import annotations

import itertools

import pytest
import torch
from dropin_helpers import assert_close, assert_independent_standard_normals, pair

import fastflow.diffusers as ffd
import fastflow.diffusers._locate as dropin_locate
import fastflow.diffusers.unclip as unclip_module

diffusers = pytest.importorskip("diffusers")
NAME = "UnCLIPScheduler"
SHAPE = (2, 16)  # a prior's image embedding


def _model(x: torch.Tensor, t, learned: bool) -> torch.Tensor:
    out = 0.3 * x + 0.2 * torch.sin(x) + float(t) / 2000
    return torch.cat([out, torch.tanh(x)], dim=1) if learned else out


def _prev(mode: str, ts: torch.Tensor, i: int):
    """What a caller passes as prev_timestep: Kandinsky's prior (the next timestep, None at the last step), always
    None, or a timestep of its own (here ``t - 7``, outside the schedule)."""
    if mode == "pipeline":
        return None if i + 1 == len(ts) else ts[i + 1]
    if mode == "none":
        return None
    return max(int(ts[i]) - 7, -1)


def _loop(s, steps: int, mode: str, learned: bool, generators: bool = True):
    s.set_timesteps(steps)
    ts = s.timesteps
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    preds = []
    for i, t in enumerate(ts):
        kw = dict(generator=torch.Generator().manual_seed(i)) if generators else {}
        out = s.step(_model(x, t, learned), t, x, prev_timestep=_prev(mode, ts, i), **kw)
        x = out.prev_sample
        preds.append(out.pred_original_sample)
    return x, preds


GRID = list(itertools.product(("epsilon", "sample"), (True, False), ("fixed_small_log", "learned_range"), (2, 5, 25),
                              ("pipeline", "none", "custom")))


@pytest.mark.parametrize(("prediction", "clip", "variance", "steps", "mode"), GRID,
                         ids=["-".join(str(v) for v in case) for case in GRID])
def test_loops_match_diffusers(prediction, clip, variance, steps, mode):
    """Both prediction types, clipping, both variances, 2 to 25 steps, and every way a caller names the timestep it
    steps to: each step's sample and x0 are diffusers', its noise drawn from the same generators."""
    ref, ff = pair(NAME, prediction_type=prediction, clip_sample=clip, clip_sample_range=5.0, variance_type=variance)
    learned = variance == "learned_range"
    (xa, pa), (xb, pb) = (_loop(s, steps, mode, learned) for s in (ref, ff))
    assert torch.isfinite(xa).all()
    assert_close(xb, xa, rtol=1e-5, atol=1e-5 * max(1.0, float(xa.abs().max())))
    for a, b in zip(pa, pb, strict=True):
        assert_close(b, a, rtol=1e-5, atol=1e-5 * max(1.0, float(a.abs().max())))


def test_a_device_prev_timestep_is_located_not_read(monkeypatch):
    """Tensors treated as unreadable (as device tensors are: reading one syncs): the pipeline's ``timesteps[i + 1]``
    is found by its offset in the scheduler's timesteps and the loop is diffusers'; a tensor that is not one of
    them raises instead of being read."""
    ref, ff = pair(NAME)
    xa, _ = _loop(ref, 6, "pipeline", learned=False)
    unreadable = lambda value: None if isinstance(value, torch.Tensor) else float(value)  # noqa: E731
    monkeypatch.setattr(dropin_locate, "host_number", unreadable)
    monkeypatch.setattr(unclip_module, "host_number", unreadable)
    xb, _ = _loop(ff, 6, "pipeline", learned=False)
    assert_close(xb, xa)
    ff.set_timesteps(6)
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="prev_timestep"):
        ff.step(_model(x, 999, False), ff.timesteps[0], x, prev_timestep=ff.timesteps[1].clone())


def test_learned_range_needs_the_variance_half():
    ff = ffd.UnCLIPScheduler(variance_type="learned_range")
    ff.set_timesteps(4)
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="twice the sample's channels"):
        ff.step(_model(x, 999, False), ff.timesteps[0], x)


@pytest.mark.parametrize("variance", ["fixed_small_log", "learned_range"])
def test_fastflow_noise_has_diffusers_distribution(variance):
    """Without a generator the kernel draws fastflow's noise: each step's, taken back with diffusers as the oracle
    (its step with a known generator gives the noise-free part), is standard normal and the steps independent."""
    ref, ff = pair(NAME, variance_type=variance, clip_sample=False)
    learned = variance == "learned_range"
    for s in (ref, ff):
        s.set_timesteps(5)
    x = torch.randn(64, 1024, generator=torch.Generator().manual_seed(1))
    noises = []
    for i, t in enumerate(ref.timesteps[:-1]):
        prev = ref.timesteps[i + 1]
        o = _model(x, t, learned)
        g = torch.Generator().manual_seed(50 + i)
        theirs = ref.step(o, t, x, prev_timestep=prev, generator=g).prev_sample
        drawn = torch.randn(x.shape, generator=torch.Generator().manual_seed(50 + i))
        std = ref._get_variance(int(t), prev_timestep=int(prev), predicted_variance=torch.tanh(x) if learned else None)
        std = (0.5 * std).exp() if learned else std
        mine = ff.step(o, t, x, prev_timestep=prev).prev_sample
        noises.append((mine - (theirs - std * drawn)) / std)
    assert_independent_standard_normals(noises)
