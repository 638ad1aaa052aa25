"""Helpers for the drop-in scheduler tests: a model stand-in and pipeline-style loops.

The stand-in depends on the sample and the timestep (nonlinearly in both), so a
wrong step index, scaling or coefficient shows up over a loop.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
from collections.abc import Callable, Iterator

import pytest
import torch

diffusers = pytest.importorskip("diffusers")  # a test dependency; skip cleanly where absent

SHAPE = (2, 4, 16, 16)  # 2048 elements
RTOL = ATOL = 1e-5
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)  # Stable Diffusion's betas
# Classes whose noise diffusers draws from a Brownian tree (seeded, not drawn from a generator): fastflow's noise
# then differs from diffusers' in its numbers, and a test that wants diffusers' numbers sets diffusers_noise.
TREE_NOISE = ("DPMSolverSDEScheduler", "CosineDPMSolverMultistepScheduler")


def recompile_limit(n: int) -> contextlib.AbstractContextManager:
    """``torch._dynamo.config.patch(recompile_limit=n)``, under the name torch 2.6 gives it (``cache_size_limit``):
    the same limit, renamed later."""
    name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    return torch._dynamo.config.patch(**{name: n})


@functools.cache
def fullgraph_traces_item() -> bool:
    """Whether fullgraph=True traces ``Tensor.item()`` (2.13 captures the scalar; older dynamo, 2.6's and 2.8's,
    refuses unless ``torch._dynamo.config.capture_scalar_outputs`` is set, which its error says)."""
    try:
        torch.compile(lambda x: x + x.sum().item(), fullgraph=True, backend="eager")(torch.zeros(1))
    except torch._dynamo.exc.Unsupported:
        return False
    return True


def fullgraph_seed_draws() -> contextlib.AbstractContextManager:
    """What a fullgraph=True trace of a loop's first noisy step (its seed is drawn with ``.item()``) needs: nothing
    where dynamo traces ``Tensor.item()``, ``capture_scalar_outputs=True`` where it does not (docs/diffusers.md
    tells users so)."""
    if fullgraph_traces_item():
        return contextlib.nullcontext()
    return torch._dynamo.config.patch(capture_scalar_outputs=True)


def stand_in(x: torch.Tensor, t) -> torch.Tensor:
    """``a(t) x + b(t) sin(x)`` with smooth, bounded ``a, b`` of the timestep value."""
    tau = float(t)
    a = 0.3 + 0.2 * math.cos(tau / 300.0)
    b = 0.5 * math.sin(tau / 500.0 + 1.0)
    return (a * x + b * torch.sin(x)).to(x.dtype)


def start_noise(seed: int = 0, shape=SHAPE, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def run_loop(
    scheduler,
    steps: int | None = 12,
    *,
    set_kwargs: dict | None = None,
    step_kwargs: Callable[[int], dict] | dict | None = None,
    model: Callable = stand_in,
    x: torch.Tensor | None = None,
    seed: int = 0,
    begin: int = 0,
) -> tuple[torch.Tensor, list]:
    """A pipeline-style loop: set_timesteps, scale by init_noise_sigma, scale_model_input, step.

    ``begin``: start at that index of the timesteps, after ``set_begin_index(begin)`` where the scheduler has it
    (img2img).
    Returns the final sample and every step's output object (or tuple).
    """
    set_kwargs = dict(set_kwargs or {})
    if steps is not None:
        set_kwargs.setdefault("num_inference_steps", steps)
    scheduler.set_timesteps(**set_kwargs)
    x = start_noise(seed) if x is None else x.clone()
    x = x * getattr(scheduler, "init_noise_sigma", 1.0)
    outs = []
    if begin and hasattr(getattr(diffusers, type(scheduler).__name__, type(scheduler)), "set_begin_index"):
        # As a pipeline written for diffusers calls it: the classes without it (DDIM, DDPM, the inverse schedulers)
        # find their first step by its timestep, which the drop-ins do too where set_begin_index was not called.
        scheduler.set_begin_index(begin)
    for i, t in enumerate(scheduler.timesteps[begin:]):
        inp = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        o = model(inp, t)
        kw = step_kwargs(i) if callable(step_kwargs) else dict(step_kwargs or {})
        out = scheduler.step(o, t, x, **kw)
        outs.append(out)
        x = out[0] if isinstance(out, tuple) else out.prev_sample
    return x, outs


def pair(name: str, backend: str = "torch", **config):
    """(diffusers scheduler, fastflow drop-in) built from the same config."""
    import fastflow.diffusers as ffd

    ref = getattr(diffusers, name)(**config)
    ff = getattr(ffd, name).from_config(ref.config)
    ff.backend = backend
    return ref, ff


def assert_close(a: torch.Tensor, b: torch.Tensor, rtol: float = RTOL, atol: float = ATOL) -> None:
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def assert_loops_match(ref, ff, fields=("pred_original_sample",), rtol=RTOL, atol=ATOL, **loop_kwargs) -> tuple:
    """Full loops of both schedulers agree in the final sample and each step's fields. Returns both loops'
    ``(final sample, outputs)``, diffusers' first."""
    xa, oa = run_loop(ref, **loop_kwargs)
    xb, ob = run_loop(ff, **loop_kwargs)
    torch.testing.assert_close(ref.timesteps, ff.timesteps, rtol=0, atol=0)
    assert_close(xb, xa, rtol, atol)
    for i, (a, b) in enumerate(zip(oa, ob, strict=True)):
        for f in fields:
            va, vb = getattr(a, f, None), getattr(b, f, None)
            if va is None:
                continue
            try:
                assert_close(vb, va, rtol, atol)
            except AssertionError as exc:
                raise AssertionError(f"step {i}: {f} differs: {exc}") from None
    return (xa, oa), (xb, ob)


