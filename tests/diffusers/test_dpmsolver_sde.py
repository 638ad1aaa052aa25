"""DPMSolverSDEScheduler drop-in: parity with diffusers given diffusers' Brownian-tree noise, the joint
distribution of fastflow's own noise across a step's two calls, samples modified between the calls, loops that
start part-way. (Its meta-device, compile and CUDA sync-debug loops are in test_dropin_api.py.)"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from dropin_helpers import (
    SD,
    assert_close,
    assert_loops_match,
    assert_standard_normal,
    correlation,
    meta_loop,
    pair,
    run_loop,
    stand_in,
    start_noise,
)
from posterior_model import posterior_model

import fastflow.diffusers as ffd

pytest.importorskip("torchsde", reason="diffusers' DPMSolverSDEScheduler needs torchsde")
diffusers = pytest.importorskip("diffusers")
NAME = "DPMSolverSDEScheduler"

pytestmark = pytest.mark.filterwarnings("ignore:Should have:UserWarning")  # torchsde, on diffusers' own sigmas


def sde_pair(backend: str = "torch", diffusers_noise: bool = True, **config):
    ref, ff = pair(NAME, backend=backend, **config)
    ff.diffusers_noise = diffusers_noise
    return ref, ff


def _grid():
    sigmas = [{}, dict(use_karras_sigmas=True), dict(use_exponential_sigmas=True), dict(use_beta_sigmas=True)]
    spacing = [{}, dict(timestep_spacing="leading", steps_offset=1), dict(timestep_spacing="trailing")]
    out = []
    for c, (pred, sig, steps) in enumerate(itertools.product(["epsilon", "v_prediction"], sigmas, [1, 2, 5, 12])):
        cfg = dict(SD if c % 3 else {}, **spacing[c % 3], **sig, prediction_type=pred, noise_sampler_seed=c)
        out.append((cfg, steps, (1.0, 0.5, 0.0)[c % 3]))
    return out


@pytest.mark.parametrize("case", _grid(), ids=lambda c: "-".join(
    f"{k}={v}" for k, v in c[0].items() if k not in ("beta_start", "beta_end")) + f"-n{c[1]}-s{c[2]}")
def test_grid_parity_with_diffusers_noise(case):
    """Both prediction types, every sigma family, spacings, betas, 1 to 12 steps, s_noise 1, 0.5 and 0: with
    ``diffusers_noise`` every call's sample and x0 are diffusers' (its Brownian tree draws the noise)."""
    cfg, steps, s_noise = case
    ref, ff = sde_pair(**cfg)
    (xa, oa), _ = assert_loops_match(ref, ff, model=posterior_model(ref), steps=steps,
                                     step_kwargs=dict(s_noise=s_noise))
    assert len(oa) == 2 * steps - 1 and torch.isfinite(xa).all()


@pytest.mark.parametrize("backend", ["torch", "cuda"])
def test_unseeded_diffusers_noise_draws_the_seed_as_diffusers(backend):
    """``noise_sampler_seed=None``: diffusers draws the tree's seed from torch's global generator at the first
    call; so does the drop-in with ``diffusers_noise``, so seeding torch gives diffusers' samples."""
    if _unavailable(backend):
        pytest.skip("the extension is not built")
    ref, ff = sde_pair(backend, **SD, use_karras_sigmas=True)
    outs = []
    for s in (ref, ff):
        torch.manual_seed(123)
        outs.append(run_loop(s, 6, model=posterior_model(ref))[0])
    assert_close(outs[1], outs[0])


def _unavailable(name: str) -> bool:
    from fastflow.backends import get_backend

    backend = get_backend(name)
    return backend.availability() is not None or backend.supports(torch.device("cpu")) is not None


