"""Drop-in replacements for diffusers schedulers: same API and numbers, one fused step, no host sync.

    pipe.scheduler = fastflow.diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.scheduler = fastflow.diffusers.from_scheduler(pipe.scheduler)

Each class subclasses the diffusers scheduler of the same name; see
:mod:`fastflow.diffusers._base` for step indexing and noise. This is the only
place fastflow imports diffusers.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from . import _requires  # noqa: F401 - first: names a missing or too old diffusers with the fix
from ._base import FastflowScheduler, registry
from .cogvideox import CogVideoXDDIMScheduler, CogVideoXDPMScheduler
from .consistency import CMStochasticIterativeScheduler
from .ddim import DDIMScheduler, DDPMScheduler
from .ddim_inverse import DDIMInverseScheduler
from .deis import DEISMultistepScheduler
from .dpmsolver import DPMSolverMultistepScheduler
from .dpmsolver_inverse import DPMSolverMultistepInverseScheduler
from .dpmsolver_singlestep import DPMSolverSinglestepScheduler
from .edm_dpmsolver import EDMDPMSolverMultistepScheduler
from .euler import EDMEulerScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from .flow_map import FlowMapEulerDiscreteScheduler
from .flow_match import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler
from .heun import HeunDiscreteScheduler
from .ipndm import IPNDMScheduler
from .kdpm2 import KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler
from .lcm import LCMScheduler
from .lms import LMSDiscreteScheduler
from .ltx_euler import LTXEulerAncestralRFScheduler
from .pndm import PNDMScheduler
from .sasolver import SASolverScheduler
from .scm import SCMScheduler
from .tcd import TCDScheduler
from .unclip import UnCLIPScheduler
from .unipc import UniPCMultistepScheduler
from .wuerstchen import DDPMWuerstchenScheduler

_NEED_TORCHSDE = ("CosineDPMSolverMultistepScheduler", "DPMSolverSDEScheduler")  # diffusers' modules import it
_HAVE_TORCHSDE = importlib.util.find_spec("torchsde") is not None
if _HAVE_TORCHSDE:
    from .cosine_dpmsolver import CosineDPMSolverMultistepScheduler  # noqa: F401 - exported when present
    from .dpmsolver_sde import DPMSolverSDEScheduler  # noqa: F401

__all__ = [
    "CMStochasticIterativeScheduler",
    "CogVideoXDDIMScheduler",
    "CogVideoXDPMScheduler",
    "CosineDPMSolverMultistepScheduler",
    "DDIMInverseScheduler",
    "DDIMScheduler",
    "DDPMScheduler",
    "DDPMWuerstchenScheduler",
    "DEISMultistepScheduler",
    "DPMSolverMultistepInverseScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSDEScheduler",
    "DPMSolverSinglestepScheduler",
    "EDMDPMSolverMultistepScheduler",
    "EDMEulerScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "FlowMapEulerDiscreteScheduler",
    "FlowMatchEulerDiscreteScheduler",
    "FlowMatchHeunDiscreteScheduler",
    "HeunDiscreteScheduler",
    "IPNDMScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "LCMScheduler",
    "LMSDiscreteScheduler",
    "LTXEulerAncestralRFScheduler",
    "PNDMScheduler",
    "SASolverScheduler",
    "SCMScheduler",
    "TCDScheduler",
    "UnCLIPScheduler",
    "UniPCMultistepScheduler",
    "FastflowScheduler",
    "from_scheduler",
    "supported",
]
if not _HAVE_TORCHSDE:
    __all__ = [name for name in __all__ if name not in _NEED_TORCHSDE]


def __getattr__(name: str) -> Any:
    """Say why a drop-in that needs torchsde is missing, rather than a bare AttributeError."""
    if name in _NEED_TORCHSDE:
        raise ImportError(f"fastflow.diffusers.{name} needs torchsde, as diffusers' class does: pip install torchsde")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def supported() -> list[str]:
    """Names of the diffusers schedulers that have a drop-in."""
    return sorted(registry())


def from_scheduler(
    scheduler: Any, backend: str | None = None, diffusers_noise: bool | None = None
) -> FastflowScheduler:
    """The fastflow drop-in for a diffusers scheduler instance, built from its config.

    ``backend`` sets the drop-in's fastflow backend (default: the class default, ``auto``);
    ``diffusers_noise`` its :attr:`~fastflow.diffusers.FastflowScheduler.diffusers_noise`.
    """
    classes = registry()
    for cls in type(scheduler).__mro__:
        if isinstance(scheduler, FastflowScheduler) and cls.__name__ in classes and cls is classes[cls.__name__]:
            target = cls
            break
        if cls.__module__.startswith("diffusers.") and cls.__name__ in classes:
            target = classes[cls.__name__]
            break
    else:
        raise NotImplementedError(
            f"fastflow.diffusers has no drop-in for {type(scheduler).__name__}; supported: {', '.join(supported())}"
        )
    new = target.from_config(scheduler.config)
    if hasattr(scheduler, "set_shift") and hasattr(new, "set_shift"):
        new.set_shift(scheduler.shift)  # set_shift changes the instance, not its config
    if backend is not None:
        new.backend = backend
    if diffusers_noise is not None:
        new.diffusers_noise = bool(diffusers_noise)
    return new
