"""Drop-in ``EDMDPMSolverMultistepScheduler``: diffusers' DPM-Solver++ on EDM's variance-exploding sigmas.

The model sees ``c_in * sample`` and its output is preconditioned to the data
prediction ``c_skip * sample + c_out * output`` (Karras et al. 2022, with
``sigma_data``); the update is DPM-Solver++ with ``alpha = 1``. The steps are
DPM-Solver's drop-in's (:class:`~fastflow.diffusers.dpmsolver.DPMSolverFormulas`) on
these sigmas. diffusers defines no ``sde-dpmsolver++`` step of order 3 here (it fails there):
such a step raises when it runs. :class:`EDMPreconditioned` is shared with the cosine-schedule
variant (:mod:`.cosine_dpmsolver`).
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.schedulers import scheduling_edm_dpmsolver_multistep as _edm_dpm

from ._outputs import output_maker
from ._spec import promoted_dtype
from .dpmsolver import DPMSolverFormulas

__all__ = ["EDMDPMSolverMultistepScheduler", "EDMPreconditioned"]
_OUTPUT = output_maker(_edm_dpm.SchedulerOutput, "prev_sample")

ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++")
PREDICTIONS = ("epsilon", "v_prediction")


class EDMPreconditioned(DPMSolverFormulas):
    """DPM-Solver++ on EDM-preconditioned variance-exploding sigmas: diffusers' ``c_in`` input scaling and
    ``c_skip``/``c_out`` data prediction, with ``sigma_data`` from the config."""

    _ff_sde_max_order = 2  # diffusers' EDM-preconditioned schedulers have no SDE step of order 3
    _ff_max_order = 3

    def _ff_check_config(self) -> None:
        cfg = self.config
        name = type(self).__name__
        if cfg.prediction_type not in PREDICTIONS:
            raise NotImplementedError(f"prediction_type={cfg.prediction_type!r} is not supported by {name}")
        if cfg.solver_order not in range(1, self._ff_max_order + 1):
            raise NotImplementedError(
                f"solver_order={cfg.solver_order} is not supported by {name} (1 to {self._ff_max_order})"
            )

    def _ff_prepare(self) -> None:
        super()._ff_prepare()
        sig = self.sigmas.detach().to("cpu", torch.float32)
        # diffusers' c_in on each 0-d float32 sigma, as its step evaluates it, so the scaled input is bit-identical.
        data = self.config.sigma_data
        self._ff_in_scale = [float(1 / ((s**2 + data**2) ** 0.5)) for s in sig[: len(self._ff_host_timesteps)]]

    def _ff_conversions(self, sig: np.ndarray) -> list[tuple[float, float]]:
        """EDM's preconditioned data prediction: ``c_skip * sample + c_out * output``."""
        data = float(self.config.sigma_data)
        sign = 1.0 if self.config.prediction_type == "epsilon" else -1.0
        return [
            (data**2 / (s**2 + data**2), sign * s * data / (s**2 + data**2) ** 0.5)
            for s in (float(v) for v in sig[:-1])
        ]

    def _ff_sigma_kind(self) -> dict[str, bool]:
        return {"ve": True}

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor) -> torch.Tensor:
        """diffusers' ``c_in * sample`` from a host scalar (no device read)."""
        if not self._ff_ready():
            self._ff_reset()
        idx = self._ff_index(timestep)
        self.is_scale_input_called = True
        return sample * self._ff_in_scale[idx]


class EDMDPMSolverMultistepScheduler(EDMPreconditioned, _edm_dpm.EDMDPMSolverMultistepScheduler):
    """diffusers' ``EDMDPMSolverMultistepScheduler`` whose ``step`` is one fused fastflow call.

    Algorithms ``dpmsolver++`` (orders 1-3) and ``sde-dpmsolver++`` (1-2), Karras or exponential sigmas,
    ``epsilon`` and ``v_prediction`` outputs, dynamic thresholding (torch ops before the fused step).
    """

    def _ff_check_config(self) -> None:
        cfg = self.config
        if cfg.algorithm_type not in ALGORITHMS:
            raise NotImplementedError(
                f"algorithm_type={cfg.algorithm_type!r} is not supported by fastflow's {type(self).__name__}"
            )
        super()._ff_check_config()

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> _edm_dpm.SchedulerOutput | tuple:
        """diffusers' step (same arguments and output), in one backend call.

        ``sde-dpmsolver++``: a ``generator`` gives diffusers' exact numbers; without one, the
        kernel draws fastflow's own noise (or diffusers' with ``diffusers_noise``).
        """
        if generator is None and (done := self._ff_lane_step(model_output, timestep, sample)) is not None:
            return (done[0],) if not return_dict else _OUTPUT(done[0])
        dtype = promoted_dtype(sample, model_output)
        # diffusers draws in its preconditioned output's dtype, the promotion of the sample's and the output's
        draw = self._ff_draw(generator, model_output, dtype) if self._ff_draws else None
        prev = self._ff_multistep_step(
            model_output, timestep, sample, draw=draw, state_dtype=dtype, out_dtype=dtype, lane=generator is None,
        )
        if not return_dict:
            return (prev,)
        return _OUTPUT(prev)
