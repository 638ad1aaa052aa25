"""fastflow.plan: what compile_plan makes of a stage's references to earlier stages."""

from __future__ import annotations

import numpy as np
import pytest

from fastflow.plan import AO, AZ, CX, CZ, H0, H1, HistoryRef, W, compile_plan
from fastflow.solvers.base import Lin, Points, Stage, UndefinedStepError

_POINT = Points(*(np.array([v]) for v in (1.0, 1.0, 1.0, 0.0, 0.0)))  # x0 prediction: x_hat = model output


def _stage(update: dict) -> Stage:
    return Stage(_POINT, Lin(update))


def test_references_to_earlier_stages_become_history_slots():
    """x, z and o of earlier stages take slots, newest first; each marks what its stage must keep."""
    plan = compile_plan(
        [
            _stage({("z", 0): 1.0, ("x", 0): 0.5}),
            _stage({("z", 1): 1.0, ("o", 0): 0.25}),
            _stage({("x", 2): 2.0, ("o", 1): -1.0, ("z", 0): 3.0}),
        ],
        "x0",
    )
    assert plan.history == ((), (HistoryRef("o", 0),), (HistoryRef("o", 1), HistoryRef("z", 0)))
    assert plan.keep_o == (True, True, False)
    assert plan.write_x == (False, False, False)  # a stage's own x_hat is not history
    assert plan.keep_z == (True, False, False)
    assert plan.coefs[0, CZ] == 1.0 and plan.coefs[0, CX] == 0.5
    assert plan.coefs[1, H0] == 0.25 and plan.coefs[2, H0] == -1.0 and plan.coefs[2, H1] == 3.0
    assert plan.with_guidance(3.0).keep_o == plan.keep_o
    assert np.all(plan.with_guidance(3.0).coefs[:, W] == 3.0)


def test_a_plan_without_kept_model_outputs_has_no_keep_o():
    plan = compile_plan([_stage({("z", 0): 1.0}), _stage({("x", 0): 1.0, ("z", 1): 1.0})], "x0")
    assert plan.keep_o == () and plan.write_x == (True, False)


@pytest.mark.parametrize("ref", [("o", 1), ("o", -1), ("y", 0)])
def test_a_reference_to_a_stage_not_yet_run_raises(ref):
    with pytest.raises(ValueError, match="which is not available"):
        compile_plan([_stage({("z", 0): 1.0}), _stage({ref: 1.0})], "x0")


@pytest.mark.parametrize("prediction", ["eps", "score"])
def test_a_prediction_with_no_data_prediction_at_alpha_zero_says_why(prediction):
    """At pure noise (alpha = 0) eps and score carry no information on the data: no step can use them there."""
    noise_point = Points(*(np.array([v]) for v in (1.0, 0.0, 1.0, -1.0, 1.0)))  # t = 1 of flow matching
    with pytest.raises(UndefinedStepError, match=f"prediction '{prediction}' gives no data prediction where alpha"):
        compile_plan([Stage(noise_point, Lin({("x", 0): 1.0}))], prediction)
    plan = compile_plan([Stage(noise_point, Lin({("x", 0): 1.0}))], "flow")  # x_hat = z - o there
    assert plan.coefs[0, AZ] == 1.0 and plan.coefs[0, AO] == -1.0
