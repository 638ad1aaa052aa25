"""Host data on a device without a host sync (fastflow.devices)."""

from __future__ import annotations

import pytest
import torch

import fastflow as ff
from fastflow.devices import to_device, traced_without_dynamo


def test_to_device_keeps_values_and_returns_a_tensor_already_there():
    t = torch.arange(5, dtype=torch.int64)
    assert to_device(t, "cpu") is t
    moved = to_device(t, "meta")
    assert moved.device.type == "meta" and moved.shape == t.shape and moved.dtype == t.dtype


@pytest.mark.gpu
def test_to_device_and_seeds_reach_a_gpu_without_a_sync():
    """CPU data copied to a GPU (tables, timesteps, seeds, per-call seeds of Sampler.step) makes no host sync."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    host = torch.arange(7, dtype=torch.int64) * 3
    s = ff.Sampler(ff.VP(), "ddpm", steps=3, backend="auto")
    z = torch.randn(2, 4, 8, device="cuda")
    o = torch.randn_like(z)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        moved = to_device(host, "cuda")
        s.prepare("cuda")
        z = s.step(o, z, 0, seed=11)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(moved.cpu(), host) and torch.isfinite(z).all()


def test_per_call_seeds_trace_under_torch_compile():
    """Sampler.step with a per-call seed (made on the host, then moved) traces with fullgraph=True."""
    backend = ff.backends.get_backend("cuda")
    reason = backend.availability() or backend.supports(torch.device("cpu"))
    if reason is not None:
        pytest.skip(f"the C++ extension: {reason}")
    torch._dynamo.reset()
    s = ff.Sampler(ff.VP(), "ddpm", steps=3, backend="cuda")
    z, o = torch.randn(2, 6), torch.randn(2, 6)

    def f(o, z):
        return s.step(o, z, 0, seed=7)

    eager = f(o, z)  # resolves the backend (a traced first step cannot import one)
    assert torch.equal(torch.compile(f, fullgraph=True, backend="eager")(o, z), eager)


class _HostData:
    """Stands in for a CPU tensor: records how to_device copies it (no GPU needed)."""

    device = torch.device("cpu")

    def __init__(self) -> None:
        self.calls: list = []

    def pin_memory(self):
        self.calls.append("pin")
        return self

    def to(self, device, non_blocking=False):
        self.calls.append(("to", torch.device(device).type, non_blocking))
        return self


@pytest.mark.parametrize("capturing", [False, True])
def test_to_device_pins_only_outside_graph_capture(monkeypatch, capturing):
    """To a GPU: through pinned memory, asynchronously; inside a CUDA graph capture, a plain copy (a captured
    copy from a temporary pinned buffer would be read again at every replay, after the buffer is freed)."""
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)
    host = _HostData()
    to_device(host, "cuda")
    assert host.calls == ([("to", "cuda", False)] if capturing else ["pin", ("to", "cuda", True)])


@pytest.mark.skipif(torch.backends.cuda.is_built(), reason="checks the error of a torch built without CUDA")
def test_to_cuda_on_a_torch_without_cuda_gives_torchs_own_error():
    """The capture-state query raised "Tried to instantiate dummy base class _cuda_isCurrentStreamCapturing"
    (init_noise(device='cuda'), timesteps_on('cuda'), prepare('cuda'))."""
    s = ff.Sampler(ff.VP(), steps=3)
    for call in (lambda: s.init_noise((1, 2), device="cuda"), lambda: s.timesteps_on("cuda")):
        with pytest.raises((AssertionError, RuntimeError), match="not compiled with CUDA"):
            call()


@pytest.mark.parametrize(("exporting", "dynamo", "expected"), [
    (False, False, False),  # eager
    (False, True, False),  # torch.compile
    (True, True, False),  # torch.export's strict tracing, which is dynamo's: its tensors are the graph's
    (True, False, True),  # torch.export's non-strict tracing: fake tensors outside dynamo
])
def test_traced_without_dynamo_is_non_strict_export_only(monkeypatch, exporting, dynamo, expected):
    """Only a non-strict export trace makes fakes that a device cache must not keep; under torch.compile or a strict
    export the caches fill as eagerly."""
    if getattr(torch.compiler, "is_exporting", None) is None:
        pytest.skip("torch without torch.compiler.is_exporting")
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: exporting)
    monkeypatch.setattr(torch.compiler, "is_dynamo_compiling", lambda: dynamo)
    assert traced_without_dynamo() is expected
