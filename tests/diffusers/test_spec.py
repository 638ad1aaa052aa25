"""fastflow/diffusers/_spec.py: the StepSpec language compiles to plans that compute what the specs state.

Every drop-in's parity with diffusers runs through ``compile_specs``; these tests state the language's meaning on
its own terms (float64 formulas written out here), so a fault in it is named here rather than as a drift in one
scheduler's loop.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastflow.diffusers._spec import (
    O,
    StepSpec,
    X,
    Z,
    compile_specs,
    float32,
    noise,
    promoted_dtype,
    spec_finiteness_error,
    sqrt,
)
from fastflow.plan import MAX_HISTORY
from fastflow.solvers.base import UndefinedStepError

pytest.importorskip("diffusers")


def _run(specs: list[StepSpec], zs0: torch.Tensor, outputs: list[torch.Tensor]) -> list[tuple]:
    """Each stage through the compiled runner as a drop-in's step calls it: ``(z_next, x_hat)`` per stage."""
    comp = compile_specs(specs, None, "torch")
    z, results = zs0, []
    for k, o in enumerate(outputs):
        call = comp.calls[k]
        z_next, x, _ = call.runner.run(k, z, o, None, want_x=True, extra_history=(o,) if call.uses_o else ())
        results.append((z_next, x))
        z = z_next
    return results


def test_a_two_stage_spec_computes_its_formulas():
    """x_hat = xz z + xo o; the update over Z, X, the stage's own raw output O(k), and an earlier stage's X and O,
    kept from stage 0 for stage 1."""
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(2, 3, 5, 7, generator=g, dtype=torch.float64)
    o0, o1 = (torch.randn(z0.shape, generator=g, dtype=torch.float64) for _ in range(2))
    specs = [
        StepSpec(0.9, -0.3, 0.7 * Z(0) + 0.2 * X(0) + 0.05 * O(0)),
        StepSpec(1.1, 0.4, 0.5 * Z(1) + 0.3 * X(1) + 0.15 * X(0) - 0.1 * O(0) + 0.25 * O(1)),
    ]
    (z1, x0), (z2, x1) = _run(specs, z0, [o0, o1])
    want_x0 = 0.9 * z0 - 0.3 * o0
    want_z1 = 0.7 * z0 + 0.2 * want_x0 + 0.05 * o0
    want_x1 = 1.1 * want_z1 + 0.4 * o1
    want_z2 = 0.5 * want_z1 + 0.3 * want_x1 + 0.15 * want_x0 - 0.1 * o0 + 0.25 * o1
    for got, want in ((x0, want_x0), (z1, want_z1), (x1, want_x1), (z2, want_z2)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_each_stage_call_says_what_its_stage_does():
    specs = [
        StepSpec(1.0, 0.0, Z(0) + noise(0.5), draws=True),
        StepSpec(0.0, 1.0, 0.5 * Z(1) + 0.5 * O(1), pred=2.0 * X(1)),
        StepSpec(0.0, 1.0, Z(2), error="undefined here"),
    ]
    comp = compile_specs(specs, None, "torch", start=4)
    assert comp.start == 4 and len(comp.calls) == 3
    noisy, plain = comp.calls[0], comp.calls[2]
    assert (noisy.noisy, noisy.draws, noisy.uses_o, noisy.error) == (True, True, False, None)
    with_o = comp.calls[1]
    assert (with_o.noisy, with_o.draws, with_o.uses_o) == (False, False, True)
    assert with_o.pred is not None and dict(with_o.pred) == {("x", 1): 2.0}
    assert plain.error == "undefined here" and not plain.uses_o
    assert all(call.k == k and call.runner is comp.runner for k, call in enumerate(comp.calls))


def test_a_stage_needing_more_stored_tensors_than_the_kernel_has_is_refused():
    """Three earlier x_hat and the stage's own model output: one slot past the kernel's MAX_HISTORY."""
    earlier = [StepSpec(0.0, 1.0, Z(k)) for k in range(MAX_HISTORY)]
    update = Z(MAX_HISTORY) + O(MAX_HISTORY)
    for k in range(MAX_HISTORY):
        update = update + X(k)
    with pytest.raises(ValueError, match=f"stage {MAX_HISTORY} needs {MAX_HISTORY + 1} stored tensors"):
        compile_specs([*earlier, StepSpec(0.0, 1.0, update)], None, "torch")


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("where", ["xz", "xo", "update", "pred"])
def test_a_coefficient_that_is_not_finite_makes_the_step_undefined(where, bad):
    fields = {"xz": 1.0, "xo": 0.5, "update": 0.5 * Z(0) + 0.5 * X(0), "pred": 1.0 * X(0)}
    fields[where] = bad * X(0) if where in ("update", "pred") else bad
    message = spec_finiteness_error(StepSpec(**fields), 7)
    assert message is not None and message.startswith("step 7 has a coefficient that is not finite")
    fine = {"xz": 1.0, "xo": 0.5, "update": 0.5 * Z(0) + 0.5 * X(0), "pred": 1.0 * X(0)}
    assert spec_finiteness_error(StepSpec(**fine), 7) is None


def test_the_scalar_helpers_of_the_formulas():
    assert sqrt(2.25) == 1.5
    with pytest.raises(UndefinedStepError, match="negative variance"):
        sqrt(-1e-12)
    assert float32(0.1) == float(np.float32(0.1)) != 0.1
    assert promoted_dtype(torch.empty(1, dtype=torch.float16), torch.empty(1, dtype=torch.float32)) is torch.float32
    assert promoted_dtype(torch.empty(1, dtype=torch.bfloat16), torch.empty(1, dtype=torch.bfloat16)) is torch.bfloat16
