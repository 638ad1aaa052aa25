"""DPMSolverMultistepInverseScheduler drop-in (DPM-Solver inversion): parity with diffusers over whole loops and its
options, the steps diffusers leaves undefined, 16-bit states, DiffEdit's inversion with a real UNet. (Its meta-device,
compile and CUDA sync-debug loops are in test_dropin_api.py.)"""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
from dropin_helpers import SD, assert_close, assert_half_loop_bounded, posterior_loops, run_loop
from dropin_helpers import pair as dropin_pair

from fastflow.diffusers.dpmsolver import dpm_orders

diffusers = pytest.importorskip("diffusers")
NAME = "DPMSolverMultistepInverseScheduler"
pair = functools.partial(dropin_pair, NAME)

# diffusers' inverse sigmas rise from the data end (default, Karras, exponential, beta: these three end on a
# zero-length step at sigma_max) or, for flow sigmas, fall.
SIGMAS = {
    "vp": {},
    "karras": dict(use_karras_sigmas=True),
    "exponential": dict(use_exponential_sigmas=True),
    "beta": dict(use_beta_sigmas=True),
    "flow": dict(use_flow_sigmas=True, flow_shift=3.0),
}
_PAIRS = [("midpoint", "epsilon"), ("heun", "v_prediction"), ("midpoint", "sample"), ("heun", "epsilon"),
          ("midpoint", "v_prediction"), ("heun", "sample")]


def _zero_length_last_step(cfg: dict, steps: int) -> bool:
    """A schedule ending on its last sigma twice (all but the default): diffusers divides 0 by 0 on that step unless
    it is first order or 2M-midpoint (see test_dpmsolver.py)."""
    if not any(cfg.get(k) for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                                    "use_flow_sigmas")):
        return False
    order = dpm_orders(steps, 0, cfg["solver_order"], cfg["lower_order_final"], False, False)[-1]
    return order == 3 or (order == 2 and cfg["solver_type"] == "heun")


def _grid():
    out = []
    cases = itertools.product(("dpmsolver++", "dpmsolver"), (1, 2, 3), SIGMAS, (6, 16))
    for c, (alg, order, sigmas, steps) in enumerate(cases):
        solver_type, prediction = _PAIRS[c % len(_PAIRS)]
        if sigmas == "flow" and alg == "dpmsolver++" and c % 2:
            prediction = "flow_prediction"
        thresholding = c % 3 == 0 and not (alg == "dpmsolver" and order == 3)  # (needs four stored tensors)
        cfg = dict(SD, algorithm_type=alg, solver_order=order, solver_type=solver_type, prediction_type=prediction,
                   lower_order_final=bool(c % 4), thresholding=thresholding, sample_max_value=1.2, **SIGMAS[sigmas])
        out.append((cfg, steps, _zero_length_last_step(cfg, steps)))
    return out


GRID = _grid()


def _id(case):
    cfg, steps, _ = case
    sig = next((k for k, v in SIGMAS.items() if v and all(cfg.get(o) == x for o, x in v.items())), "vp")
    return (f"{cfg['algorithm_type']}{cfg['solver_order']}-{cfg['solver_type'][:3]}-{cfg['prediction_type'][:4]}-"
            f"{sig}-lof{int(cfg['lower_order_final'])}-thr{int(cfg['thresholding'])}-n{steps}")


@pytest.mark.parametrize("case", [c for c in GRID if not c[2]], ids=_id)
def test_grid_parity(case):
    """Both ODE algorithms, orders 1-3, both solver types, every prediction type, the five sigma families,
    lower_order_final, thresholding, below and above 15 steps: whole loops agree with diffusers' to 1e-5 of the
    sample's scale. With flow sigmas, ``dpmsolver`` takes its noise prediction straight from the output, and
    diffusers' float32 ``1 / alpha`` near sigma 1 puts its loop up to ~8e-5 from the drop-in's (whose float64 loop
    is as far from diffusers' float64 one: the forward scheduler's test_noise_prediction_on_flow_sigmas_converts_as_
    diffusers measures the same), so 2e-4 there."""
    cfg, steps, _ = case
    ref, ff = pair(**cfg)
    xa, xb = posterior_loops(ref, ff, steps)
    assert torch.isfinite(xa).all()
    tol = 2e-4 if cfg.get("use_flow_sigmas") and cfg["algorithm_type"] == "dpmsolver" else 1e-5
    scale = max(1.0, float(xa.abs().max()))
    assert_close(xb, xa, rtol=tol, atol=tol * scale)
    assert xb.dtype == xa.dtype


