"""benchmarks/cases.py: the bytes a timed step moves, as the timed call reads and writes them."""

from __future__ import annotations

import pytest
import torch

from benchmarks.cases import FAMILIES, Case, step_bytes_per_element
from benchmarks.impls import FastflowImpl

CPU = torch.device("cpu")
# fp32 state, bf16 output: read z 4 and the output 2 (a guidance pair 2 x 2), write z 4; +4 per stored x_hat read,
# +4 for the x_hat written for later stages (DPM-Solver++ 2M reads one and writes one, UniPC reads two).
EXPECTED = {"ddim": 10, "flow-euler": 10, "ddpm": 10, "euler-ancestral": 10, "sde-dpm++2m": 18, "cfg-ddim": 12,
            "dpm++2m": 18, "unipc": 22}


@pytest.mark.parametrize("steps", [10, 30])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bytes_per_element_are_what_the_timed_call_moves(monkeypatch, family, steps):
    """The figure behind "% of copy bandwidth" counts exactly the tensors the device-time call reads and writes."""
    case = Case(FAMILIES[family], (1, 2, 4, 4), torch.float32, torch.bfloat16, CPU, steps)
    impl = FastflowImpl(case, "torch")
    seen = {}

    def fused_step(z, out, cond, uncond, history, table, step, seeds=None, noise=None, x_out=None,
                   model_in_out=None, **_):
        seen.update(step=step, read=[z, cond, uncond, *history, noise], written=[out, x_out, model_in_out])

    monkeypatch.setattr(impl.backend, "fused_step", fused_step)
    impl.one_step()()
    moved = sum(t.numel() * t.element_size() for t in seen["read"] + seen["written"] if t is not None)
    bpe = step_bytes_per_element(case.family.sampler(steps), case.stage, case.state_dtype, case.model_dtype)
    assert seen["step"] == case.stage
    assert moved == bpe * case.elements
    assert bpe == EXPECTED[family]
