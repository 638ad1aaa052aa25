"""The public sampling API: every solver reachable, guidance, clipping, inputs, and clear errors."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import fastflow as ff
from fastflow.mixture import GaussianMixture
from fastflow.solvers import SOLVER_NAMES

MIX = GaussianMixture([[-1.0, 0.0], [1.0, 0.5]], [0.3, 0.5])


@pytest.mark.parametrize("solver", SOLVER_NAMES)
@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "flow", "score"])
def test_every_solver_and_prediction_runs(solver, prediction):
    schedule = ff.EDM() if solver in ("euler", "heun") else ff.VP.cosine()
    s = ff.Sampler(schedule, solver, prediction=prediction, steps=8, backend="torch")
    z = s.init_noise((16, 2), seed=3, dtype=torch.float64)
    x = ff.sample(MIX.model(schedule, prediction), z, s)
    assert x.shape == (16, 2) and torch.isfinite(x).all()
    assert float((x.mean(0) - MIX.means.mean(0)).abs().max()) < 1.5


def test_timesteps_are_schedule_times():
    sched = ff.VP()
    s = ff.Sampler(sched, "dpm++2m", steps=10)
    assert s.timesteps.dtype == torch.float64 and len(s.timesteps) == 10
    assert np.all(np.isfinite(sched.alpha(s.timesteps.numpy())))
    assert float(s.timesteps[0]) == pytest.approx(999.0)
    heun = ff.Sampler(ff.EDM(), "heun", steps=10)
    assert heun.num_stages == 19 and len(heun.timesteps) == 19


def test_init_noise_seeds_and_scale():
    s = ff.Sampler(ff.EDM(), "euler", steps=4)
    z = s.init_noise((3, 4, 5), seed=[10, 11, 12])
    alone = s.init_noise((1, 4, 5), seed=11)
    torch.testing.assert_close(z[1:2], alone, rtol=0, atol=0)
    big = s.init_noise((1, 100_000), seed=0)
    assert float(big.std()) == pytest.approx(np.hypot(1.0, 80.0), rel=0.02)
    assert s.init_noise((2, 3), seed=0, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_init_noise_is_the_first_stage_marginal_where_alpha_is_not_negligible():
    """Under EDM sqrt(1 + 80^2) and 80 differ by 1e-4, so the test above cannot tell the marginal from sigma alone;
    at t = 0.5 of the cosine schedule alpha = sigma, and the marginal std of unit data is 1, not sigma = 0.71."""
    sched = ff.VP.cosine()
    s = ff.Sampler(sched, "ddim", steps=4, grid=[0.5, 0.4, 0.3, 0.2], final="clean")
    z = s.init_noise((1, 100_000), seed=0, dtype=torch.float64)
    want = math.hypot(float(sched.alpha(0.5)), float(sched.sigma(0.5)))
    assert want == pytest.approx(1.0)
    assert float(z.std()) == pytest.approx(want, rel=0.02)


def test_init_noise_is_not_the_first_stochastic_stage_noise():
    """The initial noise has its own stream (INIT_TAG): drawn from the step-0 stream instead, a DDPM loop would add
    the very noise it started from at its first step (correlation 1)."""
    s = ff.Sampler(ff.VP(), "ddpm", steps=4)
    z = s.init_noise((1, 20_000), seed=5, dtype=torch.float64)
    first_step = ff.noise.normal(s.seeds, (20_000,), step=0, dtype=torch.float64)
    corr = float(torch.corrcoef(torch.cat([z, first_step]))[0, 1])
    assert abs(corr) < 0.05, corr


def test_guidance_pair_and_doubled_batch():
    s = ff.Sampler(ff.VP(), "ddim", steps=5, guidance_scale=4.0, backend="torch")
    g = torch.Generator().manual_seed(0)
    z, c, u = (torch.randn(2, 3, 4, generator=g) for _ in range(3))
    a = s.step((c, u), z, 1)
    b = s.step(torch.cat([u, c]), z, 1)
    plain = ff.Sampler(ff.VP(), "ddim", steps=5, backend="torch")
    ref = plain.step(u + 4.0 * (c - u), z, 1)
    torch.testing.assert_close(a, ref)
    torch.testing.assert_close(b, ref)
    with pytest.raises(ValueError, match="batch of 4"):
        s.step(c, z, 1)
    with pytest.raises(ValueError, match="no guidance_scale"):
        plain.step((c, u), z, 1)


def test_clip_bounds_the_data_prediction():
    s = ff.Sampler(ff.VP(), "ddim", prediction="x0", steps=5, clip=1.0, backend="torch")
    z = torch.zeros(1, 8)
    o = torch.linspace(-3, 3, 8).reshape(1, 8)
    _, x0 = s.step(o, z, 0, return_x0=True)
    torch.testing.assert_close(x0, o.clamp(-1, 1))


def test_model_input_and_its_dtype():
    scale = np.linspace(1.0, 2.0, 5)
    s = ff.Sampler(ff.VP(), "ddim", steps=5, input_scale=scale, backend="torch")
    z = torch.randn(2, 6)
    torch.testing.assert_close(s.model_input(z, 3), z * scale[3])
    z_next, z_in = s.step(torch.randn(2, 6), z, 2, return_model_input=True, model_input_dtype=torch.bfloat16)
    assert z_in.dtype == torch.bfloat16
    torch.testing.assert_close(z_in, (z_next * scale[3]).to(torch.bfloat16))
    _, doubled = s.step(torch.randn(2, 6), z, 2, return_model_input=True, duplicate_model_input=True)
    torch.testing.assert_close(doubled[:2], doubled[2:])


def test_step_is_sync_free_on_the_meta_device():
    s = ff.Sampler(ff.VP(), "sde-dpm++2m", steps=6, guidance_scale=2.0, backend="torch")
    z = torch.empty(2, 4, 8, device="meta")
    seeds = torch.empty(2, dtype=torch.int64, device="meta")
    for i in range(3):
        z = s.step((torch.empty_like(z), torch.empty_like(z)), z, i, seed=seeds)
    assert z.device.type == "meta" and z.shape == (2, 4, 8)


def test_step_index_as_device_tensor_matches_int():
    s = ff.Sampler(ff.VP(), "ddpm", steps=5, backend="torch")
    s.init_noise((2, 7), seed=1)
    z, o = torch.randn(2, 7), torch.randn(2, 7)
    table = s.table("cpu")
    backend = ff.backends.get_backend("torch")
    a, b = torch.empty_like(z), torch.empty_like(z)
    backend.fused_step(z, a, o, None, [], table, 3, seeds=s.seeds, use_noise=True)
    backend.fused_step(z, b, o, None, [], table, torch.tensor([3]), seeds=s.seeds, use_noise=True)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def _sampler_on(backend: str, *args, **kwargs) -> ff.Sampler:
    """A Sampler on ``backend`` (skipped where it cannot run on the CPU)."""
    reason = ff.backends.get_backend(backend).availability() or ff.backends.get_backend(backend).supports("cpu")
    if reason is not None:
        pytest.skip(f"{backend} backend: {reason}")
    return ff.Sampler(*args, backend=backend, **kwargs)


@pytest.mark.parametrize("backend", ["torch", "cuda"])
def test_out_that_a_later_stage_reads_is_refused(backend):
    """Heun's predictor keeps its input state for the corrector, so ``out=z`` there would overwrite it (silently wrong
    before); its corrector may write in place. An x0 returned and kept for a later stage may not be ``out`` either."""
    model = lambda z, t: torch.tanh(0.1 * z)  # noqa: E731
    heun = _sampler_on(backend, ff.EDM(), "heun", steps=4)
    z0 = heun.init_noise((1, 8), seed=3)
    z = z0.clone()
    with pytest.raises(ValueError, match="state z of stage 0, which is kept for a later stage"):
        heun.step(model(z, 0), z, 0, out=z)
    torch.testing.assert_close(z, z0, rtol=0, atol=0)  # refused before anything was written
    z1 = heun.step(model(z, 0), z, 0)
    want = heun.step(model(z1, 1), z1, 1)
    heun.step(model(z, 0), z, 0)
    z1 = z1.clone()
    assert heun.step(model(z1, 1), z1, 1, out=z1) is z1  # the corrector's own input: read before written
    torch.testing.assert_close(z1, want, rtol=0, atol=0)
    multi = _sampler_on(backend, ff.VP(), "dpm++3m", steps=8)
    z = multi.init_noise((1, 6), seed=2)
    z = multi.step(model(z, 0), z, 0)
    z, x1 = multi.step(model(z, 1), z, 1, return_x0=True)
    with pytest.raises(ValueError, match="x0 of stage 1"):
        multi.step(model(z, 2), z, 2, out=x1)  # stage 3 reads x1 too


def test_a_prepared_sampler_traces_from_its_first_step_in_a_fresh_process():
    """prepare() resolves the backend, so the first step may be traced by torch.compile(fullgraph=True): a traced
    step cannot import one (it failed with 'function marked as skipped')."""
    code = (
        "import torch, fastflow as ff\n"
        "for backend in ('torch', 'cuda'):\n"
        "    s = ff.Sampler(ff.VP(), 'dpm++2m', steps=3, backend=backend).prepare('cpu')\n"
        "    step = torch.compile(s.step, fullgraph=True, backend='eager')\n"
        "    z = zz = s.init_noise((1, 8), seed=0)\n"
        "    for i in range(s.num_stages):\n"
        "        z = step(torch.tanh(z), z, i)\n"
        "    eager = ff.Sampler(ff.VP(), 'dpm++2m', steps=3, backend=backend)\n"
        "    for i in range(eager.num_stages):\n"
        "        zz = eager.step(torch.tanh(zz), zz, i)\n"
        "    assert torch.equal(z, zz), backend\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]


def test_guidance_scale_is_fixed_and_backend_switches_the_steps():
    """The scale is compiled into the plan: setting it was ignored by steps but read by GraphCache (two answers
    from one sampler); it now raises. Setting ``backend`` switches the steps (it changed only the repr)."""
    sampler = ff.Sampler(ff.VP(), steps=3, guidance_scale=5.0, backend="torch")
    with pytest.raises(AttributeError, match="guidance_scale is compiled into its plan"):
        sampler.guidance_scale = 2.0
    assert sampler.guidance_scale == 5.0 and sampler.guided
    with pytest.raises(ValueError, match="unknown backend 'nonsense'"):
        sampler.backend = "nonsense"
    sampler.backend = "cuda"
    assert sampler.backend == "cuda" and sampler.runner.backend == "cuda" and "backend='cuda'" in repr(sampler)


@pytest.mark.parametrize("backend", ["torch", "cuda", "triton"])
def test_out_and_autograd(backend):
    """``out=`` into a tensor that requires grad is refused with gradients enabled, as torch's out= ops refuse it
    (a leaf was rewritten silently; a graph's tensor gave a wrong gradient). A tensor that a graph saved for backward
    is marked changed, so that backward raises rather than using the overwritten values (the kernels' writes did not
    bump its version)."""
    sampler = _sampler_on(backend, ff.VP(), "ddim", steps=4)
    z = sampler.init_noise((2, 5), seed=1)
    o = torch.tanh(z)
    w = torch.randn(2, 5, requires_grad=True)
    with pytest.raises(RuntimeError, match="requires grad"):
        sampler.step(o, z, 0, out=w.exp())
    leaf = torch.zeros(2, 5, requires_grad=True)
    with pytest.raises(RuntimeError, match="requires grad"):
        sampler.step(o, z, 0, out=leaf)
    with torch.no_grad():  # as an in-place torch op on a leaf is allowed there
        sampler.step(o, z, 0, out=leaf)
    torch.testing.assert_close(leaf.detach(), sampler.step(o, z, 0), rtol=0, atol=0)
    saved = torch.randn(2, 5)
    loss = (w * saved).sum()  # saves `saved` for w's gradient
    sampler.step(o, z, 0, out=saved)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("backend", ["torch", "cuda"])
def test_out_overlapping_the_state_in_part_is_refused(backend):
    """``out`` shifted by one element against ``z``: the extension's block-wise CPU kernel gave wrong values
    silently; every backend now refuses it, and the exact same tensor stays allowed."""
    s = _sampler_on(backend, ff.VP(), "ddim", steps=4)
    g = torch.Generator().manual_seed(0)
    z0, o = torch.randn(2, 1031, generator=g), torch.randn(2, 1031, generator=g)
    want = s.step(o, z0, 0)
    buf = torch.zeros(2 * 1031 + 1)
    buf[:-1] = z0.flatten()
    with pytest.raises(ValueError, match="overlaps the state in part"):
        s.step(o, buf[:-1].view(2, 1031), 0, out=buf[1:].view(2, 1031))
    z = z0.clone()
    assert s.step(o, z, 0, out=z) is z
    torch.testing.assert_close(z, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "cuda"])
def test_an_expanded_out_is_refused_before_the_step(backend):
    """An expanded ``out`` (stride 0) names several elements at one address: it got torch's own copy error after the
    kernel had run; it is refused first, saying why."""
    s = _sampler_on(backend, ff.VP(), "ddim", steps=4)
    z, o = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="stride 0"):
        s.step(o, z, 0, out=torch.empty(1, 4, 8).expand(2, 4, 8))
    z1, o1 = z.reshape(2, 1, 32), o.reshape(2, 1, 32)
    out = torch.empty(2, 32).as_strided((2, 1, 32), (32, 0, 1))  # stride 0 on a size-1 dimension: one element
    assert s.step(o1, z1, 0, out=out) is out
    torch.testing.assert_close(out, s.step(o1, z1, 0), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "cuda"])
@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.complex64, "float32"], ids=str)
def test_model_input_dtype_must_be_a_float_dtype(backend, dtype):
    """The torch backend cast the model input to an int, a bool or a complex silently; every backend now raises the
    same TypeError, and so does model_input."""
    s = _sampler_on(backend, ff.VP(), "ddim", steps=4)
    z, o = torch.full((1, 4), 1.7), torch.zeros(1, 4)
    with pytest.raises(TypeError, match="model input dtype must be float32, float16, bfloat16 or float64"):
        s.step(o, z, 0, return_model_input=True, model_input_dtype=dtype)
    with pytest.raises(TypeError, match="model input dtype"):
        s.model_input(z, 0, dtype)
    with pytest.raises(TypeError, match="model input dtype"):
        ff.sample(lambda z, t: torch.zeros_like(z), z, s, model_dtype=dtype)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(dtype=torch.int64), TypeError, "floating dtype"),
        (dict(dtype=torch.bool), TypeError, "floating dtype"),
        (dict(shape=(2, -1)), ValueError, "non-negative"),
        (dict(shape=(1, 2.7)), TypeError, "sequence of ints"),
        (dict(shape=(1, True)), TypeError, "sequence of ints"),
        (dict(seed=3.0), TypeError, "seed"),
        (dict(seed="12"), TypeError, "seed"),
        (dict(seed=[1.9, 2.2]), TypeError, "seeds must be ints"),
        (dict(shape=4), TypeError, r"shape must be a sequence of ints such as \(batch, "),
    ],
)
def test_init_noise_refuses_what_it_would_truncate(kwargs, exc, match):
    """Integer dtypes gave garbage, negative or float sizes were truncated, float and string seeds were truncated or
    read digit by digit: each is now an error."""
    s = ff.Sampler(ff.VP(), "ddpm", steps=3)
    kw = dict(shape=(2, 4)) | kwargs
    with pytest.raises(exc, match=match):
        s.init_noise(**kw)


def test_init_noise_takes_numpy_and_tensor_sizes():
    s = ff.Sampler(ff.VP(), "ddpm", steps=3)
    want = s.init_noise((2, 3), seed=1)
    for shape in ((np.int64(2), 3), torch.Size([2, 3]), (torch.tensor(2), 3), [2, np.uint8(3)], np.array([2, 3]),
                  torch.tensor([2, 3])):
        torch.testing.assert_close(s.init_noise(shape, seed=1), want, rtol=0, atol=0)


def test_callback_gets_what_it_takes():
    """``callback`` gets as many of (i, t, z) as it takes positionally, all three with ``*args`` (a ``*args``
    callback got ``(i,)`` alone before)."""
    s = ff.Sampler(ff.VP(), "ddim", steps=2, backend="torch")
    seen = {k: [] for k in ("varargs", "one", "two", "kw", "defaults")}
    callbacks = {
        "varargs": lambda *a: seen["varargs"].append(a),
        "one": lambda i: seen["one"].append((i,)),
        "two": lambda i, t: seen["two"].append((i, t)),
        "kw": lambda i, **kw: seen["kw"].append((i, *kw)),
        "defaults": lambda i, t, z, extra=None: seen["defaults"].append((i, t, z)),
    }
    for cb in callbacks.values():
        x = ff.sample(lambda z, t: torch.tanh(z), torch.ones(1, 3), s, callback=cb)
    assert [len(a) for a in seen["varargs"]] == [3, 3] and seen["varargs"][1][0] == 1
    assert torch.equal(seen["varargs"][1][2], x) and seen["varargs"][1][1] == s.timesteps[1]
    assert [len(a) for a in seen["one"]] == [1, 1] and [len(a) for a in seen["two"]] == [2, 2]
    assert seen["kw"] == [(0,), (1,)] and [len(a) for a in seen["defaults"]] == [3, 3]


def test_callback_and_progress(capsys):
    seen = []
    s = ff.Sampler(ff.VP(), "ddim", steps=3, backend="torch")
    ff.sample(lambda z, t: torch.zeros_like(z), torch.randn(1, 2), s, progress=True,
              callback=lambda i, t, z: seen.append(i))
    assert seen == [0, 1, 2]
    assert "step 3/3" in capsys.readouterr().err


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(solver="ddim3"), ValueError, "valid: ddim, ddpm"),
        (dict(prediction="noise"), ValueError, "valid: eps"),
        (dict(backend="jax"), ValueError, "valid: auto"),
        (dict(steps=0), ValueError, "steps"),
        (dict(steps=2.5), ValueError, "steps"),
        (dict(steps=True), ValueError, "steps"),
        (dict(solver="heun", eta=0.5), TypeError, "eta"),
        (dict(solver="unipc", order=5), ValueError, "order"),
        (dict(solver="dpm++2m", variant="bh1"), TypeError, "variant"),
        (dict(eta=-1.0), ValueError, "eta"),
        (dict(clip=0.0), ValueError, "clip"),
        (dict(guidance_scale=float("nan")), ValueError, "guidance"),
        (dict(guidance_scale="7.5"), TypeError, r"guidance_scale must be a real number, got '7.5'"),
        (dict(clip="1"), TypeError, r"clip must be a real number, got '1'"),
        (dict(clip=True), TypeError, "clip must be a real number, got True"),
        (dict(grid="zigzag"), ValueError, "unknown grid"),
        (dict(input_scale=[1.0, 2.0]), ValueError, "input_scale"),
        (dict(rho=3.0), ValueError, "'uniform' grid ignores rho"),
        (dict(grid="logsnr", rho=3.0), ValueError, "ignores rho"),
        (dict(grid="trailing", t_min=10.0), ValueError, "'trailing' grid ignores t_min; it reads t_max only"),
        (dict(grid="leading", t_min=10.0), ValueError, "ignores t_min"),
        (dict(grid="linspace", t_min=10.0, rho=2.0), ValueError, "ignores t_min, rho"),
        (dict(grid=[900.0, 500.0, 300.0, 100.0, 10.0], t_max=950.0), ValueError, "explicit grid ignores t_max"),
    ],
)
def test_bad_construction(kwargs, exc, match):
    kw = dict(schedule=ff.VP(), steps=5) | kwargs
    with pytest.raises(exc, match=match):
        ff.Sampler(**kw)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(schedule=None), "schedule must be a fastflow Schedule"),
        (dict(schedule="vp"), "schedule must be a fastflow Schedule .*got 'vp'"),
        (dict(solver=None), "solver must be a name .* or a Solver, got NoneType"),
        (dict(prediction=None), r"prediction must be a name \(eps, x0, v, flow, score\), got NoneType"),
    ],
)
def test_wrong_types_at_construction_name_the_argument(kwargs, match):
    """None or a string in the wrong place failed with an AttributeError deep inside (``'NoneType' object has no
    attribute 'lower'``)."""
    with pytest.raises(TypeError, match=match):
        ff.Sampler(**(dict(schedule=ff.VP(), steps=5) | kwargs))


def test_sample_names_a_misplaced_argument():
    s = ff.Sampler(ff.VP(), "ddim", steps=2)
    z = torch.randn(2, 3)
    with pytest.raises(TypeError, match="sampler must be a fastflow Sampler, got str"):
        ff.sample(lambda z, t: z, z, "ddim")
    with pytest.raises(TypeError, match="noise must be the initial state as a torch.Tensor, got function"):
        ff.sample(z, lambda z, t: z, s)
    with pytest.raises(TypeError, match="noise must be the initial state as a torch.Tensor, got ndarray"):
        ff.sample(lambda z, t: z, z.numpy(), s)
    with pytest.raises(TypeError, match="initial state, must be a floating-point tensor, got torch.int64"):
        ff.sample(lambda z, t: z, z.long(), s)


def test_seeds_for_another_batch_are_named_as_such():
    """init_noise was called, for another batch: the error says so, rather than asking to call it."""
    s = ff.Sampler(ff.VP(), "ddpm", steps=3)
    s.init_noise((2, 4), seed=0)
    with pytest.raises(ValueError, match=r"batch of 3 .*\(init_noise made seeds for a batch of 2\)"):
        ff.sample(lambda z, t: torch.zeros_like(z), torch.randn(3, 4), s)


@pytest.mark.parametrize("kw", [dict(model_input_dtype=torch.float16), dict(duplicate_model_input=True)])
def test_model_input_options_without_the_model_input_raise(kw):
    """They shape the model input that return_model_input returns; without it they changed nothing."""
    s = ff.Sampler(ff.VP(), "ddim", steps=3)
    z = torch.randn(2, 4)
    with pytest.raises(ValueError, match="without it they would be ignored"):
        s.step(z, z, 0, **kw)
    out, model_in = s.step(z, z, 0, return_model_input=True, **kw)
    assert model_in.shape[0] == (4 if kw.get("duplicate_model_input") else 2)


def test_grid_options_the_grid_reads_are_taken():
    karras = ff.Sampler(ff.EDM(), "euler", steps=4, rho=3.0, t_min=0.1, t_max=10.0)
    assert float(karras.timesteps[0]) == pytest.approx(10.0)
    default = ff.Sampler(ff.EDM(), "euler", steps=4, t_min=0.1, t_max=10.0)
    assert float(karras.timesteps[1]) != pytest.approx(float(default.timesteps[1]))
    trailing = ff.Sampler(ff.VP(), "ddim", steps=4, grid="trailing", t_max=499.0)
    assert float(trailing.timesteps[0]) == 499.0


def test_bad_schedule_is_rejected():
    with pytest.raises(ValueError):
        ff.Sampler(ff.VP(alphas_cumprod=np.array([0.99, 0.9, float("nan")])), steps=2)
    with pytest.raises(ValueError, match="decreasing"):
        ff.Sampler(ff.VP(alphas_cumprod=np.array([0.5, 0.9, 0.1])), steps=2)


def test_bad_steps_and_tensors():
    s = ff.Sampler(ff.VP(), "dpm++2m", steps=4, backend="torch")
    z = torch.randn(2, 3)
    with pytest.raises(IndexError, match="out of range"):
        s.step(torch.randn(2, 3), z, 4)
    with pytest.raises(IndexError, match="out of range"):
        s.step(torch.randn(2, 3), z, -1)
    with pytest.raises(TypeError, match="int"):
        s.step(torch.randn(2, 3), z, 1.0)
    with pytest.raises(ValueError, match="shape"):
        s.step(torch.randn(2, 4), z, 0)
    with pytest.raises(TypeError, match="float32, float16, bfloat16 or float64"):
        s.step(torch.ones(2, 3, dtype=torch.int64), z, 0)
    with pytest.raises(ValueError, match="on meta"):
        s.step(torch.empty(2, 3, device="meta"), z, 0)
    with pytest.raises(RuntimeError, match="in order"):
        s.step(torch.randn(2, 3), z, 2)  # needs stage 1's x_hat
    stochastic = ff.Sampler(ff.VP(), "ddpm", steps=4, backend="torch")
    with pytest.raises(ValueError, match="init_noise"):
        stochastic.step(torch.randn(2, 3), z, 0)


def test_explicit_backend_that_cannot_run_says_why():
    s = ff.Sampler(ff.VP(), "ddim", steps=2, backend="triton")
    reason = ff.backends.get_backend("triton").supports(torch.device("cpu"))
    if reason is None:
        pytest.skip("triton runs on the CPU here (interpreter mode)")
    with pytest.raises(RuntimeError, match="cannot run"):
        s.step(torch.randn(1, 3), torch.randn(1, 3), 0)


@pytest.mark.parametrize("solver", ["ddim", "dpm++3m", "heun", "sde-dpm++2m"])
def test_sample_equals_a_hand_written_loop_and_keeps_the_noise(solver):
    schedule = ff.EDM() if solver == "heun" else ff.VP()
    s = ff.Sampler(schedule, solver, steps=6, backend="torch")
    noise = s.init_noise((3, 2), seed=4, dtype=torch.float64)
    kept = noise.clone()
    model = MIX.model(schedule, "eps")
    got = ff.sample(model, noise, s)
    torch.testing.assert_close(noise, kept, rtol=0, atol=0)  # the loop's buffers never alias the input
    z = kept
    for i, t in enumerate(s.timesteps):
        z = s.step(model(s.model_input(z, i), t), z, i)
    torch.testing.assert_close(got, z, rtol=0, atol=0)


def test_seeds_made_elsewhere_are_copied_once_per_loop():
    """Seeds from init_noise on the CPU, states on another device: the copy is made at the first noisy step and
    reused, and made again when the seeds are replaced or changed in place."""
    s = ff.Sampler(ff.VP(), "ddpm", steps=4, backend="torch")
    s.init_noise((2, 3), seed=5)
    z = torch.empty(2, 3, device="meta")
    first = s._stage_seeds(0, None, z)
    assert first.device.type == "meta" and s._stage_seeds(1, None, z) is first
    s.seeds.add_(1)
    second = s._stage_seeds(2, None, z)
    assert second is not first
    s.init_noise((2, 3), seed=6)
    assert s._stage_seeds(0, None, z) is not second
    assert s._stage_seeds(0, None, torch.empty(2, 3)) is s.seeds  # same device: the seeds themselves


@pytest.mark.gpu
def test_cpu_seeds_on_a_gpu_loop_do_not_sync():
    """init_noise on the CPU, the loop on a GPU: the stochastic steps read the seeds without a host sync."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    s = ff.Sampler(ff.VP(), "ddpm", steps=4, backend="auto")
    z = s.init_noise((2, 4, 8, 8), seed=3).cuda()
    o = torch.randn_like(z)
    s.prepare("cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(s.num_stages):
            z = s.step(o, z, i)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(z).all()


@pytest.mark.parametrize("backend", ["torch", "cuda"])
def test_channels_last_state_keeps_its_layout(backend):
    """A channels_last state (a ``unet.to(memory_format=torch.channels_last)`` pipeline) and model outputs in its
    layout give channels_last outputs (the next model input, doubled for guidance, too), read and written in place,
    with the bits of the row-major step; ``sample`` keeps the noise's layout through its loop."""
    if ff.backends.get_backend(backend).availability() is not None:
        pytest.skip(f"{backend} backend unavailable")
    cl = torch.channels_last
    s = ff.Sampler(ff.VP(), "dpm++2m", steps=4, guidance_scale=3.0, backend=backend)
    z = s.init_noise((2, 4, 6, 5), seed=7)
    o = torch.randn((4, 4, 6, 5), generator=torch.Generator().manual_seed(2))
    want, want_in = s.step(o, z, 0, return_model_input=True, duplicate_model_input=True)
    got, got_in = s.step(o.to(memory_format=cl), z.to(memory_format=cl), 0, return_model_input=True,
                         duplicate_model_input=True)
    assert got.is_contiguous(memory_format=cl) and not got.is_contiguous()
    assert got_in.shape == (4, 4, 6, 5) and got_in.is_contiguous(memory_format=cl)
    assert torch.equal(got, want) and torch.equal(got_in, want_in)
    plain = ff.Sampler(ff.VP(), "ddim", steps=3, backend=backend)
    x = ff.sample(lambda zi, t: 0.5 * zi, plain.init_noise((2, 4, 6, 5), seed=1).to(memory_format=cl), plain)
    assert x.is_contiguous(memory_format=cl)
    torch.testing.assert_close(x, ff.sample(lambda zi, t: 0.5 * zi, plain.init_noise((2, 4, 6, 5), seed=1), plain),
                               rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "cuda"])
@pytest.mark.parametrize("solver, guided", [("ddim", False), ("sde-dpm++2m", False), ("dpm++2m", True)])
def test_export_non_strict(backend, solver, guided):
    """torch.export's default (non-strict) tracing runs the step's Python on fake tensors (the C++ bindings hand
    them to the operator, which the exported program then holds): the program takes other sizes along a dynamic
    dimension and new seeds, and gives eager's numbers, the next model input included."""
    if ff.backends.get_backend(backend).availability() is not None:
        pytest.skip(f"{backend} backend unavailable")
    sampler = ff.Sampler(ff.VP(), solver=solver, prediction="eps", steps=6, backend=backend,
                         guidance_scale=3.0 if guided else None)
    sampler.prepare("cpu")

    class Step(torch.nn.Module):
        def forward(self, cond, uncond, z, seed):
            out = (cond, uncond) if guided else cond
            return sampler.step(out, z, 0, seed=seed, return_model_input=True, model_input_dtype=torch.bfloat16)

    def inputs(h: int, seed: int) -> tuple[torch.Tensor, ...]:
        cond, uncond, z = torch.randn(3, 2, 4, h, 5, generator=torch.Generator().manual_seed(h))
        return cond, uncond, z, torch.tensor([seed, seed + 1])

    h = torch.export.Dim("h", min=2, max=64)
    exported = torch.export.export(Step(), inputs(7, 3), dynamic_shapes=({2: h}, {2: h}, {2: h}, None), strict=False)
    assert ("fastflow.fused_step" in str(exported.graph)) is (backend == "cuda")
    results = []
    for args in (inputs(7, 3), inputs(11, 3), inputs(11, 8)):
        got, want = exported.module()(*args), Step()(*args)
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
        results.append(got[0])
    assert torch.equal(results[1], results[2]) is (solver != "sde-dpm++2m")  # only the stochastic step reads the seed


@pytest.mark.parametrize("backend", ["torch", "cuda"])
@pytest.mark.parametrize("solver", ["dpm++2m", "heun", "sde-dpm++2m"])
def test_export_whole_loop_with_its_model(backend, solver):
    """A module whose forward is the whole loop, model included (``fastflow.sample``), exports (non-strict) with
    the stored predictions, corrector stages or noise of its solver, and its program gives eager's numbers."""
    if ff.backends.get_backend(backend).availability() is not None:
        pytest.skip(f"{backend} backend unavailable")
    sampler = ff.Sampler(ff.VP(), solver=solver, prediction="eps", steps=4, backend=backend)
    net = torch.nn.Conv2d(4, 4, 3, padding=1)

    class Loop(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, noise: torch.Tensor) -> torch.Tensor:
            return ff.sample(lambda z_in, t: 0.1 * self.net(z_in), noise, sampler)

    noise = sampler.init_noise((2, 4, 8, 8), seed=1)
    with torch.no_grad():
        # unprepared: its tables are first made while tracing
        exported = torch.export.export(Loop(), (noise,), strict=False)
        assert torch.equal(exported.module()(noise), Loop()(noise))


@pytest.mark.parametrize("backend", ["torch", "cuda"])
def test_export_leaves_no_fake_tensors_for_eager_steps(backend):
    """Non-strict tracing runs the sampler's Python on fake tensors: the device tables and timesteps it makes are not
    cached for later eager steps (they read garbage from them), and the seeds a traced ``init_noise`` kept are
    refused by name until ``init_noise`` runs again."""
    if ff.backends.get_backend(backend).availability() is not None:
        pytest.skip(f"{backend} backend unavailable")

    def make() -> ff.Sampler:
        return ff.Sampler(ff.VP(), solver="sde-dpm++2m", prediction="eps", steps=4, backend=backend)

    def model(z_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.1 * z_in

    sampler = make()

    class Loop(torch.nn.Module):
        def forward(self, seed: torch.Tensor) -> torch.Tensor:
            return ff.sample(model, sampler.init_noise((2, 3, 5), seed=seed), sampler)

    seed = torch.tensor([4, 9])
    exported = torch.export.export(Loop(), (seed,), strict=False)
    fresh = make()
    want = ff.sample(model, fresh.init_noise((2, 3, 5), seed=seed), fresh)
    assert torch.equal(exported.module()(seed), want)
    with pytest.raises(ValueError, match="init_noise kept while torch.export traced it"):
        ff.sample(model, fresh.init_noise((2, 3, 5), seed=seed), sampler)
    assert torch.equal(ff.sample(model, sampler.init_noise((2, 3, 5), seed=seed), sampler), want)


@pytest.mark.parametrize("backend", ["torch", "cuda"])
def test_channels_last_step_traces_with_dynamic_shapes(backend):
    """torch.compile(fullgraph=True, dynamic=True) traces a step of a channels_last state: the order it is stepped
    in was found with sorted(key=stride), which dynamo cannot trace on symbolic strides (a graph break, an error with
    fullgraph); the traced step gives eager's bits and layout."""
    if ff.backends.get_backend(backend).availability() is not None:
        pytest.skip(f"{backend} backend unavailable")
    torch._dynamo.reset()
    cl = torch.channels_last
    s = ff.Sampler(ff.VP(), "dpm++2m", steps=3, guidance_scale=2.0, backend=backend)
    z0 = s.init_noise((2, 4, 6, 5), seed=7).to(memory_format=cl)
    o = torch.randn((4, 4, 6, 5), generator=torch.Generator().manual_seed(2)).to(memory_format=cl)
    s.prepare(z0.device, z0.dtype)
    step = torch.compile(lambda o, z: s.step(o, z, 0, return_model_input=True, duplicate_model_input=True),
                         fullgraph=True, dynamic=True, backend="eager")
    got, got_in = step(o, z0)
    s.runner.reset()
    want, want_in = s.step(o, z0, 0, return_model_input=True, duplicate_model_input=True)
    assert got.stride() == want.stride() == z0.stride() and got_in.stride() == want_in.stride()
    assert torch.equal(got, want) and torch.equal(got_in, want_in)


def test_guided_pair_with_a_none_uncond_is_refused():
    """``(cond, None)`` reached the backend as an unguided output: the step silently ignored guidance_scale."""
    s = ff.Sampler(ff.VP(), steps=3, guidance_scale=3.0, backend="torch")
    z = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"\(cond, None\)"):
        s.step((torch.randn(2, 3), None), z, 0)


@pytest.mark.parametrize("name", ["z", "out", "noise", "uncond"])
def test_a_non_tensor_argument_to_step_is_named(name):
    """A numpy state, out or noise (or a list) failed inside with "'numpy.ndarray' object has no attribute
    'is_contiguous'" (or 'device', 'requires_grad'), naming no argument."""
    guided = name == "uncond"
    s = ff.Sampler(ff.VP(), "ddpm", steps=3, backend="torch", guidance_scale=2.0 if guided else None)
    z, o = torch.randn(2, 3), torch.randn(2, 3)
    bad = np.zeros((2, 3), dtype=np.float32)
    kw = {"seed": 0}
    if name == "z":
        z = bad
    elif name in ("out", "noise"):
        kw[name] = bad
    output = (o, bad) if guided else o
    named = r"model_output\[1\]" if guided else name
    with pytest.raises(TypeError, match=rf"^{named} must be a torch.Tensor"):
        s.step(output, z, 0, **kw)
    # nor does it leave a numpy dtype in the backend caches: torch 2.8's dynamo cannot hash that key, and every
    # later traced step that read them failed
    from fastflow.backends import _RESOLVED

    assert all(isinstance(key[2], (torch.dtype, type(None))) for key in _RESOLVED)
    assert all(isinstance(key[1], torch.dtype) for key in s.runner._dispatch)


def test_a_0d_state_with_return_model_input_names_the_batch_dimension():
    """The torch backend sized the model input from z.shape[0] before its checks: IndexError 'tuple index out of
    range' (fastflow.sample of a 0-d noise tensor too)."""
    s = ff.Sampler(ff.VP(), steps=3, backend="torch")
    with pytest.raises(ValueError, match="batch dimension"):
        s.step(torch.tensor(1.0), torch.tensor(1.0), 0, return_model_input=True)
    with pytest.raises(ValueError, match="batch dimension"):
        ff.sample(lambda z, t: torch.zeros_like(z), torch.tensor(1.0), s)


@pytest.mark.parametrize("scale", [math.inf, math.nan])
def test_a_non_finite_first_input_scale_is_refused(scale):
    """input_scale[0] is not in the coefficient table (CIN holds the next stage's), so its finiteness went unchecked
    and model_input(z, 0) returned inf or NaN."""
    with pytest.raises(ValueError, match="input_scale must be finite"):
        ff.Sampler(ff.VP(), steps=3, input_scale=[scale, 1.0, 1.0])


def test_a_guidance_scale_past_float32_is_refused_not_stepped_to_inf():
    """1e39 is finite in float64, so it passed the check, and became inf in the float32 table: every output inf."""
    s = ff.Sampler(ff.VP(), steps=3, guidance_scale=1e39, backend="torch")
    z = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"coefficient W at stage 0 is 1e\+39, past the range of a torch.float32"):
        s.step((z, 0.5 * z), z, 0)
    out = s.step((z.double(), 0.5 * z.double()), z.double(), 0)  # a float64 table holds it
    assert torch.isfinite(out).all()


