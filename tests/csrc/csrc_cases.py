"""The C++ (CPU) and CUDA kernel tests' bindings of the shared step cases (``tests/backends/step_cases.py``)."""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import pytest
import torch
from backends import step_cases
from backends.step_cases import EXTENSION_TOL

from fastflow.backends.cuda import CudaBackend

# The extension tests draw the coefficient table in float64 (then cast to the table dtype),
# and compare within EXTENSION_TOL unless they ask for bit equality.
make_case = partial(step_cases.make_case, table_draw_dtype=torch.float64)
matrix_case = partial(step_cases.matrix_case, table_draw_dtype=torch.float64)
assert_matches = partial(step_cases.assert_matches, tol=EXTENSION_TOL)


def cuda_backend() -> CudaBackend:
    backend = CudaBackend()
    reason = backend.availability()
    if reason is not None:
        pytest.skip(reason)
    return backend


# The CUDA float kernels' compile-time plans (DrawPlans and DtypePlans in csrc/step_plans.h), as launches
# the tests build for them. The (state, model output) dtype pairs; the drawing plans as (state, model output,
# x_hat dtype or None, next model input written); the dtype plans as (state, model output, x_hat dtype).
PLAN_PAIRS = [
    (torch.float32, torch.float32),
    (torch.float32, torch.bfloat16),
    (torch.float32, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
]
HALF_STATES = (torch.bfloat16, torch.float16)  # their plans also take a float32 x_hat
FLOAT_STATE_PAIRS = PLAN_PAIRS[:3]  # their drawing plans come without clipping (also guided), tried first


class DrawPlanCase(NamedTuple):
    """A drawing plan: state and model-output dtypes, x_hat's dtype (None: not written), the next model input
    written (doubled when guided), no clipping, a guidance pair."""

    z: torch.dtype
    model_out: torch.dtype
    x_dtype: torch.dtype | None
    model_in: bool
    no_clip: bool = False
    guided: bool = False


DRAW_PLANS = (
    [DrawPlanCase(z, o, x, m, True) for z, o in FLOAT_STATE_PAIRS for x in (None, z) for m in (False, True)]
    + [DrawPlanCase(z, o, None, m, True, True) for z, o in FLOAT_STATE_PAIRS for m in (False, True)]
    + [DrawPlanCase(z, o, x, m) for z, o in PLAN_PAIRS for x in (None, z) for m in (False, True)]
    + [DrawPlanCase(z, z, torch.float32, m) for z in HALF_STATES for m in (False, True)]
)
DTYPE_PLANS = [(z, o, z) for z, o in PLAN_PAIRS] + [(z, z, torch.float32) for z in HALF_STATES]


def plan_id(plan: tuple) -> str:
    """A test id for an entry of DRAW_PLANS or DTYPE_PLANS."""
    return "-".join("none" if v is None else (str(v)[6:] if isinstance(v, torch.dtype) else str(v)) for v in plan)


def draw_plan_label(plan: DrawPlanCase) -> str:
    """The emulator's name of a drawing plan:
    "draw <state> <model output>[ x_out <dtype>][ model_in][ no_clip][ guided]"."""
    x = "" if plan.x_dtype is None else f" x_out {str(plan.x_dtype)[6:]}"
    options = "".join(name for name, on in ((" model_in", plan.model_in), (" no_clip", plan.no_clip),
                                            (" guided", plan.guided)) if on)
    return f"draw {str(plan.z)[6:]} {str(plan.model_out)[6:]}{x}{options}"


def draw_plan_clips(plan: DrawPlanCase) -> tuple[bool, ...]:
    """The clipping settings of the launches a drawing plan runs: only unclipped ones for a no-clipping plan,
    only clipped ones for a plan whose dtypes also have a no-clipping plan (tried first), else both."""
    if plan.no_clip:
        return (False,)
    return (True,) if (plan.z, plan.model_out) in FLOAT_STATE_PAIRS else (False, True)


def draw_plan_model_input(plan: DrawPlanCase) -> str | None:
    """The model-input mode (tests/backends/step_cases.py) of a drawing plan's launches."""
    if not plan.model_in:
        return None
    return "dup-model" if plan.guided else "model"


def dtype_plan_label(zdt: torch.dtype, odt: torch.dtype, x_dtype: torch.dtype) -> str:
    """The emulator's name of a dtype plan: "dtypes <state> <model output> x_out <dtype>"."""
    return f"dtypes {str(zdt)[6:]} {str(odt)[6:]} x_out {str(x_dtype)[6:]}"


# Options a deterministic dtype plan (DtypePlans) leaves to the launch, one tuple per case: (guided, stored
# predictions, noise ("none" or "tensor"), x_hat written, model input mode, clip, step index kind).
DTYPE_PLAN_OPTIONS = [
    (False, 0, "none", False, None, False, "int"),
    (True, 2, "tensor", True, "model", True, "i64"),
    (True, 3, "none", True, "dup-model", False, "i32"),
    (False, 1, "tensor", False, "model", True, "int"),
]
