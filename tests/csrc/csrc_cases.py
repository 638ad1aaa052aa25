"""The C++ (CPU) and CUDA kernel tests' bindings of the shared step cases (``tests/backends/step_cases.py``)."""

from __future__ import annotations

from functools import partial

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

# The (state, model output) dtypes of the CUDA drawing kernel's compile-time plans (DrawPlans in
# csrc/step_kernel_body.h); each pair has a plan per set of outputs.
PLAN_PAIRS = [
    (torch.float32, torch.float32),
    (torch.float32, torch.bfloat16),
    (torch.float32, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
]


def cuda_backend() -> CudaBackend:
    backend = CudaBackend()
    reason = backend.availability()
    if reason is not None:
        pytest.skip(reason)
    return backend

# Options a deterministic dtype plan (DtypePlans) leaves to the launch, one tuple per case: (guided, stored
# predictions, noise ("none" or "tensor"), x_hat written, model input mode, clip, step index kind).
DTYPE_PLAN_OPTIONS = [
    (False, 0, "none", False, None, False, "int"),
    (True, 2, "tensor", True, "model", True, "i64"),
    (True, 3, "none", True, "dup-model", False, "i32"),
    (False, 1, "tensor", False, "model", True, "int"),
]