def _float64_loop(s, steps: int, model) -> torch.Tensor:
    s.set_timesteps(steps)
    x = start_noise().double() * float(s.init_noise_sigma)
    for t in s.timesteps:
        x = s.step(model(s.scale_model_input(x, t), t), t, x).prev_sample
    return x


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_float64_loops_equal_diffusers(pred):
    """Float64 samples (diffusers' scalars stay float32 0-d tensors, its tree draws float64 noise): the drop-in's
    loop equals diffusers' to 1e-9, so every coefficient is evaluated as diffusers evaluates it."""
    ref, ff = sde_pair(**SD, use_karras_sigmas=True, prediction_type=pred, noise_sampler_seed=4)
    model = posterior_model(ref)
    xa, xb = _float64_loop(ref, 8, model), _float64_loop(ff, 8, model)
    assert xb.dtype == torch.float64
    torch.testing.assert_close(xb, xa, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_half_precision_loops(dtype, pred):
    """16-bit samples and model outputs: diffusers steps in the 16-bit dtype (its scalars are 0-d tensors), the
    kernel in float32, rounding once. Given the same tree noise, both loops return the dtype and the drop-in's is
    no further than diffusers' from the float32 loop on the same 16-bit model outputs (to a margin of 1.2)."""
    ref, ff = sde_pair(**SD, noise_sampler_seed=3, prediction_type=pred)
    model = posterior_model(ref)
    half = lambda x, t: model(x.float(), t).to(dtype)  # noqa: E731
    x = start_noise().to(dtype)
    xa, _ = run_loop(ref, 10, model=half, x=x)
    xb, _ = run_loop(ff, 10, model=half, x=x)
    x32, _ = run_loop(ref, 10, model=lambda x, t: half(x, t).float(), x=x.float())
    assert xa.dtype == xb.dtype == dtype and torch.isfinite(xb).all()
    assert (xb.float() - x32).abs().max() <= 1.2 * (xa.float() - x32).abs().max()


@pytest.mark.parametrize("backend", ["torch", "cuda"])
def test_without_noise_the_default_path_is_diffusers(backend):
    """``s_noise=0``: fastflow's own noise path (nothing drawn) gives diffusers' samples."""
    if _unavailable(backend):
        pytest.skip("the extension is not built")
    ref, ff = sde_pair(backend, diffusers_noise=False, **SD, prediction_type="v_prediction")
    assert_loops_match(ref, ff, model=posterior_model(ref), steps=7, step_kwargs=dict(s_noise=0.0))


def test_scale_model_input_and_order_flag_bit_identical():
    """Each call's scaled input is diffusers' to the bit (the second call divides by the midpoint sigma diffusers
    computes in its first), and ``state_in_first_order`` agrees."""
    ref, ff = sde_pair(**SD, use_karras_sigmas=True, noise_sampler_seed=1)
    for s in (ref, ff):
        s.set_timesteps(6)
    x = start_noise(5)
    model = posterior_model(ref)
    for i, t in enumerate(ref.timesteps):
        assert ff.state_in_first_order == ref.state_in_first_order, i
        a, b = ref.scale_model_input(x, t), ff.scale_model_input(x, t)
        assert torch.equal(a, b), i
        xa = ref.step(model(a, t), t, x).prev_sample
        ff.step(model(b, t), t, x)
        x = xa


@pytest.mark.parametrize("begin", [2, 6])
def test_loop_starting_part_way(begin):
    """img2img: ``set_begin_index(t_start * order)``, an even index; the remaining calls are diffusers'."""
    ref, ff = sde_pair(**SD, noise_sampler_seed=2)
    assert_loops_match(ref, ff, model=posterior_model(ref), steps=6, begin=begin)


def test_an_odd_start_raises_where_diffusers_returns_nan():
    """From an odd index the first call, first-order, steps between two equal sigmas: diffusers' Brownian noise
    is 0 / 0 there (NaN); the drop-in raises, saying why."""
    ref, ff = sde_pair(**SD, noise_sampler_seed=2)
    xa, _ = run_loop(ref, 4, model=posterior_model(ref), begin=3)
    assert not torch.isfinite(xa).all()
    with pytest.raises(ValueError, match="empty interval"):
        run_loop(ff, 4, model=posterior_model(ref), begin=3)


def _noises(s, steps: int, x: torch.Tensor, modify=None, scaled: bool = False) -> list[tuple[torch.Tensor, ...]]:
    """Each step's two noises, taken back from a loop whose model predicts zero noise (so x0 is the sample):
    with ``A = sigma_down / sigma``, a call from ``sigma`` with base ``b`` and x0 ``x0`` returns
    ``A b + (1 - A) x0 + sigma_up n`` (float64 from diffusers' float32 sigmas). ``scaled``: ``sigma_up n``, as
    added to the sample. ``modify`` changes the sample handed to each second call."""
    s.set_timesteps(steps)
    sig = s.sigmas.double()

    def call(index: int, base: torch.Tensor, z: torch.Tensor, sigma: float, target: float):
        up = target * math.sqrt(1 - target**2 / sigma**2)
        a = math.sqrt(target**2 - up**2) / sigma
        y = s.step(torch.zeros_like(z), s.timesteps[index], z).prev_sample
        added = y.double() - a * base.double() - (1 - a) * z.double()
        return y, added if scaled else added / up

    out = []
    for i in range(steps - 1):
        sigma, sigma_next = float(sig[2 * i]), float(sig[2 * i + 1])
        y, n1 = call(2 * i, x, x, sigma, math.sqrt(sigma * sigma_next))
        y, n2 = call(2 * i + 1, x, modify(y) if modify else y, sigma, sigma_next)
        out.append((n1, n2))
        x = y
    return out


@pytest.mark.parametrize("backend", ["torch", "cuda"])
def test_noise_has_diffusers_joint_distribution(backend):
    """fastflow's in-kernel noise has the joint distribution of diffusers' Brownian draws: standard normal per
    call, the second call's correlated with the first's as ``sqrt(rho)``, ``rho = (sigma - sigma_mid) /
    (sigma - sigma_next)`` (the first interval inside the second), and independent across steps. Measured on
    both, 65536 elements a call."""
    if _unavailable(backend):
        pytest.skip("the extension is not built")
    ref, ff = sde_pair(backend, diffusers_noise=False, **SD, use_karras_sigmas=True, noise_sampler_seed=9)
    x = torch.randn(4, 4, 64, 64, generator=torch.Generator().manual_seed(0)) * 3
    results = [_noises(s, 5, x) for s in (ref, ff)]
    sig = ref.sigmas.double()
    for i, (theirs, mine) in enumerate(zip(*results, strict=True)):
        sigma, sigma_next = float(sig[2 * i]), float(sig[2 * i + 1])
        rho = (sigma - math.sqrt(sigma * sigma_next)) / (sigma - sigma_next)
        for n1, n2 in (theirs, mine):
            assert_standard_normal(n1)
            assert_standard_normal(n2)
            assert abs(correlation(n1, n2) - math.sqrt(rho)) < 0.02, (i, correlation(n1, n2), math.sqrt(rho))
        assert abs(correlation(mine[0], theirs[0])) < 0.02  # other numbers than diffusers', the same law
    for noises in results:  # steps are independent
        for a, b in ((noises[0][1], noises[1][0]), (noises[0][0], noises[1][1])):
            assert abs(correlation(a, b)) < 0.02


@pytest.mark.parametrize("backend", ["torch", "cuda"])
@pytest.mark.parametrize("how", ["copy", "in_place", "blend"])
def test_a_sample_changed_between_the_calls_keeps_the_noise(backend, how):
    """A second call given another tensor than the first returned (a copy, the same tensor changed in place, or
    an inpainting pipeline's blend) adds the noise it would have added to the unchanged sample (to float32
    round-off of the sample): the kernel takes the first call's noise back from its sample, and the drop-in
    corrects for a changed one. Uncorrected, the change would leak into the noise scaled by ``sigma_up``
    ratios."""
    if _unavailable(backend):
        pytest.skip("the extension is not built")
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1)) * 3
    delta = {"copy": 0.0, "in_place": 0.0, "blend": 0.25}[how] * torch.randn(
        2, 4, 16, 16, generator=torch.Generator().manual_seed(2))

    def modify(z):
        if how == "in_place":
            return z.add_(delta)  # same tensor, new version
        return z + delta

    loops = []
    for change in (None, modify):
        _, ff = sde_pair(backend, diffusers_noise=False, **SD, noise_sampler_seed=3)
        loops.append(_noises(ff, 4, x, modify=change, scaled=True))
    for (n1, n2), (m1, m2) in zip(*loops, strict=True):
        assert_close(m1, n1, rtol=0, atol=1e-5)
        assert_close(m2, n2, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "cuda"])
