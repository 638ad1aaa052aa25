"""fastflow: one fused GPU pass per sampler step for diffusion and flow-matching models."""

from . import grids, noise, predictions, schedules, sde, solvers
from ._version import __version__
from .backends import backend_report
from .plan import StepPlan
from .sampler import Sampler, sample
from .schedules import EDM, VP, FlowMatching

__all__ = [
    "EDM", "VP", "FlowMatching", "Sampler", "StepPlan", "__version__", "backend_report", "grids", "noise",
    "predictions", "sample", "schedules", "sde", "solvers",
]
