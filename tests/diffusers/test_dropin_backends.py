"""Every available backend runs the drop-ins' plans (model-output slot, in-kernel noise, churned x0) alike."""

from __future__ import annotations

import pytest
import torch
from dropin_helpers import assert_close, pair, run_loop, stand_in

from fastflow.backends import get_backend

CASES = [
    ("DDIMScheduler", dict(), dict(eta=0.0)),  # clip_sample: eps from the raw output's history slot
    ("DDIMScheduler", dict(), dict(eta=1.0)),
    ("EulerAncestralDiscreteScheduler", dict(), dict()),
    ("EulerDiscreteScheduler", dict(), dict(s_churn=3.0)),
    ("LCMScheduler", dict(clip_sample=True), dict()),
    ("PNDMScheduler", dict(skip_prk_steps=True, prediction_type="v_prediction"), dict()),  # raw outputs as history
    ("PNDMScheduler", dict(prediction_type="v_prediction"), dict()),  # warm-up: a stored state, three outputs
    ("LMSDiscreteScheduler", dict(prediction_type="v_prediction"), dict()),  # derivatives as history
    ("KDPM2AncestralDiscreteScheduler", dict(), dict()),  # a saved sample and in-kernel noise
    ("DPMSolverSDEScheduler", dict(noise_sampler_seed=1), dict()),  # noise taken back from the sample
]
FIELDS = {"LCMScheduler": "denoised", "PNDMScheduler": None}  # the prediction field step returns, if any


def _available(name: str) -> bool:
    backend = get_backend(name)
    return backend.availability() is None and backend.supports(torch.device("cpu")) is None


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("name,config,kw", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_backend_matches_torch(backend, name, config, kw):
    if not _available(backend):
        pytest.skip(f"backend {backend} unavailable on the CPU: {get_backend(backend).availability()}")
    x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    results = []
    for be in ("torch", backend):
        _, ff = pair(name, backend=be, **config)
        torch.manual_seed(0)  # the in-kernel noise seed is drawn from the global generator
        results.append(run_loop(ff, 4, x=x, step_kwargs=kw))
    (xa, oa), (xb, ob) = results
    assert_close(xb, xa, rtol=1e-4, atol=1e-4)
    field = FIELDS.get(name, "pred_original_sample")
    for a, b in zip(oa, ob, strict=True):
        if field is not None:
            assert_close(getattr(b, field), getattr(a, field), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "cuda"])
@pytest.mark.parametrize("name,config,kw", CASES[:1] + CASES[3:4], ids=["DDIM-clip", "Euler-churn"])
def test_channels_last_inputs_give_the_same_bits(backend, name, config, kw):
    """A model output and sample in another memory layout (channels_last) are read by value: the same bits as
    contiguous ones, also where the raw model output is bound twice (DDIM's clipped x0 and unclipped noise)."""
    if not _available(backend):
        pytest.skip(f"backend {backend} unavailable on the CPU")
    x = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    o = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(2)) * 3
    outs = []
    for layout in (torch.contiguous_format, torch.channels_last):
        _, ff = pair(name, backend=backend, **config)
        ff.set_timesteps(4)
        t = ff.timesteps[1]
        ff.set_begin_index(1)
        torch.manual_seed(0)
        outs.append(ff.step(o.to(memory_format=layout), t, x.to(memory_format=layout), **kw))
    for a, b in zip(outs[0].values(), outs[1].values(), strict=True):
        assert torch.equal(a, b)


LAYOUT_CASES = [
    ("DDIMScheduler", dict(), dict(eta=0.0)),  # the raw model output bound twice (clipped x0, unclipped noise)
    ("LMSDiscreteScheduler", dict(prediction_type="v_prediction"), dict()),  # kept derivatives
    ("DPMSolverMultistepScheduler", dict(), dict()),  # kept x0s
    ("FlowMatchEulerDiscreteScheduler", dict(), dict()),
    ("EulerAncestralDiscreteScheduler", dict(), "generator"),  # noise given (drawn as diffusers draws it)
]


