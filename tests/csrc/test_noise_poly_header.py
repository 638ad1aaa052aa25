"""``csrc/noise_poly.h`` is generated from ``fastflow/noise.py``: it must be current and hold the float32
values the Triton kernel rounds the same constants to."""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import numpy as np

from fastflow import noise

ROOT = Path(__file__).resolve().parents[2]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_noise_poly", ROOT / "scripts" / "gen_noise_poly.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_header_is_current():
    assert (ROOT / "csrc" / "noise_poly.h").read_text() == _generator().header_text(), (
        "csrc/noise_poly.h is stale: run python scripts/gen_noise_poly.py"
    )


def test_header_constants_are_the_float32_coefficients():
    text = (ROOT / "csrc" / "noise_poly.h").read_text()
    found = {name: float.fromhex(lit) for name, lit in re.findall(r"constexpr float (\w+) = (\S+)f;", text)}
    want = {f"kSinPoly{i}": c for i, c in enumerate(noise.SIN_POLY)}
    want |= {f"kCosPoly{i}": c for i, c in enumerate(noise.COS_POLY)}
    want["kPiF"] = math.pi
    assert found.keys() == want.keys()
    for name, value in want.items():
        assert found[name] == float(np.float32(value)), name
