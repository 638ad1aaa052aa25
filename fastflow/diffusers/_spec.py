"""The language a drop-in states its ``step`` in, and its compilation into a fastflow plan.

A family describes each ``step`` call as a :class:`StepSpec`: the conversion of the
model output to the kernel's ``x_hat``, the next sample as a :class:`~fastflow.solvers.base.Lin`
over ``Z(i)`` (the sample), ``X(i)`` (``x_hat`` after clipping), :func:`O` (the raw
model output) and ``noise``, and the prediction field diffusers returns. Writing
diffusers' own formulas this way keeps float32 parity without copying its code; the
scalar helpers at the end are the arithmetic those formulas are written with.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from ..grids import Points
from ..plan import AO, AZ, H0, MAX_HISTORY, StepPlan, compile_plan
from ..runner import PlanRunner
from ..solvers.base import Lin, Stage, UndefinedStepError, X, Z, noise

__all__ = [
    "O", "StepSpec", "Compiled", "compile_specs", "spec_finiteness_error", "promoted_dtype", "float32", "sqrt",
    "Lin", "X", "Z", "noise",
]

O_KIND = "o"  # the atom kind of a raw model output in a spec's Lin
_UNIT_POINT = Points(*(np.array([v]) for v in (1.0, 1.0, 1.0, 0.0, 0.0)))


def O(i: int) -> Lin:  # noqa: E743 - the symbol's name is the formula's
    """The raw model output of stage ``i`` (bound to a free history slot of the kernel; an earlier stage's is kept
    by reference, as diffusers keeps it, not written again)."""
    return Lin({(O_KIND, i): 1.0})


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


class StageCall(NamedTuple):
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
    calls: tuple[StageCall, ...]


def spec_finiteness_error(spec: StepSpec, i: int) -> str | None:
    """Why step ``i``'s spec is undefined where a coefficient is not finite (diffusers returns inf or NaN there;
    the step raises this when it runs), else None."""
    coefs = [spec.xz, spec.xo, *(c for _, c in spec.update), *(c for _, c in spec.pred or ())]
    if all(math.isfinite(c) for c in coefs):
        return None
    return (f"step {i} has a coefficient that is not finite (diffusers returns inf or NaN there); this "
            "configuration has no defined step there")


def _split_o(i: int, lin: Lin) -> tuple[Lin, float]:
    """Stage ``i``'s update without its own model output's term (the caller's tensor, bound to a slot after the
    plan's), and that term's coefficient; earlier stages' model outputs stay plan history."""
    rest: dict = {}
    c_o = 0.0
    for (kind, j), c in lin:
        if kind == O_KIND and j == i:
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
        StageCall(
            runner, k, bool(plan.noise[k]), spec.draws, o_coefs[k] != 0.0, spec.pred, spec.error, runner.is_plain(k)
        )
        for k, spec in enumerate(specs)
    )
    return Compiled(start=start, plan=plan, runner=runner, calls=calls)


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