@pytest.mark.parametrize("backend", ["torch", "cuda"])
@pytest.mark.parametrize("name,config,kw", LAYOUT_CASES, ids=[c[0] for c in LAYOUT_CASES])
def test_channels_last_sample_keeps_its_layout(backend, name, config, kw):
    """diffusers' step returns ``prev_sample`` in the sample's layout (channels_last in, channels_last out: torch's
    elementwise ops keep it); so does the drop-in, at every step of a loop (its lane too), with the bits of a
    row-major loop. It came back row-major, which made every later step copy the channels_last model output."""
    if not _available(backend):
        pytest.skip(f"backend {backend} unavailable on the CPU")
    cl = torch.channels_last
    x0 = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    loops = []
    for layout in (torch.contiguous_format, cl):
        ref, ff = pair(name, backend=backend, **config)
        samples = []
        for sched in (ref, ff):
            sched.set_timesteps(5)
            x = (x0 * getattr(sched, "init_noise_sigma", 1.0)).to(memory_format=layout)
            g = torch.Generator().manual_seed(5)
            states = []
            for t in sched.timesteps:
                inp = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
                o = stand_in(inp, t).contiguous(memory_format=layout)
                step_kw = dict(generator=g) if kw == "generator" else kw
                x = sched.step(o, t, x, **step_kw).prev_sample
                states.append(x)
            samples.append(states)
        for a, b in zip(*samples, strict=True):
            assert b.stride() == a.stride()  # diffusers' layout
            assert_close(b, a)
        loops.append(samples[1])
    for a, b in zip(*loops, strict=True):
        assert torch.equal(a, b)
    assert loops[1][-1].is_contiguous(memory_format=cl)


@pytest.mark.parametrize("backend", ["torch", "cuda"])
def test_channels_last_sample_traces_with_dynamic_shapes(backend):
    """A drop-in's step of a channels_last sample traces with torch.compile(fullgraph=True, dynamic=True) (the
    sample's dense order was found with sorted(key=stride), which dynamo cannot trace on symbolic strides), with
    the bits and layout of the eager loop."""
    if not _available(backend):
        pytest.skip(f"backend {backend} unavailable on the CPU")
    cl = torch.channels_last
    loops = []
    for compiled in (False, True):
        torch._dynamo.reset()
        _, ff = pair("DDIMScheduler", backend=backend)
        step = lambda o, t, x, ff=ff: ff.step(o, t, x).prev_sample  # noqa: E731
        if compiled:
            step = torch.compile(step, fullgraph=True, dynamic=True, backend="eager")
        ff.set_timesteps(3)
        ff.set_begin_index(0)
        x = torch.randn((2, 4, 6, 10), generator=torch.Generator().manual_seed(0)).to(memory_format=cl)
        states = []
        for t in ff.timesteps:
            x = step(stand_in(x, t).contiguous(memory_format=cl), t, x)
            states.append(x)
        loops.append(states)
    for a, b in zip(*loops, strict=True):
        assert b.stride() == a.stride() and torch.equal(a, b)
    assert loops[1][-1].is_contiguous(memory_format=cl)


@pytest.mark.parametrize("backend", ["torch", "cuda"])
def test_channels_last_sample_with_a_misshapen_model_output_is_named(backend):
    """A model output of another rank than a channels_last sample is refused by the backend's shape check, which
    names both shapes (the copy into the sample's layout permuted it first: a RuntimeError from permute)."""
    if not _available(backend):
        pytest.skip(f"backend {backend} unavailable on the CPU")
    _, ff = pair("DDIMScheduler", backend=backend)
    ff.set_timesteps(4)
    x = torch.randn(2, 4, 6, 10).to(memory_format=torch.channels_last)
    o = torch.randn(4, 10, 6).transpose(-1, -2)  # 3-D, not contiguous
    with pytest.raises(ValueError, match=r"[(\[]4, 6, 10[)\]]"):
        ff.step(o, ff.timesteps[0], x)
