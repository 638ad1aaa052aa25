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
        x = out[0].to(x.dtype)  # (DPM-Solver returns a float32 sample for a float32 input: the loop stays half)
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
        assert a[0].dtype == dtype
        assert torch.equal(a[0], b[0].to(dtype))
        for pa, pb in zip(a[1:], b[1:], strict=True):  # pred_original_sample where the class returns it
            assert (pa is None) == (pb is None)
            if pa is not None:
                assert pa.dtype == pb.dtype == torch.float32
                assert torch.equal(pa, pb)


# (class, config): a conversion per family, the raw model output as x0 ('sample') beside computed ones.
DTYPE_CASES = [
    ("DDIMScheduler", {"prediction_type": "sample"}),
    ("DDIMScheduler", {"prediction_type": "epsilon", "clip_sample": False}),
    ("DDPMScheduler", {"prediction_type": "sample"}),
    ("LCMScheduler", {"prediction_type": "sample"}),
    ("EulerDiscreteScheduler", {"prediction_type": "sample"}),
    ("EulerDiscreteScheduler", {"prediction_type": "epsilon"}),
    ("EulerAncestralDiscreteScheduler", {"prediction_type": "v_prediction"}),
    ("HeunDiscreteScheduler", {"prediction_type": "sample"}),
    ("EDMEulerScheduler", {}),
    ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}),
    ("DPMSolverMultistepScheduler", {"prediction_type": "sample"}),
    ("DPMSolverMultistepScheduler", {"prediction_type": "epsilon"}),
    ("DPMSolverMultistepScheduler", {"prediction_type": "epsilon", "algorithm_type": "dpmsolver",
                                     "final_sigmas_type": "sigma_min"}),
    ("DPMSolverMultistepScheduler", {"prediction_type": "v_prediction", "algorithm_type": "dpmsolver",
                                     "final_sigmas_type": "sigma_min"}),
    ("UniPCMultistepScheduler", {"prediction_type": "sample"}),
]
DTYPE_PAIRS = [(torch.float32, torch.bfloat16), (torch.float16, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
               (torch.float16, torch.float32)]


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(("sample_dtype", "output_dtype"), DTYPE_PAIRS, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize(("name", "config"), DTYPE_CASES, ids=lambda v: v if isinstance(v, str) else None)
def test_output_dtypes_are_diffusers(name, config, sample_dtype, output_dtype):
    """Every returned field has the dtype diffusers gives it for each mix of sample and model-output dtypes (its
    prediction field is the model output itself for prediction_type='sample'; DPM-Solver returns prev_sample in
    its converted output's dtype), and the values agree to a few half-precision ulps."""
    diffusers = pytest.importorskip("diffusers")
    results = []
    for sched in (getattr(diffusers, name)(**config), getattr(ffd, name)(**config)):
        sched.set_timesteps(6)
        x = (start_noise(4) * getattr(sched, "init_noise_sigma", 1.0)).to(sample_dtype)
        steps = []
        for t in sched.timesteps:
            inp = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
            o = stand_in(inp.float(), t).to(output_dtype)
            out = sched.step(o, t, x, generator=torch.Generator().manual_seed(int(t) % 997)) if "generator" in (
                sched.step.__code__.co_varnames) else sched.step(o, t, x)
            steps.append(dict(out))
            x = out.prev_sample
        results.append(steps)
    for i, (a, b) in enumerate(zip(*results, strict=True)):
        assert a.keys() == b.keys(), f"step {i}"
        for field, va in a.items():
            vb = b[field]
            assert vb.dtype == va.dtype, f"step {i} {field}: {vb.dtype}, diffusers {va.dtype}"
            # diffusers rounds to half precision several times a step, the drop-in once: a few ulps a step apart.
            bound = 8 * torch.finfo(torch.bfloat16).eps * (1 + va.float().abs().max().item())
            torch.testing.assert_close(vb.float(), va.float(), rtol=0, atol=bound, msg=f"step {i} {field}")


THRESHOLDING_CLASSES = ["DDIMScheduler", "DDPMScheduler", "LCMScheduler", "DPMSolverMultistepScheduler",
                        "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler",
                        "SASolverScheduler"]


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("output_dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", THRESHOLDING_CLASSES)
def test_thresholding_converts_a_half_model_output_at_the_sample_dtype(name, output_dtype):
    """A 16-bit model output on a float32 sample is converted to x0 in float32 before the threshold: at t=999 the
    x0 coefficient of epsilon is about -156, and a 16-bit product moved the step by 0.68. The reference is the
    float32 step of the same (rounded) model output."""
    make = getattr(ffd, name)
    config = {"thresholding": True}
    if "timestep_spacing" in make().config:
        config["timestep_spacing"] = "trailing"  # the first step at t=999
    x = start_noise(4)
    model_output = (0.98 * x + 0.05 * start_noise(5)).to(output_dtype)
    steps = []
    for out in (model_output, model_output.float()):
        sched = make(**config)
        sched.set_timesteps(1)
        assert int(sched.timesteps[0]) == 999
        kw = {"generator": torch.Generator().manual_seed(3)} if "generator" in sched.step.__code__.co_varnames else {}
        steps.append(sched.step(out, sched.timesteps[0], x, **kw).prev_sample)
    assert steps[0].dtype == torch.float32
    torch.testing.assert_close(steps[0], steps[1], rtol=1e-5, atol=1e-5)


SDE_DRAW_CASES = [
    ("DPMSolverMultistepScheduler", {}),
    ("DPMSolverSinglestepScheduler", {}),
    ("DPMSolverSinglestepScheduler", {"prediction_type": "sample"}),
    ("EDMDPMSolverMultistepScheduler", {}),
]


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(
    ("sample_dtype", "output_dtype"), [(torch.float32, torch.float16), (torch.float64, torch.float32)],
    ids=["f32-f16", "f64-f32"],
)
@pytest.mark.parametrize(("name", "config"), SDE_DRAW_CASES, ids=lambda v: v if isinstance(v, str) else None)
def test_sde_noise_is_drawn_in_the_converted_output_dtype(name, config, sample_dtype, output_dtype):
    """diffusers' SDE step draws its generator's noise in the dtype of its converted output (the sample's
    promotion with the model output's, the model output's own for prediction_type='sample'); on the CPU another
    dtype draws other numbers (DPM-Solver singlestep and EDM's moved by 3 and 32)."""
    diffusers = pytest.importorskip("diffusers")
    ref = getattr(diffusers, name)(algorithm_type="sde-dpmsolver++", **config)
    outs = []
    for sched in (ref, ffd.from_scheduler(ref)):
        sched.set_timesteps(4)
        # batch 1, 120 elements: torch's CPU randn draws such a size differently per dtype, not just rounded
        x = (start_noise(1, shape=(1, 4, 6, 5)) * sched.init_noise_sigma).to(sample_dtype)
        t = sched.timesteps[0]
        o = stand_in(sched.scale_model_input(x, t).float(), t).to(output_dtype)
        outs.append(sched.step(o, t, x, generator=torch.Generator().manual_seed(1)).prev_sample)
    assert outs[1].dtype == outs[0].dtype
    # diffusers rounds its noise term to the draw's dtype; another draw would be off by the noise itself
    bound = 4 * torch.finfo(output_dtype).eps * float(outs[0].abs().max())
    torch.testing.assert_close(outs[1].double(), outs[0].double(), rtol=0, atol=bound)
