"""Drop-in API surface: no host sync (meta device, torch.compile, CUDA sync debug), from_scheduler, config IO."""

from __future__ import annotations

import functools
import inspect
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from dropin_helpers import (
    SD,
    SHAPE,
    TREE_NOISE,
    assert_close,
    fullgraph_seed_draws,
    pair,
    recompile_limit,
    stand_in,
    start_noise,
)

import fastflow.diffusers as ffd
import fastflow.diffusers._locate as dropin_locate
from fastflow.backends import get_backend

diffusers = pytest.importorskip("diffusers")


# What torch 2.13's dynamo does and 2.6's and 2.8's do not (features probed, not versions): the tests that need one
# check, on a torch without it, what a user of that torch sees instead (docs/wheels.md, "Oldest torch").
@functools.cache
def fullgraph_keeps_error_messages() -> bool:
    """Whether an exception raised in code fullgraph=True traces reaches the caller with its message (older dynamo
    gives an "Observed exception" without it)."""
    def fail(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(" ".join(("fastflow", "probe")))  # the raise line, which dynamo prints, lacks the text

    try:
        torch.compile(fail, fullgraph=True, backend="eager")(torch.zeros(1))
    except Exception as exc:  # the outcome probed
        return "fastflow probe" in str(exc)
    return False


@functools.cache
def strict_export_takes_held_tensors() -> bool:
    """Whether strict torch.export takes a tensor the module holds outside its buffers (a scheduler's table): older
    torch refuses it ("Cannot export model which references tensors that are neither buffers/parameters...")."""
    held = torch.ones(1)

    class Holder(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + held

    try:
        torch.export.export(Holder(), (torch.zeros(1),), strict=True)
    except torch._dynamo.exc.UserError:
        return False
    return True

# (class name, config, step kwargs): deterministic and stochastic (default in-kernel noise) variants
CLASSES = [
    ("DDIMScheduler", dict(SD, clip_sample=False), {}),
    ("DDIMScheduler", dict(), dict(eta=1.0)),  # clipped x0, unclipped eps from the raw output
    ("DDPMScheduler", dict(), {}),
    ("DDPMScheduler", dict(thresholding=True, sample_max_value=1.5), {}),  # quantile: torch ops, still sync-free
    ("EulerDiscreteScheduler", dict(SD), {}),
    ("EulerDiscreteScheduler", dict(SD), dict(s_churn=3.0)),
    ("EulerAncestralDiscreteScheduler", dict(SD), {}),
    ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0), {}),
    ("FlowMatchEulerDiscreteScheduler", dict(stochastic_sampling=True), {}),
    ("LCMScheduler", dict(), {}),
    ("EDMEulerScheduler", dict(), {}),
    ("EDMDPMSolverMultistepScheduler", dict(), {}),
    ("EDMDPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++"), {}),
    ("PNDMScheduler", dict(SD, skip_prk_steps=True, steps_offset=1), {}),
    ("PNDMScheduler", dict(SD, steps_offset=1), {}),  # the Runge-Kutta warm-up
    ("LMSDiscreteScheduler", dict(SD), dict(order=3)),
    ("KDPM2DiscreteScheduler", dict(SD), {}),
    # noise-prediction multistep: x_hat is the stored noise prediction (one history tensor a step)
    ("DPMSolverMultistepScheduler", dict(SD, algorithm_type="dpmsolver", solver_order=3,
                                         final_sigmas_type="sigma_min"), {}),
    ("UniPCMultistepScheduler", dict(SD, predict_x0=False, solver_order=3, final_sigmas_type="sigma_min"), {}),
    ("DEISMultistepScheduler", dict(SD, solver_order=3), {}),
    ("DPMSolverSinglestepScheduler", dict(SD, solver_order=3), {}),
    ("DPMSolverSinglestepScheduler", dict(SD, algorithm_type="sde-dpmsolver++"), {}),
    ("TCDScheduler", dict(), {}),  # eta 0.3 by default: noise on every step but the last
    ("CogVideoXDDIMScheduler", dict(prediction_type="v_prediction"), {}),
    ("FlowMatchHeunDiscreteScheduler", dict(shift=3.0), {}),
    ("IPNDMScheduler", dict(), {}),
    ("KDPM2AncestralDiscreteScheduler", dict(SD, use_karras_sigmas=True), {}),
    # a step's second call continues its first call's noise (taken back in the kernel; traced: drawn again)
    ("DPMSolverSDEScheduler", dict(SD, use_karras_sigmas=True), {}),
    ("DPMSolverSDEScheduler", dict(SD, noise_sampler_seed=0), dict(s_noise=0.0)),
    ("CosineDPMSolverMultistepScheduler", dict(solver_order=2), {}),  # Stable Audio Open's
    ("LTXEulerAncestralRFScheduler", dict(eta=1.0), {}),
    ("DDIMInverseScheduler", dict(SD, set_alpha_to_one=True), {}),  # the raw output's slot at alpha = 1
    ("DPMSolverMultistepInverseScheduler", dict(SD, solver_order=3), {}),
    # its SDE steps are defined on falling sigmas only (flow sigmas)
    ("DPMSolverMultistepInverseScheduler", dict(algorithm_type="sde-dpmsolver++", use_flow_sigmas=True,
                                                prediction_type="flow_prediction"), {}),
    ("SASolverScheduler", dict(SD, predictor_order=3, corrector_order=4, tau_func=lambda t: 1.0), {}),
    ("UnCLIPScheduler", dict(), {}),  # Kandinsky's prior; every step to t - 1 here, as it has no prev_timestep
    ("CMStochasticIterativeScheduler", dict(), {}),
    ("FlowMapEulerDiscreteScheduler", dict(shift=3.0), {}),  # AnyFlow's: each step found by its timestep's value
]
# set_timesteps keywords a class needs for a schedule of other than its default length (SCM's intermediate angle
# is for two steps only).
SET_KWARGS = {"SCMScheduler": dict(intermediate_timesteps=None)}
# (TREE_NOISE classes: their noisy loops are checked for finiteness only.)
IDS = [f"{n}-{i}" for i, (n, _, _) in enumerate(CLASSES)]
MINE = sorted({n for n, _, _ in CLASSES})


@pytest.mark.parametrize("name,config,kw", CLASSES, ids=IDS)
def test_meta_device_loop(name, config, kw):
    """Every step reads no tensor data (timesteps on the meta device too): no sync is possible."""
    _, ff = pair(name, **config)
    ff.set_timesteps(5)
    ts = ff.timesteps.to("meta")
    x = torch.empty(SHAPE, device="meta")
    for t in ts:
        x_in = ff.scale_model_input(x, t) if hasattr(ff, "scale_model_input") else x
        x = ff.step(torch.empty_like(x_in), t, x, **kw).prev_sample
    assert x.device.type == "meta" and x.shape == SHAPE


