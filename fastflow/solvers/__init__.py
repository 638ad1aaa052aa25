"""Solvers by name. Each only computes coefficients; see :mod:`fastflow.solvers.base`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields

import numpy as np

from .base import Lin, Solver, Stage, X, Z, check_real, eps_of, noise
from .ddim import DDIM, DDPM
from .dpmpp import DPMSolverPP
from .euler import Euler, EulerAncestral, FlowEuler, Heun
from .unipc import UniPC

_FACTORIES: dict[str, Callable[..., Solver]] = {
    "ddim": DDIM,
    "ddpm": DDPM,
    "flow-euler": FlowEuler,
    "euler": Euler,
    "euler-ancestral": EulerAncestral,
    "heun": Heun,
    "dpm++1": lambda **kw: DPMSolverPP(order=1, **kw),
    "dpm++2m": lambda **kw: DPMSolverPP(order=2, **kw),
    "dpm++3m": lambda **kw: DPMSolverPP(order=3, **kw),
    "sde-dpm++2m": lambda **kw: DPMSolverPP(order=2, sde=True, **kw),
    "unipc": UniPC,
}
_CLASS_OF: dict[str, tuple[type[Solver], dict[str, object]]] = {  # the factories that are not classes
    "ddpm": (DDIM, {}),
    "dpm++1": (DPMSolverPP, {"order": 1}),
    "dpm++2m": (DPMSolverPP, {"order": 2}),
    "dpm++3m": (DPMSolverPP, {"order": 3}),
    "sde-dpm++2m": (DPMSolverPP, {"order": 2, "sde": True}),
}
_ALIASES = {
    "fm-euler": "flow-euler",
    "euler-a": "euler-ancestral",
    "dpmpp1": "dpm++1",
    "dpmpp2m": "dpm++2m",
    "dpmpp3m": "dpm++3m",
    "dpm++2m-sde": "sde-dpm++2m",
    "dpmpp2m-sde": "sde-dpm++2m",
    "sde-dpmpp2m": "sde-dpm++2m",
}
SOLVER_NAMES = tuple(_FACTORIES)

__all__ = [
    "DDIM", "DDPM", "DPMSolverPP", "Euler", "EulerAncestral", "FlowEuler", "Heun", "Lin", "SOLVER_NAMES",
    "Solver", "Stage", "UniPC", "X", "Z", "canonical_solver", "eps_of", "get_solver", "noise",
]


def canonical_solver(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"solver must be a name ({', '.join(SOLVER_NAMES)}) or a Solver, got {type(name).__name__}")
    key = name.lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in _FACTORIES:
        raise ValueError(f"unknown solver {name!r}; valid: {', '.join(SOLVER_NAMES)}")
    return key


def get_solver(name: str | Solver, **options) -> Solver:
    """A solver from its name and options; a TypeError names an option the solver does not take."""
    if isinstance(name, Solver):
        if options:
            raise TypeError("options are given with a solver name, not with a solver instance")
        return name
    key = canonical_solver(name)
    unknown = sorted(set(options) - set(solver_options(key)))
    if unknown:
        takes = ", ".join(solver_options(key)) or "none"
        raise TypeError(f"solver {key!r} does not take option(s) {unknown}; it takes: {takes}")
    cls = _CLASS_OF.get(key, (_FACTORIES[key], {}))[0]
    types = {f.name: f.type for f in fields(cls)}
    for option, value in options.items():
        _check_option_type(option, value, types[option])
    return _FACTORIES[key](**options)


def _check_option_type(name: str, value: object, annotation: object) -> None:
    """An option of the type its solver's field declares: a string for a flag was taken as True, a float order
    failed deep in the coefficients, True was taken as order 1."""
    kind = str(annotation)
    if kind == "bool":
        ok = isinstance(value, (bool, np.bool_))
    elif kind == "int":
        ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    elif kind == "float":
        check_real(name, value)
        return
    elif kind == "str":
        ok = isinstance(value, str)
    else:  # a sequence (UniPC's disable_corrector checks its own)
        return
    if not ok:
        raise TypeError(f"solver option {name} must be {kind}, got {value!r} ({type(value).__name__})")


def solver_options(name: str) -> list[str]:
    """The options a solver name takes (its class's fields, less those the name fixes)."""
    key = canonical_solver(name)
    cls, fixed = _CLASS_OF.get(key, (_FACTORIES[key], {}))
    return [f.name for f in fields(cls) if f.init and f.name not in fixed]