def test_sample_refuses_a_callback_that_is_not_callable_before_the_first_model_call():
    """callback=3 ran the first model call and step, then failed with "'int' object is not callable"."""
    calls = []
    s = ff.Sampler(ff.VP(), steps=3, backend="torch")
    with pytest.raises(TypeError, match="callback must be callable"):
        ff.sample(lambda z, t: calls.append(t) or torch.zeros_like(z), torch.zeros(1, 2), s, callback=3)
    assert not calls


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("backend", ["torch", "cuda", "triton"])
def test_a_sampler_that_has_stepped_copies_and_its_copy_steps_alike(backend, how):
    """The docs give each thread a ``copy.deepcopy`` of a sampler. One that has stepped keeps its backend, and the
    Triton backend holds its kernels' module, which cannot be copied: the copy failed. Backends are shared by copies
    (and pickled by name); the copy then finishes the loop as the original does."""
    import copy
    import pickle

    if ff.backends.get_backend(backend).availability() is not None:
        pytest.skip(f"{backend} backend unavailable")
    sampler = ff.Sampler(ff.VP(), solver="dpm++2m", prediction="eps", steps=4, backend=backend)
    z = sampler.init_noise((2, 3, 5), seed=2)
    o = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(1))
    z = sampler.step(o, z, 0)
    twin = copy.deepcopy(sampler) if how == "deepcopy" else pickle.loads(pickle.dumps(sampler))
    assert twin.runner._dispatch and all(found[1] is ff.backends.get_backend(backend)
                                         for found in twin.runner._dispatch.values())
    assert torch.equal(twin.step(0.5 * o, z, 1), sampler.step(0.5 * o, z, 1))


