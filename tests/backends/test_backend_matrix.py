"""Every solver and prediction type through every available backend equals the torch reference.

Solvers only produce coefficients, so this is where a plan feature a kernel
mishandles (history slots, noise, guidance, clipping) shows up end to end.
"""

import pytest
import torch

import fastflow as ff
from fastflow.backends import get_backend
from fastflow.solvers import SOLVER_NAMES

KERNEL_BACKENDS = ("triton", "cuda")
SHAPE = (2, 3, 5, 7)  # 105 elements per sample: not a multiple of 4 or of any block


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _require(name: str) -> None:
    backend = get_backend(name)
    reason = backend.availability() or backend.supports(_device())
    if reason is not None:
        pytest.skip(f"{name} backend: {reason}")


def _loop(sampler: ff.Sampler, backend: str, z0: torch.Tensor, outputs: list) -> list[torch.Tensor]:
    sampler.backend = backend
    sampler.runner.backend = backend
    z, states = z0, []
    for i in range(sampler.num_stages):
        z = sampler.step(outputs[i], z, i)
        states.append(z)
    return states


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("solver", SOLVER_NAMES)
@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "flow", "score"])
def test_solver_matrix(backend, solver, prediction):
    _require(backend)
    device = _device()
    schedule = ff.EDM() if solver in ("euler", "heun") else ff.VP()
    options = {"s_churn": 10.0} if solver == "euler" else {}
    guided = prediction == "eps"  # guidance rides along with one prediction type to bound the matrix
    sampler = ff.Sampler(schedule, solver, prediction=prediction, steps=4, clip=3.0 if prediction == "x0" else None,
                         guidance_scale=2.5 if guided else None, **options)
    g = torch.Generator().manual_seed(0)
    z0 = sampler.init_noise(SHAPE, seed=[5, 9], device=device)
    outs = []
    for _ in range(sampler.num_stages):
        o = torch.randn(SHAPE, generator=g).to(device)
        outs.append((o, 0.5 * o + 0.1) if guided else o)
    ref = _loop(sampler, "torch", z0, outs)
    got = _loop(sampler, backend, z0, outs)
    for i, (a, b) in enumerate(zip(got, ref, strict=True)):
        scale = float(b.abs().max()) + 1.0
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5 * scale, msg=f"stage {i}")


@pytest.mark.parametrize("backend", ("torch", *KERNEL_BACKENDS))
def test_channels_last_state_and_output(backend):
    """Model outputs in another memory layout (a conv net's channels_last) give the same step."""
    _require(backend)
    device = _device()
    sampler = ff.Sampler(ff.VP(), "sde-dpm++2m", prediction="v", steps=4, backend="torch")
    z0 = sampler.init_noise((2, 3, 6, 5), seed=[1, 2], device=device)
    g = torch.Generator().manual_seed(1)
    outs = [torch.randn(2, 3, 6, 5, generator=g).to(device) for _ in range(4)]
    ref = _loop(sampler, "torch", z0, outs)
    got = _loop(sampler, backend, z0.to(memory_format=torch.channels_last),
                [o.to(memory_format=torch.channels_last) for o in outs])
    for a, b in zip(got, ref, strict=True):
        assert a.is_contiguous()
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", ("torch", *KERNEL_BACKENDS))
def test_every_backend_draws_the_spec_noise(name):
    """``Backend.noise`` (a stage's noise outside its kernel: the torch reference's default is the spec itself,
    kernels draw their own) gives fastflow.noise.normal's numbers, with the row as an int or a device tensor."""
    from fastflow import noise as noise_spec

    _require(name)
    device = _device()
    backend = get_backend(name)
    seeds = torch.tensor([3, 2**40 + 1], dtype=torch.int64, device=device)
    want = noise_spec.normal(seeds, SHAPE[1:], step=5)
    for step in (5, torch.tensor([5], dtype=torch.int64, device=device)):
        got = backend.noise(seeds, SHAPE[1:], step=step)
        assert got.shape == want.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
