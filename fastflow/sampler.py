"""The user-facing sampler: a schedule, a solver and a prediction type compiled into a step plan.

A :class:`Sampler` computes every coefficient once, at construction, in float64.
Each :meth:`Sampler.step` is then one call into a backend: no host sync, no
per-step coefficient work, so loops can run ahead of the GPU and be captured in
a CUDA graph.
"""

from __future__ import annotations

import inspect
import math
import operator
import sys
from collections.abc import Callable, Sequence

import numpy as np
import torch

from . import noise as noise_spec
from .backends import BACKEND_NAMES
from .backends.base import STEP_DTYPES, check_model_input_dtype
from .devices import to_device, traced_without_dynamo
from .grids import Points, make_points
from .plan import StepPlan, compile_plan
from .predictions import canonical_prediction
from .runner import PlanRunner
from .schedules import EDM, Schedule, root_schedule
from .solvers import Solver, Stage, get_solver

__all__ = ["Sampler", "sample"]

ModelOutput = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


# The options of each named grid that fastflow.grids.grid_times reads; an explicit grid reads none. An option given to
# a grid that ignores it is refused, since a silently ignored rho or t_min gives another grid than the one asked for.
_GRID_READS = {
    "uniform": ("t_min", "t_max"),
    "logsnr": ("t_min", "t_max"),
    "exponential": ("t_min", "t_max"),
    "karras": ("t_min", "t_max", "rho"),
    "linspace": ("t_max",),
    "leading": ("t_max", "steps_offset"),
    "trailing": ("t_max",),
}


def _default_grid(schedule: Schedule) -> str:
    return "karras" if isinstance(root_schedule(schedule), EDM) else "uniform"


def _check_grid_options(grid: str | np.ndarray, options: dict[str, float]) -> None:
    """Refuse grid options the grid does not read (an unknown grid name is left to the grid's own error)."""
    if isinstance(grid, str):
        if grid not in _GRID_READS:
            return
        reads, which = _GRID_READS[grid], f"the {grid!r} grid"
    else:
        reads, which = (), "an explicit grid"
    ignored = [name for name in options if name not in reads]
    if ignored:
        takes = f"it reads {', '.join(reads)} only" if reads else "it reads none of t_min, t_max, rho, steps_offset"
        raise ValueError(f"{which} ignores {', '.join(ignored)}; {takes}")


def _shape_of(shape: Sequence[int]) -> tuple[int, ...]:
    """``shape`` as a tuple of non-negative ints, refusing floats, bools and negatives (``int()`` would truncate)."""
    array = isinstance(shape, (torch.Tensor, np.ndarray))
    if (array and shape.ndim != 1) or not (array or isinstance(shape, Sequence)):
        raise TypeError(f"shape must be a sequence of ints such as (batch, channels, height, width), got {shape!r}")
    dims = []
    for s in shape:
        try:
            d = None if isinstance(s, bool) else operator.index(s)
        except TypeError:
            d = None
        if d is None:
            raise TypeError(f"shape must be a sequence of ints, got {shape!r} (a {type(s).__name__} in it)")
        if d < 0:
            raise ValueError(f"shape must have non-negative sizes, got {shape!r}")
        dims.append(d)
    return tuple(dims)


def _check_tensor_args(**args: object) -> None:
    """Raise a TypeError naming the first of ``args`` (None: not given) that is not a tensor (``model_output`` may be
    a pair of them); called where a step failed with an AttributeError, so the usual step pays nothing for it."""
    for name, value in args.items():
        parts = value if name == "model_output" and isinstance(value, (tuple, list)) else (value,)
        for k, part in enumerate(parts):
            if part is not None and not isinstance(part, torch.Tensor):
                what = f"{name}[{k}]" if parts is value else name
                raise TypeError(f"{what} must be a torch.Tensor, got {type(part).__name__}")