@pytest.mark.parametrize("name,config,kw", CLASSES, ids=IDS)
@pytest.mark.parametrize("needs_grad", ["sample", "model_output"])
def test_a_step_that_would_cut_a_gradient_raises(name, config, kw, needs_grad):
    """diffusers' step is differentiable; the fused step records nothing for autograd. With gradients enabled, a
    tensor that requires grad is refused (first step, and mid-loop where the lane holds the step), rather than a
    result whose gradient is silently cut; under no_grad the same loop runs."""
    _, ff = pair(name, backend="auto", **config)
    ff.set_timesteps(5, **SET_KWARGS.get(name, {}))

    def step(x, t):
        x_in = ff.scale_model_input(x, t) if hasattr(ff, "scale_model_input") else x
        out = stand_in(x_in, t)
        x = x.requires_grad_() if needs_grad == "sample" else x
        out = out.requires_grad_() if needs_grad == "model_output" else out
        return ff.step(out, t, x, **kw).prev_sample.detach()

    x = start_noise(0)
    with pytest.raises(RuntimeError, match="requires grad.*torch.no_grad"):
        step(x.clone(), ff.timesteps[0])
    ff.set_timesteps(5, **SET_KWARGS.get(name, {}))
    with torch.no_grad():
        for t in ff.timesteps[:3]:
            x = step(x, t)
    with pytest.raises(RuntimeError, match="requires grad"):
        step(x, ff.timesteps[3])


# Classes whose diffusers step fails before set_timesteps on state it has not made yet (PNDM a TypeError, flow
# matching Heun an AttributeError): the drop-in raises the ValueError that asks for set_timesteps, or steps.
_DIFFUSERS_CRASHES_BEFORE_SET = {"PNDMScheduler", "FlowMatchHeunDiscreteScheduler"}


@pytest.mark.parametrize("name,config,kw", CLASSES, ids=IDS)
def test_step_before_set_timesteps_as_diffusers(name, config, kw):
    """A step before any set_timesteps: where diffusers raises (most ask for set_timesteps with a ValueError), the
    drop-in raises the same exception type, not one from its own missing setup; where diffusers steps on the
    schedule its constructor made, the drop-in steps too."""
    ref, ff = pair(name, **config)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = ref.timesteps[0] if getattr(ref, "timesteps", None) is not None else torch.tensor(999)

    def run(s):
        try:
            return s.step(x * 0.5, t, x, **kw).prev_sample
        except Exception as exc:  # the outcome compared
            return exc

    a, b = run(ref), run(ff)
    if name in _DIFFUSERS_CRASHES_BEFORE_SET:
        assert isinstance(a, (TypeError, AttributeError)), a
        assert isinstance(b, (torch.Tensor, ValueError)), b
    elif isinstance(a, Exception):
        assert type(b) is type(a), (a, b)
    else:
        assert isinstance(b, torch.Tensor), b
        assert b.shape == x.shape and torch.isfinite(b).all()


@pytest.mark.parametrize("name", ["DDIMScheduler", "DPMSolverMultistepScheduler", "FlowMatchEulerDiscreteScheduler"])
def test_set_timesteps_on_meta_says_to_set_them_on_the_cpu(name):
    """diffusers' set_timesteps(device="meta") runs for these (their steps then fail on a read); the drop-in's host
    copies cannot be made from meta tensors: the error says so (it was torch's 'Cannot copy out of meta tensor')."""
    _, ff = pair(name)
    with pytest.raises(NotImplementedError, match="set_timesteps\\(device='meta'\\).*set the timesteps on the CPU"):
        ff.set_timesteps(4, device="meta")
    with pytest.raises(NotImplementedError, match="device='meta'"):
        ff.set_timesteps(4, torch.device("meta"))


def test_meta_device_given_noise():
    _, ff = pair("DDIMScheduler")
    ff.set_timesteps(3)
    x = torch.empty(SHAPE, device="meta")
    for t in ff.timesteps.to("meta"):
        x = ff.step(torch.empty_like(x), t, x, eta=0.5, variance_noise=torch.empty_like(x)).prev_sample
    assert x.device.type == "meta"


@pytest.mark.parametrize("name,config,kw", CLASSES, ids=IDS)
def test_torch_compile_fullgraph(name, config, kw):
    """Once the first (eager) step has compiled the plan, a step traces with fullgraph=True (no graph break)."""
    torch._dynamo.reset()
    ref, ff = pair(name, **config)
    stochastic = any(k in kw for k in ("eta", "s_churn")) or (
        name in ("DDPMScheduler", "LCMScheduler", "TCDScheduler", "SASolverScheduler", "UnCLIPScheduler",
                 "CMStochasticIterativeScheduler")
        or "Ancestral" in name
        or config.get("stochastic_sampling", False) or config.get("algorithm_type", "").startswith("sde")
        or (name in TREE_NOISE and kw.get("s_noise", 1.0) != 0.0)
    )
    for s in (ref, ff):
        s.set_timesteps(5)
    ts = list(ff.timesteps)
    x = start_noise(3)
    x = ff.step(stand_in(x, ts[0]), ts[0], x, **kw).prev_sample

    @torch.compile(fullgraph=True, backend="eager")
    def step(o, t, x):
        out = ff.step(o, t, x, **kw)
        return out.prev_sample

    # A loop's first noisy step draws its seed with .item() (KDPM2 ancestral's is traced here)
    with fullgraph_seed_draws():
        for t in ts[1:2]:
            x = step(stand_in(x, t), t, x)
    if not stochastic:  # the compiled steps compute what diffusers does
        xa = start_noise(3)
        for t in ts[:2]:
            xa = ref.step(stand_in(xa, t), t, xa, **kw).prev_sample
        assert_close(x, xa)


def test_learned_variance_meta_and_compile():
    """DeepFloyd IF's DDPM config (learned_range + thresholding) on meta tensors and under fullgraph compile."""
    _, ff = pair("DDPMScheduler", thresholding=True, variance_type="learned_range")
    ff.set_timesteps(4)
    x = torch.empty(SHAPE, device="meta")
    wide = (SHAPE[0], 2 * SHAPE[1], *SHAPE[2:])
    for t in ff.timesteps.to("meta"):
        x = ff.step(torch.empty(wide, device="meta"), t, x).prev_sample
    assert x.device.type == "meta"
    torch._dynamo.reset()
    ff.set_timesteps(4)
    x = start_noise()
    ts = list(ff.timesteps)
    x = ff.step(torch.rand(wide), ts[0], x).prev_sample
    step = torch.compile(lambda o, t, x: ff.step(o, t, x).prev_sample, fullgraph=True, backend="eager")
    assert torch.isfinite(step(torch.rand(wide), ts[1], x)).all()


