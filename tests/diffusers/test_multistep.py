"""What the multistep drop-ins (DPM-Solver, UniPC) share: fastflow/diffusers/_multistep.py."""

from __future__ import annotations

import pytest
import torch
from dropin_helpers import assert_close, compiled_loops, pair, run_loop, stand_in


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


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_thresholded_steps_trace_with_fullgraph(name):
    """Dynamic thresholding reads the step's x0 conversion as Python numbers (torch.compile traces numpy scalars
    as tensors, and a branch on one broke the graph): a thresholded step traces with fullgraph=True and matches
    diffusers."""
    ref, ff = pair(name, thresholding=True, sample_max_value=1.0, prediction_type="v_prediction")
    xb, xa = compiled_loops(ref, ff, stand_in, 6)
    assert_close(xb, xa)