def test_copies_between_calls_give_the_fused_samples(backend):
    """A loop that copies the sample before every call takes the corrected path at every second call; its
    samples equal the fused loop's to float32 round-off."""
    if _unavailable(backend):
        pytest.skip("the extension is not built")
    config = dict(SD, noise_sampler_seed=6, prediction_type="v_prediction")
    _, fused = sde_pair(backend, diffusers_noise=False, **config)
    _, copying = sde_pair(backend, diffusers_noise=False, **config)
    x_fused, _ = run_loop(fused, 7, model=posterior_model(fused), x=start_noise(1))
    assert_close(_copying_loop(copying, 7), x_fused, rtol=1e-5, atol=1e-5)


def _copying_loop(ff, steps: int) -> torch.Tensor:
    model = posterior_model(ff)
    ff.set_timesteps(steps)
    x = start_noise(1) * ff.init_noise_sigma
    for t in ff.timesteps:
        x = x.clone()
        x = ff.step(model(ff.scale_model_input(x, t), t), t, x).prev_sample
    return x


def test_noise_sampler_seed_seeds_fastflow_noise():
    """A set ``noise_sampler_seed`` makes fastflow's noise reproducible across schedules and instances (and
    a different seed gives other noise); without it, torch's global generator seeds it."""
    finals = []
    for seed in (5, 5, 6):
        _, ff = sde_pair(diffusers_noise=False, **SD, noise_sampler_seed=seed)
        torch.manual_seed(seed * 17)  # the global generator does not matter once a seed is set
        finals.append(run_loop(ff, 4, model=posterior_model(ff))[0])
    assert torch.equal(finals[0], finals[1]) and not torch.allclose(finals[0], finals[2])
    _, ff = sde_pair(diffusers_noise=False, **SD)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(run_loop(ff, 4, model=posterior_model(ff))[0])
    assert torch.equal(runs[0], runs[1])


