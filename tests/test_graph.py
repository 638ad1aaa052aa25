"""Whole-loop capture: validation and the eager fallback on the CPU; replay against eager on a GPU."""

from __future__ import annotations

import contextlib
import math
import types
import warnings
from collections.abc import Callable

import pytest
import torch

import fastflow
from fastflow import backends
from fastflow import graph as ffgraph
from fastflow._capture import MAX_WARNED
from fastflow.backends.reference import TorchBackend
from fastflow.graph import CaptureFallbackWarning, GraphCache, capture, capture_blockers, sampler_key
from fastflow.plan import W

SHAPE = (2, 3, 4, 4)


def toy_model(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth, time-dependent stand-in for a denoiser (no host sync)."""
    return torch.tanh(0.7 * z + 0.001 * t.to(z.dtype)) * 0.9 + 0.05 * z.flip(-1)


def guided_model(z: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    base = toy_model(z, t)
    return base + 0.1 * c.to(z.dtype), base


def doubled_model(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    base = toy_model(z, t)
    return torch.cat([base, base * 0.8 + 0.1])


def make_sampler(solver: str = "ddim", steps: int = 6, **kw) -> fastflow.Sampler:
    schedule = fastflow.FlowMatching() if solver == "flow-euler" else fastflow.VP()
    prediction = "flow" if solver == "flow-euler" else "eps"
    kw.setdefault("backend", "torch")
    return fastflow.Sampler(schedule, solver, prediction=prediction, steps=steps, **kw)


def use_torch_backend(monkeypatch, backend) -> None:
    """Stand ``backend`` in for the torch reference (dispatch caches resolutions, so reset that too)."""
    monkeypatch.setitem(backends._CACHE, "torch", backend)
    if hasattr(backends, "_RESOLVED"):
        monkeypatch.setattr(backends, "_RESOLVED", {})


@pytest.fixture(autouse=True)
def _quiet_fallback():
    ffgraph._WARNED.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CaptureFallbackWarning)
        yield


# ----------------------------------------------------------------------------- validation
def test_rejects_bad_arguments():
    s = make_sampler()
    with pytest.raises(TypeError, match="callable"):
        capture(None, s, SHAPE, device="cpu")
    with pytest.raises(TypeError, match="fastflow.Sampler"):
        capture(toy_model, "ddim", SHAPE, device="cpu")
    for bad in [(), (0, 3), (2, -1)]:
        with pytest.raises(ValueError, match="shape"):
            capture(toy_model, s, bad, device="cpu")
    for bad in [(2.0, 3), (True, 3), "23", 5]:
        with pytest.raises(TypeError, match="shape"):
            capture(toy_model, s, bad, device="cpu")
    with pytest.raises(TypeError, match="dtype"):
        capture(toy_model, s, SHAPE, device="cpu", dtype=torch.int32)
    with pytest.raises(TypeError, match="model_dtype"):
        capture(toy_model, s, SHAPE, device="cpu", model_dtype=torch.int8)
    with pytest.raises(ValueError, match="warmup"):
        capture(toy_model, s, SHAPE, device="cpu", warmup=0)
    with pytest.raises(ValueError, match="unguided"):
        capture(toy_model, s, SHAPE, device="cpu", guidance_scale=3.0)
    with pytest.raises(TypeError, match="cond"):
        capture(toy_model, s, SHAPE, device="cpu", cond=3)
    with pytest.raises(TypeError, match="cond"):
        capture(toy_model, s, SHAPE, device="cpu", cond={"a": 1.0})


class GpuOnly(TorchBackend):
    def supports(self, device):
        return None if torch.device(device).type == "cuda" else "this backend runs on CUDA devices only"


def test_rejects_backend_that_cannot_run(monkeypatch):
    use_torch_backend(monkeypatch, GpuOnly())
    with pytest.raises(ValueError, match="cannot run on cpu.*CUDA devices only"):
        capture(toy_model, make_sampler(), SHAPE, device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_rejects_cuda_without_cuda():
    with pytest.raises(ValueError, match="CUDA is not available"):
        capture(toy_model, make_sampler(), SHAPE, device="cuda")


def test_rejects_bad_guidance_at_call():
    s = make_sampler(guidance_scale=2.0)
    c = torch.zeros(SHAPE)
    loop = capture(guided_model, s, SHAPE, device="cpu", cond=c)
    with pytest.raises(ValueError, match="finite"):
        loop(seed=0, guidance_scale=math.inf)
    with pytest.raises(TypeError, match="float"):
        loop(seed=0, guidance_scale="3")
    unguided = capture(toy_model, make_sampler(), SHAPE, device="cpu")
    with pytest.raises(ValueError, match="unguided"):
        unguided(seed=0, guidance_scale=2.0)


def test_model_with_wrong_output_is_named():
    s = make_sampler()
    loop = capture(lambda z, t: z[:, :1], s, SHAPE, device="cpu")
    with pytest.raises(ValueError, match=r"shape \(2, 1, 4, 4\) at stage 0; expected \(2, 3, 4, 4\)"):
        loop(seed=0)
    loop = capture(lambda z, t: z.sum().item(), s, SHAPE, device="cpu")
    with pytest.raises(TypeError, match="must return a tensor"):
        loop(seed=0)
    guided = capture(lambda z, t: z, make_sampler(guidance_scale=2.0), SHAPE, device="cpu")
    with pytest.raises(ValueError, match="guided model_fn returned batch 2"):
        guided(seed=0)
    pair = capture(lambda z, t: (z, z), s, SHAPE, device="cpu")
    with pytest.raises(ValueError, match="unguided loop needs a tensor"):
        pair(seed=0)


def test_call_validation_leaves_buffers_alone():
    c = torch.randn(SHAPE)
    loop = capture(guided_model, make_sampler(guidance_scale=2.0), SHAPE, device="cpu", cond=c)
    ref = loop(seed=1)
    with pytest.raises(ValueError, match="noise has shape"):
        loop(noise=torch.zeros(1, 3, 4, 4))
    with pytest.raises(TypeError, match="noise has dtype"):
        loop(noise=torch.zeros(SHAPE, dtype=torch.float64))
    with pytest.raises(ValueError, match="captured with"):
        loop(seed=1, cond=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="structure"):
        loop(seed=1, cond={"c": c})
    with pytest.raises(ValueError, match="seed"):
        loop(seed=[1, 2, 3])
    with pytest.raises(ValueError, match="finite"):
        loop(seed=5, cond=torch.ones(SHAPE), guidance_scale=math.nan)
    assert torch.equal(loop(seed=1), ref)


def test_fallback_reason_and_warning_once():
    s = make_sampler()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = capture(toy_model, s, SHAPE, device="cpu")
        b = capture(toy_model, s, SHAPE, device="cpu")
    assert not a.captured and not b.captured
    assert "CUDA device" in a.reason and a.reason == b.reason
    assert a.output is None and a.memory_bytes == 0
    ours = [w for w in caught if issubclass(w.category, CaptureFallbackWarning)]
    assert len(ours) == 1 and "CUDA device" in str(ours[0].message)
    assert "eager" in repr(a)


def test_capture_blockers(monkeypatch):
    s = make_sampler()
    assert any("CUDA device" in r for r in capture_blockers(s, "cpu"))

    class NotCapturable(TorchBackend):
        capturable = False
        capture_reason = "it reads its coefficients on the host"

    use_torch_backend(monkeypatch, NotCapturable())
    reasons = capture_blockers(s, "cpu")
    assert any("'torch' backend cannot be captured: it reads its coefficients on the host" in r for r in reasons)


# ----------------------------------------------------------------------------- eager fallback == fastflow.sample
SOLVERS = ["ddim", "flow-euler", "heun", "dpm++2m", "dpm++3m", "unipc", "ddpm", "euler-ancestral", "sde-dpm++2m"]


@pytest.mark.parametrize("solver", SOLVERS)
def test_fallback_equals_sample_bitwise(solver):
    s = make_sampler(solver)
    loop = capture(toy_model, s, SHAPE, device="cpu")
    noise = s.init_noise(SHAPE, seed=11)
    expected = fastflow.sample(toy_model, noise, s)
    assert torch.equal(loop(seed=11), expected)
    assert torch.equal(loop(noise=noise, seed=11), expected)
    assert torch.equal(loop.eager(noise=noise, seed=11), expected)


def test_fallback_model_dtype_and_float64():
    s = make_sampler("dpm++2m")
    loop = capture(toy_model, s, SHAPE, device="cpu", model_dtype=torch.bfloat16)
    noise = s.init_noise(SHAPE, seed=3)
    assert torch.equal(loop(noise=noise), fastflow.sample(toy_model, noise, s, model_dtype=torch.bfloat16))
    s64 = make_sampler("unipc")
    loop64 = capture(toy_model, s64, SHAPE, device="cpu", dtype=torch.float64)
    noise64 = s64.init_noise(SHAPE, seed=3, dtype=torch.float64)
    assert torch.equal(loop64(noise=noise64), fastflow.sample(toy_model, noise64, s64))


def test_fallback_guidance_cond_and_new_scale():
    s = make_sampler("dpm++2m", guidance_scale=3.0)
    c1, c2 = torch.randn(SHAPE), torch.randn(SHAPE)
    loop = capture(guided_model, s, SHAPE, device="cpu", cond=c1)
    noise = s.init_noise(SHAPE, seed=5)
    table_before = s.table("cpu").clone()
    assert torch.equal(loop(noise=noise), fastflow.sample(lambda z, t: guided_model(z, t, c1), noise, s))
    # new conditioning and a new scale, same loop
    s2 = make_sampler("dpm++2m", guidance_scale=6.5)
    got = loop(noise=noise, cond=c2, guidance_scale=6.5)
    assert torch.equal(got, fastflow.sample(lambda z, t: guided_model(z, t, c2), noise, s2))
    # the scale stays in effect; the user's sampler is untouched
    assert torch.equal(loop(noise=noise), got)
    assert torch.equal(s.table("cpu"), table_before) and s.plan.coefs[0, W] == 3.0
    # a doubled-batch model works too
    loop2 = capture(doubled_model, s, SHAPE, device="cpu")
    assert torch.equal(loop2(noise=noise), fastflow.sample(doubled_model, noise, s))


def test_fallback_cond_kinds():
    s = make_sampler()
    a, b = torch.randn(SHAPE), torch.randn(SHAPE)
    noise = s.init_noise(SHAPE, seed=2)

    def two(z, t, x, y):
        return toy_model(z, t) + 0.1 * x - 0.2 * y

    def named(z, t, *, x, y):
        return two(z, t, x, y)

    ref = fastflow.sample(lambda z, t: two(z, t, a, b), noise, s)
    assert torch.equal(capture(two, s, SHAPE, device="cpu", cond=(a, b))(noise=noise), ref)
    loop = capture(named, s, SHAPE, device="cpu", cond={"x": a, "y": b})
    assert torch.equal(loop(noise=noise), ref)
    swapped = fastflow.sample(lambda z, t: two(z, t, b, a), noise, s)
    assert torch.equal(loop(noise=noise, cond={"x": b, "y": a}), swapped)


def test_fallback_seeds():
    s = make_sampler("ddpm")
    loop = capture(toy_model, s, SHAPE, device="cpu")
    torch.manual_seed(0)
    first, second = loop(), loop()
    assert not torch.equal(first, second)  # fresh seeds per call
    assert torch.equal(loop(seed=[4, 9]), loop(seed=[4, 9]))
    # per-sample seeds: a sample does not depend on its batch mates
    pair = loop(seed=[4, 9])
    swapped = loop(seed=[9, 4])
    assert torch.equal(pair[0], swapped[1]) and torch.equal(pair[1], swapped[0])
    # deterministic solver: given noise, no seed needed, same result every call
    d = capture(toy_model, make_sampler(), SHAPE, device="cpu")
    noise = torch.randn(SHAPE)
    assert torch.equal(d(noise=noise), d(noise=noise))


def _cpu_backends() -> list[str]:
    names = ["torch"]
    for name in ("triton", "cuda"):
        try:
            b = backends.get_backend(name)
            if b.availability() is None and b.supports(torch.device("cpu")) is None:
                names.append(name)
        except Exception:  # an optional backend that fails to load is simply not tested here
            pass
    return names


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("solver", ["ddim", "dpm++2m", "ddpm", "sde-dpm++2m"])
def test_graph_mode_loop_equals_eager(solver, backend):
    """The captured loop reads step rows and noise counters from a device tensor; same numbers as int steps."""
    s = make_sampler(solver, steps=4, backend=backend)
    loop = capture(toy_model, s, SHAPE, device="cpu")
    loop._set_seeds(7)
    loop._draw_initial_state()
    assert torch.equal(loop._z0, s.init_noise(SHAPE, seed=7))
    graph_mode = loop._loop(graph_mode=True)
    loop._runner.reset()
    assert torch.equal(graph_mode, loop._loop(graph_mode=False))


# ----------------------------------------------------------------------------- the cache
def test_sampler_key():
    assert sampler_key(make_sampler()) == sampler_key(make_sampler())
    assert sampler_key(make_sampler(steps=6)) != sampler_key(make_sampler(steps=7))
    assert sampler_key(make_sampler("ddim")) != sampler_key(make_sampler("dpm++2m"))
    g1, g2 = make_sampler(guidance_scale=2.0), make_sampler(guidance_scale=5.0)
    assert sampler_key(g1) == sampler_key(g2) != sampler_key(make_sampler())


@pytest.mark.parametrize(
    "a, b",
    [
        # stage 0's model-input scale is not in the plan's table (its CIN column holds the next stage's)
        (make_sampler(steps=4, input_scale=[1.0] * 4), make_sampler(steps=4, input_scale=[0.5, 1.0, 1.0, 1.0])),
        # one x0 step to sigma = 0: the same table and timesteps, but twice the initial noise
        (
            fastflow.Sampler(fastflow.VP(), "ddim", prediction="x0", steps=1, backend="torch"),
            fastflow.Sampler(fastflow.schedules.Rescaled(fastflow.VP(), 2.0), "ddim", prediction="x0", steps=1,
                             backend="torch"),
        ),
        # one x0 step to sigma = 0 again: the same table from any start time, but the model is called at t_max
        (
            fastflow.Sampler(fastflow.VP(), "ddim", prediction="x0", steps=1, backend="torch"),
            fastflow.Sampler(fastflow.VP(), "ddim", prediction="x0", steps=1, backend="torch", t_max=500),
        ),
    ],
    ids=["input_scale", "init_scale", "timesteps"],
)
def test_graph_cache_keys_what_a_capture_reads(a, b):
    assert sampler_key(a) != sampler_key(b)
    cache = GraphCache(toy_model, device="cpu")
    for s in (a, b):
        assert torch.equal(cache(s, seed=3, shape=SHAPE), fastflow.sample(toy_model, s.init_noise(SHAPE, seed=3), s))
    assert cache.captures == 2


def test_graph_cache_refuses_what_cannot_capture_before_evicting(monkeypatch):
    """Arguments that cannot capture (a backend that cannot run here) raise before the oldest capture is evicted;
    the eviction comes before a capture, so no more than max_graphs pools are ever alive."""
    monkeypatch.setitem(backends._CACHE, "cuda", GpuOnly())
    monkeypatch.setattr(backends, "_RESOLVED", {})
    cache = GraphCache(toy_model, device="cpu", max_graphs=1)
    good = cache.get(make_sampler(), SHAPE)
    with pytest.raises(ValueError, match="cannot run on cpu"):
        cache.get(make_sampler(backend="cuda"), SHAPE)
    assert len(cache) == 1 and cache.evictions == 0
    assert cache.get(make_sampler(), SHAPE) is good


def test_graph_cache_follows_the_current_cuda_device(monkeypatch):
    """``device="cuda"`` is the current device at each call, as for torch's tensors: after
    ``torch.cuda.set_device`` a call gets a capture on the new device, not the one made on the last (which would run
    the loop on the other GPU). Stand-ins replace the GPU: the capture records the device it is asked for."""
    current = [0]
    made: list[torch.device] = []

    def fake_capture(model_fn, sampler, shape, *, device, **kwargs):
        made.append(device)
        return types.SimpleNamespace(device=device)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(ffgraph, "_checked_arguments", lambda *args: (SHAPE, args[3]))
    monkeypatch.setattr(ffgraph, "capture", fake_capture)
    cache = GraphCache(toy_model, device="cuda")
    sampler = make_sampler()
    first = cache.get(sampler, SHAPE)
    current[0] = 1
    second = cache.get(sampler, SHAPE)
    current[0] = 0
    assert cache.get(sampler, SHAPE) is first
    assert made == [torch.device("cuda", 0), torch.device("cuda", 1)] and second.device == torch.device("cuda", 1)
    pinned = GraphCache(toy_model, device="cuda:0")
    current[0] = 1
    assert pinned.get(sampler, SHAPE).device == torch.device("cuda", 0)  # an index given is kept


def _fallback_warning_site(call: Callable[[], object]) -> tuple[str, int]:
    ffgraph._WARNED.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    ours = [w for w in caught if issubclass(w.category, CaptureFallbackWarning)]
    assert len(ours) == 1
    return ours[0].filename, ours[0].lineno


def test_fallback_warning_points_at_the_callers_line():
    """However deep in fastflow the fallback is found, the warning names the line outside fastflow that called it."""
    for call in (
        lambda: capture(toy_model, make_sampler(), SHAPE, device="cpu"),
        lambda: GraphCache(toy_model, device="cpu").get(make_sampler(), SHAPE),
        lambda: GraphCache(toy_model, device="cpu")(make_sampler(), shape=SHAPE),
    ):
        assert _fallback_warning_site(call) == (__file__, call.__code__.co_firstlineno)


def test_graph_cache_bounded():
    cache = GraphCache(toy_model, device="cpu", max_graphs=2)
    noise = torch.randn(SHAPE)
    s6, s7, s8 = make_sampler(steps=6), make_sampler(steps=7), make_sampler(steps=8)
    assert torch.equal(cache(s6, noise=noise), fastflow.sample(toy_model, noise, s6))
    cache(make_sampler(steps=6), noise=noise)
    assert cache.captures == 1
    cache(s7, noise=noise)
    cache(s8, shape=SHAPE, seed=1)
    assert cache.captures == 3 and cache.evictions == 1 and len(cache) == 2
    cache(s8, noise=torch.randn(4, 3, 4, 4))  # a new shape is a new capture
    assert cache.captures == 4 and len(cache) == 2
    with pytest.raises(ValueError, match="noise= or shape="):
        cache(s8)
    with pytest.raises(ValueError, match="max_graphs"):
        GraphCache(toy_model, device="cpu", max_graphs=0)
    cache.clear()
    assert len(cache) == 0 and cache.memory_bytes == 0


def test_graph_cache_guidance_shares_capture():
    cache = GraphCache(guided_model, device="cpu")
    c = torch.randn(SHAPE)
    noise = torch.randn(SHAPE)
    for g in (2.0, 7.5, 2.0):
        s = make_sampler(guidance_scale=g)
        got = cache(s, noise=noise, cond=c)
        assert torch.equal(got, fastflow.sample(lambda z, t: guided_model(z, t, c), noise, s))
    assert cache.captures == 1


# ----------------------------------------------------------------------------- GPU: replay == eager
gpu = pytest.mark.gpu


class TinyNet(torch.nn.Module):
    """A small model with weights (a matmul over channels) and a time embedding."""

    def __init__(self, channels: int):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.mix = torch.nn.Parameter(torch.randn(channels, channels, generator=g) * 0.3)
        self.bias = torch.nn.Parameter(torch.randn(channels, generator=g) * 0.1)

    def forward(self, z: torch.Tensor, t: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        h = torch.einsum("bc...,dc->bd...", z, self.mix.to(z.dtype))
        h = h + self.bias.to(z.dtype).view(1, -1, *([1] * (z.dim() - 2)))
        out = torch.tanh(h) + 0.01 * torch.sin(t.to(z.dtype) / 100) * z
        return out if c is None else out + 0.1 * c.to(z.dtype)


def _backends_on_gpu() -> list[str]:
    names = ["torch"]
    if torch.cuda.is_available():
        for name in ("triton", "cuda"):
            b = backends.get_backend(name)
            if b.availability() is None and b.supports(torch.device("cuda")) is None:
                names.append(name)
    return names


GPU_BACKENDS = ["torch", "triton", "cuda"]
DETERMINISTIC = ["ddim", "flow-euler", "heun", "dpm++2m", "dpm++3m", "unipc"]
STOCHASTIC = ["ddpm", "euler-ancestral", "sde-dpm++2m"]
GSHAPE = (4, 4, 16, 16)


def _gpu_sampler(solver: str, backend: str, **kw) -> fastflow.Sampler:
    if backend not in _backends_on_gpu():
        pytest.skip(f"backend {backend} unavailable: {backends.get_backend(backend).availability()}")
    return make_sampler(solver, steps=8, backend=backend, **kw)


@gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("solver", DETERMINISTIC)
def test_gpu_replay_equals_eager_deterministic(solver, backend):
    dev = torch.device("cuda")
    net = TinyNet(GSHAPE[1]).to(dev)
    s = _gpu_sampler(solver, backend)
    loop = capture(net, s, GSHAPE, device=dev)
    assert loop.captured, loop.reason
    assert loop.memory_bytes > 0
    for seed in (0, 1):
        noise = s.init_noise(GSHAPE, seed=seed, device=dev)
        expected = fastflow.sample(net, noise, s)
        got = loop(noise=noise)
        torch.cuda.synchronize()
        assert torch.equal(got, expected), (got - expected).abs().max()
        assert torch.equal(loop(seed=seed), expected)  # initial noise drawn inside the small init graph


@gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("solver", STOCHASTIC)
def test_gpu_replay_stochastic_seeds(solver, backend):
    dev = torch.device("cuda")
    net = TinyNet(GSHAPE[1]).to(dev)
    s = _gpu_sampler(solver, backend)
    loop = capture(net, s, GSHAPE, device=dev)
    assert loop.captured, loop.reason
    a1, a2, b = loop(seed=10), loop(seed=10), loop(seed=20)
    assert torch.equal(a1, a2)
    assert not torch.equal(a1, b)
    assert torch.equal(a1, loop.eager(seed=10))
    noise = s.init_noise(GSHAPE, seed=10, device=dev)  # also sets s.seeds for the steps
    assert torch.equal(a1, fastflow.sample(net, noise, s))
    fresh = [loop() for _ in range(3)]
    assert not torch.equal(fresh[0], fresh[1]) and not torch.equal(fresh[1], fresh[2])


@gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_new_guidance_and_cond_without_recapture(backend):
    dev = torch.device("cuda")
    net = TinyNet(GSHAPE[1]).to(dev)

    def model(z, t, c):
        return net(z, t, c), net(z, t)

    s = _gpu_sampler("dpm++2m", backend, guidance_scale=3.0)
    c1, c2 = torch.randn(GSHAPE, device=dev), torch.randn(GSHAPE, device=dev)
    loop = capture(model, s, GSHAPE, device=dev, cond=c1)
    assert loop.captured, loop.reason
    graph = loop._graph
    noise = s.init_noise(GSHAPE, seed=1, device=dev)
    assert torch.equal(loop(noise=noise), fastflow.sample(lambda z, t: model(z, t, c1), noise, s))
    s2 = _gpu_sampler("dpm++2m", backend, guidance_scale=7.0)
    got = loop(noise=noise, cond=c2, guidance_scale=7.0)
    assert torch.equal(got, fastflow.sample(lambda z, t: model(z, t, c2), noise, s2))
    assert loop._graph is graph


@gpu
def test_gpu_bf16_model_and_static_output():
    dev = torch.device("cuda")
    net = TinyNet(GSHAPE[1]).to(dev)
    s = _gpu_sampler("unipc", "torch")
    loop = capture(net, s, GSHAPE, device=dev, model_dtype=torch.bfloat16)
    assert loop.captured, loop.reason
    noise = s.init_noise(GSHAPE, seed=2, device=dev)
    expected = fastflow.sample(net, noise, s, model_dtype=torch.bfloat16)
    out = loop(noise=noise, copy=False)
    assert out.data_ptr() == loop.output.data_ptr()
    assert torch.equal(out, expected)
    loop.release()
    assert not loop.captured and loop.memory_bytes == 0
    assert torch.equal(loop(noise=noise), expected)  # released: runs eagerly


@gpu
def test_gpu_syncing_model_falls_back():
    dev = torch.device("cuda")
    net = TinyNet(GSHAPE[1]).to(dev)

    def syncing(z, t):
        scale = float(z.abs().max())  # a host sync: cannot be captured
        return net(z, t) / max(scale, 1.0)

    s = _gpu_sampler("ddim", "torch")
    with pytest.warns(CaptureFallbackWarning, match="model call at stage 0"):
        loop = capture(syncing, s, GSHAPE, device=dev)
    assert not loop.captured and "model call at stage 0 synchronizes" in loop.reason
    noise = s.init_noise(GSHAPE, seed=0, device=dev)
    assert torch.equal(loop(noise=noise), fastflow.sample(syncing, noise, s))


@gpu
def test_gpu_syncing_backend_falls_back(monkeypatch):
    class Syncing(TorchBackend):
        def fused_step(self, z, out, model_out, model_out_uncond, history, table, step, **kwargs):
            table.sum().item()  # reads the table on the host: not capture-safe
            return super().fused_step(z, out, model_out, model_out_uncond, history, table, step, **kwargs)

    use_torch_backend(monkeypatch, Syncing())
    dev = torch.device("cuda")
    net = TinyNet(GSHAPE[1]).to(dev)
    s = _gpu_sampler("ddim", "torch")
    loop = capture(net, s, GSHAPE, device=dev)
    assert not loop.captured and "'torch' backend's step at stage 0 synchronizes" in loop.reason
    noise = s.init_noise(GSHAPE, seed=0, device=dev)
    assert torch.equal(loop(noise=noise), fastflow.sample(net, noise, s))


@gpu
def test_gpu_cache_evicts_and_frees():
    dev = torch.device("cuda")
    net = TinyNet(GSHAPE[1]).to(dev)
    cache = GraphCache(net, device=dev, max_graphs=2)
    for steps in (4, 5, 6):
        s = make_sampler("ddim", steps=steps)
        noise = s.init_noise(GSHAPE, seed=0, device=dev)
        assert torch.equal(cache(s, noise=noise), fastflow.sample(net, noise, s))
    assert cache.captures == 3 and cache.evictions == 1 and len(cache) == 2
    assert cache.memory_bytes > 0
    cache.clear()
    assert cache.memory_bytes == 0


def test_graph_cache_get_sets_the_sampler_s_guidance_scale():
    """Samplers that differ only in their guidance scale share a capture; ``get`` hands it over with the asked
    sampler's scale (it ran with the scale the last call left: 7 for a sampler of 3)."""

    def doubled(z, t):
        base = toy_model(z, t)
        return torch.cat([base, base * 0.8 + 0.1])

    low, high = make_sampler(guidance_scale=3.0), make_sampler(guidance_scale=7.0)
    cache = GraphCache(doubled, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CaptureFallbackWarning)
        cache(high, seed=1, shape=SHAPE)
        loop = cache.get(low, SHAPE)
        assert loop.guidance_scale == 3.0 and len(cache) == 1
        want = fastflow.sample(doubled, low.init_noise(SHAPE, seed=1), low)
        torch.testing.assert_close(loop(seed=1), want, rtol=0, atol=0)


def test_graph_cache_get_loads_the_asked_cond():
    """Calls with the same key share a capture; ``get`` hands it over with the asked conditioning loaded (it ran
    with the conditioning the last call left in it: c1's for a get of c2)."""

    def model(z, t, c):
        return toy_model(z, t) + 0.1 * c

    s = make_sampler()
    c1, c2 = torch.zeros(SHAPE), torch.ones(SHAPE)
    noise = s.init_noise(SHAPE, seed=0)
    cache = GraphCache(model, device="cpu")
    cache(s, noise=noise, cond=c1)
    loop = cache.get(s, SHAPE, cond=c2)
    assert cache.captures == 1
    assert torch.equal(loop(noise=noise), fastflow.sample(lambda z, t: model(z, t, c2), noise, s))


@pytest.mark.parametrize(
    "bad",
    [
        {"noise": torch.zeros(SHAPE, dtype=torch.float64)},
        {"noise": [[0.0]]},
        {"shape": SHAPE, "seed": [1, 2, 3]},
        {"shape": SHAPE, "seed": 1.5},
        {"shape": SHAPE, "guidance_scale": math.nan},
    ],
    ids=["noise_dtype", "noise_list", "seed_count", "seed_float", "guidance_nan"],
)
def test_graph_cache_call_refused_before_it_captures(bad):
    """A call the loop would refuse raises before a capture is looked up: it evicts nothing and captures nothing
    (on a GPU a capture is warm-up loops and a new memory pool, all for an error)."""

    def doubled(z, t):
        return torch.cat([toy_model(z, t)] * 2)

    cache = GraphCache(doubled, device="cpu", max_graphs=1)
    good = cache.get(make_sampler(steps=4, guidance_scale=2.0), SHAPE)
    with pytest.raises((TypeError, ValueError)):
        cache(make_sampler(steps=5, guidance_scale=2.0), **bad)
    assert cache.captures == 1 and cache.evictions == 0 and list(cache._loops.values()) == [good]


def test_dict_cond_in_another_key_order_shares_the_capture():
    """The model gets a dict's conditioning as keywords: the same keys in another order are the same call (they
    were refused by a loop, and made a second capture in a GraphCache)."""

    def model(z, t, a, b):
        return toy_model(z, t) + 0.1 * a - 0.2 * b

    s = make_sampler()
    a, b = torch.zeros(SHAPE), torch.ones(SHAPE)
    noise = s.init_noise(SHAPE, seed=0)
    cache = GraphCache(model, device="cpu")
    first = cache(s, noise=noise, cond={"a": a, "b": b})
    again = cache(s, noise=noise, cond={"b": b, "a": a})
    assert cache.captures == 1 and torch.equal(first, again)
    loop = cache.get(s, SHAPE, cond={"a": a, "b": b})
    assert torch.equal(loop(noise=noise, cond={"b": b, "a": a}), first)


def test_guidance_scale_past_the_tables_float32_range_is_refused():
    """A finite 1e300 became inf in the loop's float32 table: the loop returned NaN."""
    s = make_sampler(guidance_scale=2.0)
    c = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="past the range"):
        capture(guided_model, s, SHAPE, device="cpu", cond=c, guidance_scale=1e300)
    loop = capture(guided_model, s, SHAPE, device="cpu", cond=c)
    with pytest.raises(ValueError, match="past the range"):
        loop(seed=0, guidance_scale=1e39)


