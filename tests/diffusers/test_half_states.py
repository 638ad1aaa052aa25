"""Drop-ins that upcast like diffusers (Euler family, flow matching, DPM-Solver) run half-precision samples without
the casts: the kernels compute half states in float32 and round once on the store, so a loop on float16 or
bfloat16 latents gives the same bits as the upcast, float32 update and cast back it replaces."""

from __future__ import annotations

import pytest
import torch
from dropin_helpers import stand_in, start_noise

import fastflow.diffusers as ffd

# (class, config, step keyword arguments): the drop-ins whose step upcasts the sample to float32.
CASES = [
    ("EulerDiscreteScheduler", {}, {}),
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True}, {"s_churn": 0.5, "s_tmax": 10.0}),
    ("EulerAncestralDiscreteScheduler", {}, {}),
    ("EDMEulerScheduler", {}, {}),
    ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}, {}),
    ("DPMSolverMultistepScheduler", {}, {}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, {}),
]


def _loop(sched, x: torch.Tensor, upcast: bool, step_kwargs: dict) -> list:
    """A loop on half latents; ``upcast`` hands the step float32 samples (the cast path) instead of half ones."""
    sched.set_timesteps(8)
    x = (x * getattr(sched, "init_noise_sigma", 1.0)).to(x.dtype)
    outs = []
    for t in sched.timesteps:
        inp = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
        o = stand_in(inp.float(), t).to(x.dtype)
        kw = dict(step_kwargs, generator=torch.Generator().manual_seed(int(t * 1000) % 9973))
        if "generator" not in sched.step.__code__.co_varnames:
            kw.pop("generator")
        out = sched.step(o, t, x.float() if upcast else x, return_dict=False, **kw)
        x = out[0]
        outs.append(out)
    return outs


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(("name", "config", "step_kwargs"), CASES, ids=lambda v: v if isinstance(v, str) else None)
def test_half_samples_equal_the_upcast_path(name, config, step_kwargs, dtype):
    make = getattr(ffd, name)
    x = start_noise(3).to(dtype)
    direct = _loop(make(**config), x, False, step_kwargs)
    upcast = _loop(make(**config), x, True, step_kwargs)
    for a, b in zip(direct, upcast, strict=True):
        assert a[0].dtype == b[0].dtype == dtype
        assert torch.equal(a[0], b[0])
        for pa, pb in zip(a[1:], b[1:], strict=True):  # pred_original_sample where the class returns it
            assert (pa is None) == (pb is None)
            if pa is not None:
                assert pa.dtype == pb.dtype == torch.float32
                assert torch.equal(pa, pb)