@pytest.mark.parametrize("case", [c for c in GRID if c[2]], ids=_id)
def test_zero_length_last_step_raises(case):
    """Where diffusers divides 0 by 0 on the zero-length last step (NaN), the drop-in raises, saying why."""
    cfg, steps, _ = case
    ref, ff = pair(**cfg)
    xa, _ = run_loop(ref, steps)
    assert torch.isnan(xa).any()
    with pytest.raises(ValueError, match="zero length.*end on their last sigma twice.*euler_at_final"):
        run_loop(ff, steps)


def _gen(seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    return lambda i: dict(generator=g)


@pytest.mark.parametrize("algorithm", ["sde-dpmsolver++", "sde-dpmsolver"])
@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("steps", [6, 16])
def test_sde_on_falling_sigmas_matches_with_a_generator(algorithm, order, steps):
    """Flow sigmas fall, where the SDE algorithms are defined: with a generator, diffusers' draws and numbers
    (``sde-dpmsolver``'s float32 coefficients put diffusers' loop ~1e-4 from its float64 result, see
    test_dpmsolver.py's grid, so 2e-4 there)."""
    cfg = dict(SD, algorithm_type=algorithm, solver_order=order, prediction_type="v_prediction", **SIGMAS["flow"])
    ref, ff = pair(**cfg)
    xa, xb = posterior_loops(ref, ff, steps, _gen)
    assert torch.isfinite(xa).all()
    tol = 2e-4 if algorithm == "sde-dpmsolver" else 1e-5
    assert_close(xb, xa, rtol=tol, atol=tol)


def test_sde_given_variance_noise_is_used_as_given():
    """``variance_noise`` enters as given: the same noise in both gives the same loop."""
    cfg = dict(SD, algorithm_type="sde-dpmsolver++", prediction_type="v_prediction", **SIGMAS["flow"])
    ref, ff = pair(**cfg)
    noises = [torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    xa, xb = posterior_loops(ref, ff, 8, lambda: (lambda i: dict(variance_noise=noises[i])))
    assert_close(xb, xa)


@pytest.mark.parametrize("algorithm", ["sde-dpmsolver++", "sde-dpmsolver"])
def test_sde_on_rising_sigmas_raises(algorithm):
    """On the default (rising) sigmas an SDE step's noise scale is the square root of a negative number: diffusers
    returns NaN, the drop-in raises, naming the ODE algorithm to use."""
    ref, ff = pair(**SD, algorithm_type=algorithm)
    xa, _ = run_loop(ref, 5, step_kwargs=_gen())
    assert torch.isnan(xa).all()
    with pytest.raises(ValueError, match="must lower the noise level.*dpmsolver\\+\\+"):
        run_loop(ff, 5)


def test_third_order_sde_step_raises():
    """diffusers' inverse scheduler passes no noise to its third-order step, which fails for ``sde-dpmsolver++``;
    the drop-in raises a ValueError at that step instead (a loop whose orders stay below 3 runs)."""
    cfg = dict(SD, algorithm_type="sde-dpmsolver++", solver_order=3, prediction_type="v_prediction",
               **SIGMAS["flow"])
    ref, ff = pair(**cfg)
    with pytest.raises(AssertionError):
        run_loop(ref, 6, step_kwargs=_gen())  # orders 1, 2, 3, 3, 2, 1
    with pytest.raises(ValueError, match="order 3.*use solver_order=2"):
        run_loop(ff, 6)
    xa, xb = posterior_loops(ref, ff, 3, _gen)  # orders 1, 2, 1: no third-order step
    assert_close(xb, xa)


def test_repeated_timesteps_keep_every_sigma():
    """More steps than distinct training timesteps: diffusers drops the repeated timesteps but keeps every sigma, so
    step ``i`` still goes from sigma ``i`` to ``i + 1`` (some of them repeated: zero-length steps, which first order
    leaves as they are) and the loop is shorter than the sigmas; the drop-in follows (its step count and order
    rules are the timesteps'). Higher orders divide by those zero lengths: diffusers returns NaN, the drop-in
    raises."""
    ref, ff = pair(**SD, num_train_timesteps=40, solver_order=1)
    xa, xb = posterior_loops(ref, ff, 60)
    assert len(ref.timesteps) < len(ref.sigmas) - 1
    assert torch.isfinite(xa).all()
    assert_close(xb, xa)
    ref, ff = pair(**SD, num_train_timesteps=40, solver_order=2)
    xa, _ = run_loop(ref, 60)
    assert torch.isnan(xa).any()
    with pytest.raises(ValueError, match="zero-length step"):
        run_loop(ff, 60)


def test_learned_variance_keeps_the_noise_channels():
    """A learned-variance model's output (6 channels): diffusers converts its first three; so does the drop-in."""
    ref, ff = pair(**SD, variance_type="learned_range")
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = lambda x, t: torch.cat([0.3 * x + float(t) / 2000.0, torch.ones_like(x)], dim=1)  # noqa: E731
    xa, _ = run_loop(ref, 6, model=out, x=x)
    xb, _ = run_loop(ff, 6, model=out, x=x)
    assert_close(xb, xa)


def test_a_16_bit_model_output_returns_the_promoted_dtype():
    """diffusers does not upcast: a float32 sample with a bfloat16 output computes (and returns) float32, as the
    drop-in does; the two loops agree to the output's rounding of its products (diffusers rounds ``sigma * o`` to
    bfloat16)."""
    ref, ff = pair(**SD)
    model = lambda x, t: (0.3 * x + float(t) / 2000.0).to(torch.bfloat16)  # noqa: E731
    xa, _ = run_loop(ref, 8, model=model)
    xb, _ = run_loop(ff, 8, model=model)
    assert xa.dtype == xb.dtype == torch.float32
    assert_close(xb, xa, rtol=1e-2, atol=1e-2 * float(xa.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_states(dtype):
    """A 16-bit sample and output: diffusers computes in 16 bits, the drop-in in float32 rounded once; both stay
    within the dtype's round-off of the float32 loop, the drop-in no further than diffusers."""
    ref, ff = pair(**SD)
    assert_half_loop_bounded(ref, ff, dtype, steps=8)


def test_diffedit_inversion_matches():
    """DiffEdit's ``invert`` (guided, a prefix of the schedule, every step's latents kept) with a tiny random UNet
    and VAE: the drop-in's latents are diffusers'."""
    pytest.importorskip("transformers", reason="the DiffEdit pipeline needs transformers")
    from tiny_models import tiny_cond_unet, tiny_vae

    vae, unet = tiny_vae(), tiny_cond_unet()
    embeds = [torch.randn(1, 5, 12, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    image = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(3))

    def invert(inverse_scheduler):
        pipe = diffusers.StableDiffusionDiffEditPipeline(
            vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=diffusers.DDIMScheduler(**SD),
            safety_checker=None, feature_extractor=None, inverse_scheduler=inverse_scheduler,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            return pipe.invert(
                image=image, prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], num_inference_steps=8,
                inpaint_strength=0.7, guidance_scale=5.0, generator=torch.Generator().manual_seed(0),
                decode_latents=False, output_type="pt",
            ).latents

    import fastflow.diffusers as ffd

    ref = diffusers.DPMSolverMultistepInverseScheduler(**SD)
    a, b = invert(ref), invert(ffd.from_scheduler(ref))
    assert a.shape[1] == 5  # five of the eight steps
    assert_close(b, a, rtol=1e-5, atol=1e-5 * float(a.abs().max()))
