"""The allocating form of the step (``fused_step_alloc``) equals ``fused_step`` into given outputs, per backend.

Front ends (``Sampler.step``, graph capture, the diffusers drop-ins) call only the
allocating form, and the C++ backend overrides it with allocations made in C++, so
each backend's form is checked against its own ``fused_step`` and the reference.
"""

from __future__ import annotations

import pytest
import torch
from backends.step_cases import EXTENSION_TOL, REF, TRITON_TOL, assert_matches, make_case
from torch.utils._python_dispatch import TorchDispatchMode

from fastflow.backends import get_backend
from fastflow.plan import NUM_COEFS

BACKENDS = ("torch", "cuda", "triton")
SHAPE = (3, 5, 7)  # 35 elements per sample: no multiple of a vector width or block


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _backend(name: str):
    backend = get_backend(name)
    reason = backend.availability() or backend.supports(_device())
    if reason is not None:
        pytest.skip(f"{name} backend: {reason}")
    return backend


def _alloc(backend, case, **kw):
    return backend.fused_step_alloc(
        case.z, case.model_out, case.uncond, list(case.history), case.table, case.step,
        seeds=case.seeds, noise=case.noise, clip=case.clip, use_noise=case.use_noise, **kw,
    )


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("guided", [False, True], ids=["cond", "cfg"])
@pytest.mark.parametrize("noise", ["none", "philox", "tensor"])
@pytest.mark.parametrize("mi", [None, "same", "dup-bf16"])
def test_alloc_equals_fused_step(name, guided, noise, mi):
    backend = _backend(name)
    case = make_case(SHAPE, torch.float32, torch.bfloat16, guided=guided, hist=2, noise=noise,
                     x_dtype=torch.float32, mi=mi, seed=7, device=str(_device()))
    want = case.run(REF)
    double = mi is not None and mi.startswith("dup")
    out, x, model_in = _alloc(backend, case, want_x=True, model_in_dtype=case.mi_dtype, model_in_double=double)
    got = {"out": out, "x": x}
    if mi is None:
        assert model_in is None
    else:
        assert model_in.dtype == case.mi_dtype and model_in.shape[0] == SHAPE[0] * (2 if double else 1)
        got["mi"] = model_in
    for t in got.values():
        assert t.is_contiguous() and t.device == case.z.device
    assert_matches(got, want, tol=TRITON_TOL if name == "triton" else EXTENSION_TOL)
    # The same call into given buffers is the plain fused_step, bit for bit on one backend.
    assert torch.equal(out, case.run(backend)["out"])