def test_torch_compile_return_tuple():
    torch._dynamo.reset()
    _, ff = pair("DDIMScheduler", **SD, clip_sample=False)
    ff.set_timesteps(4)
    x = start_noise()
    t0 = ff.timesteps[0]
    ff.step(stand_in(x, t0), t0, x)
    fn = torch.compile(lambda o, t, x: ff.step(o, t, x, return_dict=False), fullgraph=True, backend="eager")
    prev, pred = fn(stand_in(x, ff.timesteps[1]), ff.timesteps[1], x)
    assert prev.shape == pred.shape == x.shape


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("name,config,kw", CLASSES, ids=IDS)
def test_gpu_loop_no_sync(backend, name, config, kw):
    """A whole loop on the GPU under sync debug mode "error"; deterministic ones match diffusers."""
    ref, ff = pair(name, backend=backend, **config)
    ref.set_timesteps(8, device="cuda")
    ff.set_timesteps(8, device="cuda")
    x0 = start_noise(0).cuda()
    # A CUDA generator draws on the device (no sync), for the steps that take one.
    takes_generator = "generator" in inspect.signature(ref.step).parameters
    gen_kw = lambda g: dict(kw, generator=g) if takes_generator else kw  # noqa: E731
    ga, gb = torch.Generator("cuda").manual_seed(1), torch.Generator("cuda").manual_seed(1)
    xa = x0.clone()
    for t in ref.timesteps:
        x_in = ref.scale_model_input(xa, t) if hasattr(ref, "scale_model_input") else xa
        xa = ref.step(stand_in(x_in, 0.0) + 0.01 * x_in, t, xa, **gen_kw(ga)).prev_sample
    xb = x0.clone()
    ff.set_begin_index(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in ff.timesteps:
            x_in = ff.scale_model_input(xb, t) if hasattr(ff, "scale_model_input") else xb
            xb = ff.step(stand_in(x_in, 0.0) + 0.01 * x_in, t, xb, **gen_kw(gb)).prev_sample
        # default in-kernel noise, too
        ff.set_begin_index(0)
        xc = x0.clone()
        for t in ff.timesteps:
            x_in = ff.scale_model_input(xc, t) if hasattr(ff, "scale_model_input") else xc
            xc = ff.step(stand_in(x_in, 0.0) + 0.01 * x_in, t, xc, **kw).prev_sample
    finally:
        torch.cuda.set_sync_debug_mode("default")
    if name not in TREE_NOISE or kw.get("s_noise", 1.0) == 0.0:
        assert_close(xb, xa, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(xb).all() and torch.isfinite(xc).all()


@pytest.mark.parametrize("name", MINE)
def test_from_scheduler_and_signatures(name):
    ref = getattr(diffusers, name)()
    ff = ffd.from_scheduler(ref)
    assert type(ff) is getattr(ffd, name) and isinstance(ff, type(ref))
    assert dict(ff.config) == dict(ref.config)
    assert ffd.from_scheduler(ff, backend="torch").backend == "torch"
    for method in ("step", "set_timesteps"):
        mine = inspect.signature(getattr(ff, method)).parameters
        theirs = inspect.signature(getattr(ref, method)).parameters
        assert list(mine) == list(theirs), method
    assert getattr(ff, "order", None) == getattr(ref, "order", None)  # (diffusers' UnCLIP has none)


@pytest.mark.parametrize("name", ffd.supported())
def test_construction_sets_up_nothing_for_diffusers_throwaway_schedule(name, monkeypatch):
    """Constructors that run ``set_timesteps(num_train_timesteps)`` (LMS, Heun, KDPM2) get diffusers' schedule but
    no fastflow setup for it, which would be discarded (it cost LMS ~80 ms a construction); the first
    ``set_timesteps`` after it sets up as usual."""
    resets = []
    original = ffd.FastflowScheduler._ff_reset
    monkeypatch.setattr(ffd.FastflowScheduler, "_ff_reset", lambda self: (resets.append(1), original(self))[1])
    ff = getattr(ffd, name)()
    assert resets == []
    ff.set_timesteps(4, **SET_KWARGS.get(name, {}))
    assert resets == [1]
    assert ff._ff_compiled is not None


def test_a_subclass_of_a_users_subclass_keeps_its_overrides():
    """A class below a user's subclass of a drop-in inherits that subclass's ``__init__`` and ``set_timesteps``:
    only a method taken from diffusers is wrapped (it replaced both by diffusers' own, skipping the override)."""
    calls = []

    class Custom(ffd.EulerDiscreteScheduler):
        def __init__(self, **kwargs):
            calls.append("__init__")
            super().__init__(**kwargs)

        def set_timesteps(self, *args, **kwargs):
            calls.append("set_timesteps")
            super().set_timesteps(*args, **kwargs)

    class Leaf(Custom):
        pass

    leaf, plain = Leaf(), ffd.EulerDiscreteScheduler()
    for scheduler in (leaf, plain):
        scheduler.set_timesteps(4)
    assert calls == ["__init__", "set_timesteps"]
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    t = plain.timesteps[0]
    assert torch.equal(leaf.step(0.1 * x, t, x).prev_sample, plain.step(0.1 * x, t, x).prev_sample)


def test_from_scheduler_unsupported_names_the_class():
    with pytest.raises(NotImplementedError, match="RePaintScheduler"):
        ffd.from_scheduler(diffusers.RePaintScheduler())


def test_without_diffusers_the_error_names_the_extra():
    code = "import sys; sys.modules['diffusers'] = None\nimport fastflow.diffusers\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode != 0 and "pip install 'fastflow[diffusers]'" in out.stderr, out.stderr[-500:]
    code = "import sys; sys.modules['diffusers'] = None\nimport fastflow; fastflow.Sampler(fastflow.VP())\n"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0  # the core needs none


def test_a_too_old_diffusers_is_named_with_the_fix():
    """diffusers before 0.39 lacks scheduler modules the drop-ins import: the error says which diffusers is needed
    (it was an ImportError on a diffusers module, naming no fix), and pyproject.toml's extras ask for the same."""
    code = "import diffusers; diffusers.__version__ = '0.36.0'\nimport fastflow.diffusers\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode != 0 and "needs diffusers>=0.39, found 0.36.0" in out.stderr, out.stderr[-500:]
    from fastflow.diffusers import _requires

    assert _requires.release("0.40.0.dev0") == (0, 40, 0) and _requires.release("0.39.0rc1") == (0, 39, 0)
    _requires.check("0.39.0")
    _requires.check("1.0")
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    need = "diffusers>=" + ".".join(map(str, _requires.MIN_DIFFUSERS))
    extras = re.findall(r'"diffusers>=[^"]*"', pyproject.read_text())
    assert extras and set(extras) == {f'"{need}"'}, extras


def test_without_torchsde_the_two_classes_that_need_it_are_named_missing():
    """diffusers' DPM-Solver SDE and cosine DPM-Solver modules import torchsde: without it the other drop-ins
    import, ``import *`` works and the two say what they need."""
    code = (
        "import sys; sys.modules['torchsde'] = None\n"
        "import importlib.util; importlib.util.find_spec = lambda name, *a, _f=importlib.util.find_spec: "
        "None if name == 'torchsde' else _f(name, *a)\n"
        "from fastflow.diffusers import *\n"
        "import fastflow.diffusers as ffd\n"
        "assert 'DPMSolverSDEScheduler' not in ffd.__all__ and len(ffd.supported()) == 31, ffd.supported()\n"
        "try:\n    ffd.DPMSolverSDEScheduler\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert "DPMSolverSDEScheduler needs torchsde" in out.stdout
    with pytest.raises(AttributeError, match="NoSuchScheduler"):
        ffd.NoSuchScheduler  # noqa: B018


def test_from_config_of_another_scheduler_and_save_load(tmp_path):
    src = diffusers.PNDMScheduler(**SD, steps_offset=1, skip_prk_steps=True)
    ff = ffd.EulerDiscreteScheduler.from_config(src.config)
    assert ff.config.beta_schedule == "scaled_linear" and ff.config.steps_offset == 1
    ff.save_config(tmp_path)
    back = diffusers.EulerDiscreteScheduler.from_pretrained(tmp_path)
    assert type(back) is diffusers.EulerDiscreteScheduler  # the saved config names the diffusers class
    again = ffd.EulerDiscreteScheduler.from_pretrained(tmp_path)
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert type(again) is ffd.EulerDiscreteScheduler and public(again.config) == public(ff.config)


def test_unsupported_prediction_type_names_the_option():
    with pytest.raises(NotImplementedError, match="prediction_type"):
        ffd.EDMEulerScheduler(prediction_type="sample")


def test_add_noise_and_init_noise_sigma_are_diffusers():
    ref, ff = pair("EulerDiscreteScheduler", **SD)
    for s in (ref, ff):
        s.set_timesteps(10)
    x, n = start_noise(1), start_noise(2)
    t = ref.timesteps[2:3]
    assert torch.equal(ff.add_noise(x, n, t), ref.add_noise(x, n, t))
    assert torch.equal(torch.as_tensor(ff.init_noise_sigma), torch.as_tensor(ref.init_noise_sigma))


def _output_classes() -> list[type]:
    """The diffusers output classes the drop-ins return, found from a step of each."""
    classes = []
    for name in MINE:
        _, ff = pair(name)
        ff.set_timesteps(4)
        x = start_noise(4)
        t = ff.timesteps[0]
        classes.append(type(ff.step(stand_in(x, t), t, x)))
    return classes


def test_step_output_is_the_diffusers_output():
    """The directly built step output equals diffusers' constructor's result in every way a pipeline reads it."""
    import pickle
    from dataclasses import fields

    from fastflow.diffusers._outputs import output_maker

    a, b = torch.ones(2), torch.zeros(2)
    for cls in _output_classes():
        names = [f.name for f in fields(cls)]
        make = output_maker(cls, *names)
        assert make.__name__ == "build", cls  # the direct build is in use for diffusers' own classes
        for values in ((a, b), (a, None)):
            values = values[: len(names)]
            got, want = make(*values), cls(**dict(zip(names, values, strict=True)))
            assert type(got) is cls and got == want and got.keys() == want.keys()
            assert vars(got) == vars(want) and got.to_tuple() == want.to_tuple() and got[0] is a
            assert got.prev_sample is a and got["prev_sample"] is a and repr(got) == repr(want)
            assert pickle.loads(pickle.dumps(got)).keys() == want.keys()


def test_step_output_falls_back_for_a_class_that_builds_differently():
    from dataclasses import dataclass

    from diffusers.utils import BaseOutput

    from fastflow.diffusers._outputs import output_maker

    @dataclass
    class Extra(BaseOutput):  # a field the caller does not pass: only the constructor sets it
        prev_sample: torch.Tensor
        extra: torch.Tensor | None = None

        def __post_init__(self):
            super().__post_init__()
            self.extra = torch.zeros(1)

    make = output_maker(Extra, "prev_sample")
    assert make.__name__ == "construct"
    got = make(torch.ones(1))
    assert torch.equal(got.extra, torch.zeros(1)) and list(got.keys()) == ["prev_sample"]


def test_torch_compile_whole_loop_from_the_first_step():
    """With set_begin_index(0) the first step traces too (the backend is resolved in set_timesteps), and with a
    recompile limit of at least the number of steps every step of a loop runs compiled, equal to the eager loop."""
    torch._dynamo.reset()
    _, ff = pair("DDIMScheduler", **SD)
    ff.set_timesteps(10)
    ts = list(ff.timesteps)
    xe = start_noise()
    for t in ts:
        xe = ff.step(stand_in(xe, t), t, xe).prev_sample
    ff.set_timesteps(10)
    ff.set_begin_index(0)
    step = torch.compile(lambda o, t, x: ff.step(o, t, x).prev_sample, fullgraph=True, backend="eager")
    x = start_noise()
    with recompile_limit(len(ts)):
        for t in ts:
            x = step(stand_in(x, t), t, x)
    assert torch.equal(x, xe)


def test_torch_compile_a_step_option_in_later_loops_and_number_timesteps():
    """A step variant other than the default (DDIM's eta with given noise) is built by set_timesteps once a loop has
    used it, so later loops trace from their first step (its plan was built inside the trace, which fullgraph
    refused); Python-number timesteps trace too (their check read a numpy array)."""
    torch._dynamo.reset()
    _, ff = pair("DDIMScheduler", **SD)
    noise = [start_noise(10 + i) for i in range(5)]

    def loop(step, number=False):
        ff.set_timesteps(5)
        ff.set_begin_index(0)
        x = start_noise()
        for i, t in enumerate(ff.timesteps):
            t = int(t) if number else t
            x = step(stand_in(x, t), t, x, noise[i])
        return x

    eager = lambda o, t, x, n: ff.step(o, t, x, eta=1.0, variance_noise=n).prev_sample  # noqa: E731
    want = loop(eager)
    compiled = torch.compile(eager, fullgraph=True, backend="eager")
    with recompile_limit(16):
        assert torch.equal(loop(compiled), want)
        torch._dynamo.reset()
        assert torch.equal(loop(compiled, number=True), want)


def test_torch_compile_dynamic_takes_a_new_batch_without_recompiling():
    """With dynamic=True a deterministic step's graphs serve any batch (the host-time lane, bound inside the trace,
    guarded every graph on the batch, so a new batch compiled each step again)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    _, ff = pair("DDIMScheduler", **SD)
    step = torch.compile(lambda o, t, x: ff.step(o, t, x).prev_sample, fullgraph=True, dynamic=True,
                         backend="eager")
    with recompile_limit(16):
        for batch in (3, 5, 7):
            ff.set_timesteps(4)
            ff.set_begin_index(0)
            x = torch.randn(batch, 4, 6, 10)
            for t in ff.timesteps:
                x = step(stand_in(x, t), t, x)
    assert counters["stats"]["unique_graphs"] == 4


def test_torch_compile_first_step_needs_its_index():
    """Locating a loop's first step reads the timestep's value: under tracing, a CPU tensor says what to do."""
    torch._dynamo.reset()
    _, ff = pair("DDIMScheduler", **SD)
    ff.set_timesteps(4)
    t = ff.timesteps[0]
    step = torch.compile(lambda o, t, x: ff.step(o, t, x).prev_sample, fullgraph=True, backend="eager")
    if fullgraph_keeps_error_messages():
        with pytest.raises(Exception, match="set_begin_index"):
            step(stand_in(start_noise(), t), t, start_noise())
        return
    # An older dynamo drops the message: it raises "Observed exception". The step raised this (traced code sees
    # is_compiling() True), as an eager step with that flag shows.
    with pytest.raises(torch._dynamo.exc.Unsupported, match="Observed exception"):
        step(stand_in(start_noise(), t), t, start_noise())
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.compiler, "is_compiling", lambda: True)
        with pytest.raises(RuntimeError, match="set_begin_index"):
            ff.step(stand_in(start_noise(), t), t, start_noise())


def test_torch_compile_a_step_option_on_first_use_says_what_to_do():
    """A step option's plan is built on first use, which a graph cannot trace (documented): fullgraph and strict
    export say so and what to do, rather than numpy's TypeError from inside dynamo."""
    torch._dynamo.reset()
    _, ff = pair("DDIMScheduler", **SD)
    ff.set_timesteps(4)
    ff.set_begin_index(0)
    t, x = ff.timesteps[0], start_noise()
    step = torch.compile(lambda o, t, x: ff.step(o, t, x, eta=1.0).prev_sample, fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="built on its first use.*eagerly"):
        step(stand_in(x, t), t, x)


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
@pytest.mark.parametrize("name,config", [
    ("EulerAncestralDiscreteScheduler", {}),
    ("DDPMScheduler", {}),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++")),
    ("FlowMatchEulerDiscreteScheduler", dict(stochastic_sampling=True)),
])
def test_export_a_step_with_fastflow_noise(name, config, strict):
    """torch.export of a step whose kernel draws fastflow's noise: the loop's seed, drawn from torch's global
    generator, was read with int() on a fake tensor in the default non-strict tracing (a data-dependent guard
    error). The exported program draws it as the eager step does (the same numbers after the same manual_seed,
    other numbers after another), and the tracing leaves no fake seed in the scheduler."""
    _, ff = pair(name, backend="auto", **config)

    class Step(torch.nn.Module):
        def forward(self, o, t, x):
            return ff.step(o, t, x).prev_sample

    def args():
        ff.set_timesteps(4)
        ff.set_begin_index(0)
        t = ff.timesteps[0]
        x = start_noise(0)
        return stand_in(x, t), t, x

    if strict and not strict_export_takes_held_tensors():
        # older torch's strict export refuses the scheduler's table (a tensor the module does not own), by name;
        # docs/diffusers.md says to export non-strict there
        with pytest.raises(torch._dynamo.exc.UserError, match="neither buffers/parameters/constants(?s:.*)runner"):
            torch.export.export(Step(), args(), strict=strict)
        return
    exported = torch.export.export(Step(), args(), strict=strict)
    assert ff._ff_seed is None and not ff._ff_seeds
    results = []
    for seed in (0, 0, 1):
        inputs = args()
        torch.manual_seed(seed)
        want = Step()(*inputs)
        torch.manual_seed(seed)
        results.append(exported.module()(*args()))
        assert torch.equal(results[-1], want)
    assert not torch.equal(results[0], results[2])


@pytest.mark.parametrize("backend", ["torch", "cuda"])
def test_continuing_a_loop_after_a_non_strict_export_is_refused(backend):
    """Non-strict tracing runs step's Python: the counter moves on while the history it keeps is fake. Stepping
    that scheduler on eagerly gave garbage (1e26 and more); it raises, naming the fake history, and set_timesteps
    starts a loop that steps as diffusers' does."""
    if get_backend(backend).availability() is not None:
        pytest.skip(f"{backend} backend unavailable")
    ref, ff = pair("DPMSolverMultistepScheduler", backend=backend)

    class Step(torch.nn.Module):
        def forward(self, o, t, x):
            return ff.step(o, t, x).prev_sample

    ff.set_timesteps(4)
    ff.set_begin_index(0)
    x = start_noise(0)
    torch.export.export(Step(), (stand_in(x, ff.timesteps[0]), ff.timesteps[0], x), strict=False)
    with pytest.raises(RuntimeError, match=r"fake tensors \(history\)"):
        ff.step(stand_in(x, ff.timesteps[1]), ff.timesteps[1], x)
    ff.set_timesteps(4)
    ref.set_timesteps(4)
    a = b = x
    for t in ref.timesteps:
        a = ff.step(stand_in(a, t), t, a).prev_sample
        b = ref.step(stand_in(b, t), t, b).prev_sample
    assert_close(a, b)


@pytest.mark.parametrize("name", ["HeunDiscreteScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler",
                                  "DDIMScheduler"])
def test_a_host_timestep_locates_the_loop_start_as_diffusers_does(name):
    """A loop's first step given a CPU timestep starts where diffusers' ``index_for_timestep`` says (the second
    match of a repeated value, as Heun's schedule has; DDIM addresses steps by value, its first match)."""
    ref, ff = pair(name)
    ref.set_timesteps(6)
    ff.set_timesteps(6)
    for t in ff.timesteps.unique():
        ff._step_index = None
        want = ref.index_for_timestep(t) if hasattr(ref, "index_for_timestep") else int(
            (ref.timesteps == t).nonzero()[0])
        assert ff._ff_peek_index(t) == want, float(t)
    ff._step_index = None
    with pytest.raises(ValueError, match="not in this scheduler's timesteps"):
        ff._ff_peek_index(torch.tensor(12345.0))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name", [n for n in ffd.__all__ if n.endswith("Scheduler") and n not in (
    "FastflowScheduler", "CogVideoXDPMScheduler")])  # (its step's signature differs: test_cogvideox.py copies it)