def _callback_arity(callback: Callable[..., None]) -> int:
    """How many of ``(i, t, z)`` :func:`sample` passes ``callback``: as many as it takes positionally, all three
    when it takes ``*args`` (or its signature cannot be read)."""
    try:
        params = inspect.signature(callback).parameters.values()
    except (TypeError, ValueError):
        return 3
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return 3
    return min(3, sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params))


class Sampler:
    """A compiled sampling loop.

    Args:
        schedule: a :mod:`fastflow.schedules` schedule.
        solver: a name from :data:`fastflow.solvers.SOLVER_NAMES` or a Solver instance.
        prediction: what the model outputs: ``eps``, ``x0``, ``v``, ``flow`` or ``score``.
        steps: number of steps (Heun makes two model calls per step, except a step to sigma = 0, as the last step of
            ``final="clean"``).
        eta: noise scale for ``ddim``, ``ddpm`` and ``euler-ancestral``.
        guidance_scale: classifier-free guidance scale, or None for unguided models.
        clip: clamp the data prediction to ``[-clip, clip]``.
        backend: ``auto``, ``torch``, ``triton`` or ``cuda``.
        grid: a grid name (:data:`fastflow.grids.GRID_NAMES`) or explicit evaluation times.
        final: ``clean`` (end at sigma = 0) or ``t_min`` (end at the grid's last time).
        t_min, t_max: the span of a named grid in schedule time (default the schedule's). ``uniform``, ``logsnr``,
            ``exponential`` and ``karras`` read both; ``linspace``, ``leading`` and ``trailing`` read ``t_max`` only
            (the last training step; their low end follows from the spacing, not from ``t_min``). A FlowMatching
            ``shift`` or ``mu`` warps the span with the rest of the grid, as diffusers shifts its sigmas: times run
            from ``warp(t_max)`` to ``warp(t_min)`` (``t_max=0.5`` with ``shift=3`` starts at 0.75).
        rho: the Karras grid's exponent (default the schedule's ``rho``, else 7); only ``karras`` reads it.
        steps_offset: added to every timestep of the ``leading`` grid (diffusers' ``steps_offset``: 1 in Stable
            Diffusion's configs); only ``leading`` reads it, as in diffusers. An option the grid does not read (any
            with explicit times) raises a ValueError.
        input_scale: per-stage factor on the state to form the model input (default 1).
        **solver_options: passed to the solver (``s_churn``, ``order``, ``variant``, ...).
    """

    def __init__(
        self,
        schedule: Schedule,
        solver: str | Solver = "ddim",
        prediction: str = "eps",
        steps: int = 20,
        eta: float | None = None,
        guidance_scale: float | None = None,
        clip: float | None = None,
        backend: str = "auto",
        grid: str | Sequence[float] | np.ndarray | None = None,
        final: str = "clean",
        t_min: float | None = None,
        t_max: float | None = None,
        rho: float | None = None,
        steps_offset: int | None = None,
        input_scale: Sequence[float] | np.ndarray | None = None,
        **solver_options,
    ):
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if backend not in BACKEND_NAMES:
            raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKEND_NAMES)}")
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a fastflow Schedule (VP, EDM, FlowMatching, ...), got {schedule!r}")
        schedule.validate()
        if eta is not None:
            solver_options["eta"] = eta
        self.schedule = schedule
        self.solver = get_solver(solver, **solver_options)
        self.prediction = canonical_prediction(prediction)
        self.steps = int(steps)
        self._guidance_scale = guidance_scale
        grid = _default_grid(schedule) if grid is None else grid
        grid_options = {
            k: v for k, v in (("t_min", t_min), ("t_max", t_max), ("rho", rho), ("steps_offset", steps_offset))
            if v is not None
        }
        if steps_offset is not None and (
            isinstance(steps_offset, bool) or not isinstance(steps_offset, (int, np.integer)) or steps_offset < 0
        ):
            raise ValueError(f"steps_offset must be a non-negative int, got {steps_offset!r}")
        if not isinstance(grid, str):
            grid = np.asarray(grid, dtype=np.float64)
        _check_grid_options(grid, grid_options)
        self.points: Points = make_points(schedule, self.steps, grid, final, **grid_options)
        self.stages: list[Stage] = self.solver.build(schedule, self.points)
        n = len(self.stages)
        if input_scale is not None:
            input_scale = np.asarray(input_scale, dtype=np.float64)
            if input_scale.shape != (n,):
                raise ValueError(f"input_scale must have one value per stage ({n}), got shape {input_scale.shape}")
            if not np.all(np.isfinite(input_scale)):  # stage 0's is not in the table's finiteness check
                raise ValueError(f"input_scale must be finite, got {input_scale.tolist()}")
        self.input_scale = np.ones(n) if input_scale is None else input_scale
        self.plan: StepPlan = compile_plan(self.stages, self.prediction, guidance_scale, clip, self.input_scale)
        self.stage_alpha = np.array([st.point.alpha[0] for st in self.stages])
        self.stage_sigma = np.array([st.point.sigma[0] for st in self.stages])
        self.timesteps = torch.tensor([st.point.t[0] for st in self.stages], dtype=torch.float64)
        self.seeds: torch.Tensor | None = None
        self._fake_seeds = False  # init_noise made them under torch.export's tracing (see _stage_seeds)
        self._seeds_copy: tuple[torch.Tensor, int, torch.device, torch.Tensor] | None = None
        self.runner = PlanRunner(self.plan, backend)
        self._num_stages = n
        self._noisy = [bool(v) for v in self.plan.noise]
        self._times: dict[torch.device, torch.Tensor] = {}
        self._time_views: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    # ----------------------------------------------------------------- metadata
    @property
    def num_stages(self) -> int:
        """Model evaluations per loop (``steps``, or more for Heun)."""
        return len(self.stages)

    @property
    def guided(self) -> bool:
        return self._guidance_scale is not None

    @property
    def guidance_scale(self) -> float | None:
        """The classifier-free guidance scale, compiled into the plan: fixed for the sampler's life (a captured loop
        takes a new one per call: ``loop(guidance_scale=...)``)."""
        return self._guidance_scale

    @guidance_scale.setter
    def guidance_scale(self, value: float | None) -> None:
        raise AttributeError(
            "Sampler.guidance_scale is compiled into its plan and cannot be set afterwards (steps would keep the old "
            "scale); build a new Sampler, or pass guidance_scale= to a captured loop's call"
        )

    @property
    def backend(self) -> str:
        """The backend the steps run on; setting it switches them (resolved again per device and dtype)."""
        return self.runner.backend

    @backend.setter
    def backend(self, name: str) -> None:
        if name not in BACKEND_NAMES:
            raise ValueError(f"unknown backend {name!r}; valid: {', '.join(BACKEND_NAMES)}")
        self.runner.backend = name

    def __len__(self) -> int:
        return self.num_stages

    def __repr__(self) -> str:
        return (
            f"Sampler({self.schedule!r}, solver={self.solver.name!r}, prediction={self.prediction!r}, "
            f"steps={self.steps}, stages={self.num_stages}, backend={self.backend!r})"
        )

    # ----------------------------------------------------------------- device data
    def table(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The plan's coefficient table on ``device`` (cached; float64 for float64 states)."""
        return self.runner.table(device, dtype)

    def timesteps_on(self, device: torch.device | str) -> torch.Tensor:
        """``timesteps`` on ``device`` (cached, so indexing it in a loop never syncs)."""
        device = torch.device(device)
        times = self._times.get(device)
        if times is None:
            times = to_device(self.timesteps, device)
            if not traced_without_dynamo():  # a fake there, which later eager steps could not read
                self._times[device] = times
        return times

    def _timestep_views(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Each stage's 0-d view of :meth:`timesteps_on` (made once per device: indexing a tensor in a loop costs
        about a microsecond of host time per step)."""
        views = self._time_views.get(device)
        if views is None:
            views = self.timesteps_on(device).unbind()
            if not traced_without_dynamo():
                self._time_views[device] = views
        return views

    def prepare(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> Sampler:
        """Upload the table and timesteps and resolve the backend now, so the first step does no host-to-device copy
        and may be traced by torch.compile (a traced step cannot import a backend)."""
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype (the state's), got {dtype!r}")
        self.table(device, torch.float64 if dtype == torch.float64 else torch.float32)
        self.timesteps_on(device)
        self.runner.warm(device, dtype)
        return self

    # ----------------------------------------------------------------- loop pieces
    def init_noise(
        self,
        shape: Sequence[int],
        seed: int | Sequence[int] | torch.Tensor = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """The initial state: fastflow noise scaled to the first stage's marginal ``sqrt(alpha^2 + sigma^2)``.

        ``seed`` is one int (sample ``b`` gets ``seed + b``) or one per sample (ints, numpy
        integers, or an int64 tensor). The seeds are kept, until the next ``init_noise``, for
        the stochastic stages of every loop of that batch size (a loop from other initial
        noise draws the same stage noise unless ``step`` gets ``seed=``).
        ``dtype`` is a floating dtype (the noise is not integer).
        """
        shape = _shape_of(shape)
        if len(shape) < 1 or shape[0] < 1:
            raise ValueError(f"shape needs a batch dimension of at least 1, got {shape}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"init_noise makes floating-point noise; dtype must be a floating dtype, got {dtype}")
        device = torch.device("cpu") if device is None else torch.device(device)
        self.seeds = noise_spec.as_seed_tensor(seed, shape[0], device)
        self._fake_seeds = traced_without_dynamo()
        scale = math.hypot(self.stage_alpha[0], self.stage_sigma[0])
        z = noise_spec.normal(self.seeds, shape[1:], step=0, tag=noise_spec.INIT_TAG, dtype=torch.float32)
        return (z * scale).to(dtype)

    def model_input(self, z: torch.Tensor, i: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The model input of stage ``i``: the state times its input scale, cast to ``dtype``."""
        self._check_index(i)
        if dtype is not None:
            check_model_input_dtype(dtype)
        c = self.input_scale[i]
        out = z if c == 1.0 else z * c
        return out.to(dtype or z.dtype)

    def _check_index(self, i: int) -> None:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"step index must be an int, got {type(i).__name__}")
        if not 0 <= i < self.num_stages:
            raise IndexError(f"step index {i} is out of range for {self.num_stages} stages")

    def _split_output(self, model_output: ModelOutput, z: torch.Tensor):
        """``(cond, uncond, paired)``: a guided doubled batch stays whole (``paired``), split by the backend."""
        # type() first: isinstance against torch.Tensor goes through its metaclass (this is the hot path).
        if type(model_output) is torch.Tensor or isinstance(model_output, torch.Tensor):
            if self._guidance_scale is None:
                return model_output, None, False
            if model_output.dim() < 1 or model_output.shape[0] != 2 * z.shape[0]:
                raise ValueError(
                    f"guided model output must be a (cond, uncond) pair or a batch of {2 * z.shape[0]} "
                    f"(uncond first), got shape {tuple(model_output.shape)}"
                )
            return model_output, None, True
        if isinstance(model_output, (tuple, list)):
            if len(model_output) != 2:
                raise ValueError("a guided model output pair must be (cond, uncond)")
            if not self.guided:
                raise ValueError("got a (cond, uncond) pair but this sampler has no guidance_scale")
            if model_output[1] is None:  # the backend would take it as unguided: the scale silently dropped
                raise ValueError(
                    "a guided model output pair must be (cond, uncond) tensors, got (cond, None): the step would "
                    "ignore guidance_scale"
                )
            return model_output[0], model_output[1], False
        raise TypeError(f"model output must be a tensor or a (cond, uncond) pair, got {type(model_output).__name__}")

    def _stage_seeds(self, i: int, seed: int | Sequence[int] | torch.Tensor | None, z: torch.Tensor) -> torch.Tensor:
        """The per-sample seeds of a noisy stage: ``seed`` if given, else those of :meth:`init_noise`."""
        if seed is not None:
            return noise_spec.as_seed_tensor(seed, z.shape[0], z.device)
        seeds = self.seeds
        if seeds is not None and seeds.shape[0] == z.shape[0]:
            if self._fake_seeds and not traced_without_dynamo():
                raise ValueError(
                    f"stage {i} draws noise from the seeds init_noise kept while torch.export traced it, which are "
                    "fake tensors without values: call init_noise again before an eager loop, or pass step's seed="
                )
            if seeds.device == z.device:
                return seeds
            return to_device(seeds, z.device) if torch.compiler.is_compiling() else self._seeds_on(seeds, z.device)
        made = "" if seeds is None else f" (init_noise made seeds for a batch of {seeds.shape[0]})"
        raise ValueError(
            f"stage {i} draws noise for a batch of {z.shape[0]} and has no seeds for it{made}: call "
            "init_noise(shape, seed) for this state before the loop, or pass step's seed= or noise="
        )

    def _seeds_on(self, seeds: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``seeds`` (made on another device by :meth:`init_noise`) on ``device``, copied again only when the
        seeds tensor, its contents (its version counter) or the device change; the copy makes no host sync."""
        cached = self._seeds_copy
        if cached is not None and cached[0] is seeds and cached[1] == seeds._version and cached[2] == device:
            return cached[3]
        moved = to_device(seeds, device)
        self._seeds_copy = (seeds, seeds._version, device, moved)
        return moved

    def step(
        self,
        model_output: ModelOutput,
        z: torch.Tensor,
        i: int,
        *,
        seed: int | Sequence[int] | torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
        return_model_input: bool = False,
        model_input_dtype: torch.dtype | None = None,
        duplicate_model_input: bool = False,
        return_x0: bool = False,
    ):
        """Stage ``i``: from the model output at state ``z`` to the next state, in one backend call.

        Stages must run in order from 0 when the solver keeps history (a stage cannot tell a new
        loop from the old one: stage ``i`` right after stage ``i - 1`` of an abandoned loop reads
        that loop's stored predictions). Returns the
        next state; with ``return_model_input``, also the next model input (cast to
        ``model_input_dtype``, a float dtype; batch doubled if ``duplicate_model_input``);
        with ``return_x0``, also the data prediction. Every output is a new tensor unless
        ``out`` is given. ``seed`` and ``noise`` are read by stages that draw noise only
        (a loop may pass them to every stage). Outputs made here keep ``z``'s layout where
        ``z`` is dense in another order of its dimensions, batch first (channels_last, say:
        inputs in that layout are read in place, as torch's own elementwise ops read them),
        except at a stage that draws its noise in
        the kernel (keyed by the row-major index), which computes and returns row-major, copying
        inputs in another layout once.

        ``out`` may be ``z`` itself, or any tensor that shares no memory with the inputs,
        except where a later stage reads what it would overwrite (Heun's predictor keeps
        ``z`` for its corrector; multistep solvers keep earlier x0): that, or a partial
        overlap with an input, raises a ValueError. The x0 of a solver that keeps it is
        the very tensor later stages step from (a copy per step would cost a full pass
        over memory): do not change it in place, ``clone()`` it first.
        """
        if type(i) is not int or not 0 <= i < self._num_stages:  # the fast test first: this is the hot path
            self._check_index(i)
        if model_input_dtype is not None and model_input_dtype not in STEP_DTYPES:
            check_model_input_dtype(model_input_dtype)
        if not return_model_input and (model_input_dtype is not None or duplicate_model_input):
            raise ValueError(
                "model_input_dtype and duplicate_model_input shape the model input that return_model_input=True "
                "returns; without it they would be ignored"
            )
        try:  # free until it raises: a non-tensor argument fails inside with an AttributeError naming no argument
            cond, uncond, paired = self._split_output(model_output, z)
            seeds = self._stage_seeds(i, seed, z) if noise is None and self._noisy[i] else None
            out, x_out, model_in = self.runner.run(
                i, z, cond, uncond, seeds=seeds, noise=noise, out=out, want_x=return_x0,
                model_in_dtype=(model_input_dtype or z.dtype) if return_model_input else None,
                model_in_double=duplicate_model_input, paired=paired,
            )
        except AttributeError:
            _check_tensor_args(z=z, out=out, noise=noise, model_output=model_output)
            raise
        if return_model_input:
            return (out, model_in, x_out) if return_x0 else (out, model_in)
        return (out, x_out) if return_x0 else out


def sample(
    model_fn: Callable[[torch.Tensor, torch.Tensor], ModelOutput],
    noise: torch.Tensor,
    sampler: Sampler,
    progress: bool = False,
    callback: Callable[..., None] | None = None,
    model_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Run a whole loop: ``model_fn(z_in, t)`` at every stage, then the sampler's step.

    ``t`` is a float64 0-d tensor on the state's device, in the schedule's own
    time. For guidance, ``model_fn`` returns ``(cond, uncond)`` or a doubled
    batch (uncond first). ``callback(i, t, z)`` sees each new state: ``z`` after
    stage ``i``, whose model call was at time ``t``. A callback taking fewer positional
    parameters gets the first ones (``callback(i)``, ``callback(i, t)``); one taking
    ``*args`` gets all three.

    The first model call gets ``noise`` itself when the first stage's input scale is 1 and no ``model_dtype``
    casts it (as a diffusers loop passes its latents): a model that writes into its input changes the caller's
    tensor.

    A sampler runs one loop at a time: a multistep solver keeps its loop's stored predictions in the sampler, so
    two threads sampling with one sampler at once would read each other's. Give each thread its own sampler (they
    are cheap: ``copy.deepcopy`` one).
    """
    if not isinstance(sampler, Sampler):
        raise TypeError(f"sampler must be a fastflow Sampler, got {type(sampler).__name__}")
    if not isinstance(noise, torch.Tensor):
        raise TypeError(f"noise must be the initial state as a torch.Tensor, got {type(noise).__name__}")
    if not noise.is_floating_point():
        raise TypeError(f"noise, the initial state, must be a floating-point tensor, got {noise.dtype}")
    if not callable(model_fn):
        raise TypeError(f"model_fn must be callable as model_fn(z_in, t), got {type(model_fn).__name__}")
    if callback is not None and not callable(callback):  # else it fails only after the first model call and step
        raise TypeError(f"callback must be callable as callback(i, t, z), got {type(callback).__name__}")
    z = noise
    sampler.prepare(z.device, z.dtype)
    times = sampler._timestep_views(z.device)
    z_in = sampler.model_input(z, 0, model_dtype)
    accepts = _callback_arity(callback) if callback is not None else 0
    n = sampler.num_stages
    # Without a callback nobody else sees the intermediate states, so two buffers take turns
    # (one allocation less per step). Solvers that read an earlier state keep fresh tensors.
    # The buffers take the noise's layout (channels_last stays channels_last, written in place) unless a stage
    # draws its noise in the kernel, which steps row-major (Backend.fused_step_alloc).
    buffers = None
    if callback is None and not any(sampler.plan.keep_z):
        if any(sampler.plan.noise):
            buffers = [torch.empty(z.shape, dtype=z.dtype, device=z.device) for _ in range(min(n, 2))]
        else:
            buffers = [torch.empty_like(z) for _ in range(min(n, 2))]
    for i in range(n):
        t = times[i]
        output = model_fn(z_in, t)
        z, z_in = sampler.step(
            output, z, i, out=None if buffers is None else buffers[i % 2],
            return_model_input=True, model_input_dtype=model_dtype or z.dtype,
        )
        if callback is not None:
            callback(*(i, t, z)[:accepts])
        if progress:
            print(f"\rfastflow: step {i + 1}/{n}", end="" if i + 1 < n else "\n", file=sys.stderr, flush=True)
    return z
