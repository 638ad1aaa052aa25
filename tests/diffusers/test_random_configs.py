"""Seeded random configurations of the drop-ins against diffusers, whole loops.

The grids elsewhere pick configurations a pipeline uses; this draws option mixes
nobody picked (beta schedules, ranges and trained betas, training lengths, zero-SNR
rescaling, spacings, sigma families (Karras, exponential, beta), final sigma types,
solver orders and types, clipping, thresholding and its ratio, flow sigmas, dynamic
shifting, custom timesteps and sigmas, loops that start part-way as img2img's do),
so an option the drop-in mishandles shows up. Stochastic steps get a generator, so
they draw diffusers' noise. Each configuration diffusers can build must end one of
four ways:

* the loops agree within float32 round-off (and the drop-in's runs on meta tensors,
  which have no data to read back);
* the drop-in raises a ValueError, and diffusers' loop is not finite (a step diffusers
  leaves undefined), or a NotImplementedError that names a config option;
* diffusers' loop is not finite only because float32 rounding broke a step, and the
  drop-in's, which takes the exact value, agrees with its own float64 loop;
* they differ by no more than diffusers' own float32 round-off in that loop: how far its
  result moves when its start or its sigmas move by an ulp, how far its loop is from
  its own loop on a float64 sample, or what float32 coefficient arithmetic on its
  largest sigma carries (sigmas in the thousands, where diffusers' evaluation cancels
  and the drop-in's, folded in float64 on the host, does not).

A coefficient off by 1e-4 fails dozens of these cases.
"""

from __future__ import annotations

import inspect
import math
import random
import warnings

import pytest
import torch
from dropin_helpers import SHAPE, TREE_NOISE, run_loop, start_noise

import fastflow.diffusers as ffd

diffusers = pytest.importorskip("diffusers")

BETAS = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("linspace", "leading", "trailing")
SIGMAS = ({}, {"use_karras_sigmas": True}, {"use_exponential_sigmas": True}, {"use_beta_sigmas": True})
CASES = 300
STOCHASTIC_CASES = 200
STEPS = (1, 2, 3, 5, 8, 13, 25)
TOL = 1e-5
EPS32 = 2.0**-23


def _vp(r: random.Random) -> dict:
    cfg = dict(beta_schedule=r.choice(BETAS), timestep_spacing=r.choice(SPACINGS), steps_offset=r.choice((0, 1)),
               rescale_betas_zero_snr=r.random() < 0.3)
    if r.random() < 0.15:
        cfg["num_train_timesteps"] = r.choice((500, 2000))
    if r.random() < 0.15:
        cfg |= dict(beta_start=r.choice((0.0001, 0.00085)), beta_end=r.choice((0.012, 0.03)))
    if r.random() < 0.1:  # a model's own betas: a power curve between random ends
        n, power = cfg.get("num_train_timesteps", 1000), r.uniform(0.5, 2)
        lo, hi = r.uniform(1e-4, 1e-3), r.uniform(0.01, 0.03)
        cfg["trained_betas"] = [lo + (hi - lo) * (i / (n - 1)) ** power for i in range(n)]
    return cfg


def _thresholding(r: random.Random) -> dict:
    return dict(thresholding=True, sample_max_value=r.choice((1.0, 1.5)),
                dynamic_thresholding_ratio=r.choice((0.995, 0.9, 0.5)))


def _ddim(r: random.Random) -> dict:
    cfg = _vp(r) | dict(prediction_type=r.choice(("epsilon", "sample", "v_prediction")),
                        clip_sample=r.choice((True, False)), clip_sample_range=r.choice((0.5, 1.0, 2.0)),
                        set_alpha_to_one=r.choice((True, False)))
    if r.random() < 0.3:
        cfg |= _thresholding(r)
    return cfg


def _cogvideox(r: random.Random) -> dict:
    cfg = _vp(r) | dict(prediction_type=r.choice(("epsilon", "sample", "v_prediction")),
                        snr_shift_scale=r.choice((1.0, 3.0)), set_alpha_to_one=r.choice((True, False)),
                        clip_sample=r.choice((True, False)))  # (a config option its step never applies)
    return cfg


