"""Shared machinery of the drop-in diffusers schedulers.

Each drop-in subclasses the diffusers scheduler of the same name, so its config,
``from_config``/``save_config``, ``add_noise``, ``timesteps``, ``sigmas`` and
``init_noise_sigma`` are diffusers' own. Only ``set_timesteps`` (which lets
diffusers compute the schedule, then compiles a fastflow plan once, in float64 on
the host) and ``step`` (one backend call, no host sync) are replaced.

A family describes each ``step`` call as a :class:`StepSpec`: the conversion of the
model output to the kernel's ``x_hat``, the next sample as a :class:`~fastflow.solvers.base.Lin`
over ``Z(i)`` (the sample), ``X(i)`` (``x_hat`` after clipping), :func:`O` (the raw
model output) and ``noise``, and the prediction field diffusers returns. Writing
diffusers' own formulas this way keeps float32 parity without copying its code.

Step index: a Python int, advanced by ``step``. A timestep given as a Python number
or a CPU tensor locates the first step (as diffusers does; PNDM, whose diffusers class
counts calls instead, by the timestep's position in its own timesteps where it is one
of them, since its schedule repeats values); a device tensor is never
read (that would sync): an element of the scheduler's own ``timesteps`` (what a
pipeline's loop passes, from a slice too, as CogVideoX's video-to-video pipeline starts)
is located by its offset in their storage, and any other device tensor takes the first
step, so such a loop that does not start there must call ``set_begin_index`` first, as
diffusers' img2img pipelines do. Mid-loop, classes whose diffusers step derives from the
timestep's value alone (DDIM, DDPM, their inverse, UnCLIP, CogVideoX) follow a timestep that
is not the counter's step (a step taken twice, a loop that skips steps) where the host knows it
without a read: an element of ``timesteps`` by its position, a number or a CPU tensor by its
value (a step taken again draws fresh in-kernel noise); LCM, TCD and PNDM, whose diffusers step reads
its counter and the timestep both, raise for such a timestep.

``torch.compile``: ``step`` traces without a graph break (``fullgraph=True``) once its
index is known without reading a tensor: after a first eager step, after
``set_begin_index``, or with Python-number timesteps (a CPU-tensor timestep at a
loop's first step raises an error that says so). The index is a Python int, so each
step index traces its own graph: a compiled loop of N steps needs dynamo's
``recompile_limit`` to be at least N, or compile the model alone (the step is one
kernel launch already); :mod:`fastflow.graph_pipeline` captures a whole loop instead.
A ``generator`` draw is diffusers' ``randn_tensor`` with it, which dynamo cannot trace.

Undefined steps: where diffusers' step is undefined (it returns NaN or inf there), the
drop-in's step raises a ValueError (:class:`~fastflow.UndefinedStepError`) that says why
when it runs; ``set_timesteps`` does not, since an img2img loop may start after it, and
a loop may stop before it (:attr:`StepSpec.error`).

Noise of stochastic steps: ``variance_noise`` (where the original takes it) is used
as given, broadcast to the sample as diffusers adds it; a ``generator`` draws exactly
the tensor diffusers would draw (same call, shape, device, dtype and order), so outputs
match diffusers'. A model output must have the sample's shape. With neither, the
kernel draws fastflow's counter-based noise (:mod:`fastflow.noise`), seeded from torch's
global CPU generator at the first noisy step after each ``set_timesteps`` (so
``torch.manual_seed`` reproduces it and a pipeline's initial latents are unchanged):
the same distribution as diffusers' ``torch.randn``, not the same numbers; or, with
``diffusers_noise``, diffusers' own draw from torch's global generator.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
import sys
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from diffusers import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from torch._subclasses.fake_tensor import is_fake

from .. import noise as noise_spec
from ..backends import resolve_backend
from ..backends.base import kernel_layout
from ..grids import Points
from ..plan import AO, AZ, H0, MAX_HISTORY, StepPlan, compile_plan
from ..runner import HistoryShapeError, PlanRunner, broadcasts_to, run_bound
from ..solvers.base import NOISE, Lin, Stage, UndefinedStepError, X, Z, noise

__all__ = [
    "O", "StepSpec", "Compiled", "FastflowScheduler", "compile_specs", "generator_draw", "output_maker", "registry",
    "X", "Z", "noise",
]

_O_KIND = "o"
_UNIT_POINT = Points(*(np.array([v]) for v in (1.0, 1.0, 1.0, 0.0, 0.0)))
_REGISTRY: dict[str, type] = {}
_NO_DEFAULT = object()
_MAX_WARMED_VARIANTS = 4  # step variants beyond the default that set_timesteps builds again (see _ff_warm)


def registry() -> dict[str, type]:
    """Drop-in classes by diffusers class name (filled as the family modules are imported)."""
    return dict(_REGISTRY)


class absent_method:  # noqa: N801 (used as a class attribute, like a decorator)
    """An inherited method the diffusers class lacks: reading it raises AttributeError, so ``hasattr`` is False
    where pipelines branch on it."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: object, owner: type | None = None) -> Any:
        raise AttributeError(f"{(owner or type(obj)).__name__} has no {self.name!r} (nor has diffusers' class)")


def spec_finiteness_error(spec: StepSpec, i: int) -> str | None:
    """Why step ``i``'s spec is undefined where a coefficient is not finite (diffusers returns inf or NaN there;
    the step raises this when it runs), else None."""
    coefs = [spec.xz, spec.xo, *(c for _, c in spec.update), *(c for _, c in spec.pred or ())]
    if all(math.isfinite(c) for c in coefs):
        return None
    return (f"step {i} has a coefficient that is not finite (diffusers returns inf or NaN there); this "
            "configuration has no defined step there")


def generator_draw(
    generator: torch.Generator | None, like: torch.Tensor, dtype: torch.dtype | None = None, always: bool = False
) -> Callable[[], torch.Tensor] | None:
    """diffusers' noise draw of a step: ``randn_tensor`` of ``like``'s shape on its device (``dtype``, by default
    ``like``'s) from ``generator``; without a generator, from torch's global generator when ``always``, else None
    (the kernel then draws its own noise)."""
    if generator is None and not always:
        return None
    shape, device, dtype = like.shape, like.device, like.dtype if dtype is None else dtype

    def draw() -> torch.Tensor:
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)

    return draw


