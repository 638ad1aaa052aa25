"""What a solver is: a function from the points of a loop to a list of stages.

A stage is one model evaluation: the point it is evaluated at, and the next state
as a :class:`Lin`, a linear combination of symbols: the stage's input state
``Z(i)``, its data prediction ``X(i)``, those of earlier stages, and its fresh noise
``NOISE``. Solvers write their update formulas with these symbols in float64;
:func:`fastflow.plan.compile_plan` turns the symbols into table columns and
history slots. Solvers never see prediction types, guidance, dtypes or backends.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from ..grids import Points
from ..schedules import Schedule, check_real

Atom = tuple[str, int]
NOISE: Atom = ("n", -1)


class UndefinedStepError(ValueError):
    """A step the schedule leaves undefined (it would divide by a zero step length, or by zero, and has no finite
    limit there): raised where that step's formula is built. The diffusers drop-ins defer it to the step's call, as
    diffusers meets its NaN there."""


class Lin:
    """A float64 linear combination of atoms, with the arithmetic a formula needs."""

    __slots__ = ("terms",)

    def __init__(self, terms: dict[Atom, float] | None = None):
        self.terms: dict[Atom, float] = dict(terms or {})

    def __add__(self, other: Lin) -> Lin:
        out = dict(self.terms)
        for k, v in other.terms.items():
            out[k] = out.get(k, 0.0) + v
        return Lin(out)

    def __sub__(self, other: Lin) -> Lin:
        return self + other * -1.0

    def __mul__(self, c: float) -> Lin:
        c = float(c)
        return Lin({k: v * c for k, v in self.terms.items()})

    __rmul__ = __mul__

    def __truediv__(self, c: float) -> Lin:
        return self * (1.0 / float(c))

    def __neg__(self) -> Lin:
        return self * -1.0

    def __getitem__(self, atom: Atom) -> float:
        return self.terms.get(atom, 0.0)

    def __iter__(self) -> Iterator[tuple[Atom, float]]:
        return iter(self.terms.items())

    def __repr__(self) -> str:
        return " + ".join(f"{v:.6g}*{k[0]}{k[1] if k[1] >= 0 else ''}" for k, v in self.terms.items()) or "0"


def Z(i: int) -> Lin:
    """The state stage ``i`` evaluated the model at."""
    return Lin({("z", i): 1.0})


def X(i: int) -> Lin:
    """The data prediction x_hat of stage ``i``."""
    return Lin({("x", i): 1.0})


def noise(scale: float = 1.0) -> Lin:
    """Fresh standard-normal noise of the current stage, times ``scale``."""
    return Lin({NOISE: float(scale)})


def eps_of(i: int, alpha: float, sigma: float) -> Lin:
    """The noise prediction of stage ``i``: ``(z - alpha x_hat) / sigma``."""
    return (Z(i) - X(i) * alpha) / sigma


@dataclass(frozen=True)
class Stage:
    """One model evaluation at ``point`` (a one-element :class:`Points`); ``update`` is the next state."""

    point: Points
    update: Lin


@dataclass
class Solver:
    """Base of all solvers. ``stochastic`` solvers draw noise; ``order`` is the ODE order for tests and docs."""

    name: str = field(default="", init=False)
    stochastic: bool = field(default=False, init=False)
    order: int = field(default=1, init=False)

    def build(self, schedule: Schedule, points: Points) -> list[Stage]:
        raise NotImplementedError


def check_scale(name: str, value: object) -> None:
    """A noise scale, churn level or ``eta``: a real number, finite and non-negative."""
    check_real(name, value)
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be finite and non-negative, got {value}")


def stages_on_points(points: Points, updates: list[Lin]) -> list[Stage]:
    return [Stage(points[i], u) for i, u in enumerate(updates)]


def ve(points: Points) -> np.ndarray:
    """``sigma / alpha`` at each point (0 at the clean point, inf where alpha = 0)."""
    with np.errstate(divide="ignore"):
        return points.sigma / points.alpha