def _euler(r: random.Random) -> dict:
    cfg = _vp(r) | r.choice(SIGMAS) | dict(
        prediction_type=r.choice(("epsilon", "v_prediction", "sample")),
        interpolation_type=r.choice(("linear", "log_linear")), timestep_type=r.choice(("discrete", "continuous")),
        final_sigmas_type=r.choice(("zero", "sigma_min")))
    if r.random() < 0.2:
        cfg |= dict(sigma_min=r.choice((0.02, 0.1)), sigma_max=r.choice((10.0, 40.0)))
    return cfg


def _heun(r: random.Random) -> dict:
    cfg = _vp(r) | r.choice(SIGMAS) | dict(prediction_type=r.choice(("epsilon", "v_prediction", "sample")),
                                           clip_sample=r.choice((True, False)))
    del cfg["rescale_betas_zero_snr"]  # not an option of diffusers' Heun
    return cfg


def _kdpm2(r: random.Random) -> dict:
    cfg = _vp(r) | r.choice(SIGMAS) | dict(prediction_type=r.choice(("epsilon", "v_prediction")))
    del cfg["rescale_betas_zero_snr"]  # not an option of diffusers' KDPM2
    return cfg


def _flow(r: random.Random) -> dict:
    cfg = r.choice(SIGMAS) | dict(shift=r.choice((0.5, 1.0, 3.0)), invert_sigmas=r.random() < 0.2)
    if r.random() < 0.3:
        cfg["shift_terminal"] = r.choice((0.02, 0.1))
    if r.random() < 0.2:
        cfg |= dict(use_dynamic_shifting=True, time_shift_type=r.choice(("exponential", "linear")))
    return cfg


def _multistep(r: random.Random) -> dict:
    cfg = _vp(r) | r.choice(SIGMAS) | dict(solver_order=r.choice((1, 2, 3)), lower_order_final=r.choice((True, False)),
                                           final_sigmas_type=r.choice(("zero", "sigma_min")))
    if r.random() < 0.25:
        cfg |= _thresholding(r)
    if r.random() < 0.25:
        cfg |= dict(use_flow_sigmas=True, flow_shift=r.choice((1.0, 3.0)), prediction_type="flow_prediction")
        if r.random() < 0.3:
            cfg |= dict(use_dynamic_shifting=True, time_shift_type=r.choice(("exponential", "linear")))
    else:
        cfg["prediction_type"] = r.choice(("epsilon", "sample", "v_prediction"))
    return cfg


def _dpm(r: random.Random) -> dict:
    return _multistep(r) | dict(algorithm_type=r.choice(("dpmsolver++", "dpmsolver")),
                                solver_type=r.choice(("midpoint", "heun")), euler_at_final=r.choice((False, True)),
                                use_lu_lambdas=r.random() < 0.2, lambda_min_clipped=r.choice((-math.inf, -5.1)))


def _singlestep(r: random.Random) -> dict:
    cfg = _multistep(r) | dict(algorithm_type=r.choice(("dpmsolver++", "dpmsolver")),
                               solver_type=r.choice(("midpoint", "heun")),
                               lambda_min_clipped=r.choice((-math.inf, -5.1)))
    for key in ("rescale_betas_zero_snr", "timestep_spacing", "steps_offset"):  # not options of diffusers' singlestep
        del cfg[key]
    return cfg


def _unipc(r: random.Random) -> dict:
    cfg = _multistep(r) | dict(solver_type=r.choice(("bh1", "bh2")), predict_x0=r.random() < 0.8,
                               disable_corrector=r.choice(([], [0], [1, 2])))
    if cfg.get("use_flow_sigmas") and r.random() < 0.3:
        cfg["shift_terminal"] = r.choice((0.02, 0.1))
    if r.random() < 0.2:
        cfg |= dict(sigma_min=r.choice((0.02, 0.1)), sigma_max=r.choice((10.0, 40.0)))
    return cfg


def _deis(r: random.Random) -> dict:
    cfg = _multistep(r)
    del cfg["final_sigmas_type"], cfg["rescale_betas_zero_snr"]  # not options of diffusers' DEIS
    return cfg


def _edm(r: random.Random) -> dict:
    return dict(sigma_schedule=r.choice(("karras", "exponential")), final_sigmas_type=r.choice(("zero", "sigma_min")),
                prediction_type=r.choice(("epsilon", "v_prediction")), rho=r.choice((3.0, 7.0)),
                sigma_min=r.choice((0.002, 0.02)), sigma_max=r.choice((20.0, 80.0)), sigma_data=r.choice((0.5, 1.0)))