def test_a_copy_made_mid_loop_continues_as_the_original(name, how):
    """A scheduler copied between steps (a pipeline state saved, a sampler cloned) carries its loop: the stored
    predictions of a multistep solver, Heun's pending first stage, the step index. Bit for bit, except where a
    step's second call takes its first call's noise back from the sample only when it is the very tensor the
    first returned (DPM-Solver SDE): a copy holds a copy of that tensor, so it draws the noise again, the same
    to float32 round-off."""
    import copy
    import pickle

    if how == "pickle" and name == "SASolverScheduler":
        pytest.skip("diffusers' SASolverScheduler holds a lambda (its default tau_func): it does not pickle")
    ff = getattr(ffd, name)()
    ff.set_timesteps(6, **SET_KWARGS.get(name, {}))
    generator = torch.Generator().manual_seed(5)
    takes_generator = "generator" in inspect.signature(ff.step).parameters

    def step(scheduler, o, t, x):
        kw = {"generator": torch.Generator().manual_seed(1)} if takes_generator else {}
        return scheduler.step(o, t, x, **kw).prev_sample

    x = start_noise()
    for t in ff.timesteps[:3]:
        x = step(ff, torch.randn(SHAPE, generator=generator), t, x)
    twin = copy.deepcopy(ff) if how == "deepcopy" else pickle.loads(pickle.dumps(ff))
    o = torch.randn(SHAPE, generator=generator)
    t = ff.timesteps[3]
    expected = step(ff, o, t, x)
    assert twin.step_index == 3
    tol = 1e-5 if name in TREE_NOISE else 0.0
    torch.testing.assert_close(step(twin, o, t, x), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", ["HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "DPMSolverMultistepScheduler",
                                  "PNDMScheduler"])
