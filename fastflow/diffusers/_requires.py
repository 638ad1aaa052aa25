"""The diffusers that the drop-ins need, checked before any of them imports it, so that a missing or too old one is
named with its fix rather than failing on a scheduler module it lacks."""

from __future__ import annotations

import itertools

# The first diffusers release with every scheduler module the drop-ins import (FlowMapEulerDiscreteScheduler's came
# last); pyproject.toml's `diffusers` extra asks for the same.
MIN_DIFFUSERS = (0, 39)

try:
    import diffusers
except ImportError as exc:
    raise ModuleNotFoundError(
        "fastflow.diffusers needs diffusers: pip install 'fastflow[diffusers]' (or pip install diffusers)",
        name="diffusers",
    ) from exc


def release(version: str) -> tuple[int, ...]:
    """The leading numeric release of a version string (``0.40.0.dev0`` -> ``(0, 40, 0)``, ``0.39.0rc1`` ->
    ``(0, 39, 0)``)."""
    parts = []
    for part in version.split("+")[0].split("."):
        digits = "".join(itertools.takewhile(str.isdigit, part))
        if not digits:
            break
        parts.append(int(digits))
        if digits != part:
            break
    return tuple(parts)


def check(version: str) -> None:
    """Raise an ImportError naming the fix when ``version`` is older than :data:`MIN_DIFFUSERS` (a version it cannot
    read passes: the imports then say what is missing)."""
    found = release(version)
    if found and found < MIN_DIFFUSERS:
        need = ".".join(map(str, MIN_DIFFUSERS))
        raise ImportError(
            f"fastflow.diffusers needs diffusers>={need}, found {version}: pip install -U 'diffusers>={need}'",
            name="diffusers",
        )


check(getattr(diffusers, "__version__", ""))