def posterior_loops(ref, ff, steps, step_kwargs=None, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Final samples of full loops of both schedulers with the posterior stand-in (same timesteps checked).

    ``step_kwargs`` is a factory: each loop gets a fresh one (a generator draws anew).
    """
    from posterior_model import posterior_model

    model = posterior_model(ref)
    xa, _ = run_loop(ref, steps, model=model, step_kwargs=step_kwargs() if step_kwargs else None, **kwargs)
    xb, _ = run_loop(ff, steps, model=model, step_kwargs=step_kwargs() if step_kwargs else None, **kwargs)
    torch.testing.assert_close(ff.timesteps, ref.timesteps, rtol=0, atol=0)
    return xa, xb


def meta_loop(ff, steps: int, scale_input: bool = False):
    """A loop of ``ff`` on meta tensors (a step that read tensor data would fail); the last sample and output."""
    ff.set_timesteps(steps)
    x = torch.empty(SHAPE, device="meta")
    out = None
    for t in ff.timesteps:
        out = ff.step(torch.empty_like(x), t, ff.scale_model_input(x, t) if scale_input else x)
        x = out.prev_sample
    return x, out


def compiled_loops(
    ref, ff, model: Callable, steps: int, scale_input: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Final samples of a drop-in loop whose steps after the first (eager, it builds the plan) are traced with
    ``torch.compile(fullgraph=True)``, and of diffusers' eager loop."""
    from fastflow.backends import get_backend

    get_backend("torch")
    torch._dynamo.reset()

    def inp(s, x, t):
        return s.scale_model_input(x, t) if scale_input else x

    ff.set_timesteps(steps)
    ref.set_timesteps(steps)
    xa = xb = start_noise(4) * ref.init_noise_sigma if scale_input else start_noise(4)
    ts = list(ff.timesteps)
    xb = ff.step(model(inp(ff, xb, ts[0]), ts[0]), ts[0], xb).prev_sample

    @torch.compile(fullgraph=True, backend="eager")
    def step(o, t, x):
        return ff.step(o, t, x).prev_sample

    for t in ts[1:]:
        xb = step(model(inp(ff, xb, t), t), t, xb)
    for t in ref.timesteps:
        xa = ref.step(model(inp(ref, xa, t), t), t, xa).prev_sample
    return xb, xa


WELL_CONDITIONED = 2e-6  # diffusers' float32 loop within this of its float64 loop, relative to the sample's scale


def float64_distance(x: torch.Tensor, x64: torch.Tensor) -> float:
    """How far a loop's final sample is from diffusers' float64 loop's, relative to that loop's scale."""
    return float((x.double() - x64).abs().max() / x64.abs().max())


def assert_no_further_from_float64(xb: torch.Tensor, xa: torch.Tensor, x64: torch.Tensor) -> bool:
    """The drop-in's final sample ``xb`` is within twice diffusers' float32 loop's (``xa``) distance from diffusers'
    float64 loop (or 2e-6). Returns whether diffusers' float32 loop is accurate here (within WELL_CONDITIONED), where
    the drop-in must give its numbers directly."""
    err32, err_ff = float64_distance(xa, x64), float64_distance(xb, x64)
    assert err_ff <= max(2 * err32, 2e-6), (err_ff, err32)
    return err32 <= WELL_CONDITIONED


def assert_half_loop_bounded(ref, ff, dtype: torch.dtype, steps: int = 10, model: Callable | None = None) -> None:
    """16-bit sample and model output in, 16-bit out, for schedulers that step in the 16-bit dtype: diffusers
    rounds several times a step, the kernel computes in float32 and rounds once. Both loops (``model``, by
    default the posterior stand-in) sit within the dtype's round-off of the float32 loop on the same 16-bit
    model outputs, fastflow no further than diffusers (to a margin of 1.5)."""
    from posterior_model import posterior_model

    model = posterior_model(ref) if model is None else model
    half = lambda x, t: model(x.float(), t).to(dtype)  # noqa: E731
    x = start_noise().to(dtype)
    xa, _ = run_loop(ref, steps, model=half, x=x)
    xb, _ = run_loop(ff, steps, model=half, x=x)
    x32, _ = run_loop(ref, steps, model=lambda x, t: half(x, t).float(), x=x.float())
    assert xa.dtype == xb.dtype == dtype
    tol = 4e-3 if dtype == torch.float16 else 3e-2
    assert_close(xb.float(), x32, rtol=tol, atol=tol)
    assert (xb.float() - x32).abs().max() <= 1.5 * (xa.float() - x32).abs().max()


def assert_bfloat16_parity(ref, ff, steps: int = 10) -> None:
    """bfloat16 loops of both schedulers (posterior stand-in) return bfloat16 and agree to a few bfloat16 ulps."""
    outs = bfloat16_loops(ref, ff, steps)
    assert outs[1].dtype == outs[0].dtype == torch.bfloat16
    assert_close(outs[1].float(), outs[0].float(), rtol=0, atol=0.05)


def assert_unet_loops_match(ref, steps: int) -> None:
    """diffusers' pipeline loop with a tiny random UNet gives the same samples with ``ref`` and its drop-in."""
    from posterior_model import tiny_unet, unet_loop

    import fastflow.diffusers as ffd

    ff = ffd.from_scheduler(ref, backend="torch")
    unet = tiny_unet()
    assert_close(unet_loop(ff, unet, steps), unet_loop(ref, unet, steps))


def bfloat16_loops(ref, ff, steps: int = 10) -> list[torch.Tensor]:
    """Final samples of bfloat16 loops of both schedulers with the posterior stand-in."""
    from posterior_model import posterior_model

    model = posterior_model(ref)
    outs = []
    for s in (ref, ff):
        s.set_timesteps(steps)
        x = (start_noise(0) * s.init_noise_sigma).to(torch.bfloat16)
        for t in s.timesteps:
            x = s.step(model(s.scale_model_input(x, t), t), t, x).prev_sample
        outs.append(x)
    return outs


def begin_index_loops(ref, ff, steps: int, begin: int, x0: torch.Tensor, scale_input: bool = False) -> list:
    """img2img: final samples of both loops from step ``begin`` (``set_begin_index``), posterior stand-in."""
    from posterior_model import posterior_model

    model = posterior_model(ref)
    outs = []
    for s in (ref, ff):
        s.set_timesteps(steps)
        s.set_begin_index(begin)
        x = x0
        for t in s.timesteps[begin:]:
            x = s.step(model(s.scale_model_input(x, t) if scale_input else x, t), t, x).prev_sample
        outs.append(x)
    return outs


def doubled_x0_model(ref) -> Callable:
    """The posterior stand-in with x0 predictions twice the data's scale, so a thresholding quantile exceeds 1 and
    the clamp acts; it answers in ``ref``'s prediction type."""
    from posterior_model import posterior_model

    inner = posterior_model(ref, prediction="sample")

    def model(x, t):
        x0 = 2.0 * inner(x, t)
        ab = float(ref.alphas_cumprod[int(t)])
        eps = (x - ab**0.5 * x0) / (1 - ab) ** 0.5
        return {"sample": x0, "epsilon": eps, "v_prediction": ab**0.5 * eps - (1 - ab) ** 0.5 * x0}[
            ref.config.prediction_type]

    return model


def assert_multistep_api(ref, ff, steps: int = 10) -> torch.Tensor:
    """A multistep drop-in's order, init_noise_sigma, sigmas, identity input scaling and add_noise are diffusers'.

    Returns the sample it used (``start_noise(2)``).
    """
    ref.set_timesteps(steps)
    ff.set_timesteps(steps)
    assert ff.order == ref.order and ff.init_noise_sigma == ref.init_noise_sigma
    torch.testing.assert_close(ff.sigmas, ref.sigmas, rtol=0, atol=0)
    x = start_noise(2)
    assert torch.equal(ff.scale_model_input(x, ff.timesteps[0]), x)
    noise = start_noise(3)
    assert_close(ff.add_noise(x, noise, ff.timesteps[2:3]), ref.add_noise(x, noise, ref.timesteps[2:3]))
    return x


@contextlib.contextmanager
def float32_draws(*modules) -> Iterator[None]:
    """Inside, each module's ``randn_tensor`` draws as in float32 and widens to the dtype asked for: a float64 loop
    then adds the very noise its float32 twin adds (float64 draws are other numbers)."""
    originals = [module.randn_tensor for module in modules]
    def widening(draw: Callable) -> Callable:
        return lambda shape, dtype=None, **kw: draw(shape, dtype=torch.float32, **kw).to(dtype)

    for module, draw in zip(modules, originals, strict=True):
        module.randn_tensor = widening(draw)
    try:
        yield
    finally:
        for module, draw in zip(modules, originals, strict=True):
            module.randn_tensor = draw


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """The sample correlation of two tensors' elements."""
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def assert_standard_normal(n: torch.Tensor, tol: float = 0.02) -> None:
    """Mean 0 and standard deviation 1 to ``tol`` (tens of thousands of elements: a few standard errors)."""
    assert abs(float(n.mean())) < tol and abs(float(n.std()) - 1) < tol, (float(n.mean()), float(n.std()))


def assert_independent_standard_normals(noises: list[torch.Tensor], tol: float = 0.02) -> None:
    """Each tensor standard normal, every pair uncorrelated (to ``tol``): noises of separate steps."""
    for n in noises:
        assert_standard_normal(n, tol)
    for a, b in itertools.combinations(noises, 2):
        assert abs(correlation(a, b)) < tol


def assert_sync_free_gpu_loops(ref, ff, schedule: Callable, loop: Callable) -> None:
    """``schedule(scheduler)`` (``set_timesteps`` and the like, which may copy to the device, as a pipeline does
    once before its loop), then ``loop(scheduler, generators)`` on CUDA: diffusers' with CUDA generators, then the
    drop-in's with them and with fastflow's noise, each drop-in loop under sync debug mode "error"; the drop-in's
    first equals diffusers'."""
    schedule(ref)
    xa = loop(ref, True)
    xb, xc = (_sync_free(ff, schedule, loop, generators) for generators in (True, False))
    assert_close(xb, xa, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(xc).all()


def _sync_free(ff, schedule: Callable, loop: Callable, generators: bool) -> torch.Tensor:
    schedule(ff)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return loop(ff, generators)
    finally:
        torch.cuda.set_sync_debug_mode("default")