def test_a_shallow_copy_made_mid_loop_and_the_original_each_continue_their_own_loop(name):
    """``copy.copy`` between steps: diffusers' Heun and KDPM2 keep their pending stage in plain attributes, so a
    shallow copy and the original continue apart; the drop-ins keep theirs in their plans, which the copy must not
    share (the original's next step raised "run the stages in order"). diffusers' multistep classes share their
    history list with the copy (the original then steps from the copy's history); the drop-ins keep each loop's
    own, the numbers of a loop that was never copied."""
    import copy

    ref, ff = pair(name)
    generator = torch.Generator().manual_seed(5)
    outputs = [torch.randn(SHAPE, generator=generator) for _ in range(30)]

    def run(scheduler, x, steps):
        for i in steps:
            t = scheduler.timesteps[i]
            x = scheduler.step(outputs[i] + 0.1 * x, t, x).prev_sample
        return x

    ref.set_timesteps(6)
    want = run(ref, start_noise(), range(len(ref.timesteps)))
    ff.set_timesteps(6)
    x = run(ff, start_noise(), range(3))
    twin = copy.copy(ff)
    assert twin.timesteps is ff.timesteps and twin.config is ff.config  # shallow, as a copy of diffusers' is
    rest = range(3, len(ff.timesteps))
    assert_close(run(twin, x, rest), want)
    assert_close(run(ff, x, rest), want)