FAMILIES = {
    "DDIMScheduler": _ddim,
    "CogVideoXDDIMScheduler": _cogvideox,
    "EulerDiscreteScheduler": _euler,
    "HeunDiscreteScheduler": _heun,
    "KDPM2DiscreteScheduler": _kdpm2,
    "FlowMatchEulerDiscreteScheduler": _flow,
    "DPMSolverMultistepScheduler": _dpm,
    "UniPCMultistepScheduler": _unipc,
    "DEISMultistepScheduler": _deis,
    "DPMSolverSinglestepScheduler": _singlestep,
    "EDMEulerScheduler": _edm,
}


def _case(seed: int) -> tuple[str, dict, int, int, dict]:
    r = random.Random(seed)
    name = r.choice(sorted(FAMILIES))
    config, steps = FAMILIES[name](r), r.choice(STEPS)
    return name, config, steps, _begin(r, steps), _schedule(r, name, config, steps)


def _begin(r: random.Random, steps: int) -> int:
    """The step an img2img loop starts from (set_begin_index), in three cases of ten; else 0."""
    return r.randrange(steps) if r.random() < 0.3 else 0


def _schedule(r: random.Random, name: str, config: dict, steps: int) -> dict:
    """set_timesteps' keywords besides the step count: ``mu`` where dynamic shifting needs it, LCM's ``strength``
    in three cases of ten, and in two of ten a custom schedule of ``steps`` timesteps or sigmas, where the
    scheduler takes one."""
    extra = {"mu": r.choice((0.5, 1.2))} if config.get("use_dynamic_shifting") else {}
    accepts = inspect.signature(getattr(diffusers, name).set_timesteps).parameters
    if "strength" in accepts and r.random() < 0.3:  # LCM's img2img schedule
        extra["strength"] = r.choice((0.3, 0.6, 1.0))
    if r.random() >= 0.2:
        return extra
    if "timesteps" in accepts and name != "FlowMatchEulerDiscreteScheduler":
        return extra | {"timesteps": sorted(r.sample(range(1, 1000), steps), reverse=True)}
    if "sigmas" in accepts:
        top = 1.0 if name in ("FlowMatchEulerDiscreteScheduler", "UniPCMultistepScheduler") else 80.0
        return extra | {"sigmas": sorted((r.uniform(0.002, top) for _ in range(steps)), reverse=True)}
    return extra


def _ddim_eta(r: random.Random) -> tuple[dict, dict]:
    return _ddim(r), dict(eta=r.choice((0.3, 1.0)), use_clipped_model_output=r.random() < 0.3)


def _ddpm(r: random.Random) -> tuple[dict, dict]:
    cfg = _ddim(r) | dict(variance_type=r.choice(("fixed_small", "fixed_small_log", "fixed_large")))
    del cfg["set_alpha_to_one"]  # not an option of diffusers' DDPM
    return cfg, {}


def _lcm(r: random.Random) -> tuple[dict, dict]:
    return _ddim(r) | dict(original_inference_steps=r.choice((30, 50)), timestep_scaling=r.choice((5.0, 10.0))), {}


def _tcd(r: random.Random) -> tuple[dict, dict]:
    cfg = _ddim(r) | dict(original_inference_steps=r.choice((30, 50)), timestep_scaling=r.choice((5.0, 10.0)))
    return cfg, dict(eta=r.choice((0.0, 0.3, 1.0)))


def _ancestral(r: random.Random) -> tuple[dict, dict]:
    return _vp(r) | dict(prediction_type=r.choice(("epsilon", "v_prediction"))), {}


def _churn(r: random.Random) -> tuple[dict, dict]:
    return _euler(r), dict(s_churn=r.choice((0.5, 5.0)), s_tmin=r.choice((0.0, 0.5)), s_tmax=r.choice((math.inf, 5.0)))


def _sde_dpm(r: random.Random) -> tuple[dict, dict]:
    cfg = _dpm(r) | dict(algorithm_type=r.choice(("sde-dpmsolver++", "sde-dpmsolver")))
    return cfg, {}


def _flow_sde(r: random.Random) -> tuple[dict, dict]:
    return _flow(r) | dict(stochastic_sampling=True), {}


