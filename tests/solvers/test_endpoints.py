"""Solvers at the ends of a schedule: pure noise (alpha = 0, t = 1 of flow matching) and sigma = 0.

Where a step has a finite limit there, the plan is that limit, checked against nearby finite
configurations or an independent formula; where it has none, an UndefinedStepError says why.
"""

import numpy as np
import pytest
import torch

import fastflow as ff
from fastflow.plan import CN, CX, CZ
from fastflow.solvers import SOLVER_NAMES
from fastflow.solvers.base import X, Z
from fastflow.solvers.unipc import VARIANTS, correction, differences, predictor_update


def _terms(lin) -> dict:
    return {k: v for k, v in lin if v != 0.0}


def _distance(a, b) -> float:
    ta, tb = _terms(a), _terms(b)
    return max(abs(ta.get(k, 0.0) - tb.get(k, 0.0)) for k in set(ta) | set(tb))


def _unipc_interval(lam: np.ndarray, i: int, order: int, variant: str) -> list:
    """UniP from point ``i`` and UniC of the same interval, with arbitrary state ratio and scale."""
    h = lam[i + 1] - lam[i]
    rks, d1s = differences(lam, i, order)
    return [
        predictor_update(Z(i), X(i), rks, d1s, h, variant, 0.7, 0.3),
        correction(X(i + 1), X(i), rks, d1s, h, variant, 0.3),
    ]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("i,order", [(1, 2), (2, 3)])
def test_unipc_with_a_point_at_infinite_log_snr_is_the_limit_of_finite_ones(variant, i, order):
    """A point at log-SNR -inf (its ratio r = -inf) gives the limit of the finite ratios: the weights
    differ by O(1/r), the rate Cramer's rule predicts."""
    rng = np.random.default_rng()
    lam = np.concatenate([[-np.inf], np.cumsum(rng.uniform(0.2, 1.5, 4))])
    limit = _unipc_interval(lam, i, order, variant)
    for lin in limit:
        assert all(np.isfinite(v) for _, v in lin)
    gaps = {}
    for far in (1e4, 1e7):
        near = _unipc_interval(np.concatenate([[lam[1] - far], lam[1:]]), i, order, variant)
        gaps[far] = [_distance(a, b) for a, b in zip(limit, near, strict=True)]
    for g4, g7 in zip(gaps[1e4], gaps[1e7], strict=True):
        assert g7 < 1e-5
        assert g7 * 1e7 == pytest.approx(g4 * 1e4, rel=0.02)


@pytest.mark.parametrize("steps", [5, 9])
def test_unipc_3_from_pure_noise_is_the_limit_of_grids_that_start_below_it(steps):
    """FlowMatching from t = 1 (alpha = 0): UniPC-3's plan is finite and grids starting at t = 1 - delta
    approach it as 1 / |log-SNR(1 - delta)|."""
    fm = ff.FlowMatching(shift=3.0)
    limit = ff.Sampler(fm, "unipc", order=3, prediction="flow", steps=steps)
    t = limit.timesteps.numpy()
    assert t[0] == 1.0 and np.all(np.isfinite(limit.plan.coefs))
    scaled = []
    for delta in (1e-12, 1e-15):
        grid = t.copy()
        grid[0] = 1.0 - delta
        near = ff.Sampler(ff.FlowMatching(), "unipc", order=3, prediction="flow", steps=steps, grid=grid)
        lam0 = abs(float(fm.logsnr(grid[0]))) / 2
        scaled.append(lam0 * np.abs(near.plan.coefs - limit.plan.coefs).max())
    assert 0 < scaled[1] < 1.0
    assert scaled[1] == pytest.approx(scaled[0], rel=0.1)


def test_unipc_bh1_from_pure_noise_says_why():
    with pytest.raises(ff.UndefinedStepError, match="bh1.*alpha = 0.*'bh2'"):
        ff.Sampler(ff.FlowMatching(), "unipc", variant="bh1", prediction="flow", steps=6)
    ff.Sampler(ff.FlowMatching(), "unipc", variant="bh1", prediction="flow", steps=6, disable_corrector=(0,))


EDGES = {
    "pure noise": (ff.FlowMatching(shift=3.0), {}),
    "sigma 0 evaluated": (ff.FlowMatching(t_min=0.0, t_max=0.99), {}),
    "EDM grid to 0": (ff.EDM(), {"grid": [1.0, 0.5, 0.0], "steps": 3}),
}


