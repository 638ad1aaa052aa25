"""TCDScheduler drop-in: parity with diffusers (noise from the same generator), every gamma, sync-free."""

from __future__ import annotations

import pytest
import torch
from dropin_helpers import assert_bfloat16_parity, assert_close, meta_loop, pair, run_loop, stand_in

import fastflow.diffusers as ffd
from fastflow.diffusers.tcd import TCDScheduler, tcd_intermediate_timestep

diffusers = pytest.importorskip("diffusers")


def _loops(config: dict, set_kwargs: dict, eta: float | None, seed: int = 3):
    """Both loops, each drawing from its own generator seeded alike (so the same noise)."""
    ref, ff = pair("TCDScheduler", **config)
    out = []
    for s in (ref, ff):
        g = torch.Generator().manual_seed(seed)
        kw = dict(generator=g) if eta is None else dict(generator=g, eta=eta)
        out.append(run_loop(s, None, set_kwargs=set_kwargs, step_kwargs=lambda i, kw=kw: kw))
    return out


@pytest.mark.parametrize("eta", [None, 0.0, 0.5, 1.0], ids=["default-0.3", "0", "0.5", "1"])
@pytest.mark.parametrize(
    "config,set_kwargs",
    [
        (dict(), dict(num_inference_steps=4)),
        (dict(prediction_type="v_prediction", timestep_spacing="trailing"), dict(num_inference_steps=6)),
        (dict(prediction_type="sample", set_alpha_to_one=False),
         dict(num_inference_steps=8, original_inference_steps=40)),
        (dict(beta_schedule="linear", timestep_spacing="linspace"), dict(num_inference_steps=5)),
        (dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"),
         dict(num_inference_steps=4)),
        (dict(), dict(timesteps=[999, 759, 499, 259])),
        (dict(), dict(num_inference_steps=4, strength=0.5)),
        (dict(), dict(timesteps=[999, 759, 499, 259, 119], strength=0.6)),
    ],
    ids=["default", "v-trailing", "sample-orig40", "linear-linspace", "zero-snr", "custom", "strength",
         "custom-strength"],
)
def test_loops_match_diffusers(config, set_kwargs, eta):
    """Prediction types, spacings, zero-SNR betas, custom timesteps, img2img strength, gamma from 0 (deterministic)
    to 1: the same samples and ``pred_noised_sample`` at every step."""
    (xa, oa), (xb, ob) = _loops(config, set_kwargs, eta)
    assert_close(xb, xa)
    assert len(oa) == len(ob)
    for a, b in zip(oa, ob, strict=True):
        assert_close(b.pred_noised_sample, a.pred_noised_sample)


def test_clip_and_thresholding_are_ignored_as_in_diffusers():
    """diffusers' TCD step applies neither ``clip_sample`` nor ``thresholding``: with them set (a range of 0.5,
    which the stand-in's x0 leaves), both loops agree, and diffusers' equals its loop without them."""
    config = dict(clip_sample=True, clip_sample_range=0.5, thresholding=True, sample_max_value=1.0)
    (xa, _), (xb, _) = _loops(config, dict(num_inference_steps=4), 0.3)
    (xc, _), _ = _loops({}, dict(num_inference_steps=4), 0.3)
    assert_close(xb, xa)
    assert torch.equal(xa, xc)


def test_intermediate_timestep_rounds_as_diffusers():
    """``floor((1 - gamma) t_prev)`` in float32, as diffusers' tensor arithmetic gives it."""
    for gamma in (0.0, 0.1, 0.3, 0.7, 0.9, 1.0):
        for t_prev in (0, 1, 19, 259, 499, 759, 999):
            expected = int(torch.floor((1 - gamma) * torch.tensor(t_prev)).to(torch.long))
            assert tcd_intermediate_timestep(gamma, t_prev) == expected, (gamma, t_prev)


def test_eta_out_of_range_raises():
    ff = TCDScheduler()
    ff.set_timesteps(4)
    x = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match="eta"):
        ff.step(x, ff.timesteps[0], x, eta=1.5)


def test_api_surface():
    ref, ff = pair("TCDScheduler")
    for s in (ref, ff):
        s.set_timesteps(4)
    torch.testing.assert_close(ff.timesteps, ref.timesteps, rtol=0, atol=0)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = ff.step(stand_in(x, ff.timesteps[0]), ff.timesteps[0], x, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 2 and ff.step_index == 1
    out = ff.step(stand_in(x, ff.timesteps[1]), ff.timesteps[1], x)
    assert type(out).__name__ == "TCDSchedulerOutput" and out.pred_noised_sample.shape == x.shape
    assert type(ffd.from_scheduler(ref)) is TCDScheduler


def test_meta_device_step():
    ff = TCDScheduler()
    ff.backend = "torch"
    x, out = meta_loop(ff, 4)
    assert x.device.type == "meta" and out.pred_noised_sample.device.type == "meta"


def test_bfloat16_sample():
    """A bfloat16 loop at gamma 0 returns bfloat16 and agrees to a few bfloat16 ulps."""
    ref, ff = pair("TCDScheduler")
    for s in (ref, ff):
        s.step = _with_eta(s.step, 0.0)
    assert_bfloat16_parity(ref, ff)


def _with_eta(step, eta: float):
    def stepped(*args, **kwargs):
        return step(*args, eta=eta, **kwargs)

    return stepped


@pytest.mark.parametrize("set_kwargs", [dict(num_inference_steps=4), dict(num_inference_steps=4, strength=0.5)],
                         ids=["full", "strength"])
def test_generator_is_left_as_diffusers_leaves_it(set_kwargs):
    """diffusers draws no noise on the last step (it returns the prediction there), and a pipeline that draws from
    the same generator after the loop must get the same numbers: each step's noise weight there is 0, so only the
    generator's state shows a draw too many or too few."""
    ref, ff = pair("TCDScheduler")
    states = []
    for s in (ref, ff):
        g = torch.Generator().manual_seed(3)
        run_loop(s, None, set_kwargs=set_kwargs, step_kwargs=lambda i, g=g: dict(generator=g, eta=0.5))
        states.append(g.get_state())
    assert torch.equal(states[1], states[0])