def test_an_element_of_the_schedule_is_located_without_reading_it():
    """A device timestep is never read; one that is an element of the scheduler's own ``timesteps`` (a pipeline's
    loop variable, from a slice too) gives its value by its offset in their storage. Checked here on the
    mechanism itself (CPU tensors, whose values are read anyway): elements and slices' elements are found, copies
    and other tensors are not."""
    _, ff = pair("DDIMScheduler")
    ff.set_timesteps(10)
    ts = ff.timesteps
    assert ff._ff_view_value(ts[3]) == float(ts[3]) and ff._ff_view_value(ts[4:][2]) == float(ts[6])
    assert ff._ff_view_value(ts[3].clone()) is None and ff._ff_view_value(torch.tensor(float(ts[3]))) is None
    assert ff._ff_view_value(ts[:2]) is None and ff._ff_view_value(3) is None


@pytest.mark.parametrize("name", ["DDIMScheduler", "CogVideoXDDIMScheduler"])
def test_a_slice_put_in_timesteps_keeps_the_schedule_s_steps(monkeypatch, name):
    """A pipeline that puts a slice of the timesteps in ``scheduler.timesteps`` and loops over it: its elements,
    located without reading them (tensors made unreadable here, as device tensors are), are the schedule's own
    steps, counted from the tensor ``set_timesteps`` made, not from the slice; the loop is diffusers'."""
    ref, ff = pair(name)
    outs = []
    for s in (ref, ff):
        s.set_timesteps(10)
        s.timesteps = s.timesteps[3:]
        if s is ff:
            monkeypatch.setattr(dropin_locate, "host_number", lambda v: None if isinstance(v, torch.Tensor) else v)
        x = start_noise(0)
        for t in s.timesteps:
            x = s.step(stand_in(x, 0.0) + 0.01 * x, t, x).prev_sample
        outs.append(x)
    assert ff.step_index == 10
    assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def test_a_tensor_past_the_end_of_a_replaced_timesteps_is_read_by_value():
    """``scheduler.timesteps`` replaced by the first elements of a longer tensor: that tensor's next element shares
    their storage but is none of their steps. DDIM steps by the timestep's value, as diffusers' does, so a loop
    that passes it (holding step 2's value) in place of step 2 is diffusers' loop."""
    ref, ff = pair("DDIMScheduler")
    outs = []
    for s in (ref, ff):
        s.set_timesteps(10)
        longer = torch.cat([s.timesteps, s.timesteps[2:3]])
        s.timesteps = longer[:10]
        x = start_noise(0)
        for t in [longer[0], longer[1], longer[10], *longer[3:10]]:
            x = s.step(stand_in(x, t), t, x).prev_sample
        outs.append(x)
    assert ff.step_index == 10
    assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def test_the_timesteps_memory_read_in_another_dtype_is_not_a_timestep():
    """A tensor that reinterprets the timesteps' memory in another dtype (int64 read as float64: a denormal) shares
    their storage but is not one of them: its value is read, and it is in no schedule. diffusers' DDIM fails on
    it too; the drop-in must not take it for the step at that address."""
    ref, ff = pair("DDIMScheduler")
    for s in (ref, ff):
        s.set_timesteps(10)
    x = start_noise(0)
    with pytest.raises(IndexError):
        ref.step(stand_in(x, 0.0), ref.timesteps.view(torch.float64)[0], x)
    ff.step(stand_in(x, 0.0), ff.timesteps[0], x)
    with pytest.raises(ValueError, match="not in this scheduler's timesteps"):
        ff.step(stand_in(x, 0.0), ff.timesteps.view(torch.float64)[0], x)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["DDIMScheduler", "CogVideoXDDIMScheduler", "EulerDiscreteScheduler"])
def test_gpu_loop_from_a_slice_without_set_begin_index(name):
    """A pipeline that starts part-way by slicing the timesteps and never calls set_begin_index (CogVideoX's
    video-to-video pipeline): the first step is located by the element's offset, without a sync, and the loop
    matches diffusers'."""
    ref, ff = pair(name)
    outs = []
    for s in (ref, ff):
        s.set_timesteps(10, device="cuda")
        x = start_noise(0).cuda()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if s is ff else "default")
        try:
            for t in s.timesteps[4:]:
                x_in = s.scale_model_input(x, t)
                x = s.step(stand_in(x_in, 0.0) + 0.01 * x_in, t, x).prev_sample
        finally:
            torch.cuda.set_sync_debug_mode("default")
        outs.append(x)
    assert ff.step_index == len(ff.timesteps)
    assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["DDIMScheduler", "EulerDiscreteScheduler", "LMSDiscreteScheduler"])
def test_only_an_undefined_step_waits_until_it_runs(monkeypatch, name):
    """A step whose formula raises UndefinedStepError (diffusers' NaN) raises when the loop gets there; any other
    error of a step's formula (a fault, not diffusers' undefined step) raises at the loop's first step."""
    from fastflow import UndefinedStepError

    cls = getattr(ffd, name)
    real = cls._ff_spec
    for error, first_failing in ((UndefinedStepError, 3), (ValueError, 0)):
        def spec(self, i, k, variant, error=error):
            if i == 3:
                raise error(f"step {i} fails")
            return real(self, i, k, variant)

        monkeypatch.setattr(cls, "_ff_spec", spec)
        ff = cls.from_config(getattr(diffusers, name)(**SD).config)
        ff.set_timesteps(6)
        x = start_noise(1) * ff.init_noise_sigma
        for i, t in enumerate(ff.timesteps):
            if i == first_failing:
                with pytest.raises(error, match="step 3 fails") as raised:
                    ff.step(stand_in(x, t), t, x)
                assert raised.type is error
                break
            x = ff.step(stand_in(ff.scale_model_input(x, t), t), t, x).prev_sample


