"""benchmarks/impls.py: what each implementation's timed loop does."""

from __future__ import annotations

import pytest
import torch

from benchmarks.cases import FAMILIES, Case
from benchmarks.impls import FastflowImpl

CPU = torch.device("cpu")


@pytest.mark.parametrize("family", ["ddim", "dpm++2m", "cfg-ddim"])
def test_fastflow_loop_keeps_its_last_state_without_a_copy(family):
    """The timed loop is its steps: its final state is the last step's output itself. It was a clone, a copy of
    the whole state in every timed loop (host and CUDA-graph columns) that the naive and diffusers loops do not
    make."""
    case = Case(FAMILIES[family], (1, 4, 8, 8), torch.float32, torch.bfloat16, CPU, 4)
    impl = FastflowImpl(case, "torch")
    assert impl.reason is None
    outputs = []
    step = impl.sampler.step

    def recording_step(*args, **kwargs):
        result = step(*args, **kwargs)
        outputs.append(result[0])
        return result

    impl.sampler.step = recording_step
    impl.prepare()
    impl.run()
    assert len(outputs) == impl.sampler.num_stages
    assert impl.final is outputs[-1]
    impl.run()  # the next loop's buffers are its own: the last loop's state is left as it was
    assert impl.final is outputs[-1] and outputs[-1] is not outputs[impl.sampler.num_stages - 1]
    torch.testing.assert_close(outputs[-1], outputs[impl.sampler.num_stages - 1], rtol=0, atol=0)