@pytest.mark.parametrize("name", BACKENDS)
def test_alloc_optional_outputs_and_given_out(name):
    """Nothing asked, nothing made; a given ``out`` is written and returned (an in-place step included)."""
    backend = _backend(name)
    case = make_case(SHAPE, torch.float32, torch.float32, guided=False, hist=0, noise="none", seed=3,
                     device=str(_device()))
    want = case.run(REF)["out"]
    out, x, model_in = _alloc(backend, case)
    assert x is None and model_in is None
    torch.testing.assert_close(out, want, rtol=2e-5, atol=2e-5)
    buf = torch.full_like(case.z, float("nan"))
    out2, _, _ = _alloc(backend, case, out=buf)
    assert out2 is buf
    torch.testing.assert_close(buf, want, rtol=2e-5, atol=2e-5)
    z = case.z.clone()
    out3, _, _ = backend.fused_step_alloc(z, case.model_out, None, [], case.table, case.step, out=z)
    assert out3 is z
    torch.testing.assert_close(z, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", BACKENDS)
def test_alloc_non_contiguous_inputs(name):
    """Inputs in another layout are read by value (the noise is keyed by the row-major index)."""
    backend = _backend(name)
    case = make_case((2, 4, 3, 5), torch.float32, torch.float32, guided=True, hist=1, noise="philox", seed=11,
                     device=str(_device()))
    want = case.run(REF)["out"]
    cl = torch.channels_last
    out, _, _ = backend.fused_step_alloc(
        case.z.to(memory_format=cl), case.model_out.to(memory_format=cl), case.uncond.to(memory_format=cl),
        [h.to(memory_format=cl) for h in case.history], case.table, case.step, seeds=case.seeds, use_noise=True,
    )
    assert out.is_contiguous()
    torch.testing.assert_close(out, want, rtol=2e-5, atol=2e-5)


class _CountCopies(TorchDispatchMode):
    """Counts the whole-tensor copies torch makes in its scope (``contiguous()`` and ``copy_`` both end in one of
    these; the C++ extension's go through the dispatcher too)."""

    COPIES = (torch.ops.aten.clone.default, torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default)

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if func in self.COPIES and isinstance(result, torch.Tensor) and result.numel() >= self.numel:
            self.count += 1
        return result


def _channels_last_case(noise: str):
    case = make_case((2, 4, 3, 5), torch.float32, torch.bfloat16, guided=True, hist=2, noise=noise, seed=13,
                     device=str(_device()))
    cl = torch.channels_last
    layout = dict(z=case.z.to(memory_format=cl), model_out=case.model_out.to(memory_format=cl),
                  uncond=case.uncond.to(memory_format=cl), history=[h.to(memory_format=cl) for h in case.history],
                  noise=None if case.noise is None else case.noise.to(memory_format=cl))
    return case, layout


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("noise", ["none", "tensor"])
def test_alloc_keeps_a_channels_last_state(name, noise):
    """A channels_last state (a ``unet.to(memory_format=torch.channels_last)`` pipeline) with inputs in its layout is
    stepped in place in that order: outputs come back channels_last, as diffusers' torch ops return them, with the
    bits of the row-major step, and the extension's kernel copies nothing (row-major outputs cost a copy of every
    input per step; the reference and Triton's interpreter copy for casts of their own, so only it is counted)."""
    backend = _backend(name)
    case, cl = _channels_last_case(noise)
    want, _, want_mi = _alloc(backend, case, want_x=True, model_in_dtype=torch.bfloat16, model_in_double=True)
    kw = dict(seeds=case.seeds, noise=cl["noise"], clip=case.clip, use_noise=case.use_noise, want_x=True,
              model_in_dtype=torch.bfloat16, model_in_double=True)
    with _CountCopies(case.z.numel()) as copies:
        out, x, model_in = backend.fused_step_alloc(cl["z"], cl["model_out"], cl["uncond"], cl["history"], case.table,
                                                    case.step, **kw)
    assert copies.count == 0 or name != "cuda"
    for t in (out, x, model_in):
        assert t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    assert torch.equal(out, want) and torch.equal(model_in, want_mi)
    # A given out in that layout is written in place (no temporary); a guided doubled batch is split there too.
    given = torch.full_like(cl["z"], float("nan"))
    paired = torch.cat([case.uncond, case.model_out]).to(memory_format=torch.channels_last)
    with _CountCopies(case.z.numel()) as copies:
        got, _, _ = backend.fused_step_alloc(cl["z"], paired, None, cl["history"], case.table, case.step, out=given,
                                             paired=True, seeds=case.seeds, noise=cl["noise"], clip=case.clip,
                                             use_noise=case.use_noise)
    assert got is given and (copies.count == 0 or name != "cuda")
    assert torch.equal(given, want)


@pytest.mark.parametrize("name", ("torch", "cuda"))  # Triton's direct form takes row-major tensors only
def test_fused_step_writes_channels_last_outputs_in_place(name):
    """The direct form into outputs in the state's channels_last layout (a doubled model input too) writes them with
    the bits of the row-major step; the extension's entry copies nothing for it."""
    backend = _backend(name)
    case, cl = _channels_last_case("tensor")
    want, want_x, want_mi = _alloc(backend, case, want_x=True, model_in_dtype=torch.bfloat16, model_in_double=True)
    fmt = torch.channels_last
    out, x = torch.empty_like(cl["z"]), torch.empty_like(cl["z"])
    mi = torch.empty((4, *case.z.shape[1:]), dtype=torch.bfloat16).to(memory_format=fmt)
    with _CountCopies(case.z.numel()) as copies:
        backend.fused_step(cl["z"], out, cl["model_out"], cl["uncond"], cl["history"], case.table, case.step,
                           noise=cl["noise"], x_out=x, model_in_out=mi, clip=case.clip, use_noise=True)
    assert copies.count == 0 or name != "cuda"
    assert torch.equal(out, want) and torch.equal(x, want_x) and torch.equal(mi, want_mi)


@pytest.mark.parametrize("name", BACKENDS)
def test_alloc_steps_a_drawing_stage_row_major(name):
    """A stage that draws its noise in the kernel keys it by the row-major index: a channels_last state is stepped
    row-major there (the same noise as a row-major state's), and its outputs come back row-major."""
    backend = _backend(name)
    case, cl = _channels_last_case("philox")
    want = case.run(REF)["out"]
    out, _, _ = backend.fused_step_alloc(cl["z"], cl["model_out"], cl["uncond"], cl["history"], case.table, case.step,
                                         seeds=case.seeds, use_noise=True)
    assert out.is_contiguous()
    torch.testing.assert_close(out, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", BACKENDS)
def test_alloc_mixed_layouts_follow_the_state(name):
    """Inputs in another layout than the state's are copied once into the state's, whose layout the outputs take
    (diffusers' ``sample + c * model_output`` does the same); a shape error is still named in the caller's order."""
    backend = _backend(name)
    case, cl = _channels_last_case("none")
    want = case.run(REF)["out"]
    for z, o in ((cl["z"], case.model_out), (case.z, cl["model_out"])):
        out, _, _ = backend.fused_step_alloc(z, o, case.uncond, case.history, case.table, case.step)
        assert out.stride() == z.stride()
        torch.testing.assert_close(out, want, rtol=2e-5, atol=2e-5)
    sliced = cl["z"][:, :, :2]  # channels_last, not dense: stepped row-major
    got, _, _ = backend.fused_step_alloc(sliced, case.model_out[:, :, :2], None, [], case.table, case.step)
    assert got.is_contiguous()
    with pytest.raises(ValueError, match=r"[(\[]2, 4, 3, 4[)\]]"):
        backend.fused_step_alloc(cl["z"], case.model_out[..., :4], None, [], case.table, case.step)


@pytest.mark.parametrize("name", BACKENDS)
def test_alloc_given_out_in_another_layout(name):
    """A given ``out`` that is not row-major (channels_last, a transposed view, the state itself in that layout) is
    written by value on every backend (Triton refused it, while the other two wrote it)."""
    backend = _backend(name)
    case = make_case((2, 4, 3, 5), torch.float32, torch.float32, guided=False, hist=0, noise="none", seed=4,
                     device=str(_device()))
    want = case.run(REF)["out"]
    for out in (torch.empty_like(case.z, memory_format=torch.channels_last),
                torch.empty(case.z.shape[::-1], device=case.z.device).permute(3, 2, 1, 0)):
        got, _, _ = backend.fused_step_alloc(case.z, case.model_out, None, [], case.table, case.step, out=out)
        assert got is out
        torch.testing.assert_close(out, want, rtol=2e-5, atol=2e-5)
    z = case.z.to(memory_format=torch.channels_last)
    got, _, _ = backend.fused_step_alloc(z, case.model_out, None, [], case.table, case.step, out=z)
    assert got is z
    torch.testing.assert_close(z, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", BACKENDS)
def test_alloc_rejects_a_bad_model_input_shape(name):
    """The allocating form checks what it is given like ``fused_step`` (a shape mismatch names the tensor)."""
    backend = _backend(name)
    case = make_case(SHAPE, torch.float32, torch.float32, guided=False, hist=0, noise="none", seed=5,
                     device=str(_device()))
    with pytest.raises(ValueError, match="model output"):
        backend.fused_step_alloc(case.z, case.model_out[:, :4], None, [], case.table, case.step)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ("cuda", "triton"))
@pytest.mark.parametrize("noise", ["none", "philox"])
def test_alloc_on_gpu_realistic_size(name, noise):
    """The allocating form on a CUDA device at a latent-sized state with an odd sample size, against the reference."""
    backend = get_backend(name)
    reason = backend.availability() or backend.supports(torch.device("cuda"))
    if reason is not None:
        pytest.skip(f"{name} backend: {reason}")
    case = make_case((3, 16, 61, 67), torch.float32, torch.bfloat16, guided=True, hist=2, noise=noise,
                     x_dtype=torch.float32, mi="dup-bf16", seed=21, device="cuda")
    want = case.run(REF)
    out, x, model_in = _alloc(backend, case, want_x=True, model_in_dtype=torch.bfloat16, model_in_double=True)
    assert out.device.type == "cuda" and model_in.shape[0] == 6
    assert_matches({"out": out, "x": x, "mi": model_in}, want, tol=TRITON_TOL if name == "triton" else EXTENSION_TOL)


@pytest.mark.parametrize("name", BACKENDS)
def test_alloc_paired_model_output(name):
    """A guided model's doubled batch (uncond first) is split by the backend: the same bits as the two halves given
    apart, and a batch that is not 2B, or a separate uncond beside it, is refused."""
    backend = _backend(name)
    case = make_case(SHAPE, torch.float32, torch.bfloat16, guided=True, hist=1, noise="philox", x_dtype=torch.float32,
                     mi="dup-bf16", seed=13, device=str(_device()))
    pair = torch.cat([case.uncond, case.model_out])
    kw = dict(want_x=True, model_in_dtype=torch.bfloat16, model_in_double=True, seeds=case.seeds, use_noise=True)
    apart = backend.fused_step_alloc(case.z, case.model_out, case.uncond, case.history, case.table, case.step, **kw)
    strided = pair.transpose(1, 2).contiguous().transpose(1, 2)  # same values, not contiguous
    for given in (pair, strided):
        whole = backend.fused_step_alloc(case.z, given, None, case.history, case.table, case.step, paired=True, **kw)
        for a, b in zip(apart, whole, strict=True):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="paired"):
        backend.fused_step_alloc(case.z, pair[:-1], None, case.history, case.table, case.step, paired=True, **kw)
    with pytest.raises(ValueError, match="paired"):
        backend.fused_step_alloc(case.z, pair, case.uncond, case.history, case.table, case.step, paired=True, **kw)


@pytest.mark.parametrize("name", BACKENDS)
def test_alloc_x_dtype(name):
    """x_hat is made in ``x_dtype`` when given (a half state's float32 prediction): the same bits as
    ``fused_step`` into a float32 x_hat buffer."""
    backend = _backend(name)
    case = make_case(SHAPE, torch.bfloat16, torch.bfloat16, guided=False, hist=1, noise="tensor", seed=17,
                     device=str(_device()))
    out, x, _ = _alloc(backend, case, want_x=True, x_dtype=torch.float32)
    assert x.dtype == torch.float32 and out.dtype == torch.bfloat16
    want_out, want_x = torch.empty_like(case.z), torch.empty(case.z.shape, dtype=torch.float32, device=case.z.device)
    backend.fused_step(case.z, want_out, case.model_out, None, case.history, case.table, case.step,
                       noise=case.noise, x_out=want_x, use_noise=case.use_noise)
    assert torch.equal(out, want_out) and torch.equal(x, want_x)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("step_on_device", [False, True], ids=["int-step", "tensor-step"])
def test_alloc_entry_equals_fused_step_alloc(name, step_on_device):
    """The per-step entry of the front ends (``alloc_entry``, positional; the C++ backend's is its binding) gives
    ``fused_step_alloc``'s bits, with the step an int or a device tensor and dtypes given as torch dtypes."""
    backend = _backend(name)
    case = make_case(SHAPE, torch.bfloat16, torch.bfloat16, guided=True, hist=1, noise="philox", mi="dup-bf16",
                     seed=19, device=str(_device()))
    step = torch.tensor([case.step], device=case.z.device) if step_on_device else case.step
    want = backend.fused_step_alloc(
        case.z, case.model_out, case.uncond, list(case.history), case.table, step, seeds=case.seeds, want_x=True,
        x_dtype=torch.float32, model_in_dtype=torch.float16, model_in_double=True, clip=1.5, use_noise=True,
    )
    entry = backend.alloc_entry()
    got = entry(case.z, None, case.model_out, case.uncond, list(case.history), case.table, step, case.seeds, None,
                True, torch.float32, torch.float16, True, 1.5, True, False)
    assert [t.dtype for t in got] == [torch.bfloat16, torch.float32, torch.float16]
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    if name == "cuda":  # no Python frame between a front end and the extension
        from fastflow.backends import cuda as cuda_mod

        assert entry is cuda_mod._STATE["alloc"]


@pytest.mark.parametrize("name", BACKENDS)
def test_alloc_outputs_are_like_torch_empty(name):
    """Outputs made by the allocating form are what torch.empty makes: inference tensors under
    torch.inference_mode, ordinary ones (no grad) outside it."""
    backend = _backend(name)
    case = make_case(SHAPE, torch.float32, torch.float32, guided=False, hist=0, noise="none", seed=23,
                     device=str(_device()))
    for inference in (False, True):
        with torch.inference_mode(inference):
            outs = _alloc(backend, case, want_x=True, model_in_dtype=torch.bfloat16)
        for t in outs:
            assert t.is_inference() is inference and not t.requires_grad


@pytest.mark.parametrize("name", BACKENDS)
def test_alloc_refuses_out_overlapping_an_input_in_part(name):
    """A given ``out`` one element off an input (the state, the model output, a history tensor) is refused: the
    kernels write block by block (the extension's CPU kernel returned wrong values). The very same tensor, or
    exactly the conditional half of a paired output, is read before it is written, so it stays allowed."""
    backend = _backend(name)
    n = 1031  # several blocks per sample
    case = make_case((2, n), torch.float32, torch.float32, guided=False, hist=1, noise="none", seed=29,
                     device=str(_device()))
    want = case.run(REF)["out"]
    args = [case.z, case.model_out, None, list(case.history), case.table, case.step]
    for slot, what in ((0, "the state"), (1, "the model output"), (3, "history tensor")):
        buf = torch.zeros(2 * n + 1, device=case.z.device)
        buf[:-1] = (args[slot][0] if slot == 3 else args[slot]).flatten()
        shifted = list(args)
        shifted[slot] = [buf[:-1].view(2, n)] if slot == 3 else buf[:-1].view(2, n)
        with pytest.raises(ValueError, match=f"overlaps {what}.* in part|overlaps a {what}.* in part"):
            backend.fused_step_alloc(*shifted, out=buf[1:].view(2, n))
    same = case.model_out.clone()
    out, _, _ = backend.fused_step_alloc(case.z, same, None, list(case.history), case.table, case.step, out=same)
    assert out is same
    torch.testing.assert_close(same, want, rtol=2e-5, atol=2e-5)
    guided = make_case((2, n), torch.float32, torch.float32, guided=True, hist=0, noise="none", seed=31,
                       device=str(_device()))
    want = guided.run(REF)["out"]
    pair = torch.cat([guided.uncond, guided.model_out])
    out, _, _ = backend.fused_step_alloc(guided.z, pair, None, [], guided.table, guided.step, paired=True, out=pair[2:])
    torch.testing.assert_close(out, want, rtol=2e-5, atol=2e-5)
    pair = torch.cat([guided.uncond, guided.model_out])
    with pytest.raises(ValueError, match="in part"):
        backend.fused_step_alloc(guided.z, pair, None, [], guided.table, guided.step, paired=True, out=pair[1:3])


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.complex64], ids=str)
def test_alloc_refuses_a_model_input_dtype_no_kernel_writes(name, dtype):
    """An int, bool or complex model input was a silent cast on the torch backend; every backend raises a TypeError
    naming the float dtypes, the allocating form and ``fused_step`` into a given buffer alike."""
    backend = _backend(name)
    case = make_case(SHAPE, torch.float32, torch.float32, guided=False, hist=0, noise="none", seed=37,
                     device=str(_device()))
    with pytest.raises(TypeError, match="float32, float16, bfloat16 or float64"):
        _alloc(backend, case, model_in_dtype=dtype)
    with pytest.raises(TypeError, match="float32, float16, bfloat16 or float64"):
        backend.fused_step(case.z, torch.empty_like(case.z), case.model_out, None, [], case.table, case.step,
                           model_in_out=torch.zeros(case.z.shape, dtype=dtype, device=case.z.device))