def test_s_noise_changed_inside_a_step_raises():
    """The second call continues the first's noise: a different ``s_noise`` (or noise source) there raises."""
    _, ff = sde_pair(diffusers_noise=False, **SD, noise_sampler_seed=1)
    ff.set_timesteps(4)
    x = start_noise() * ff.init_noise_sigma
    t0, t1 = ff.timesteps[:2]
    x = ff.step(torch.zeros_like(x), t0, x).prev_sample
    with pytest.raises(ValueError, match="same s_noise"):
        ff.step(torch.zeros_like(x), t1, x, s_noise=0.5)


def test_unsupported_prediction_and_from_scheduler():
    """``sample`` prediction raises as diffusers' step does (it implements none), at construction; from_scheduler
    picks the drop-in; a meta-device loop reads no tensor data."""
    with pytest.raises(NotImplementedError, match="prediction_type='sample'"):
        ffd.DPMSolverSDEScheduler(prediction_type="sample")
    ref = diffusers.DPMSolverSDEScheduler(**SD, use_karras_sigmas=True)
    ff = ffd.from_scheduler(ref)
    assert type(ff) is ffd.DPMSolverSDEScheduler and ff.config == ref.config and "DPMSolverSDEScheduler" in (
        ffd.supported())
    x, out = meta_loop(ff, 5, scale_input=True)
    assert x.device.type == "meta" and out.pred_original_sample.device.type == "meta"