def test_prepare_refuses_a_dtype_that_is_not_a_torch_dtype():
    """``prepare("cpu", "float32")`` prepared nothing for float32 states, silently."""
    with pytest.raises(TypeError, match="dtype must be a torch.dtype"):
        ff.Sampler(ff.VP(), steps=3).prepare("cpu", "float32")


@pytest.mark.parametrize("backend", ["torch", "cuda"])
def test_continuing_a_traced_loop_eagerly_is_refused(backend):
    """A multistep stage traced by torch.export (non-strict) keeps fake tensors as the loop's history; the next
    eager stage read them and stepped to garbage (the operator's fake writes nothing; torch's ops give NaN). It
    raises, naming them, and a loop started again at stage 0 steps as usual."""
    if ff.backends.get_backend(backend).availability() is not None:
        pytest.skip(f"{backend} backend unavailable")
    sampler = ff.Sampler(ff.VP(), solver="dpm++2m", prediction="eps", steps=4, backend=backend)
    z = sampler.init_noise((2, 3, 5), seed=1)

    class First(torch.nn.Module):
        def forward(self, o: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            return sampler.step(o, z, 0)

    torch.export.export(First(), (0.5 * z, z), strict=False)
    with pytest.raises(RuntimeError, match=r"fake tensors \(history\)"):
        sampler.step(0.5 * z, z, 1)
    fresh = ff.Sampler(ff.VP(), solver="dpm++2m", prediction="eps", steps=4, backend=backend)
    assert torch.equal(sampler.step(0.5 * sampler.step(0.5 * z, z, 0), z, 1),
                       fresh.step(0.5 * fresh.step(0.5 * z, z, 0), z, 1))