@pytest.mark.parametrize("begin", [0, 2])
@pytest.mark.parametrize("name", ["HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
                                  "FlowMatchHeunDiscreteScheduler", "DPMSolverSDEScheduler"])
def test_two_call_order_flag_is_diffusers_after_every_call(name, begin):
    """``state_in_first_order`` before the loop, after each call and after the last (diffusers keys it on a saved
    sample: after a loop that ends on a first-order call that saved it, False)."""
    ref = getattr(diffusers, name)()
    ff = ffd.from_scheduler(ref)
    flags = []
    for s in (ref, ff):
        s.set_timesteps(4)
        s.set_begin_index(begin)
        seen = [s.state_in_first_order]
        x = start_noise(1)
        for t in s.timesteps[begin:]:
            x = s.step(stand_in(x, t), t, x).prev_sample
            seen.append(s.state_in_first_order)
        flags.append(seen)
    assert flags[1] == flags[0]


VALUE_ADDRESSED = [("DDIMScheduler", dict(SD, clip_sample=False)), ("DDPMScheduler", dict(SD, clip_sample=False)),
                   ("UnCLIPScheduler", {}), ("CogVideoXDDIMScheduler", {}), ("DDIMInverseScheduler", SD)]


@pytest.mark.parametrize("pattern", ["twice per timestep", "every other timestep", "backwards"])
@pytest.mark.parametrize(("name", "config"), VALUE_ADDRESSED)
def test_a_value_addressed_step_follows_its_tensor_timestep(name, config, pattern):
    """diffusers' DDIM family derives each step from the timestep's value, so a loop may take a step twice, skip
    steps or go back: the drop-in finds an element of its timesteps by its position (no data read) and a CPU
    tensor by its value, mid-loop too, and matches diffusers."""
    ref = getattr(diffusers, name)(**config)
    outs = []
    for s in (ref, ffd.from_scheduler(ref)):
        s.set_timesteps(8)
        ts = list(s.timesteps)
        calls = {"twice per timestep": [t for t in ts for _ in (0, 1)], "every other timestep": ts[::2],
                 "backwards": ts[:4] + ts[1:3] + [ts[5].clone()]}[pattern]
        x, g = start_noise(2), torch.Generator().manual_seed(3)
        for t in calls:
            kw = {"generator": g} if "generator" in inspect.signature(s.step).parameters else {}
            x = s.step(stand_in(x, t), t, x, **kw).prev_sample
        outs.append(x)
    assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)


def test_a_step_taken_again_draws_fresh_noise():
    """DDPM's in-kernel noise is keyed by the step: a step taken again (its timestep passed twice) draws new noise,
    as diffusers' draw from the global generator does, not the same noise again."""
    ff = ffd.DDPMScheduler(**SD)
    ff.set_timesteps(10)
    t, x = ff.timesteps[3], start_noise(4, shape=(4, 4, 32, 32))
    ff.set_begin_index(3)
    o = stand_in(x, t)
    first = ff.step(o, t, x).prev_sample
    second = ff.step(o, t, x).prev_sample  # the same step again, from the same sample
    assert ff.step_index == 4
    a_t, a_p = ff.alphas_cumprod[t].double(), ff.alphas_cumprod[ff.timesteps[4]].double()
    std = float(((1 - a_p) / (1 - a_t) * (1 - a_t / a_p)).sqrt())  # diffusers' fixed_small variance
    diff = (second - first) / (std * 2**0.5)  # the difference of two independent draws, standardized
    assert abs(diff.mean().item()) < 0.03 and abs(diff.std().item() - 1) < 0.03


@pytest.mark.parametrize(
    ("name", "config", "reads"),
    [
        ("LCMScheduler", {}, "alphas_cumprod"),
        ("TCDScheduler", {}, "alphas_cumprod"),
        ("PNDMScheduler", {}, "alphas_cumprod and the previous timestep"),
        ("PNDMScheduler", {"skip_prk_steps": True}, "alphas_cumprod and the previous timestep"),
        ("SASolverScheduler", {"tau_func": lambda t: float(t) / 1000}, "tau_func's noise level"),
    ],
    ids=["LCM", "TCD", "PNDM", "PLMS", "SA-Solver"],
)
def test_a_mixed_addressed_step_refuses_another_timestep(name, config, reads):
    """diffusers' LCM, TCD, PNDM and SA-Solver read their step counter and the timestep's value both: mid-loop, a
    timestep other than the counter's step's raises (a number, a CPU tensor, an element of the timesteps), naming
    both and what diffusers would read from it (PNDM and SA-Solver took the counter's step silently)."""
    ff = getattr(ffd, name)(**SD, **config)
    ff.set_timesteps(4)
    ts = ff.timesteps
    others = [i for i in range(len(ts)) if ts[i] != ts[1]]
    x = ff.step(stand_in(start_noise(), ts[0]), ts[0], start_noise()).prev_sample
    for t in (ts[others[0]], int(ts[others[-1]]), ts[others[-1]].clone()):
        match = f"given timestep {int(t)} at step 1, whose timestep is .*it reads {reads} from the given"
        with pytest.raises(NotImplementedError, match=match):
            ff.step(stand_in(x, t), t, x)
    ff.step(stand_in(x, ts[1]), ts[1], x)


def test_sa_solver_takes_another_timestep_with_the_same_tau():
    """SA-Solver's diffusers step reads the timestep's value through tau_func alone: a timestep whose tau is the
    counter's step's steps as diffusers' does (the default tau is 1 from 200 to 800)."""
    ref, ff = pair("SASolverScheduler", **SD)
    outs = []
    for sched in (ref, ff):
        sched.set_timesteps(4)
        ts, x = sched.timesteps, start_noise()
        steps = [(ts[0], ts[0]), (ts[3], ts[1]), (ts[2], ts[2])]  # step 1 given 249: tau 1, as 749's
        for i, (given, own) in enumerate(steps):
            x = sched.step(stand_in(x, own), given, x, generator=torch.Generator().manual_seed(i)).prev_sample
        outs.append(x)
    assert_close(outs[1], outs[0])


