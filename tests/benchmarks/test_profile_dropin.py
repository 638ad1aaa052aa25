"""benchmarks/profile_dropin.py: its figures are per ``step`` call."""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("diffusers")
profile_dropin = pytest.importorskip("benchmarks.profile_dropin")


@pytest.mark.filterwarnings("ignore")
def test_figures_are_per_step_call_when_a_loop_calls_step_more_often_than_its_steps():
    """Heun's 10-step loop calls ``step`` 19 times: the drop-in's ``step`` shows 1.00 calls per step call. The figures
    were divided by the 10 steps, so that each row (and the time a step) was that of 1.9 calls."""
    text = profile_dropin.profile_class("HeunDiscreteScheduler", torch.device("cpu"), loops=2, top=500)
    rows = [line for line in text.splitlines() if re.search(r"\| step \(heun\.py:\d+\) \|$", line)]
    assert len(rows) == 1, text
    assert rows[0].split("|")[2].strip() == "1.00"