def test_a_none_in_a_guided_models_pair_is_named():
    """(cond, None) failed with "'NoneType' object has no attribute 'shape'"."""
    s = make_sampler(guidance_scale=2.0)
    with pytest.raises(TypeError, match="returned a NoneType in its"):
        capture(lambda z, t: (toy_model(z, t), None), s, SHAPE, device="cpu")(seed=0)


def test_graph_cache_refuses_a_bad_model_fn_or_warmup_when_made():
    """Both were accepted by the constructor and refused only at the first call."""
    with pytest.raises(TypeError, match="model_fn must be callable"):
        GraphCache(3, device="cpu")
    with pytest.raises(ValueError, match="warmup must be an int >= 1"):
        GraphCache(toy_model, device="cpu", warmup=0)


def test_fallback_warnings_remember_a_bounded_number_of_reasons():
    """A reason can quote shapes or an exception's text, so a server meets ever new ones: the warn-once memory keeps
    the latest ``MAX_WARNED`` and warns again for one it has forgotten, instead of growing without end."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(MAX_WARNED + 40):
            ffgraph._warn_once(f"reason {i}")
        assert len(ffgraph._WARNED) == MAX_WARNED
        assert len(caught) == MAX_WARNED + 40
        ffgraph._warn_once(f"reason {MAX_WARNED + 39}")  # the newest: still remembered
        assert len(caught) == MAX_WARNED + 40
        ffgraph._warn_once("reason 0")  # the oldest: forgotten, so it warns again
        assert len(caught) == MAX_WARNED + 41


def test_graph_cache_keys_the_conditioning_signature():
    """Conditioning of another dtype or shape is captured apart (a capture's cond buffers have fixed ones), and a
    later call with the first conditioning finds its own capture again."""
    s = make_sampler(guidance_scale=2.0)
    cache = GraphCache(guided_model, device="cpu")
    conds = [torch.full(SHAPE, 0.5), torch.full(SHAPE, 0.5, dtype=torch.float64), torch.full(SHAPE[1:], 0.5)]
    outs = [cache(s, seed=3, shape=SHAPE, cond=c) for c in conds]
    assert cache.captures == 3 and len(cache) == 3
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])  # the same values, broadcast or cast
    assert torch.equal(cache(s, seed=3, shape=SHAPE, cond=conds[0]), outs[0]) and cache.captures == 3