@pytest.mark.parametrize("lane", [True, False], ids=["lane", "general"])
@pytest.mark.parametrize(
    "name", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "LMSDiscreteScheduler", "PNDMScheduler"]
)
def test_a_sample_trimmed_mid_loop_is_refused_in_a_pipeline_s_terms(name, lane, monkeypatch):
    """A pipeline that trims the latents mid-loop (ChronoEdit's temporal reasoning, which trims diffusers'
    model_outputs and last_sample too) cannot go on with a drop-in that keeps earlier steps' tensors: the error says
    so, where it named a history tensor. A class that keeps none steps the trimmed sample as diffusers does."""
    config = dict(SD, skip_prk_steps=True) if name == "PNDMScheduler" else dict(SD)
    _, ff = pair(name, **config)
    ff.set_timesteps(8)
    x = start_noise(shape=(1, 4, 5, 6, 6))
    if not lane:
        monkeypatch.setattr(type(ff), "_ff_lane_step", lambda *args, **kwargs: None)
    with pytest.raises(ValueError, match="the sample's shape changed mid-loop, from \\(1, 4, 5, 6, 6\\) to "
                                         "\\(1, 4, 2, 6, 6\\).*diffusers' scheduler"):
        for i, t in enumerate(ff.timesteps):
            if i == 4:
                x = x[:, :, [0, -1]]
            x = ff.step(stand_in(ff.scale_model_input(x, t), t), t, x).prev_sample
    ref, ff = pair("EulerDiscreteScheduler", **SD)
    finals = []
    for sched in (ref, ff):
        sched.set_timesteps(8)
        x = start_noise(shape=(1, 4, 5, 6, 6)) * sched.init_noise_sigma
        for i, t in enumerate(sched.timesteps):
            if i == 4:
                x = x[:, :, [0, -1]]
            x = sched.step(stand_in(sched.scale_model_input(x, t), t), t, x).prev_sample
        finals.append(x)
    assert_close(finals[1], finals[0])


@pytest.mark.parametrize(
    "name", ["DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"]
)
def test_a_first_timestep_of_several_values_is_refused(name):
    """diffusers' step fails on a timestep tensor of several values; the drop-in read its first element and
    stepped every sample from it. Several copies of one value are that value."""
    _, ff = pair(name, **SD)
    ff.set_timesteps(6)
    x = start_noise()
    t0, t1 = ff.timesteps[0], ff.timesteps[1]
    with pytest.raises(ValueError, match=f"step was given 2 different timesteps \\({float(t0):g}, {float(t1):g}\\)"):
        ff.step(stand_in(x, t0), torch.stack([t0, t1]), x)
    want = ff.step(stand_in(x, t0), t0, x).prev_sample
    ff.set_timesteps(6)
    got = ff.step(stand_in(x, t0), t0.repeat(2), x).prev_sample
    assert torch.equal(got, want)


SIGMA_EDIT_CASES = [
    ("EulerDiscreteScheduler", {}),
    ("EulerAncestralDiscreteScheduler", {}),
    ("HeunDiscreteScheduler", {}),
    ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}),
    ("DPMSolverMultistepScheduler", {}),
    ("UniPCMultistepScheduler", {}),
    ("DEISMultistepScheduler", {}),
    ("EDMEulerScheduler", {}),
]


def _edited_loop(sched, edit, begin: int = 0) -> list[torch.Tensor]:
    """A pipeline's loop that edits ``scheduler.sigmas`` between ``set_timesteps`` and its first step."""
    sched.set_timesteps(8)
    if begin:
        sched.set_begin_index(begin)
    edit(sched)
    x = start_noise(2) * getattr(sched, "init_noise_sigma", 1.0)
    draws = "generator" in inspect.signature(sched.step).parameters
    outs = []
    for i, t in enumerate(sched.timesteps[begin:]):
        o = stand_in(sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x, t)
        kw = {"generator": torch.Generator().manual_seed(i)} if draws else {}
        x = sched.step(o, t, x, **kw).prev_sample
        outs.append(x)
    return outs


def _halve_last_sigma(sched) -> None:
    sched.sigmas[-2] = sched.sigmas[-2] * 0.5


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("begin", [0, 3])
@pytest.mark.parametrize(("name", "config"), SIGMA_EDIT_CASES, ids=lambda v: v if isinstance(v, str) else None)
def test_sigmas_edited_before_the_loop_are_followed(name, config, begin):
    """An edit of ``scheduler.sigmas`` after ``set_timesteps`` (in place, as Cosmos 2 pipelines set ``sigmas[-1] =
    sigmas[-2]``) steps as diffusers', which reads ``sigmas`` every step; ``begin_index`` is kept."""
    ref, ff = pair(name, **config)
    want, got = (_edited_loop(s, _halve_last_sigma, begin) for s in (ref, ff))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_the_cosmos_2_final_sigma_is_followed():
    """Cosmos 2's text-to-image setup: Karras flow-match sigmas from linspace(0, 1), then ``sigmas[-1] =
    sigmas[-2]``, so diffusers' last step moves nothing (the drop-in stepped to sigma 0)."""
    ref, ff = pair("FlowMatchEulerDiscreteScheduler", use_karras_sigmas=True, shift=1.0)

    def cosmos(sched) -> None:
        sched.register_to_config(sigma_max=80.0, sigma_min=0.002, sigma_data=1.0, final_sigmas_type="sigma_min")
        sched.set_timesteps(sigmas=np.linspace(0, 1, 6))
        sched.sigmas[-1] = sched.sigmas[-2]

    outs = []
    for sched in (ref, ff):
        cosmos(sched)
        x, steps = start_noise(1), []
        for t in sched.timesteps:
            x = sched.step(0.3 * x, t, x).prev_sample
            steps.append(x)
        outs.append(steps)
    assert torch.equal(outs[0][-1], outs[0][-2])
    for a, b in zip(outs[1], outs[0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_sigmas_replaced_by_the_same_values_keep_the_plans():
    """``sigmas`` moved or reassigned with unchanged values rebuilds nothing: the compiled plans stay."""
    _, ff = pair("EulerDiscreteScheduler")
    ff.set_timesteps(8)
    plans = ff._ff_compiled
    ff.sigmas = ff.sigmas.clone()
    x = start_noise(2)
    ff.step(0.5 * x, ff.timesteps[0], x)
    assert ff._ff_compiled is plans


@pytest.mark.parametrize(
    ("name", "attribute", "value"),
    [("DDPMScheduler", "clip_sample", False), ("DDIMScheduler", "clip_sample", False),
     ("DDIMScheduler", "prediction_type", "v_prediction"), ("EulerDiscreteScheduler", "prediction_type", "sample")],
)
def test_a_config_attribute_set_before_the_loop_is_followed(name, attribute, value):
    """diffusers' steps read ``self.config.<name>``, an attribute a pipeline may set on the frozen config after
    ``set_timesteps`` (Stable Cascade's ``scheduler.config.clip_sample = False``; the dict entry keeps the old
    value): the drop-in's loop follows it (it clipped at 1, 134 away from diffusers' loop)."""
    ref, ff = pair(name)
    outs = []
    for sched in (ref, ff):
        sched.set_timesteps(4)
        setattr(sched.config, attribute, value)
        x = start_noise(1) * 3.0
        for i, t in enumerate(sched.timesteps):
            kw = {"generator": torch.Generator().manual_seed(i)} if name == "DDPMScheduler" else {}
            x = sched.step(torch.tanh(x) * 2.0, t, x, **kw).prev_sample
        outs.append(x)
    assert ff.config[attribute] != value  # the dict entry the drop-in used to read
    assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-4)