@pytest.mark.parametrize("kind", ["txt2img", "img2img", "inpaint"])
def test_stable_diffusion_pipelines(kind):
    """Stable Diffusion's pipelines (tiny random weights): diffusers' images with ``diffusers_noise`` (a seeded
    tree); with fastflow's noise the inpainting pipeline, which blends the sample between a step's calls, runs
    the corrected path and stays finite."""
    pytest.importorskip("transformers", reason="the Stable Diffusion pipelines need transformers")
    import numpy as np
    from tiny_models import stable_diffusion_call, stable_diffusion_images, tiny_cond_unet, tiny_vae

    vae, unet = tiny_vae(), tiny_cond_unet()
    pipe_cls, kwargs = stable_diffusion_call(kind, 5)
    ref = diffusers.DPMSolverSDEScheduler(**SD, use_karras_sigmas=True, noise_sampler_seed=7)
    schedulers = (ref, ffd.from_scheduler(ref, diffusers_noise=True), ffd.from_scheduler(ref))
    images = [stable_diffusion_images(pipe_cls, s, kwargs, vae, unet) for s in schedulers]
    np.testing.assert_allclose(images[1], images[0], rtol=0, atol=1e-5)
    assert np.isfinite(images[2]).all()


def _batch_changed_loop(scheduler, change, at: int, batch: int = 2):
    scheduler.set_timesteps(6)
    x = start_noise(0)[:batch] * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        if i == at:  # between the two calls of a step: the second steps from the first's sample
            x = change(x)
        x_in = scheduler.scale_model_input(x, t)
        x = scheduler.step(stand_in(x_in, t), t, x).prev_sample
    return x


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("diffusers_noise", [True, False])
def test_a_batch_shrunk_between_the_two_calls_raises_the_shape_error(backend, diffusers_noise):
    """diffusers broadcasts the first call's kept batch-2 sample into a batch-2 result; the drop-in says the shape
    changed mid-loop, as its other two-call and multistep classes do (it returned batch 1 silently, or named a
    noise the caller never passed)."""
    _, ff = sde_pair(backend, diffusers_noise)
    with pytest.raises(ValueError, match=r"shape changed mid-loop, from \(2, 4, 16, 16\) to \(1, 4, 16, 16\)"):
        _batch_changed_loop(ff, lambda x: x[:1], at=5)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_a_batch_shrunk_before_a_first_call_with_diffusers_noise_names_the_tree(backend):
    """diffusers' Brownian tree draws the first sample's batch; a shrunk batch after it is refused, naming the
    tree (the error named a noise the caller never passed). fastflow's own noise steps the new batch."""
    _, ff = sde_pair(backend, True)
    with pytest.raises(ValueError, match=r"Brownian tree was made for .* shape \(2, 4, 16, 16\).*set_timesteps"):
        _batch_changed_loop(ff, lambda x: x[:1], at=4)
    _, ff = sde_pair(backend, False)
    assert _batch_changed_loop(ff, lambda x: x[:1], at=4).shape[0] == 1


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_a_batch_grown_between_the_two_calls_is_diffusers(backend):
    """A kept sample of batch 1 broadcasts to a larger batch in diffusers' second call; so it does here."""
    ref, ff = sde_pair(backend, True, noise_sampler_seed=7)
    grow = lambda x: torch.cat([x, 0.9 * x])  # noqa: E731
    xa = _batch_changed_loop(ref, grow, at=5, batch=1)
    xb = _batch_changed_loop(ff, grow, at=5, batch=1)
    assert xb.shape == xa.shape
    assert_close(xb, xa)