def _fit_noise(noise: torch.Tensor, model_output: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """A step's noise of another shape than its state, broadcast as diffusers adds it (a ``variance_noise`` of
    batch 1 serves every sample). Noise drawn in a model output's shape that is not the state's means that model
    output broadcasts, which fastflow refuses: that is named, not the draw."""
    if model_output.shape != z.shape:
        raise ValueError(f"model output has shape {tuple(model_output.shape)}, state has {tuple(z.shape)}")
    if not broadcasts_to(noise.shape, z.shape):
        raise ValueError(f"the noise has shape {tuple(noise.shape)}, which does not broadcast to the sample's "
                         f"{tuple(z.shape)}")
    return noise.expand(z.shape)


_HALF_DTYPES = (torch.float16, torch.bfloat16)
_dict_set = OrderedDict.__setitem__


def _same_output(a: Any, b: Any) -> bool:
    return type(a) is type(b) and list(a.items()) == list(b.items()) and vars(a) == vars(b)


def output_maker(cls: type, first: str, second: str | None = None) -> Callable[..., Any]:
    """``make(a, b=None)``: ``cls(first=a, second=b)`` for a diffusers step output, built directly.

    diffusers' ``BaseOutput`` is a dataclass over an ordered dict whose constructor
    re-checks every field in Python: about 3 us per call on a CPU host, a fifth of a
    drop-in step. ``make`` builds the same object (attributes for every field, dict
    entries for those not None) in a fraction of that. It is checked here, once per
    class, against the real constructor; a class that builds differently (another
    diffusers) gets the constructor, and so does code being traced by ``torch.compile``
    (which knows the dataclass).
    """
    names = (first,) if second is None else (first, second)
    new = cls.__new__
    compiling = torch.compiler.is_compiling

    def construct(a: Any, b: Any = None) -> Any:
        return cls(**{first: a}) if second is None else cls(**{first: a, second: b})

    def build(a: Any, b: Any = None) -> Any:
        if compiling():
            return construct(a, b)
        out = new(cls)
        attrs = out.__dict__
        attrs[first] = a
        if a is not None:
            _dict_set(out, first, a)
        if second is not None:
            attrs[second] = b
            if b is not None:
                _dict_set(out, second, b)
        return out

    probes = [(object(), object()), (object(), None), (None, None)]
    try:
        same = all(_same_output(build(*p[: len(names)]), construct(*p[: len(names)])) for p in probes)
    except Exception:  # an output class this shortcut does not understand
        same = False
    return build if same else construct


def O(i: int) -> Lin:  # noqa: E743 - the symbol's name is the formula's
    """The raw model output of stage ``i`` (bound to a free history slot of the kernel; an earlier stage's is kept
    by reference, as diffusers keeps it, not written again)."""
    return Lin({(_O_KIND, i): 1.0})


@dataclass(frozen=True)
class StepSpec:
    """One ``step`` call as a plan stage.

    ``xz, xo``: the kernel's ``x_hat = clip(xz * z + xo * o)``. ``update``: the next
    sample. ``pred``: the returned prediction field (None: ``X(i)`` itself).
    ``draws``: diffusers draws a normal tensor in this call (even when its
    coefficient is 0, so a generator advances the same way). ``error``: the step is
    undefined (diffusers returns NaN or fails there): a step that runs it raises this,
    and a loop that starts after it, as img2img's do, is unaffected.
    """

    xz: float
    xo: float
    update: Lin
    pred: Lin | None = None
    draws: bool = False
    error: str | None = None


class _StageCall(NamedTuple):
    """One step of a compiled loop, as ``_ff_step`` unpacks it: its runner and stage, and what the stage does."""

    runner: PlanRunner
    k: int
    noisy: bool  # the kernel draws or reads noise
    draws: bool  # diffusers draws a noise tensor in this call
    uses_o: bool  # the raw model output is bound to a history slot
    pred: Lin | None  # the returned prediction field, when it is not x_hat
    error: str | None  # why the step is undefined (raised when it runs), or None
    plain: bool  # the runner may run it with run_plain (no history read or kept)


@dataclass
class Compiled:
    """A compiled loop from step ``start``: the plan, its runner and each stage's call (``calls[k]``: step
    ``start + k``)."""

    start: int
    plan: StepPlan
    runner: PlanRunner
    calls: tuple[_StageCall, ...]


def _split_o(i: int, lin: Lin) -> tuple[Lin, float]:
    """Stage ``i``'s update without its own model output's term (the caller's tensor, bound to a slot after the
    plan's), and that term's coefficient; earlier stages' model outputs stay plan history."""
    rest: dict = {}
    c_o = 0.0
    for (kind, j), c in lin:
        if kind == _O_KIND and j == i:
            c_o += c
        else:
            rest[(kind, j)] = c
    return Lin(rest), c_o


def compile_specs(specs: Sequence[StepSpec], clip: float | None, backend: str, start: int = 0) -> Compiled:
    """Stages ``start, start+1, ...`` (``specs[k]`` is stage ``start + k``) as a plan and a runner.

    Symbols inside the specs are numbered from 0 (stage ``start``).
    """
    stages, o_coefs = [], []
    for k, spec in enumerate(specs):
        update, c_o = _split_o(k, spec.update)
        stages.append(Stage(_UNIT_POINT, update))
        o_coefs.append(c_o)
    plan = compile_plan(stages, "x0", clip=clip)
    coefs = plan.coefs.copy()
    coefs[:, AZ] = [s.xz for s in specs]
    coefs[:, AO] = [s.xo for s in specs]
    for k, c_o in enumerate(o_coefs):
        if c_o != 0.0:
            slot = len(plan.history[k])
            if slot >= MAX_HISTORY:
                raise ValueError(f"stage {k} needs {slot + 1} stored tensors; at most {MAX_HISTORY} are supported")
            coefs[k, H0 + slot] = c_o
    plan = StepPlan(coefs, plan.history, plan.write_x, plan.keep_z, plan.noise, plan.clip, plan.keep_o)
    runner = PlanRunner(plan, backend)
    calls = tuple(
        _StageCall(
            runner, k, bool(plan.noise[k]), spec.draws, o_coefs[k] != 0.0, spec.pred, spec.error, runner.is_plain(k)
        )
        for k, spec in enumerate(specs)
    )
    return Compiled(start=start, plan=plan, runner=runner, calls=calls)


def _host_number(timestep: Any) -> float | None:
    """The value of a timestep when reading it costs no device sync (Python number or CPU tensor), else None."""
    if isinstance(timestep, (int, float, np.integer, np.floating)):
        return float(timestep)
    if isinstance(timestep, torch.Tensor) and timestep.device.type == "cpu":
        n = timestep.numel()
        if n == 1:
            return float(timestep.item())  # one op: a loop's first step reads its timestep
        if n > 1:  # a batch's timestep, read where every sample's is the same
            flat = timestep.reshape(-1)
            if not bool((flat == flat[0]).all()):
                raise ValueError(
                    f"step was given {n} different timesteps ({', '.join(f'{v:g}' for v in flat[:4].tolist())}"
                    f"{', ...' if n > 4 else ''}): a drop-in steps every sample of a batch from the same timestep, "
                    "as diffusers' step does; pass one"
                )
            return float(flat[0])
    return None


def _element_offset(element: torch.Tensor, ts: torch.Tensor) -> int | None:
    """The index of a one-element tensor in the 1-d dense tensor ``ts`` whose storage it shares, from addresses
    alone, else None."""
    if element.dtype != ts.dtype or element.device != ts.device or ts.dim() != 1 or ts.stride(0) != 1:
        return None
    if element.untyped_storage().data_ptr() != ts.untyped_storage().data_ptr():
        return None
    offset, rest = divmod(element.data_ptr() - ts.data_ptr(), ts.element_size())
    return offset if not rest and 0 <= offset < len(ts) else None


def _diffusers_parent(cls: type) -> type | None:
    for base in cls.__mro__[1:]:
        if base.__module__.startswith("diffusers."):
            return base
    return None


def _from_diffusers(cls: type, name: str) -> bool:
    """Whether ``cls`` takes ``name`` from a diffusers class, so that it needs wrapping: not where it defines it,
    nor where it inherits it from a drop-in (wrapped already) or from a subclass of one, whose override would be
    replaced by the wrapped diffusers method."""
    owner = next((base for base in cls.__mro__ if name in base.__dict__), None)
    return owner is not None and owner.__module__.startswith("diffusers.")


class FastflowScheduler:
    """Mixin placed before a diffusers scheduler class; see the module docstring.

    Subclasses implement :meth:`_ff_check_config` (raise for unsupported options),
    :meth:`_ff_spec` (one step; or :meth:`_ff_specs` for solvers with history) and
    ``step``, which calls :meth:`_ff_step`. Class attributes:

    * ``backend``: fastflow backend for ``step`` (``auto``, ``torch``, ``triton``, ``cuda``).
    * ``compute_pred_original_sample``: also write the prediction field ``step`` returns
      (one more output tensor; a copy of it where a later step reads it, as Heun's second call
      reads its first's); set False to get ``None`` there and save the write.
    * ``diffusers_noise``: a stochastic step given neither ``generator`` nor ``variance_noise``
      draws its noise as diffusers does, from torch's global generator of the sample's device,
      instead of fastflow's in-kernel noise: outputs then match diffusers' in pipelines that
      pass no generator to ``step`` (FLUX.1 or SD3 with ``stochastic_sampling``), for one more
      launch per step.
    """

    backend: str = "auto"
    compute_pred_original_sample: bool = True
    diffusers_noise: bool = False
    # True where diffusers derives each step from the timestep value alone (DDIM, DDPM):
    # then a host-readable timestep relocates the step index.
    _ff_timestep_addressed: bool = False
    # True where diffusers' step reads its counter and the timestep's value both (LCM, TCD, PNDM, SA-Solver):
    # mid-loop, a timestep whose value the host knows must be the counter's step's. _ff_value_reads names what
    # diffusers reads at the value, for the error.
    _ff_mixed_addressed: bool = False
    _ff_value_reads: str = "alphas_cumprod"
    # True where diffusers never locates a step but counts its calls (PNDM): a loop's first call is found by its
    # timestep's position in this scheduler's own timesteps where it is one of them, else by the value's first
    # occurrence (diffusers' rule of a repeat's second match is its locating classes').
    _ff_counts_calls: bool = False
    # True where the caller hands each returned prediction back to the next step (CogVideoX's DPM): it is then the
    # kept tensor itself, as an edit of it reaches diffusers' next step; elsewhere a kept one is returned as a copy.
    _ff_pred_handed_back: bool = False
    # False for single-step solvers: one plan from step 0 serves a loop starting anywhere.
    _ff_start_dependent: bool = True
    # The variant plain ``step`` calls use, compiled ahead in set_timesteps (and others callers commonly use).
    _ff_default_variant: Hashable = None
    _ff_warm_variants: tuple[Hashable, ...] = ()
    _ff_loop_start: int = 0
    # True where diffusers returns the model output itself as the prediction field for prediction_type='sample'
    # (in the model output's dtype, which the drop-in then writes x_hat in).
    _ff_returns_raw_x0: bool = False
    _ff_x0_is_output: bool = False
    _ff_initializing: bool = False  # inside diffusers' __init__ (see _wrap_init)
    _step_index: int | None = None  # diffusers' DDIM and DDPM keep no step counter; every drop-in has one
    _ff_lane: tuple | None = None  # the default call's steps, bound (see _ff_lane_step)
    _ff_steps: int = 0  # steps of the schedule set up (_ff_reset), read by every step

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        parent = _diffusers_parent(cls)
        if parent is None:  # an intermediate mixin
            return
        _REGISTRY.setdefault(parent.__name__, cls)
        module = sys.modules.get(cls.__module__)
        if module is not None and cls.__module__.startswith(f"{__package__}."):
            # A pipeline saved with a drop-in names it by its module's path; diffusers' loader looks up the base
            # classes it knows how to load (SchedulerMixin) in that module, so DiffusionPipeline.from_pretrained
            # gets the drop-in back rather than refusing the component.
            module.SchedulerMixin = SchedulerMixin
        if _from_diffusers(cls, "__init__"):
            cls.__init__ = _wrap_init(parent.__init__)
        if _from_diffusers(cls, "set_timesteps"):
            cls.set_timesteps = _wrap_set_timesteps(parent.set_timesteps)

    def __copy__(self) -> FastflowScheduler:
        """``copy.copy``: diffusers' attributes shared, as a shallow copy of diffusers' scheduler shares them, but
        this drop-in's own loop state (the stored tensors of a multistep solver, the noise seeds, the bound steps)
        copied, so that the copy and the original each continue their own loop (a copy of diffusers' scheduler
        whose state is plain attributes, Heun's or KDPM2's, continues independently too)."""
        state = self.__dict__
        shared = {id(v): v for k, v in state.items() if not k.startswith("_ff_")}  # deepcopy's memo: kept as is
        new = type(self).__new__(type(self))
        new.__dict__.update(state)
        new.__dict__.update(copy.deepcopy({k: v for k, v in state.items() if k.startswith("_ff_")}, shared))
        return new

    def __setstate__(self, state: dict[str, Any]) -> None:
        """``copy.deepcopy`` and ``pickle``: the state as it was, but the address of the copy's own ``timesteps``,
        by which its steps know an element of them (see :meth:`_ff_is_element`; the original's would send every step
        of a copy of the classes that locate steps by value off the bound steps, and could match a tensor that
        later takes the original's freed storage)."""
        self.__dict__.update(state)
        ts = state.get("_ff_schedule_tensor")
        if isinstance(ts, torch.Tensor) and "_ff_timesteps_address" in state:
            self._ff_timesteps_address = (ts.data_ptr(), ts.element_size() * ts.stride(0))

    @staticmethod
    def _ff_check_timestep(timestep: float | torch.Tensor) -> None:
        """diffusers' sigma schedulers (Euler family, flow matching, consistency models) take a timestep value,
        never an integer index; they call this at each step."""
        if type(timestep) is torch.Tensor and timestep.is_floating_point():  # the usual case, decided quickly
            return
        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
            raise ValueError("pass one of scheduler.timesteps as timestep, not an integer index")

    def _ff_require_prediction(self, valid: Sequence[str], diffusers_too: bool = False) -> None:
        """Raise NotImplementedError naming a ``prediction_type`` outside ``valid`` (``diffusers_too``: diffusers'
        own step does not implement it either)."""
        prediction = self.config.prediction_type
        if prediction not in valid:
            raise NotImplementedError(
                f"prediction_type={prediction!r} is not supported by {type(self).__name__}"
                f"{' (diffusers does not implement it either)' if diffusers_too else ''}; valid: {', '.join(valid)}"
            )

    def _ff_require_timesteps(self) -> None:
        """diffusers' error for a ``step`` before ``set_timesteps`` (the schedulers that check it)."""
        if self.num_inference_steps is None:
            raise ValueError("num_inference_steps is None: call set_timesteps before step")

    def _ff_scheduled_index(self, timestep: Any) -> int:
        """:meth:`_ff_peek_index` for the schedulers whose diffusers ``step`` needs ``set_timesteps`` first: its
        error before that, else the step's index (the schedule's setup, such as what ``step`` reads from
        ``_ff_prepare``, is then in place)."""
        if self._step_index is None:  # mid-loop, a step has passed the check (set_timesteps cannot undo it)
            self._ff_require_timesteps()
        return self._ff_peek_index(timestep)

    # ------------------------------------------------------------ hooks for families
    def _ff_check_config(self) -> None:
        """Raise NotImplementedError naming any config option fastflow cannot reproduce."""

    def _ff_num_steps(self) -> int:
        """Number of ``step`` calls in a full loop."""
        return len(self._ff_host_timesteps)

    def _ff_spec(self, i: int, k: int, variant: Hashable) -> StepSpec:
        """The spec of step ``i`` (``k = i - start`` numbers its symbols)."""
        raise NotImplementedError

    def _ff_specs(self, start: int, variant: Hashable) -> list[StepSpec]:
        return [self._ff_defined_spec(i, i - start, variant) for i in range(start, self._ff_num_steps())]

    def _ff_defined_spec(self, i: int, k: int, variant: Hashable) -> StepSpec:
        """:meth:`_ff_spec`, or, where step ``i`` is undefined (the spec raises an :class:`UndefinedStepError`, or
        has a coefficient that is not finite), a spec that raises when the step runs. Any other error is raised at
        once: it is not diffusers' undefined step but a fault or an unsupported input."""
        try:
            spec = self._ff_spec(i, k, variant)
        except UndefinedStepError as exc:
            error = str(exc)
        else:
            error = self._ff_finiteness_error(spec, i)
            if error is None:
                return spec
        return StepSpec(0.0, 1.0, Z(k), error=error)

    def _ff_finiteness_error(self, spec: StepSpec, i: int) -> str | None:
        """:func:`spec_finiteness_error`, naming non-finite timesteps or sigmas of the schedule where they are why."""
        error = spec_finiteness_error(spec, i)
        return None if error is None else error + self._ff_schedule_note()

    def _ff_clip(self) -> float | None:
        return None

    # ------------------------------------------------------------ state
    def _ff_reset(self) -> None:
        """After diffusers' ``set_timesteps``: host copies of the schedule, the default plan, a fresh noise seed."""
        self._step_index = None
        self._begin_index = None
        # One device read here (set_timesteps already copies to the device) keeps step free of them.
        self._ff_host_timesteps = self.timesteps.detach().to("cpu", torch.float64).numpy()
        self._ff_host_values = self._ff_host_timesteps.tolist()  # Python floats, for _ff_locate
        ts = self._ff_schedule_tensor = self.timesteps  # the tensor _ff_host_values mirror, see _ff_view_position
        self._ff_timesteps_address = (ts.data_ptr(), ts.element_size() * ts.stride(0))  # see _ff_is_element
        self._ff_compiled: dict[tuple, Compiled] = {}
        self._ff_seed: int | None = None
        self._ff_seeds: dict[tuple, Any] = {}  # per-device seeds
        self._ff_counter_views: dict[torch.device, list[torch.Tensor | None]] = {}  # see _ff_noise_inputs
        self._ff_host_cache: dict[str, Any] = {}
        self._ff_stages: dict[tuple[Hashable, int], _StageCall] = {}
        self._ff_lane = None
        self._ff_loop_start = 0
        self._ff_x0_is_output = self._ff_returns_raw_x0 and getattr(self.config, "prediction_type", None) == "sample"
        sigmas = getattr(self, "sigmas", None)  # the host copies' sources, see _ff_follow_edits
        self._ff_sigmas_seen = (
            (sigmas, sigmas._version, sigmas.detach().to("cpu", copy=True)) if isinstance(sigmas, torch.Tensor)
            else None
        )
        self._ff_config_seen = dict(vars(self.config))
        self._ff_prepare()
        self._ff_steps = self._ff_num_steps()  # read by every step
        self._ff_warm()

    def _ff_prepare(self) -> None:
        """Precompute host data of the new schedule (families override)."""

    def _ff_follow_edits(self) -> None:
        """A loop is about to start: where ``sigmas`` was edited in place or replaced since the host copies were
        taken (Cosmos 2 pipelines set ``sigmas[-1] = sigmas[-2]`` after ``set_timesteps``), or a config attribute
        was set (Stable Cascade sets ``scheduler.config.clip_sample = False``, which diffusers' step reads), rebuild
        them, keeping ``begin_index``. The test reads no device memory; a changed tensor is read once, to compare
        its values. An edit made after the loop's first step is not followed (docs/diffusers.md)."""
        edited = False
        if self._ff_sigmas_seen is not None:
            seen, version, values = self._ff_sigmas_seen
            now = self.sigmas
            if now is not seen or now._version != version:
                current = now.detach().to("cpu") if isinstance(now, torch.Tensor) else None
                if (current is not None and current.shape == values.shape
                        and torch.equal(current, values.to(current.dtype))):
                    self._ff_sigmas_seen = (now, now._version, values)  # the same values (moved or cast)
                else:
                    edited = True
        try:
            edited = edited or vars(self.config) != self._ff_config_seen
        except (ValueError, RuntimeError, TypeError):  # a replaced array value compares element-wise
            edited = True
        if edited:
            begin = self._begin_index
            self._ff_check_config()
            self._ff_reset()
            self._begin_index = begin

    def _ff_ready(self) -> bool:
        return getattr(self, "_ff_compiled", None) is not None

    # diffusers' DDIM/DDPM have no step counter; these make every drop-in the same.
    @property
    def step_index(self) -> int | None:
        """Index of the next step (None before the first step of a loop)."""
        return getattr(self, "_step_index", None)

    @property
    def begin_index(self) -> int | None:
        """First step index, set with :meth:`set_begin_index` (img2img pipelines)."""
        return getattr(self, "_begin_index", None)

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = int(begin_index)

    def _ff_locate(self, value: float) -> int:
        """Index of a timestep value in the schedule: where it repeats, the second match, as diffusers' classes that
        locate steps take it; the first for those that do not (value-addressed or call-counting)."""
        values = self._ff_host_values
        try:
            i = values.index(value)  # a scan in C that stops at the first match (a loop's first step: at once)
        except ValueError:
            note = self._ff_schedule_note()
            if not note and self._ff_timestep_addressed and not self._ff_mixed_addressed:
                note = (f" (diffusers' {type(self).__name__} steps from any timestep's value; this drop-in steps "
                        "the timesteps of its schedule only)")
            raise ValueError(f"timestep {value} is not in this scheduler's timesteps{note}") from None
        if not (self._ff_timestep_addressed or self._ff_counts_calls) and value in values[i + 1 :]:
            i = values.index(value, i + 1)
        return i

    def _ff_schedule_note(self) -> str:
        """Where ``set_timesteps`` made non-finite timesteps (a ``mu`` or shift the schedule cannot take, NaN
        sigmas passed in), the clause an error adds to say so; else nothing."""
        what, values = "timesteps", self._ff_host_values
        bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
        sigmas = getattr(self, "sigmas", None)
        if not bad and isinstance(sigmas, torch.Tensor) and sigmas.device.type == "cpu":  # no device read here
            what, values = "sigmas", sigmas.tolist()
            bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
        if not bad:
            return ""
        listed = ", ".join(map(str, bad[:4])) + (", ..." if len(bad) > 4 else "")
        return (f"; set_timesteps made {what} that are not finite (at index {listed} of {len(values)}): check its "
                "sigmas, shift or mu (diffusers steps to NaN there)")

    def _ff_view_value(self, timestep: Any) -> float | None:
        """The value of a device timestep that is an element of this scheduler's own ``timesteps`` (a pipeline's
        ``for t in timesteps``, sliced or not), from its offset in their storage: no data is read. None for any
        other tensor."""
        pos = self._ff_view_position(timestep)
        return None if pos is None else self._ff_host_values[pos]

    def _ff_is_element(self, timestep: torch.Tensor, idx: int) -> bool:
        """Whether ``timestep`` is element ``idx`` of this scheduler's ``timesteps`` (a pipeline's ``for t in
        timesteps``), from its address alone: no data is read. True while tracing, where no address is known."""
        if torch.compiler.is_compiling():
            return True
        base, stride = self._ff_timesteps_address
        return timestep.data_ptr() == base + idx * stride

    def _ff_relocate(self, timestep: torch.Tensor, idx: int) -> int:
        """The step of a tensor timestep other than the counter's (``idx``) on a scheduler whose diffusers class
        derives each step from the timestep's value (a step taken twice, or a loop that skips steps): found by its
        position where it is an element of ``timesteps``, by its value where it lives on the CPU. Any other device
        tensor takes the counter's step (reading it would sync the host). A step taken again draws fresh noise."""
        pos = self._ff_view_position(timestep)
        if pos is None:
            value = _host_number(timestep)
            if value is None or value == self._ff_host_values[idx]:
                return idx
            pos = self._ff_locate(value)
        return self._ff_move_to(pos, idx)

    def _ff_move_to(self, pos: int, idx: int) -> int:
        """Move the step counter from ``idx`` to step ``pos``, which the timestep named. Back to a step this loop
        has run, the in-kernel noise, keyed by the step, would repeat: it is drawn afresh, as diffusers draws."""
        if pos < idx:
            self._ff_seed = None
            self._ff_seeds = {}
            self._ff_lane = None
        self._step_index = pos
        return pos

    def _ff_require_counter_timestep(self, timestep: Any, idx: int) -> None:
        """Raise where a class whose diffusers step reads both its counter and the timestep's value is given, at
        step ``idx``, a timestep whose value the host knows and that is not that step's."""
        if type(timestep) is torch.Tensor:
            if self._ff_is_element(timestep, idx):
                return
            pos = self._ff_view_position(timestep)
            value = _host_number(timestep) if pos is None else self._ff_host_values[pos]
        else:
            value = _host_number(timestep)
        if value is None or not self._ff_value_differs(value, idx):
            return
        raise NotImplementedError(
            f"{type(self).__name__}.step was given timestep {value:g} at step {idx}, whose timestep is "
            f"{self._ff_host_values[idx]:g}: diffusers' step then mixes the two (it reads {self._ff_value_reads} "
            "from the given timestep, the rest from its step counter); fastflow's steps through its timesteps in order "
            "(call set_timesteps, or set_begin_index, to start a loop elsewhere)"
        )

    def _ff_value_differs(self, value: float, idx: int) -> bool:
        """Whether diffusers' step ``idx`` given timestep ``value`` reads other numbers than at its own timestep."""
        return value != self._ff_host_values[idx]

    def _ff_view_position(self, timestep: Any) -> int | None:
        """The index in this schedule of a timestep that is an element of its ``timesteps`` (its offset in their
        storage, on any device; no data is read), else None. Offsets count from the tensor ``set_timesteps`` made,
        so a pipeline that puts a slice of it in ``scheduler.timesteps`` still gets the schedule's own index; a
        tensor put there in its place with the schedule's length (a cast, a move) is read as the same schedule."""
        if not (isinstance(timestep, torch.Tensor) and timestep.numel() == 1):
            return None
        made = self._ff_schedule_tensor
        pos = _element_offset(timestep, made)
        if pos is None:
            ts = getattr(self, "timesteps", None)
            if ts is not made and isinstance(ts, torch.Tensor) and ts.shape == made.shape:
                pos = _element_offset(timestep, ts)
        return pos

    def _ff_peek_index(self, timestep: Any) -> int:
        """The index of the step about to run (set up on first use; ``step`` advances it)."""
        idx = self._step_index
        # Mid-loop with a tensor timestep (a pipeline's loop), or on a scheduler that finds steps by counting alone:
        # the counter, decided in one test since every step asks.
        if idx is not None and idx < self._ff_steps and (
            type(timestep) is torch.Tensor or not self._ff_timestep_addressed
        ):
            if (self._ff_timestep_addressed or self._ff_mixed_addressed) and not torch.compiler.is_compiling():
                base, stride = self._ff_timesteps_address  # _ff_is_element, inlined: every step asks
                if type(timestep) is not torch.Tensor or timestep.data_ptr() != base + idx * stride:
                    if self._ff_mixed_addressed:
                        self._ff_require_counter_timestep(timestep, idx)
                    else:
                        return self._ff_relocate(timestep, idx)
            return idx
        if getattr(self, "_ff_compiled", None) is None:  # _ff_ready(), inlined
            self._ff_reset()  # diffusers steps with its init-time schedule when set_timesteps was not called
        return self._ff_index(timestep)

    def _ff_noise_counter(self, k: int, device: torch.device) -> int | torch.Tensor:
        """The in-kernel noise counter of stage ``k``: an int on the CPU, elsewhere a one-element device view
        (an int would be copied to the device: a host sync)."""
        return k if device.type == "cpu" else self._ff_row(k, device)

    def _ff_noise_inputs(self, k: int, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The seeds and the noise counter of stage ``k``'s in-kernel draw for state ``z``: the counter a device
        view (None on the CPU, where the stage index is the counter). Every noisy step asks: a schedule lists
        the views it has used per device."""
        device, batch = z.device, z.shape[0]
        seeds = self._ff_seeds.get((device, batch))
        if seeds is None:
            seeds = self._ff_seed_tensor(batch, device)
        if device.type == "cpu":
            return seeds, None
        views = self._ff_counter_views.get(device)
        if views is None:
            views = self._ff_counter_views[device] = [None] * self._ff_steps
        view = views[k]
        if view is None:
            view = views[k] = self._ff_row(k, device)
        return seeds, view

    def _ff_index(self, timestep: Any) -> int:
        """The index of the step about to run, without reading device memory (set up: _ff_reset has run)."""
        idx = self._step_index
        if idx is None or idx >= self._ff_steps:
            if not torch.compiler.is_compiling():
                self._ff_follow_edits()
                idx = self._step_index
            begin = self.begin_index
            # diffusers' DDIM family has no begin index: each step is its timestep's, which a begin index left from
            # an earlier loop must not override; it places the first step only where the value is not known.
            by_value = self._ff_timestep_addressed and not self._ff_mixed_addressed
            if begin is not None and (not by_value or torch.compiler.is_compiling()):
                idx = begin
            else:
                on_host = isinstance(timestep, torch.Tensor) and timestep.device.type == "cpu"
                if on_host and torch.compiler.is_compiling():
                    raise RuntimeError(
                        f"{type(self).__name__}.step under torch.compile: the first step of a loop is located by "
                        "its timestep's value, which a traced graph cannot read from a tensor; call "
                        "set_begin_index(0) before the loop (as diffusers' img2img pipelines do), pass the "
                        "timestep as a Python number, or take the first step eagerly"
                    )
                pos = None if torch.compiler.is_compiling() else self._ff_view_position(timestep)
                if pos is not None and self._ff_counts_calls:
                    idx = pos
                else:
                    value = _host_number(timestep)
                    if value is None and pos is not None:
                        value = self._ff_host_values[pos]
                    idx = (begin or 0) if value is None else self._ff_locate(value)
            self._step_index = idx
            self._ff_set_loop_start(idx)
        elif (
            self._ff_timestep_addressed
            and type(timestep) is not torch.Tensor  # the usual case, decided before a four-type isinstance
            and isinstance(timestep, (int, float, np.integer, np.floating))
            and self._ff_host_values[idx] != float(timestep)  # a list: numpy would be traced as a tensor
        ):
            idx = self._ff_move_to(self._ff_locate(float(timestep)), idx)
        return idx

    # ------------------------------------------------------------ the step
    def _ff_set_loop_start(self, start: int) -> None:
        """A loop starts at step ``start``. For solvers whose plans depend on it, a new start empties the table
        of steps' calls (``_ff_reset`` empties it for each new schedule)."""
        if self._ff_start_dependent and start != self._ff_loop_start:
            self._ff_stages.clear()
            self._ff_lane = None
        self._ff_loop_start = start

    def _ff_stage(self, idx: int, variant: Hashable) -> _StageCall:
        """The call of step ``idx`` of ``variant``. Every step of the compiled loop it belongs to is entered in
        ``_ff_stages`` at once, so a loop looks its plan up once, not at every step."""
        comp = self._ff_get(idx, variant)
        if comp.start == (self._ff_loop_start if self._ff_start_dependent else 0):
            self._ff_stages.update(((variant, comp.start + k), call) for k, call in enumerate(comp.calls))
        else:  # a step before the loop's start runs a plan of its own (see _ff_get)
            self._ff_stages[(variant, idx)] = comp.calls[idx - comp.start]
        return comp.calls[idx - comp.start]

    def _ff_get(self, idx: int, variant: Hashable) -> Compiled:
        """The compiled loop containing step ``idx`` (built once per loop start and variant).

        Solvers whose stages read earlier stages compile from the step the loop
        started at (``_ff_start_dependent``); single-step ones compile once from 0.
        """
        compiled = getattr(self, "_ff_compiled", None)
        if compiled is None:
            raise ValueError("call set_timesteps before step")
        start = self._ff_loop_start if self._ff_start_dependent else 0
        if idx < start:
            start = idx
        key = (variant, start)
        comp = compiled.get(key)
        if comp is None:
            if torch.compiler.is_dynamo_compiling():  # building a plan reads numpy arrays: say so, not numpy's error
                torch._dynamo.graph_break(
                    msg=f"{type(self).__name__}.step: the plan of this step variant ({variant!r}) is built on its "
                    "first use, which a graph cannot trace: run the first loop's first such call eagerly (later "
                    "loops' set_timesteps build it), or compile without fullgraph"
                )
            comp = compile_specs(self._ff_specs(start, variant), self._ff_clip(), self.backend, start=start)
            self._ff_compiled[key] = comp
            used = self.__dict__.setdefault("_ff_used_variants", [])
            if variant != self._ff_default_variant and variant not in used and not torch.compiler.is_compiling():
                used.append(variant)  # warmed by later set_timesteps calls (see _ff_warm)
                del used[:-_MAX_WARMED_VARIANTS]
        return comp

    def _ff_warm(self) -> None:
        """Compile the default variant (and ``_ff_warm_variants``, and the last variants earlier schedules built:
        a step with ``eta``, say) from step 0, enter its steps' calls and upload its table where the timesteps live.
        Done in ``set_timesteps`` so that no ``step`` does host work or a copy for it, and so that a step traced by
        torch.compile finds its plan built (building one reads numpy arrays, which a graph cannot).
        """
        if self._ff_default_variant is _NO_DEFAULT:
            return
        self._ff_set_loop_start(0)
        device = self.timesteps.device
        used = self.__dict__.get("_ff_used_variants", ())
        for variant in (self._ff_default_variant, *self._ff_warm_variants, *used):
            try:
                runner = self._ff_stage(0, variant).runner  # every step's call, entered now
            except ValueError:  # a loop from step 0 is undefined: its first step raises (one from later may run)
                continue
            except Exception:  # an earlier schedule's variant this one cannot build: left to a step that asks
                if variant in used:
                    continue
                raise
            if device.type != "cpu":
                runner.table(device, torch.float32)
            runner.warm(device)  # the backend too: a first step traced by torch.compile cannot import one

    def _ff_row(self, k: int, device: torch.device) -> torch.Tensor:
        """Row ``k`` of ``arange(steps)`` on ``device`` as a one-element view: the noise counter a kernel reads
        there. Each view is made on first use and kept for later schedules (its value, ``k``, is the same whatever
        their number of steps), so loops after the first make none (a view costs about a microsecond of host time).
        One counter tensor per device, as long as the longest schedule yet: a server running loops of ever other
        lengths keeps that many views, not a set per length."""
        rows = self.__dict__.setdefault("_ff_rows", {})
        found = rows.get(device)
        length = max(self._ff_steps, k + 1)
        if found is None or len(found[0]) < length:
            # a longer schedule: the views of the shorter counters go with them (a loop holding one keeps it)
            found = rows[device] = (torch.arange(length, dtype=torch.int64, device=device), {})
        counters, views = found
        view = views.get(k)
        if view is None:
            view = views[k] = counters[k : k + 1]
        return view

    def _ff_draw(
        self, generator: torch.Generator | None, like: torch.Tensor, dtype: torch.dtype | None = None
    ) -> Callable[[], torch.Tensor] | None:
        """This step's diffusers noise draw (:func:`generator_draw`), from the global generator too with
        ``diffusers_noise``; None where the kernel draws fastflow's noise."""
        if generator is None and not self.diffusers_noise:  # the usual call, answered without a second one
            return None
        return generator_draw(generator, like, dtype, always=self.diffusers_noise)

    def _ff_fold_seed(self, seed: int) -> None:
        """Seed fastflow's noise for this schedule from another generator's seed (a config's, a generator's)."""
        self._ff_seed = int(seed) % noise_spec.DRAWN_SEED_RANGE

    def _ff_kernel_noise(self, runner: PlanRunner, k: int, like: torch.Tensor) -> torch.Tensor:
        """The noise stage ``k`` of ``runner``'s plan draws in its kernel (float32, ``like``'s shape), drawn outside
        it through the runner's backend: for a step that needs it scaled per element or combined with another."""
        device = like.device
        backend = resolve_backend(runner.backend, device, torch.float32)
        seeds = self._ff_seed_tensor(like.shape[0], device)
        return backend.noise(seeds, like.shape[1:], step=self._ff_noise_counter(k, device))

    def _ff_loop_seed(self) -> int:
        """This loop's seed of fastflow's noise: a fixed one (a config's, a generator's), else drawn from torch's
        global CPU generator at the loop's first noisy step, not in set_timesteps, so that a pipeline's initial
        latents drawn from the global generator stay what diffusers draws. Graph replays take it here too."""
        if self._ff_seed is None:
            self._ff_seed = noise_spec.draw_seed()
        return self._ff_seed

    def _ff_seed_tensor(self, batch: int, device: torch.device) -> torch.Tensor:
        key = (device, batch)
        seeds = self._ff_seeds.get(key)
        if seeds is None:
            if self._ff_seed is None and not torch.compiler.is_dynamo_compiling():
                drawn = noise_spec.draw_seed_tensor()
                if is_fake(drawn):
                    # torch.export's non-strict tracing (or a FakeTensorMode): the draw has no value to take int()
                    # of, so the seeds stay ops on it (the exported program draws as eager does), and are not kept:
                    # a fake tensor in the schedule's state would outlive the trace.
                    return (drawn + torch.arange(batch, dtype=torch.int64)).to(device)
                self._ff_seed = int(drawn.item())
            seed = self._ff_loop_seed()
            seeds = torch.arange(seed, seed + batch, dtype=torch.int64, device=device)
            self._ff_seeds[key] = seeds
        return seeds

    def _ff_step(
        self,
        model_output: torch.Tensor,
        timestep: Any,
        sample: torch.Tensor,
        *,
        variant: Hashable = None,
        draw: Callable[[], torch.Tensor] | None = None,
        noise: torch.Tensor | None = None,
        state_dtype: torch.dtype | None = None,
        out_dtype: torch.dtype | None = None,
        want_pred: bool = True,
        kernel_output: torch.Tensor | None = None,
        index: int | None = None,
        lane: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run step ``step_index`` as one backend call; returns ``(prev_sample, prediction field)``.

        ``draw()`` draws diffusers' noise tensor (generator path); ``noise`` is given
        noise; with neither the kernel draws its own. ``state_dtype`` is the dtype
        diffusers computes the update in, ``out_dtype`` the dtype returned (a float16 or
        bfloat16 sample upcast to float32 and returned in its own dtype is stepped as it
        is: the kernels compute it in float32 and round once). ``kernel_output``
        replaces the model output as the tensor the kernel converts to ``x_hat``
        (e.g. a thresholded x0); :func:`O` still binds the model output. ``index`` is
        what :meth:`_ff_peek_index` returned for this call, when the caller already asked. ``lane``: this is the
        class's default call, whose arguments to this method depend on no step index, so the loop's steps may
        be bound for :meth:`_ff_lane_step`.
        """
        if torch.is_grad_enabled() and (model_output.requires_grad or sample.requires_grad):
            self._ff_refuse_grad()
        idx = self._ff_peek_index(timestep) if index is None else index
        lane = lane and noise is None and draw is None and kernel_output is None
        stage = self._ff_stages.get((variant, idx)) or self._ff_stage(idx, variant)
        runner, k, noisy, draws, uses_o, pred_lin, error, plain = stage
        if error is not None:
            raise UndefinedStepError(error)
        z, x_dtype, seeds, row = sample, None, None, None
        if state_dtype is not sample.dtype and state_dtype is not None:
            if out_dtype is sample.dtype and state_dtype is torch.float32 and sample.dtype in _HALF_DTYPES:
                # Kernels compute half states in float32 and round once on the store: diffusers'
                # upcast, float32 update and cast back, bit for bit, without the two casts (each a
                # launch and a copy); x_hat stays float32, as diffusers computes it.
                x_dtype = state_dtype
            else:
                z = sample.to(state_dtype)
                lane = False
        state_x_dtype = x_dtype
        if noise is None:
            if draws and draw is not None:
                noise = draw()
            elif noisy:
                seeds, row = self._ff_noise_inputs(k, z)
        if noise is not None and noise.shape != z.shape:
            noise = _fit_noise(noise, model_output, z)
        cond = model_output
        if kernel_output is not None:
            if runner.plan.keep_o:  # the runner keeps the tensor the kernel converts; O(j) means the raw output
                raise ValueError("a plan that keeps earlier model outputs cannot convert another tensor")
            cond = kernel_output
        elif uses_o and not model_output.is_contiguous():
            # Inputs in any layout: the backend reads them by value (a copy only where needed). The model output
            # bound twice (as the kernel's output and a history slot) is copied once here, not twice, into the
            # layout the kernel reads the state in (channels_last stays so: no copy of a model output in the
            # sample's own layout).
            cond = model_output = kernel_layout(model_output, z, noisy and noise is None)
        want_x = want_pred and self.compute_pred_original_sample
        if want_x and self._ff_x0_is_output and pred_lin is None and model_output.dtype != (x_dtype or z.dtype):
            x_dtype = model_output.dtype  # diffusers' prediction field is the model output: its values and dtype
        if plain:
            history = [model_output] if uses_o else []
            out, x, _ = runner.run_plain(k, z, cond, seeds, noise, want_x, history, row, x_dtype)
        else:
            try:
                out, x, _ = runner.run(
                    k, z, cond, None, seeds=seeds, noise=noise, want_x=want_x,
                    extra_history=(model_output,) if uses_o else (), step=row, x_dtype=x_dtype,
                )
            except HistoryShapeError as exc:
                raise self._ff_reshaped(exc) from exc
        pred = None
        if want_x:
            if pred_lin is not None:
                pred = self._ff_eval(pred_lin, k, x, z, model_output, noise, seeds, k if row is None else row)
            else:  # a stage that keeps its x_hat for a later one returns a copy: an edit of it changes no step
                pred = x.clone() if runner.plan.write_x[k] and not self._ff_pred_handed_back else x
        if lane and not torch.compiler.is_compiling():  # a host-time shortcut, which would guard a graph on the batch
            self._ff_update_lane(idx, variant, stage, sample, model_output, want_x, state_x_dtype, out_dtype)
        self._step_index = idx + 1
        if out_dtype is not None and out.dtype is not out_dtype:
            out = out.to(out_dtype)
        return out, pred

    # ------------------------------------------------------------ the lane
    # A pipeline calls ``step`` the same way at every step of a loop. The first such call of a loop runs
    # _ff_step, which keeps its loop's stage calls and the entry call bound for the tensors' dtypes and device
    # (runner.BoundEntry) as the lane; the loop's later steps then run from it without _ff_step's decisions
    # (plain stages straight into the bound entry, others through the runner, which keeps their history).
    # Only a class's default call (``lane=True``: no generator, given noise or options, the same arguments to
    # _ff_step at every step) uses it; any other call, tensor or state takes _ff_step.

    def _ff_update_lane(
        self, idx: int, variant: Hashable, stage: _StageCall, sample: torch.Tensor, model_output: torch.Tensor,
        want_x: bool, x_dtype: torch.dtype | None, out_dtype: torch.dtype | None,
    ) -> None:
        """After a default call of step ``idx`` ran through :meth:`_ff_step`: bind the lane when it is missing,
        bound for other tensors or another ``variant``, or has no seeds though this noisy step has just drawn them.
        ``x_dtype``: the dtype _ff_step writes x_hat in for these tensors, before the rule of a prediction field
        that is the model output (which applies to steps that return x_hat itself: where it changes the dtype, the
        lane leaves the steps with a prediction field of their own to _ff_step)."""
        device = sample.device
        key = (sample.dtype, model_output.dtype, device, sample.shape[0], self.compute_pred_original_sample, out_dtype)
        cur = self._ff_lane
        if cur is not None and cur[-1] == key and cur[0] == variant and (cur[4] is not None or not stage.noisy):
            return
        start = self._ff_loop_start if self._ff_start_dependent else 0
        if idx < start:
            return  # a step before the loop's start runs a plan of its own (see _ff_get)
        comp = self._ff_get(idx, variant)
        own_preds = True  # the lane may run steps whose prediction field is not x_hat itself
        if want_x and self._ff_x0_is_output and model_output.dtype != (x_dtype or sample.dtype):
            x_dtype, own_preds = model_output.dtype, False
        seeds = self._ff_seeds.get((device, sample.shape[0]))
        rows = None if device.type == "cpu" else self._ff_counter_views.setdefault(device, [None] * self._ff_steps)
        bound = comp.runner.bind(device, sample.dtype, want_x, x_dtype)
        self._ff_lane = (variant, comp.calls, comp.start, bound, seeds, rows, own_preds, key)

    def _ff_lane_step(
        self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, variant: Hashable = None
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The class's default call of ``step`` from the lane, as ``(prev_sample, prediction field)``; None where
        the lane does not hold it (the caller then runs :meth:`_ff_step` with ``lane=True``): mid-loop, at a step
        whose index does not depend on the timestep's value, with tensors like those the lane was bound for.
        ``variant``: where a class's default call takes a step argument that selects its plan (LMS's order, TCD's
        eta; validated by the call that bound the lane), the argument, which must be the lane's; None for a class
        whose lane serves one variant."""
        lane = self._ff_lane
        idx = self._step_index
        if lane is None or idx is None:
            return None
        if torch.is_grad_enabled() and (model_output.requires_grad or sample.requires_grad):
            return None  # _ff_step refuses it
        if self._ff_timestep_addressed or self._ff_mixed_addressed:  # the step may depend on the timestep's value
            if type(timestep) is not torch.Tensor:
                return None  # _ff_peek_index finds it
            if not torch.compiler.is_compiling():
                base, stride = self._ff_timesteps_address  # _ff_is_element, inlined
                if timestep.data_ptr() != base + idx * stride:
                    return None
        bound_variant, calls, start, bound, seeds, rows, own_preds, key = lane
        if variant is not None and variant is not bound_variant and variant != bound_variant:
            return None
        k = idx - start
        if not 0 <= k < len(calls):
            return None
        runner, _, noisy, draws, uses_o, pred, error, plain = calls[k]
        z_dtype, o_dtype, device, batch, cpo, out_dtype = key
        if (
            error is not None
            or (pred is not None and bound.want_x and not own_preds)
            or sample.dtype is not z_dtype
            or model_output.dtype is not o_dtype
            or sample.device != device
            or self.compute_pred_original_sample != cpo
            or (draws and self.diffusers_noise)
        ):
            return None
        row = None
        if noisy:
            if seeds is None or sample.shape[0] != batch:
                return None
            if rows is not None:  # the noise counter, a device view (see _ff_noise_inputs)
                row = rows[k]
                if row is None:
                    row = self._ff_noise_inputs(k, sample)[1]
        if uses_o:
            # read in place: row-major, or in the layout of a sample the kernel steps in its own order (no draw)
            if not model_output.is_contiguous() and (noisy or model_output.stride() != sample.stride()):
                return None
            history = [model_output]
        else:
            history = []
        if plain:
            out, x, _ = run_bound(bound, k if row is None else row, sample, model_output, history,
                                  seeds if noisy else None, noisy)
        else:  # a stage that reads or keeps stored tensors: the runner's bookkeeping
            try:
                out, x, _ = runner.run_kept(bound, k, k if row is None else row, sample, model_output, history,
                                            seeds if noisy else None)
            except HistoryShapeError as exc:
                raise self._ff_reshaped(exc) from exc
        if x is not None:
            if not bound.want_x:  # written only for a later stage to read
                x = None
            elif pred is not None:  # a prediction field of its own (LMS's x0, for one)
                x = self._ff_eval(pred, k, x, sample, model_output, None, seeds if noisy else None,
                                  k if row is None else row)
            elif runner.plan.write_x[k] and not self._ff_pred_handed_back:  # kept: a copy (see _ff_step)
                x = x.clone()
        self._step_index = idx + 1
        if out_dtype is not None and out.dtype is not out_dtype:
            out = out.to(out_dtype)
        return out, x

    def _ff_refuse_grad(self) -> None:
        """diffusers' step is differentiable; the fused one is an inference op whose output records nothing for
        autograd, so a loss through it would get wrong gradients without an error."""
        raise RuntimeError(
            f"{type(self).__name__}.step was given a tensor that requires grad with gradients enabled: fastflow's "
            "fused step is an inference op and would return a result that does not require grad, cutting the "
            "gradient diffusers' step carries. Step under torch.no_grad() (as diffusers' pipelines do) or with "
            "detached tensors; to backpropagate through the sampler step, use diffusers' own scheduler"
        )

    def _ff_reshaped(self, exc: HistoryShapeError) -> ValueError:
        """The error of a step whose sample changed shape mid-loop, said in a pipeline's terms."""
        return ValueError(
            f"{type(self).__name__}: the sample's shape changed mid-loop, from {exc.kept_shape} to "
            f"{exc.state_shape}. This drop-in keeps earlier steps' tensors inside its fused plan and does not read "
            "diffusers' own solver state (model_outputs, last_sample, ...) or edits of it, as a pipeline that "
            "trims the latents mid-loop makes (ChronoEdit's temporal reasoning): such a pipeline needs diffusers' "
            "scheduler; or call set_timesteps to start a new loop at the new shape"
        )

    @staticmethod
    def _ff_eval(
        lin: Lin,
        k: int,
        x: torch.Tensor,
        z: torch.Tensor,
        o: torch.Tensor,
        given_noise: torch.Tensor | None,
        seeds: torch.Tensor | None,
        row: int | torch.Tensor,
    ) -> torch.Tensor:
        """A prediction field that is not ``x_hat`` itself (e.g. churned, LMS's x0 or LCM's clipped ``denoised``):
        plain torch ops, each term after the first added with its coefficient in one (``torch.add``'s ``alpha``)."""
        terms = {("x", k): x, ("z", k): z, (_O_KIND, k): o}
        acc = None
        for atom, c in lin:
            if c == 0.0:
                continue
            if atom == NOISE:
                if given_noise is None:  # the kernel's own draw, regenerated from the spec
                    given_noise = noise_spec.normal(seeds, z.shape[1:], step=row, dtype=torch.float32)
                t = given_noise
            elif atom in terms:
                t = terms[atom]
            else:
                raise ValueError(f"a prediction field cannot use {atom}")
            t = t.to(x.dtype)
            acc = (t * c if c != 1.0 else t) if acc is None else torch.add(acc, t, alpha=c)
        return acc if acc is not None else torch.zeros_like(x)


def _wrap_init(parent_init: Callable) -> Callable:
    """``__init__`` with the parent's exact signature (diffusers reads it for the config), then a config check."""

    @functools.wraps(parent_init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Some diffusers constructors run set_timesteps(num_train_timesteps) before the config is complete;
        # fastflow's setup for that schedule would be thrown away (and costs up to ~0.1 s: LMS, Heun), so
        # it waits for the first step or set_timesteps.
        self._ff_initializing = True
        try:
            parent_init(self, *args, **kwargs)
        finally:
            self._ff_initializing = False
        self._ff_compiled = None
        self._ff_check_config()

    return __init__


def _wrap_set_timesteps(parent_set: Callable) -> Callable:
    """``set_timesteps`` with the parent's signature (pipelines inspect it for ``timesteps``/``sigmas``/``mu``)."""

    signature = inspect.signature(parent_set)

    @functools.wraps(parent_set)
    def set_timesteps(self, *args: Any, **kwargs: Any) -> None:
        device = signature.bind_partial(self, *args, **kwargs).arguments.get("device")
        if device is not None and torch.device(device).type == "meta":
            raise NotImplementedError(
                f"{type(self).__name__}.set_timesteps(device='meta'): the drop-in keeps host copies of the schedule "
                "and locates steps by their timesteps' addresses, which meta tensors have neither of; set the "
                "timesteps on the CPU (steps take meta tensors, timesteps moved to meta included)"
            )
        parent_set(self, *args, **kwargs)
        if not self._ff_initializing:
            self._ff_reset()

    set_timesteps.__signature__ = signature
    return set_timesteps


def promoted_dtype(sample: torch.Tensor, model_output: torch.Tensor) -> torch.dtype:
    """The dtype diffusers' update is computed in: the promotion of the sample's and the model output's
    (tested for equality first, since the promotion costs a few tenths of a microsecond per step)."""
    dtype = sample.dtype
    return dtype if model_output.dtype is dtype else torch.promote_types(dtype, model_output.dtype)


def float32(x: float) -> float:
    """``x`` rounded to float32, as diffusers' float32 tensors hold it."""
    return float(np.float32(x))


def sqrt(x: float) -> float:
    """Square root that names a negative argument instead of returning NaN."""
    if x < 0:
        raise UndefinedStepError(f"negative variance {x}: this configuration has no real step")
    return math.sqrt(x)