@pytest.mark.parametrize("edge", sorted(EDGES))
@pytest.mark.parametrize("euler,ddim", [("euler", "ddim"), ("euler-ancestral", "ddpm")])
@pytest.mark.parametrize("prediction", ["flow", "x0"])
def test_euler_at_the_ends_is_ddim(edge, euler, ddim, prediction):
    """Euler in sigma / alpha is DDIM (ancestral Euler is DDPM), so DDIM's plan is the limit Euler's must take
    from alpha = 0 and at sigma = 0."""
    schedule, kw = EDGES[edge]
    kw = {"steps": 7, **kw}
    a = ff.Sampler(schedule, euler, prediction=prediction, **kw).plan
    b = ff.Sampler(schedule, ddim, prediction=prediction, **kw).plan
    np.testing.assert_allclose(a.coefs, b.coefs, rtol=1e-12, atol=1e-12)
    assert a.noise == b.noise


def test_euler_from_pure_noise_is_the_limit_of_grids_that_start_below_it():
    rng = np.random.default_rng()
    t = np.sort(rng.uniform(0.05, 0.95, 5))[::-1]
    limit = ff.Sampler(ff.FlowMatching(), "euler", prediction="flow", steps=6, grid=np.r_[1.0, t]).plan.coefs
    near = ff.Sampler(ff.FlowMatching(), "euler", prediction="flow", steps=6, grid=np.r_[1.0 - 1e-9, t]).plan.coefs
    assert np.all(np.isfinite(limit))
    np.testing.assert_allclose(near[:, [CZ, CX, CN]], limit[:, [CZ, CX, CN]], rtol=0, atol=1e-7)


def test_heun_from_pure_noise_has_no_limit_and_says_why():
    t = [0.8, 0.5, 0.2]
    scale = [np.abs(ff.Sampler(ff.FlowMatching(), "heun", prediction="flow", steps=4, grid=[1 - d, *t]).plan.coefs)
             .max() for d in (1e-4, 1e-8)]
    assert scale[1] > 1e3 * scale[0]  # the corrector's weights grow as 1 / alpha
    with pytest.raises(ff.UndefinedStepError, match="heun.*alpha = 0.*t_max < 1"):
        ff.Sampler(ff.FlowMatching(), "heun", prediction="flow", steps=4, grid=[1.0, *t])


@pytest.mark.parametrize("solver", ["ddim", "euler", "dpm++2m", "unipc"])
@pytest.mark.parametrize("prediction", ["eps", "score"])
def test_a_prediction_without_data_at_pure_noise_says_why(solver, prediction):
    with pytest.raises(ff.UndefinedStepError, match=f"prediction '{prediction}' gives no data prediction where "
                                                    "alpha = 0.*t_max < 1.*'flow', 'v' or 'x0'"):
        ff.Sampler(ff.FlowMatching(shift=3.0), solver, prediction=prediction, steps=6)


ENDS = {  # a schedule and the grid options of a loop of n steps
    "VP.cosine": lambda n: (ff.VP.cosine(), {}),
    "VP": lambda n: (ff.VP(), {}),
    "EDM": lambda n: (ff.EDM(), {}),
    "FlowMatching": lambda n: (ff.FlowMatching(t_max=0.98), {}),
    "FlowMatching from t = 1": lambda n: (ff.FlowMatching(shift=3.0), {}),
    "FlowMatching to t = 0": lambda n: (ff.FlowMatching(t_min=0.0, t_max=0.99), {}),
    "EDM grid to 0": lambda n: (ff.EDM(), {"grid": np.linspace(0.0, 1.0, n)[::-1]}),  # n = 1: [0]
}


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("end", sorted(ENDS))
@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_every_solver_ends_at_the_data_prediction(solver, end, steps):
    """README: a step to sigma = 0 is the data prediction itself. A perfect x0 model's data is where a loop ends."""
    if solver == "heun" and end == "FlowMatching from t = 1":
        pytest.skip("heun has no step from alpha = 0 (test_heun_from_pure_noise_has_no_limit_and_says_why)")
    schedule, kw = ENDS[end](steps)
    s = ff.Sampler(schedule, solver, prediction="x0", steps=steps, backend="torch", **kw)
    data = torch.randn(2, 5, dtype=torch.float64)
    z = s.init_noise((2, 5), seed=int(torch.randint(0, 2**31, ())), dtype=torch.float64)
    x = ff.sample(lambda z_in, t: data, z, s)
    torch.testing.assert_close(x, data, rtol=0, atol=1e-12)