def test_triton_table_error_names_the_dtypes_it_takes():
    """Float64 tables are taken (rounded once, as the reference's row), so the error names both dtypes."""
    backend = _backend("triton")
    case = make_case(SHAPE, torch.float32, torch.float32, guided=False, hist=0, noise="none", seed=41,
                     device=str(_device()))
    with pytest.raises(TypeError, match="float32 or float64"):
        backend.fused_step(case.z, torch.empty_like(case.z), case.model_out, None, [], case.table.half(), case.step)
    out = torch.empty_like(case.z)
    backend.fused_step(case.z, out, case.model_out, None, [], case.table.double(), case.step)
    torch.testing.assert_close(out, case.run(REF)["out"], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", BACKENDS)
def test_outputs_never_require_grad(name):
    """A step is an inference op on every backend: inputs that require grad give outputs that do not (the
    reference used to record a graph the kernels do not), and an ``out`` that is a leaf requiring grad is written
    as the kernels write it."""
    backend = _backend(name)
    case = make_case(SHAPE, torch.float32, torch.float32, guided=True, hist=1, noise="none", seed=5,
                     device=str(_device()))
    want = case.run(REF)["out"]
    model_out = case.model_out.clone().requires_grad_()
    z = case.z.clone().requires_grad_()
    out, x, model_in = backend.fused_step_alloc(
        z, model_out, case.uncond, list(case.history), case.table, case.step, want_x=True,
        model_in_dtype=torch.float32,
    )
    assert not (out.requires_grad or x.requires_grad or model_in.requires_grad)
    torch.testing.assert_close(out, want, rtol=2e-5, atol=2e-5)
    leaf = torch.zeros_like(case.z, requires_grad=True)
    backend.fused_step_alloc(z, model_out, case.uncond, list(case.history), case.table, case.step, out=leaf)
    torch.testing.assert_close(leaf.detach(), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", ("torch", "cuda"))
def test_channels_last_direct_form_names_a_model_input_of_another_batch(name):
    """A model input output of another batch than B or 2B, with a channels_last state, is refused naming its shape
    in the caller's order (the extension's entry viewed it in the state's order first and named [3, 3, 5, 4])."""
    backend = _backend(name)
    case, cl = _channels_last_case("none")
    mi = torch.empty((3, *case.z.shape[1:])).to(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match=r"[(\[]3, 4, 3, 5[)\]].*sample shape [(\[]4, 3, 5[)\]]"):
        backend.fused_step(cl["z"], torch.empty_like(cl["z"]), cl["model_out"], cl["uncond"], cl["history"],
                           case.table, case.step, model_in_out=mi)


@pytest.mark.parametrize("name", BACKENDS)
def test_alloc_takes_seeds_and_a_table_in_any_layout(name):
    """A caller's seed tensor (``Sampler.step(seed=...)``) or table may be a strided view: read by value on every
    backend (Triton's allocating form had refused both with a ValueError the others do not raise)."""
    backend = _backend(name)
    case = make_case(SHAPE, torch.float32, torch.float32, guided=False, hist=1, noise="philox", seed=5,
                     device=str(_device()))
    want = case.run(REF)["out"]
    seeds = torch.stack([case.seeds, case.seeds], 1)[:, 1]  # same values, stride 2
    table = case.table.t().contiguous().t()  # same values, column-major
    assert not seeds.is_contiguous() and not table.is_contiguous()
    out, _, _ = backend.fused_step_alloc(case.z, case.model_out, None, list(case.history), table, case.step,
                                         seeds=seeds, use_noise=True)
    rtol, atol = (TRITON_TOL if name == "triton" else EXTENSION_TOL)[torch.float32]
    torch.testing.assert_close(out, want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", BACKENDS)
def test_alloc_refuses_a_0d_state_with_a_paired_output_alike(name):
    """A 0-d state has no batch to pair: a ValueError on every backend (the Python allocating form had raised an
    IndexError from its batch arithmetic where the C++ entry says why)."""
    z = torch.zeros((), device=_device())
    table = torch.zeros(2, NUM_COEFS, device=_device())
    with pytest.raises(ValueError, match="batch dimension"):
        _backend(name).fused_step_alloc(z, torch.zeros(2, device=_device()), None, [], table, 0, paired=True)
