"""Shared machinery of the drop-in diffusers schedulers.

Each drop-in subclasses the diffusers scheduler of the same name, so its config,
``from_config``/``save_config``, ``add_noise``, ``timesteps``, ``sigmas`` and
``init_noise_sigma`` are diffusers' own. Only ``set_timesteps`` (which lets
diffusers compute the schedule, then compiles a fastflow plan once, in float64 on
the host) and ``step`` (one backend call, no host sync) are replaced.

:class:`FastflowScheduler` keeps a schedule's compiled plans and runs a step through
them. A family states its steps in the language of :mod:`._spec`; the step's index
is found by :mod:`._locate`, its noise drawn by :mod:`._noise_draws`, and a
pipeline's default call runs from :mod:`._lane`.

Undefined steps: where diffusers' step is undefined (it returns NaN or inf there), the
drop-in's step raises a ValueError (:class:`~fastflow.UndefinedStepError`) that says why
when it runs; ``set_timesteps`` does not, since an img2img loop may start after it, and
a loop may stop before it (:attr:`StepSpec.error`).
"""

from __future__ import annotations

import copy
import functools
import inspect
import sys
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from diffusers import SchedulerMixin

from .. import noise as noise_spec
from ..backends.base import kernel_layout
from ..runner import HistoryShapeError
from ..solvers.base import NOISE, Lin, UndefinedStepError, Z
from ._lane import StepLane
from ._locate import StepLocator
from ._noise_draws import KernelNoise, fit_noise
from ._spec import O_KIND, Compiled, StageCall, StepSpec, compile_specs, spec_finiteness_error

__all__ = ["FastflowScheduler", "absent_method", "registry"]

_REGISTRY: dict[str, type] = {}
_NO_DEFAULT = object()
_MAX_WARMED_VARIANTS = 4  # step variants beyond the default that set_timesteps builds again (see _ff_warm)
_HALF_DTYPES = (torch.float16, torch.bfloat16)
# torch 2.6's graph_break takes no message: called with one, the call dynamo leaves to eager after the break raised
# TypeError (torch._dynamo is imported by now: diffusers and torch's fake tensors import it)
_GRAPH_BREAK_TAKES_MSG = "msg" in inspect.signature(torch._dynamo.graph_break).parameters


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


class FastflowScheduler(StepLocator, KernelNoise, StepLane):
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

    def _ff_require_prediction(self, valid: Sequence[str], diffusers_too: bool = False) -> None:
        """Raise NotImplementedError naming a ``prediction_type`` outside ``valid`` (``diffusers_too``: diffusers'
        own step does not implement it either)."""
        prediction = self.config.prediction_type
        if prediction not in valid:
            raise NotImplementedError(
                f"prediction_type={prediction!r} is not supported by {type(self).__name__}"
                f"{' (diffusers does not implement it either)' if diffusers_too else ''}; valid: {', '.join(valid)}"
            )

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
        self._ff_stages: dict[tuple[Hashable, int], StageCall] = {}
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
        current = self._ff_sigmas_now()
        if self._ff_sigmas_seen is not None and current is not self._ff_sigmas_seen[2]:
            values = self._ff_sigmas_seen[2]
            if current is not None and current.shape == values.shape and torch.equal(current, values.to(current.dtype)):
                self._ff_sigmas_seen = (self.sigmas, self.sigmas._version, values)  # the same values (moved or cast)
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

    def _ff_sigmas_now(self) -> torch.Tensor | None:
        """The values of ``sigmas`` that a loop starting now follows: the host copy taken at ``set_timesteps``
        (this very tensor) while ``sigmas`` is that tensor unchanged, else the current values, read once."""
        if self._ff_sigmas_seen is None:
            return None
        seen, version, values = self._ff_sigmas_seen
        now = getattr(self, "sigmas", None)
        if now is seen and now._version == version:
            return values
        return now.detach().to("cpu", copy=True) if isinstance(now, torch.Tensor) else None

    def _ff_ready(self) -> bool:
        return getattr(self, "_ff_compiled", None) is not None

    # ------------------------------------------------------------ the step
    def _ff_set_loop_start(self, start: int) -> None:
        """A loop starts at step ``start``. For solvers whose plans depend on it, a new start empties the table
        of steps' calls (``_ff_reset`` empties it for each new schedule)."""
        if self._ff_start_dependent and start != self._ff_loop_start:
            self._ff_stages.clear()
            self._ff_lane = None
        self._ff_loop_start = start

    def _ff_stage(self, idx: int, variant: Hashable) -> StageCall:
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
                if _GRAPH_BREAK_TAKES_MSG:
                    torch._dynamo.graph_break(
                        msg=f"{type(self).__name__}.step: the plan of this step variant ({variant!r}) is built on its "
                        "first use, which a graph cannot trace: run the first loop's first such call eagerly (later "
                        "loops' set_timesteps build it), or compile without fullgraph"
                    )
                else:  # torch 2.6: fullgraph's error shows the next line, its comment included
                    torch._dynamo.graph_break()  # a step variant's plan is built on its first use: run that eagerly
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
            noise = fit_noise(noise, model_output, z)
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
        terms = {("x", k): x, ("z", k): z, (O_KIND, k): o}
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