STOCHASTIC = {
    "DDIMScheduler": _ddim_eta,
    "DDPMScheduler": _ddpm,
    "LCMScheduler": _lcm,
    "TCDScheduler": _tcd,
    "EulerAncestralDiscreteScheduler": _ancestral,
    "KDPM2AncestralDiscreteScheduler": lambda r: (_kdpm2(r), {}),
    "EulerDiscreteScheduler": _churn,
    "DPMSolverMultistepScheduler": _sde_dpm,
    "DPMSolverSinglestepScheduler": lambda r: (_singlestep(r) | dict(algorithm_type="sde-dpmsolver++"), {}),
    "FlowMatchEulerDiscreteScheduler": _flow_sde,
}


LATER_CASES = 120


def _ddim_inverse(r: random.Random) -> tuple[dict, dict]:
    cfg = _ddim(r)
    for key in ("thresholding", "sample_max_value", "dynamic_thresholding_ratio"):  # not options of DDIM inverse
        cfg.pop(key, None)
    cfg["timestep_spacing"] = r.choice(("leading", "trailing"))  # its only spacings
    return cfg, {}


def _dpm_sde(r: random.Random) -> tuple[dict, dict]:
    cfg = _kdpm2(r) | dict(noise_sampler_seed=r.randrange(1000))
    return cfg, dict(s_noise=r.choice((1.0, 1.0, 0.5, 0.0)))


def _cosine(r: random.Random) -> tuple[dict, dict]:
    cfg = _edm(r) | dict(solver_order=r.choice((1, 2)), solver_type=r.choice(("midpoint", "heun")),
                         lower_order_final=r.choice((True, False)), euler_at_final=r.random() < 0.3,
                         final_sigmas_type="zero")  # (at sigma_min diffusers' tree recurses without end)
    cfg["sigma_max"] = r.choice((80.0, 500.0))
    return cfg, {}


def _ltx(r: random.Random) -> tuple[dict, dict]:
    return dict(eta=r.choice((0.0, 0.5, 1.0)), s_noise=r.choice((0.0, 0.7, 1.0))), {}


LATER = {  # name: (config and step keywords, stochastic)
    "DDIMInverseScheduler": (_ddim_inverse, False),
    "DPMSolverSDEScheduler": (_dpm_sde, True),
    "CosineDPMSolverMultistepScheduler": (_cosine, True),
    "LTXEulerAncestralRFScheduler": (_ltx, True),
}


def _later_case(seed: int) -> tuple[str, dict, dict, int, int, dict, bool]:
    r = random.Random(20_000 + seed)
    name = r.choice(sorted(LATER))
    family, stochastic = LATER[name]
    config, step_kwargs = family(r)
    steps = r.choice(STEPS)
    schedule = {}
    if name == "LTXEulerAncestralRFScheduler" and r.random() < 0.3:  # explicit sigmas, ending at 0
        schedule = {"sigmas": sorted((r.uniform(0.01, 1.0) for _ in range(steps)), reverse=True) + [0.0]}
    return name, config, step_kwargs, steps, _begin(r, steps), schedule, stochastic


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("seed", range(LATER_CASES))
def test_random_later_config(seed):
    """The drop-ins added later (DDIM inverse, DPM-Solver SDE, the cosine DPM-Solver, LTX's Euler ancestral), with
    seeds of their own so the cases above stay as they were; tree-noise ones draw diffusers' tree."""
    name, config, step_kwargs, steps, begin, schedule, stochastic = _later_case(seed)
    _check(name, config, steps, step_kwargs, begin, schedule, stochastic=stochastic)


INVERSE_CASES = 120


def _dpm_inverse_case(seed: int) -> tuple[dict, int, int]:
    """A DPM-Solver inverse configuration (its own seeds): every algorithm (the SDE ones are defined on its flow
    sigmas only, which fall), orders, sigma families, thresholding; options its class lacks dropped."""
    r = random.Random(30_000 + seed)
    cfg = _vp(r) | r.choice(SIGMAS) | dict(
        solver_order=r.choice((1, 2, 3)), lower_order_final=r.choice((True, False)),
        algorithm_type=r.choice(("dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver")),
        solver_type=r.choice(("midpoint", "heun")), euler_at_final=r.random() < 0.3,
        lambda_min_clipped=r.choice((-math.inf, -5.1)), prediction_type=r.choice(("epsilon", "sample", "v_prediction")),
    )
    if r.random() < 0.25:
        cfg |= _thresholding(r)
    if r.random() < 0.3:
        cfg |= dict(use_flow_sigmas=True, flow_shift=r.choice((1.0, 3.0)), use_karras_sigmas=False,
                    use_exponential_sigmas=False, use_beta_sigmas=False)
        if cfg["algorithm_type"].endswith("++") and r.random() < 0.5:
            cfg["prediction_type"] = "flow_prediction"
    accepted = inspect.signature(diffusers.DPMSolverMultistepInverseScheduler.__init__).parameters
    cfg = {k: v for k, v in cfg.items() if k in accepted}
    steps = r.choice(STEPS)
    return cfg, steps, _begin(r, steps)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("seed", [*range(INVERSE_CASES), 518, 548])  # 518, 548: loops from a repeated timestep
