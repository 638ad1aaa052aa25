"""Prediction types: every conversion round-trips, and agrees with its definition."""

import numpy as np
import pytest
import torch

from fastflow.grids import points_at
from fastflow.predictions import PREDICTION_NAMES, canonical_prediction, from_x_eps, to_x_eps
from fastflow.schedules import EDM, VP, FlowMatching


@pytest.mark.parametrize("name", PREDICTION_NAMES)
@pytest.mark.parametrize("schedule", [VP(), VP.cosine(), FlowMatching(), EDM()], ids=repr)
def test_round_trip(name, schedule):
    t = np.linspace(schedule.t_min, schedule.t_max, 7)[1:-1]
    p = points_at(schedule, t)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, t.size, dtype=torch.float64, generator=g)
    eps = torch.randn(5, t.size, dtype=torch.float64, generator=g)
    a, s = torch.from_numpy(p.alpha), torch.from_numpy(p.sigma)
    z = a * x + s * eps
    ox, oe = (torch.from_numpy(np.asarray(c)) for c in from_x_eps(name, p.alpha, p.sigma, p.d_alpha, p.d_sigma))
    o = ox * x + oe * eps
    (xz, xo), (ez, eo) = to_x_eps(name, p.alpha, p.sigma, p.d_alpha, p.d_sigma)
    torch.testing.assert_close(torch.from_numpy(xz) * z + torch.from_numpy(xo) * o, x, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(torch.from_numpy(ez) * z + torch.from_numpy(eo) * o, eps, rtol=1e-9, atol=1e-9)


def test_outputs_match_their_definitions():
    s = VP.cosine()
    p = points_at(s, np.array([0.4]))
    a, sg, da, ds = p.alpha[0], p.sigma[0], p.d_alpha[0], p.d_sigma[0]
    assert from_x_eps("v", a, sg) == pytest.approx((-sg, a))
    assert from_x_eps("flow", a, sg, da, ds) == pytest.approx((da, ds))
    assert from_x_eps("score", a, sg) == pytest.approx((0.0, -1 / sg))
    # flow matching velocity is eps - x
    assert from_x_eps("flow", 0.7, 0.3, -1.0, 1.0) == pytest.approx((-1.0, 1.0))


def test_names_and_aliases():
    assert canonical_prediction("epsilon") == "eps"
    assert canonical_prediction("v_prediction") == "v"
    assert canonical_prediction("sample") == "x0"
    with pytest.raises(ValueError, match="valid: eps, x0, v, flow, score"):
        canonical_prediction("noise?")
    with pytest.raises(ValueError, match="derivatives"):
        to_x_eps("flow", 0.5, 0.5)
