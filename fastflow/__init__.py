"""fastflow: one fused GPU pass per sampler step for diffusion and flow-matching models."""

from . import grids, noise, predictions, schedules, sde, solvers
from ._version import __version__
from .backends import backend_report
from .graph import CapturedLoop, GraphCache, capture
from .plan import StepPlan
from .sampler import Sampler, sample
from .schedules import EDM, VP, FlowMatching
from .solvers.base import UndefinedStepError

__all__ = [
    "EDM", "VP", "CapturedLoop", "FlowMatching", "GraphCache", "Sampler", "StepPlan", "UndefinedStepError",
    "__version__", "backend_report", "capture", "grids", "noise", "predictions", "sample", "schedules", "sde",
    "solvers",
]