def test_random_dpm_inverse_config(seed):
    """DPMSolverMultistepInverseScheduler, held to the same outcomes (SDE loops with a generator)."""
    config, steps, begin = _dpm_inverse_case(seed)
    _check("DPMSolverMultistepInverseScheduler", config, steps, {}, begin, {},
           stochastic=config["algorithm_type"].startswith("sde"))


COUNTING_CASES = 80


def _lms(r: random.Random) -> tuple[dict, dict]:
    return _vp(r) | r.choice(SIGMAS) | dict(prediction_type=r.choice(("epsilon", "v_prediction"))), dict(
        order=r.choice((1, 2, 3, 4)))


def _pndm(r: random.Random) -> tuple[dict, dict]:
    return _vp(r) | dict(prediction_type=r.choice(("epsilon", "v_prediction")), skip_prk_steps=r.random() < 0.6,
                         set_alpha_to_one=r.choice((True, False))), {}


COUNTING = {  # the drop-ins whose steps read the loop's earlier calls by count: LMS, PNDM (warm-up or not), IPNDM
    "LMSDiscreteScheduler": _lms,
    "PNDMScheduler": _pndm,
    "IPNDMScheduler": lambda r: ({}, {}),
}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("seed", range(COUNTING_CASES))
def test_random_counting_config(seed):
    """LMS, PNDM and IPNDM with seeds of their own (loops from part-way: PNDM's first call starts its warm-up
    wherever it is, and its schedule repeats timesteps)."""
    r = random.Random(40_000 + seed)
    name = r.choice(sorted(COUNTING))
    config, step_kwargs = COUNTING[name](r)
    accepted = inspect.signature(getattr(diffusers, name).__init__).parameters
    config = {k: v for k, v in config.items() if k in accepted}
    steps = r.choice(STEPS)
    _check(name, config, steps, step_kwargs, _begin(r, steps), {}, stochastic=False)


def _stochastic_case(seed: int) -> tuple[str, dict, dict, int, int, dict]:
    r = random.Random(10_000 + seed)
    name = r.choice(sorted(STOCHASTIC))
    config, step_kwargs = STOCHASTIC[name](r)
    steps = r.choice(STEPS)
    return name, config, step_kwargs, steps, _begin(r, steps), _schedule(r, name, config, steps)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("seed", range(CASES))
def test_random_config(seed):
    name, config, steps, begin, schedule = _case(seed)
    _check(name, config, steps, {}, begin, schedule, stochastic=False)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("seed", range(STOCHASTIC_CASES))
def test_random_stochastic_config(seed):
    """Stochastic steps given a generator draw diffusers' noise, so they are held to the same outcomes."""
    name, config, step_kwargs, steps, begin, schedule = _stochastic_case(seed)
    _check(name, config, steps, step_kwargs, begin, schedule, stochastic=True)


