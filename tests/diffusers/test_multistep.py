"""What the multistep drop-ins (DPM-Solver, UniPC) share: fastflow/diffusers/_multistep.py."""

from __future__ import annotations

import pytest
import torch
from dropin_helpers import pair, run_loop


@pytest.mark.parametrize(
    ("name", "sigmas"),
    [("DPMSolverMultistepScheduler", "use_karras_sigmas"), ("DPMSolverMultistepScheduler", "use_exponential_sigmas"),
     ("UniPCMultistepScheduler", "use_exponential_sigmas")],
)
def test_flow_sigmas_past_one_raise(name, sigmas):
    """These sigmas with use_flow_sigmas are variance-exploding values (up to ~157) that diffusers takes as flow
    sigmas (alpha = 1 - sigma < 0): its loop returns NaN, and the drop-in's first step says why."""
    ref, ff = pair(name, use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction", **{sigmas: True})
    xa, _ = run_loop(ref, 6)
    assert torch.isnan(xa).all()
    with pytest.raises(ValueError, match="use_flow_sigmas=True, but this schedule's sigmas reach 157"):
        run_loop(ff, 6)
