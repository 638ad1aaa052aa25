"""DDIMInverseScheduler drop-in (DDIM inversion): parity with diffusers over whole loops and every option, the step
diffusers leaves undefined, a real UNet's loop. (Its meta-device, compile and CUDA sync-debug loops are in
test_dropin_api.py.)"""

from __future__ import annotations

import itertools

import pytest
import torch
from dropin_helpers import SD, assert_close, assert_half_loop_bounded, assert_unet_loops_match, pair, run_loop

diffusers = pytest.importorskip("diffusers")
NAME = "DDIMInverseScheduler"


def _grid():
    out = []
    for pred, clip, one, spacing, zero_snr, steps in itertools.product(
        ("epsilon", "v_prediction", "sample"), (False, True), (True, False), ("leading", "trailing"), (False, True),
        (1, 5, 50),
    ):
        if zero_snr and pred == "epsilon":  # epsilon has no x0 at zero SNR (see test_ddim.py)
            continue
        if pred == "sample" and one:  # its first step is undefined: test_sample_prediction_at_alpha_one_raises
            continue
        cfg = dict(SD, prediction_type=pred, clip_sample=clip, set_alpha_to_one=one, timestep_spacing=spacing,
                   rescale_betas_zero_snr=zero_snr, steps_offset=1 if spacing == "leading" else 0)
        out.append((cfg, steps))
    return out


def _ids(case):
    cfg, steps = case
    return "-".join(f"{k}={v}" for k, v in cfg.items() if k not in SD) + f"-n{steps}"


def _inversion_model(x: torch.Tensor, t) -> torch.Tensor:
    """A stand-in of the sample and the timestep."""
    return 0.3 * x + 0.2 * torch.sin(x) + float(t) / 2000.0


@pytest.mark.parametrize("case", _grid(), ids=_ids)
def test_grid_parity(case):
    """Every prediction type, clipping, set_alpha_to_one, both spacings with their offsets, zero-terminal-SNR
    rescaling, 1 to 50 steps: every step's sample and x0 are diffusers' (relative to the sample's scale: inversion
    grows it toward the noise level)."""
    cfg, steps = case
    ref, ff = pair(NAME, **cfg)
    (xa, oa), (xb, ob) = (run_loop(s, steps, model=_inversion_model) for s in (ref, ff))
    assert torch.isfinite(xa).all()
    scale = max(1.0, float(xa.abs().max()))
    assert_close(xb, xa, rtol=1e-5, atol=1e-5 * scale)
    for a, b in zip(oa, ob, strict=True):
        assert b.pred_original_sample.dtype == a.pred_original_sample.dtype
        assert_close(b.pred_original_sample, a.pred_original_sample, rtol=1e-5,
                     atol=1e-5 * max(1.0, float(a.pred_original_sample.abs().max())))


def test_sample_prediction_at_alpha_one_raises():
    """``prediction_type='sample'`` with ``set_alpha_to_one``: the first step's level is alpha = 1, where diffusers'
    noise estimate divides by zero (its loop is not finite); the drop-in's first step raises, saying why."""
    ref, ff = pair(NAME, prediction_type="sample", set_alpha_to_one=True)
    xa, _ = run_loop(ref, 5, model=_inversion_model)
    assert not torch.isfinite(xa).all()
    with pytest.raises(ValueError, match="alphas_cumprod = 1"):
        run_loop(ff, 5, model=_inversion_model)


def test_first_step_at_alpha_one_uses_the_raw_output():
    """At alpha = 1 (set_alpha_to_one, the first step) x0 is the sample and the noise estimate is the model output
    itself: it is read from the output, not derived from the sample and x0 (which would divide by zero)."""
    ref, ff = pair(NAME, **SD, set_alpha_to_one=True, clip_sample=False)
    for s in (ref, ff):
        s.set_timesteps(4)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    o = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = ref.timesteps[0]
    a, b = ref.step(o, t, x), ff.step(o, t, x)
    assert_close(b.prev_sample, a.prev_sample)
    assert torch.equal(b.pred_original_sample, x)


def test_unet_loop_matches_diffusers():
    assert_unet_loops_match(diffusers.DDIMInverseScheduler(**SD), 6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_half_precision_loops(dtype, pred):
    """diffusers steps 16-bit samples in 16 bits; the kernel in float32, rounding once (see the helper)."""
    ref, ff = pair(NAME, **SD, prediction_type=pred, clip_sample=False)
    assert_half_loop_bounded(ref, ff, dtype)