def _check(
    name: str, config: dict, steps: int, step_kwargs: dict, begin: int, schedule: dict, *, stochastic: bool
) -> None:
    """One configuration's outcome, as the module docstring lists them; the loop runs from step ``begin``, its
    set_timesteps gets ``schedule`` too."""
    begin *= getattr(diffusers, name).order  # a pipeline's set_begin_index(t_start * order)
    custom = "timesteps" in schedule or "sigmas" in schedule

    takes_generator = "generator" in inspect.signature(getattr(diffusers, name).step).parameters

    def loop(scheduler, x=None):
        kwargs = dict(step_kwargs)
        if stochastic and takes_generator:
            kwargs["generator"] = torch.Generator().manual_seed(7)  # each loop draws the same noise
        return run_loop(scheduler, None if custom else steps, set_kwargs=schedule, step_kwargs=kwargs, x=x,
                        begin=begin)[0]

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = getattr(diffusers, name)(**config)
            x_ref = loop(ref)
    except Exception as exc:  # a configuration diffusers itself refuses (or that needs scipy)
        pytest.skip(f"diffusers refuses {name} {config} {schedule}: {type(exc).__name__}: {exc}")
    where = f"{name} {config} {schedule or steps} {step_kwargs} from step {begin}"
    try:
        x_ff = loop(_dropin(name, ref))
        if not stochastic:  # (meta tensors run the noise's torch ops through slow Python references)
            # The same loop on tensors with no data: a step that read one back (a host sync) would fail here.
            meta = run_loop(_dropin(name, ref), None if custom else steps,
                            set_kwargs=schedule, x=torch.empty(SHAPE, device="meta"), begin=begin)[0]
            assert meta.device.type == "meta" and meta.shape == x_ff.shape
    except NotImplementedError as exc:
        assert any(key in str(exc) for key in config), f"{where}: the refusal names no option: {exc}"
        return
    except ValueError as exc:
        assert not torch.isfinite(x_ref).all(), f"{where}: refused a finite loop: {exc}"
        return
    if torch.allclose(x_ff, x_ref, rtol=TOL, atol=TOL):
        return
    assert torch.isfinite(x_ff).all(), f"{where}: not finite"
    if not torch.isfinite(x_ref).all():  # float32 rounding broke diffusers' step; the drop-in took the exact value
        if not stochastic:  # (a float64 loop would draw other noise)
            x_64 = loop(_dropin(name, ref), x=start_noise().double())
            torch.testing.assert_close(x_ff.double(), x_64, rtol=1e-4, atol=1e-4)
        return
    # diffusers' float32 round-off in this loop: how far its result moves when its start moves by an ulp or two,
    # or its float32 sigmas (alphas_cumprod where it has none) each by an ulp or two either way, and how far its
    # float32 loop is from its own loop on a float64 sample (a step that divides by a small sigma amplifies its
    # tensor arithmetic's rounding); and what its coefficient arithmetic can carry, about eps32 times the largest
    # sigma in units of the noise.
    def fresh():
        return getattr(diffusers, name)(**config)

    moved = [loop(fresh(), x=start_noise() * (1 + k * EPS32)) for k in (1, 2, 3)]
    moved += [loop(_nudged(fresh(), k)) for k in (1, 2, 3)]
    if not stochastic:  # (a float64 loop would draw other noise)
        moved.append(loop(fresh(), x=start_noise().double()))
    spread = max((x.double() - x_ref.double()).abs().max().item() for x in moved)
    arithmetic = EPS32 * max(1.0, _sigma_max(ref)) * start_noise().abs().max().item()
    diff = (x_ff - x_ref).abs().max().item()
    assert diff <= 4 * spread + 8 * arithmetic + TOL, (
        f"{where}: {diff:.3g} from diffusers; its round-off {spread:.3g}, {arithmetic:.3g}"
    )


def _dropin(name: str, ref):
    """The drop-in for ``ref``; where diffusers draws its noise from a Brownian tree (seeded by the config or the
    generator's initial seed), it draws from diffusers' tree too, so the noise is the same."""
    ff = getattr(ffd, name).from_config(ref.config)
    ff.diffusers_noise = name in TREE_NOISE
    return ff


def _nudged(scheduler, k: int):
    """``scheduler``, whose ``set_timesteps`` then moves each of its float32 sigmas (alphas_cumprod where it has
    none) by ``k`` ulps up or down or leaves it (seeded): the size of its coefficients' float32 rounding."""
    set_timesteps = scheduler.set_timesteps

    def nudged_set_timesteps(*args, **kwargs):
        set_timesteps(*args, **kwargs)
        attr = "sigmas" if isinstance(getattr(scheduler, "sigmas", None), torch.Tensor) else "alphas_cumprod"
        values = getattr(scheduler, attr)
        signs = torch.randint(-1, 2, values.shape, generator=torch.Generator().manual_seed(k)).to(values.dtype)
        setattr(scheduler, attr, values * (1 + signs * (k * EPS32)))

    scheduler.set_timesteps = nudged_set_timesteps
    return scheduler


def _sigma_max(scheduler) -> float:
    """The loop's largest noise-to-signal ratio (sigma), from its sigmas or its first timestep's alphas_cumprod."""
    sigmas = getattr(scheduler, "sigmas", None)
    if isinstance(sigmas, torch.Tensor) and sigmas.numel():
        return float(sigmas.max())
    a = float(scheduler.alphas_cumprod[int(scheduler.timesteps.max())])
    return math.sqrt((1.0 - a) / a) if a > 0 else math.inf
