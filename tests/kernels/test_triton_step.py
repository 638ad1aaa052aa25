"""The Triton fused step against the torch reference.

On the CPU these run under ``TRITON_INTERPRET=1`` (set by ``tests/conftest.py``), so
sizes stay tiny; the ``gpu`` tests repeat the matrix at realistic sizes and check
CUDA-graph capture and the absence of host syncs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import noise_f32
import numpy as np
import pytest
import torch
from backends import step_cases
from backends.step_cases import DTYPES, NOISE_MODES, REF, TRITON_TOL, Case, step_matrix

from fastflow import noise as noise_spec
from fastflow.backends import get_backend, resolve_backend
from fastflow.backends.triton import TritonBackend, _load_kernels
from fastflow.plan import AO, AZ, CIN, CN, CX, CZ, H0, NUM_COEFS, W

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
_K = _load_kernels()
philox4x32 = _K.philox4x32
philox_normals = _K.philox_normals
cos_sin_pi = _K.cos_sin_pi


def _dev() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


make_case = partial(step_cases.make_case, device=_dev())
matrix_case = partial(step_cases.matrix_case, device=_dev())
# Compared within TRITON_TOL; the matrix asks for bit equality where the kernel draws no noise (it rounds each
# mul and add as the reference does; its drawn normals are float32, within 1e-6 of the float64 spec).
assert_matches = partial(step_cases.assert_matches, tol=TRITON_TOL)


@pytest.fixture(scope="module")
def tb() -> TritonBackend:
    backend = get_backend("triton")
    reason = backend.availability()
    if reason is not None:
        pytest.skip(reason)
    return backend


# --------------------------------------------------------------------------- matrix


@step_matrix
def test_matrix_tiny(tb, zdt, odt, guided, clip, hist, noise):
    """Full product of dtype pair, guidance, clip, history depth and noise mode on a 2 x 105 state.

    The secondary options (x_hat output, model-input output and its dtype/duplication,
    step as int or int32/int64 device tensor) rotate with the case so each is
    exercised against every primary option without multiplying the product.
    """
    case = matrix_case((2, 3, 5, 7), zdt, odt, guided, clip, hist, noise)
    assert_matches(case.run(tb), case.run(REF), exact=noise != "philox")


@pytest.mark.parametrize("block", [8, 64, None])
@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (3, 4), (2, 5), (2, 130), (2, 3, 7, 11), (1, 517)], ids=str)
def test_odd_sizes_and_blocks(tb, shape, block):
    """Tails, samples not a multiple of 4, and several programs per sample (noise groups must align)."""
    for zdt, odt in ((torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16)):
        case = make_case(shape, zdt, odt, hist=2, clip=True, x_dtype=torch.float32, mi="dup-bf16", seed=len(shape))
        assert_matches(case.run(tb, block=block), case.run(REF))


@pytest.mark.parametrize("zdt", DTYPES, ids=str)
def test_in_place(tb, zdt):
    """``out`` is ``z`` and ``x_out`` is the history tensor it reads: loads precede stores per element."""

    def case() -> Case:
        return make_case(
            (3, 2, 45),
            zdt,
            torch.bfloat16,
            hist=2,
            clip=True,
            noise="philox",
            mi="same",
            x_dtype=zdt,
            seed=7,
            hist_dtypes=(zdt, torch.float32),
        )

    want = case().run(REF)
    c = case()
    z, x = c.z, c.history[0]  # x_hat overwrites the buffer it reads as h0
    mi = torch.empty_like(z)
    c.call(tb, z, z, x_out=x, model_in_out=mi, block=32)
    assert_matches({"out": z, "x": x, "mi": mi}, want)


def test_float64_inputs_and_table(tb):
    """History, model output and explicit noise may be float64; the table may be float64."""
    case = make_case(
        (2, 33),
        torch.float32,
        torch.float64,
        hist=3,
        noise="tensor",
        x_dtype=torch.float64,
        hist_dtypes=(torch.float64,),
        seed=3,
    )
    case.table = case.table.double()
    assert_matches(case.run(tb), case.run(REF))


def test_step_tensor_equals_int(tb):
    base = make_case((2, 70), torch.float32, torch.float32, hist=1, noise="philox", mi="dup-bf16", seed=11)
    got = []
    for step in (3, torch.tensor([3], device=base.z.device), torch.tensor(3, dtype=torch.int32, device=base.z.device)):
        base.step = step
        got.append(base.run(tb))
    for other in got[1:]:
        for key in got[0]:
            assert torch.equal(got[0][key], other[key])


def test_guidance_from_one_doubled_batch(tb):
    """cond/uncond may be the two halves (views) of one 2B model output; the model input may be doubled."""
    case = make_case((3, 4, 9), torch.bfloat16, torch.bfloat16, hist=1, noise="philox", mi="dup-bf16", seed=9)
    want = case.run(REF)
    both = torch.cat([case.uncond, case.model_out])
    case.uncond, case.model_out = both.chunk(2)
    assert_matches(case.run(tb, block=16), want)


def test_unused_coefficients_ignored(tb):
    """Columns of absent inputs (H1, H2 without history, CN without noise) do not leak into the result."""
    case = make_case((1, 40), torch.float32, torch.float32, guided=False, hist=0, noise="none", seed=5)
    want = case.run(REF)
    case.table[:, W] = float("nan")  # guidance off: W unused
    case.table[:, H0 : CN + 1] = float("nan")
    case.table[:, CIN] = float("nan")
    assert_matches(case.run(tb), want)


# --------------------------------------------------------------------------- noise


@pytest.mark.parametrize("step", [0, 1, 7, 2**31 + 5])
def test_noise_kernel_matches_spec(tb, step):
    """The kernel's noise equals the float64 spec to 1e-6 (relative above 1) for awkward seeds."""
    seeds = torch.tensor([0, 1, 2**63 - 1, -(2**63), 0x0123456789ABCDEF, -17], dtype=torch.int64, device=_dev())
    shape = (5, 411)  # 2055 elements per sample: the last group is partial
    got = tb.noise(seeds, shape, step=step).double()
    want = noise_spec.normal(seeds, shape, step=step, dtype=torch.float64)
    err = (got - want).abs() / want.abs().clamp(min=1.0)
    assert err.max().item() <= 1e-6, err.max().item()


def test_noise_many_normals(tb):
    """65536 normals per sample (the tails of the radius included) stay within 1e-6 of the spec."""
    seeds = torch.tensor([12345, -99], dtype=torch.int64, device=_dev())
    got = torch.empty(2, 65536, device=_dev())
    _K.launch_noise(got, seeds, 3, block=16384)
    want = noise_spec.normal(seeds, (65536,), step=3, dtype=torch.float64)
    err = (got.double() - want).abs() / want.abs().clamp(min=1.0)
    assert err.max().item() <= 1e-6, err.max().item()
    assert abs(got.mean().item()) < 0.02 and abs(got.std().item() - 1) < 0.02


def test_step_noise_equals_spec(tb):
    """The noise the step itself adds (CZ = CX = 0, CN = 1) is the spec's, for int and device steps."""
    b, n = 3, 301
    seeds = torch.tensor([5, 2**40 + 3, -1], dtype=torch.int64, device=_dev())
    table = torch.zeros(9, NUM_COEFS, device=_dev())
    table[:, CN] = 1.0
    want = noise_spec.normal(seeds, (n,), step=8, dtype=torch.float64)
    z = torch.randn(b, n, device=_dev())
    for step in (8, torch.tensor([8], device=_dev())):
        out = torch.empty_like(z)
        tb.fused_step(z, out, z, None, [], table, step, seeds=seeds, use_noise=True, block=64)
        err = (out.double() - want).abs() / want.abs().clamp(min=1.0)
        assert err.max().item() <= 1e-6


def test_batch_independence(tb):
    """A sample's result is the same alone and at any position inside a batch of four."""
    shape = (2, 9, 13)
    g = torch.Generator().manual_seed(1)
    full = {k: torch.randn(4, *shape, generator=g).to(_dev()) for k in ("z", "o", "u", "h0", "h1")}
    seeds = torch.tensor([101, 202, 303, 404], dtype=torch.int64, device=_dev())
    table = (torch.randn(4, NUM_COEFS, generator=g)).to(_dev())

    def run(idx: list[int]) -> tuple[torch.Tensor, ...]:
        sel = {k: v[idx].contiguous() for k, v in full.items()}
        out = torch.empty_like(sel["z"])
        x = torch.empty_like(sel["z"])
        mi = torch.empty(2 * len(idx), *shape, dtype=torch.bfloat16, device=_dev())
        tb.fused_step(
            sel["z"],
            out,
            sel["o"],
            sel["u"],
            [sel["h0"], sel["h1"]],
            table,
            2,
            seeds=seeds[idx].contiguous(),
            x_out=x,
            model_in_out=mi,
            clip=1.0,
            use_noise=True,
            block=64,
        )
        return out, x, mi

    alone = run([2])
    batch = run([0, 1, 2, 3])
    moved = run([3, 2, 1, 0])
    for a, bt, mv, key in zip(alone, batch, moved, ("out", "x", "mi"), strict=True):
        if key == "mi":  # both halves of the duplicated model input
            assert torch.equal(a[0], bt[2]) and torch.equal(a[1], bt[6]) and torch.equal(a[0], mv[5])
        else:
            assert torch.equal(a[0], bt[2]) and torch.equal(a[0], mv[1]), key


def test_threads_step_at_once(tb):
    """Threads stepping their own states at once (a server's pool) get what each gets alone, noise draws too. Triton's
    interpreter, which runs these on the CPU, keeps a launch's state process-wide: there the backend launches one at
    a time (unserialized, most of the threads failed with an InterpreterError)."""
    import threading

    n = 4
    g = torch.Generator().manual_seed(5)
    cases = [{k: torch.randn(2, 3, 40, generator=g).to(_dev()) for k in ("z", "o", "h0")} for _ in range(n)]
    seeds = torch.tensor([11, 12], dtype=torch.int64, device=_dev())
    table = torch.randn(3, NUM_COEFS, generator=g).to(_dev())

    def run(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        c = cases[k]
        out = torch.empty_like(c["z"])
        tb.fused_step(c["z"], out, c["o"], None, [c["h0"]], table, 1, seeds=seeds + k, use_noise=True, block=64)
        return out, tb.noise(seeds + k, (3, 40), step=k)

    alone = [run(k) for k in range(n)]
    got: list[object] = [None] * n
    barrier = threading.Barrier(n)

    def worker(k: int) -> None:
        barrier.wait()
        try:
            got[k] = run(k)
        except Exception as exc:  # noqa: BLE001 - the assertion below shows it
            got[k] = exc

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(n):
        assert isinstance(got[k], tuple), got[k]
        assert all(torch.equal(a, b) for a, b in zip(got[k], alone[k], strict=True)), k


@triton.jit
def _philox_probe(c_ptr, out_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    c0 = tl.load(c_ptr + i * 6 + 0).to(tl.uint32)
    c1 = tl.load(c_ptr + i * 6 + 1).to(tl.uint32)
    c2 = tl.load(c_ptr + i * 6 + 2).to(tl.uint32)
    c3 = tl.load(c_ptr + i * 6 + 3).to(tl.uint32)
    k0 = tl.load(c_ptr + i * 6 + 4).to(tl.uint32)
    k1 = tl.load(c_ptr + i * 6 + 5).to(tl.uint32)
    x0, x1, x2, x3 = philox4x32(c0, c1, c2, c3, k0, k1)
    tl.store(out_ptr + i * 4 + 0, x0.to(tl.int64))
    tl.store(out_ptr + i * 4 + 1, x1.to(tl.int64))
    tl.store(out_ptr + i * 4 + 2, x2.to(tl.int64))
    tl.store(out_ptr + i * 4 + 3, x3.to(tl.int64))


@triton.jit
def _normals_probe(g_ptr, seed_ptr, out_ptr, step, N: tl.constexpr):
    i = tl.arange(0, N)
    g = tl.load(g_ptr + i)
    seed = tl.load(seed_ptr)
    n0, n1, n2, n3 = philox_normals(g, step, seed, 0)
    tl.store(out_ptr + i * 4 + 0, n0)
    tl.store(out_ptr + i * 4 + 1, n1)
    tl.store(out_ptr + i * 4 + 2, n2)
    tl.store(out_ptr + i * 4 + 3, n3)


def test_philox_words_bit_exact(tb):
    """The kernel's Philox equals the numpy statement of the spec bit for bit (all counter words and keys)."""
    rng = np.random.default_rng(0)
    words = rng.integers(0, 2**32, size=(64, 6), dtype=np.uint64)
    words[0] = 0
    words[1] = 2**32 - 1
    c = torch.from_numpy(words.astype(np.int64)).to(_dev())
    out = torch.empty(64, 4, dtype=torch.int64, device=_dev())
    _philox_probe[(1,)](c, out, N=64)
    want = noise_spec.philox4x32_numpy(*(words[:, j] for j in range(6)))
    got = out.cpu().numpy().astype(np.uint64)
    for j in range(4):
        np.testing.assert_array_equal(got[:, j], want[j].astype(np.uint64))


def test_group_counter_high_word(tb):
    """Groups past 2**32 (samples past 2**34 elements) put the high word in counter c1 as the spec says."""
    g = torch.tensor([0, 1, 2**32 - 1, 2**32, 2**32 + 5, 3 * 2**32 + 77, 2**40 + 2**33 + 1, 12345] * 4, device=_dev())
    seed = torch.tensor([-(2**50) + 3], dtype=torch.int64, device=_dev())
    out = torch.empty(g.numel(), 4, device=_dev())
    _normals_probe[(1,)](g, seed, out, 9, N=g.numel())
    m = 0xFFFFFFFF
    gv = g.cpu()
    words = noise_spec.philox4x32_torch(
        gv & m, gv >> 32, torch.full_like(gv, 9), torch.zeros_like(gv), seed.cpu() & m, (seed.cpu() >> 32) & m
    )
    want = torch.stack(noise_spec.words_to_normals(*words), dim=-1)
    err = (out.cpu().double() - want).abs() / want.abs().clamp(min=1.0)
    assert err.max().item() <= 1e-6


@triton.jit
def _angle_probe(v_ptr, cos_ptr, sin_ptr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    c, s = cos_sin_pi(tl.load(v_ptr + i))
    tl.store(cos_ptr + i, c)
    tl.store(sin_ptr + i, s)


@triton.jit
def _fma_probe(a_ptr, out_ptr):
    a = tl.load(a_ptr)
    tl.store(out_ptr, tl.fma(a, a, -(a + a - 1.0)))


def fma_rounds_once() -> bool:
    """Whether ``tl.fma`` rounds once here. The interpreter of Triton 3.2, 3.4 and 3.8 (torch 2.6's, 2.8's and
    2.14's) multiplies and then adds, rounding twice: (1 + 2**-12)**2 - (1 + 2**-11) is then 0, not 2**-24. A GPU's
    fma rounds once, as Triton 3.9's interpreter does."""
    a = torch.tensor([1 + 2.0**-12], device=_dev())
    out = torch.empty_like(a)
    _fma_probe[(1,)](a, out)
    return out.item() == 2.0**-24


def test_angle_part_bit_exact_over_every_angle(tb):
    """The kernel's float32 cos/sin(pi v) equals the numpy statement of fastflow.noise's evaluation bit for
    bit, for all 2**23 angles a Philox word gives (the CUDA kernel is held to the same statement). Where the
    interpreter rounds ``tl.fma`` twice, its bits are that statement's with each fma rounded twice (an ulp away on
    4.6% of the angles), and the test holds it to those."""
    fused = fma_rounds_once()
    v = noise_f32.all_angles()
    block = 1 << 16
    vt = torch.from_numpy(v).to(_dev())
    got_cos, got_sin = torch.empty_like(vt), torch.empty_like(vt)
    _angle_probe[(v.size // block,)](vt, got_cos, got_sin, BLOCK=block, **_K.COMPILE_OPTIONS)
    want_cos, want_sin = noise_f32.cos_sin_pi(v, fused=fused)
    np.testing.assert_array_equal(got_cos.cpu().numpy().view(np.int32), want_cos.view(np.int32))
    np.testing.assert_array_equal(got_sin.cpu().numpy().view(np.int32), want_sin.view(np.int32))
    if not fused:  # the two statements differ: the probe chose between them
        assert not np.array_equal(want_cos, noise_f32.cos_sin_pi(v)[0])


# --------------------------------------------------------------------------- errors and dispatch


def _bad(tb, **over):
    case = make_case((2, 12), torch.float32, torch.float32, guided=False, hist=1, noise="none", seed=2)
    args = dict(
        z=case.z,
        out=torch.empty_like(case.z),
        model_out=case.model_out,
        model_out_uncond=None,
        history=case.history,
        table=case.table,
        step=1,
    )
    args.update(over)
    tb.fused_step(**args)


def test_errors(tb):
    z = torch.randn(2, 12, device=_dev())
    with pytest.raises(ValueError, match="shape"):
        _bad(tb, model_out=torch.randn(2, 13, device=_dev()))
    with pytest.raises(TypeError, match="dtype"):
        _bad(tb, out=torch.empty(2, 12, dtype=torch.float16, device=_dev()))
    with pytest.raises(TypeError, match="float64"):
        z64 = z.double()
        _bad(tb, z=z64, out=torch.empty_like(z64), model_out=z64, history=[])
    with pytest.raises(ValueError, match="contiguous"):
        zt = torch.randn(12, 2, device=_dev()).t()
        _bad(tb, z=zt, out=torch.empty(2, 12, device=_dev()), model_out=z, history=[])
    with pytest.raises(ValueError, match="contiguous"):
        _bad(tb, out=torch.empty(12, 2, device=_dev()).t())
    with pytest.raises(ValueError, match="contiguous"):
        _bad(tb, history=[torch.randn(2, 24, device=_dev())[:, ::2]])
    with pytest.raises(ValueError, match="seeds"):
        _bad(tb, use_noise=True)
    with pytest.raises(ValueError, match="seeds"):
        _bad(tb, use_noise=True, seeds=torch.tensor([1, 2], dtype=torch.int32, device=_dev()))
    with pytest.raises(IndexError, match="step"):
        _bad(tb, step=5)
    with pytest.raises(ValueError, match="step tensor"):
        _bad(tb, step=torch.tensor([1, 2], device=_dev()))
    with pytest.raises(TypeError, match="step tensor"):  # a dtype: a TypeError, as on the other backends
        _bad(tb, step=torch.tensor([1.0], device=_dev()))
    with pytest.raises(ValueError, match="table"):
        _bad(tb, table=torch.zeros(5, NUM_COEFS - 1, device=_dev()))
    with pytest.raises(TypeError, match="table"):  # as the C++ entry: a dtype is a TypeError
        _bad(tb, table=torch.zeros(5, NUM_COEFS, device=_dev(), dtype=torch.float16))
    with pytest.raises(ValueError, match="model input"):
        _bad(tb, model_in_out=torch.empty(3, 12, device=_dev()))
    with pytest.raises(ValueError, match="at most"):
        _bad(tb, history=[z, z, z, z])
    with pytest.raises(ValueError, match="block"):
        _bad(tb, block=48)


def test_empty_batch_is_a_no_op(tb):
    z = torch.empty(0, 3, 4, device=_dev())
    tb.fused_step(z, z, z, None, [], torch.zeros(2, NUM_COEFS, device=_dev()), 0)


def test_dispatch(tb, monkeypatch):
    assert tb.supports(torch.device("cuda")) is None
    assert "meta" in tb.supports(torch.device("meta"))
    assert isinstance(resolve_backend("triton", _dev()), TritonBackend)
    if not torch.cuda.is_available():
        assert tb.supports(torch.device("cpu")) is None  # the interpreter is on in CI
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert "TRITON_INTERPRET" in tb.supports(torch.device("cpu"))
        assert "TRITON_INTERPRET" in TritonBackend().availability()


def test_non_strict_export_is_refused_by_name():
    """torch.export's default tracing runs the step on fake tensors, which a Triton launch cannot take: it says so
    and names the backends that export, rather than failing on a data pointer inside Triton."""
    from fastflow import VP, Sampler

    sampler = Sampler(VP(), solver="ddim", prediction="eps", steps=4, backend="triton")
    sampler.prepare(_dev())

    class Step(torch.nn.Module):
        def forward(self, out, z):
            return sampler.step(out, z, 1)

    z = torch.randn(1, 4, 8, 8, device=_dev())
    with pytest.raises(RuntimeError, match="non-strict tracing.*backend='cuda'"):
        torch.export.export(Step(), (torch.randn_like(z), z), strict=False)
    assert torch.equal(Step()(z, z), sampler.step(z, z, 1))  # eager calls are untouched


def test_reports_missing_triton(monkeypatch):
    """Without Triton the backend says so instead of failing at import (``import fastflow`` never needs it)."""
    import fastflow.backends.triton as triton_backend

    real = triton_backend.importlib.util.find_spec
    monkeypatch.setattr(
        triton_backend.importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a)
    )
    reason = TritonBackend().availability()
    assert reason is not None and "not installed" in reason
    with pytest.raises(RuntimeError, match="not installed"):
        b = TritonBackend()
        z = torch.zeros(1, 4)
        b.fused_step(z, z, z, None, [], torch.zeros(1, NUM_COEFS), 0)


def test_a_triton_module_without_a_spec_reads_as_unavailable(monkeypatch):
    """A module named triton that import machinery cannot place (a stub in sys.modules, no ``__spec__``) makes the
    backend unavailable with the reason, as a missing one does; ``find_spec`` raised from dispatch."""
    import sys
    import types

    stub = types.ModuleType("triton")
    stub.__spec__ = None
    monkeypatch.setitem(sys.modules, "triton", stub)
    reason = TritonBackend().availability()
    assert reason is not None and "Triton cannot be found" in reason


# --------------------------------------------------------------------------- GPU

GPU_SHAPES = [(1, 16, 128, 128), (3, 4, 33, 65)]


@pytest.mark.gpu
@pytest.mark.parametrize("noise", NOISE_MODES)
@pytest.mark.parametrize("odt", DTYPES, ids=str)
@pytest.mark.parametrize("zdt", DTYPES, ids=str)
def test_gpu_matrix_realistic(tb, zdt, odt, noise):
    """Every dtype pair and noise mode at (1, 16, 128, 128), with every option on."""
    case = make_case(
        GPU_SHAPES[0],
        zdt,
        odt,
        hist=3,
        clip=True,
        noise=noise,
        x_dtype=zdt,
        mi="dup-bf16",
        step_kind="i64",
        seed=1,
        device="cuda",
    )
    assert_matches(case.run(tb), case.run(REF))


@pytest.mark.gpu
@pytest.mark.parametrize(
    "opts",
    [
        dict(guided=False, hist=0, clip=False, noise="none"),
        dict(guided=True, hist=1, clip=False, noise="philox", mi="same"),
        dict(guided=False, hist=2, clip=True, noise="tensor", x_dtype=torch.float32),
        dict(guided=True, hist=3, clip=True, noise="philox", x_dtype=torch.bfloat16, mi="dup-fp16", step_kind="i32"),
    ],
    ids=["plain", "cfg-h1-noise", "h2-clip-xi", "all"],
)
@pytest.mark.parametrize("shape", GPU_SHAPES + [(2, 1, 1, 4097), (5, 3)], ids=str)
@pytest.mark.parametrize("dts", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)], ids=str)
def test_gpu_options(tb, dts, shape, opts):
    case = make_case(shape, *dts, device="cuda", seed=4, **opts)
    want = case.run(REF)
    assert_matches(case.run(tb), want)
    assert_matches(case.run(tb, in_place=True), want)


@pytest.mark.gpu
def test_gpu_noise_matches_spec(tb):
    seeds = torch.tensor([0, 7, -(2**63), 2**63 - 1], dtype=torch.int64, device="cuda")
    got = tb.noise(seeds, (16, 128, 128), step=11).double()
    want = noise_spec.normal(seeds, (16, 128, 128), step=11, dtype=torch.float64)
    err = (got - want).abs() / want.abs().clamp(min=1.0)
    assert err.max().item() <= 1e-6, err.max().item()


@pytest.mark.gpu
def test_gpu_past_2_31_elements(tb):
    """One sample of 2**31 + 4100 elements: int64 offsets, and the noise counter of a large group index."""
    n = 2**31 + 4100
    free, _ = torch.cuda.mem_get_info()
    if free < n * 7 + 2**30:
        pytest.skip("needs about 16 GB of free GPU memory")
    z = torch.empty(1, n, device="cuda").uniform_(-1, 1)
    o = torch.empty(1, n, device="cuda", dtype=torch.bfloat16).uniform_(-1, 1)
    table = torch.tensor([[1.0, 0.5, 0.25, 0.75, 0.5, 0, 0, 0, 0.3, 1.0]], device="cuda")
    seeds = torch.tensor([2**33 + 9], dtype=torch.int64, device="cuda")
    spans = [slice(0, 4096), slice(2**31 - 2048, 2**31 + 2048), slice(n - 4100, n)]
    before = [(z[0, s].clone(), o[0, s].float()) for s in spans]
    tb.fused_step(z, z, o, None, [], table, 0, seeds=seeds, use_noise=True)
    m = 0xFFFFFFFF
    for s, (zs, os_) in zip(spans, before, strict=True):
        g = torch.arange(s.start // 4, (s.stop + 3) // 4, device="cuda", dtype=torch.int64)
        words = noise_spec.philox4x32_torch(
            g & m, g >> 32, torch.zeros_like(g), torch.zeros_like(g), seeds & m, (seeds >> 32) & m
        )
        xi = torch.stack(noise_spec.words_to_normals(*words), -1).reshape(-1)[: s.stop - s.start].float()
        x = 0.5 * zs + 0.25 * os_
        want = 0.75 * zs + 0.5 * x + 0.3 * xi
        torch.testing.assert_close(z[0, s], want, rtol=1e-5, atol=1e-5)
    del z, o
    torch.cuda.empty_cache()


@pytest.mark.gpu
def test_gpu_one_launch_per_step(tb):
    """A whole stage (guidance, history, noise, x_hat, doubled model input) is one kernel on the device."""
    case = make_case(
        GPU_SHAPES[0],
        torch.float32,
        torch.bfloat16,
        hist=2,
        clip=True,
        x_dtype=torch.float32,
        mi="dup-bf16",
        step_kind="i64",
        device="cuda",
    )
    z, out = case.z, torch.empty_like(case.z)
    x = torch.empty_like(z)
    mi = torch.empty(2 * z.shape[0], *z.shape[1:], dtype=torch.bfloat16, device="cuda")

    def step() -> None:
        case.call(tb, z, out, x_out=x, model_in_out=mi)

    step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if not kernels:
        pytest.skip("the profiler recorded no device activity here")
    names = [e.name for e in kernels]
    assert len(names) == 1 and "fused_step_kernel" in names[0], names


class _TinyModel(torch.nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(ch, 16, 3, padding=1)
        self.b = torch.nn.Conv2d(16, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.nn.functional.silu(self.a(x)))


def _loop_table(stages: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    t = torch.zeros(stages, NUM_COEFS)
    t[:, W] = 3.0
    t[:, AZ] = 1.0
    t[:, AO] = -0.2
    t[:, CZ] = 0.8 + 0.05 * torch.rand(stages, generator=g)
    t[:, CX] = 0.15
    t[:, H0] = 0.05
    t[:, CN] = 0.1
    t[:, CIN] = 0.9
    return t.cuda()


def _run_loop(tb, model, z, hist, mi, table, seeds, step_t, stages):
    """A CFG sampling loop: model on the duplicated input, then one fused step (x_hat kept as h0)."""
    b = z.shape[0]
    for i in range(stages):
        out = model(mi)
        step = i if step_t is None else step_t
        tb.fused_step(
            z,
            z,
            out[:b],
            out[b:],
            [hist],
            table,
            step,
            seeds=seeds,
            x_out=hist,
            model_in_out=mi,
            clip=2.0,
            use_noise=True,
        )
        if step_t is not None:
            step_t.add_(1)


@pytest.mark.gpu
def test_gpu_graph_capture_matches_eager(tb):
    torch.manual_seed(0)
    stages, b, shape = 20, 2, (4, 32, 32)
    model = _TinyModel(4).cuda().to(torch.bfloat16)
    table = _loop_table(stages)
    z0 = torch.randn(b, *shape, device="cuda")
    seeds_a = torch.tensor([1, 2], dtype=torch.int64, device="cuda")
    seeds_b = torch.tensor([3, 4], dtype=torch.int64, device="cuda")

    def eager(seeds: torch.Tensor) -> torch.Tensor:
        z, hist = z0.clone(), torch.zeros_like(z0)
        mi = torch.cat([z, z]).to(torch.bfloat16)
        _run_loop(tb, model, z, hist, mi, table, seeds, None, stages)
        return z

    want_a, want_b = eager(seeds_a), eager(seeds_b)

    z, hist = torch.empty_like(z0), torch.empty_like(z0)
    mi = torch.empty(2 * b, *shape, dtype=torch.bfloat16, device="cuda")
    step_t = torch.zeros(1, dtype=torch.int64, device="cuda")
    seeds = seeds_a.clone()

    def body() -> None:
        step_t.zero_()
        hist.zero_()
        mi.copy_(torch.cat([z, z]))
        _run_loop(tb, model, z, hist, mi, table, seeds, step_t, stages)

    z.copy_(z0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        body()  # warm-up: compiles every variant outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    for sd, want in ((seeds_a, want_a), (seeds_b, want_b), (seeds_a, want_a)):
        z.copy_(z0)
        seeds.copy_(sd)
        graph.replay()
        torch.cuda.synchronize()
        # Same kernels in the same order: equal up to bf16 model-output round-off if the
        # library picks another convolution algorithm under capture.
        torch.testing.assert_close(z, want, rtol=2e-3, atol=2e-3)
    # New seeds give a new sample (the step noise alone moves z by O(0.1) per stage).
    assert (want_a - want_b).abs().max().item() > 0.1


@pytest.mark.gpu
def test_gpu_no_host_sync(tb):
    stages, b, shape = 20, 2, (4, 16, 16)
    model = _TinyModel(4).cuda().to(torch.bfloat16)
    table = _loop_table(stages)
    seeds = torch.tensor([1, 2], dtype=torch.int64, device="cuda")
    z = torch.randn(b, *shape, device="cuda")
    hist = torch.zeros_like(z)
    mi = torch.cat([z, z]).to(torch.bfloat16)
    step_t = torch.zeros(1, dtype=torch.int64, device="cuda")
    _run_loop(tb, model, z, hist, mi, table, seeds, None, 2)  # compile outside the check
    _run_loop(tb, model, z, hist, mi, table, seeds, step_t, 2)
    torch.cuda.synchronize()
    step_t.zero_()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _run_loop(tb, model, z, hist, mi, table, seeds, None, stages)
        _run_loop(tb, model, z, hist, mi, table, seeds, step_t, stages)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert torch.isfinite(z).all()


_AOT_SCRIPT = r"""
import inspect
import sys
import triton
from fastflow.backends.triton import _load_kernels
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as exc:
    print("SKIP: no ahead-of-time compiler API:", exc)
    sys.exit(0)
OLD_API = "constants" in inspect.signature(ASTSource).parameters
if OLD_API:
    from triton.backends.compiler import AttrsDescriptor
k = _load_kernels()
base = {"z_ptr": "*fp32", "out_ptr": "*fp32", "o_ptr": "*bf16", "ou_ptr": "*bf16", "h0_ptr": "*fp32",
        "h1_ptr": "*fp16", "h2_ptr": "*bf16", "xi_ptr": "*fp16", "seeds_ptr": "*i64", "x_ptr": "*bf16",
        "mi_ptr": "*bf16", "table_ptr": "*fp32", "step": "*i64", "n": "i64", "rows": "i64", "clip": "fp32"}
full = dict(STEP_PTR=True, GUIDED=True, NUM_HIST=3, CLIP=True, NOISE=1, WRITE_X=True, WRITE_MI=True,
            MI_DUP=True, TAG=0, BLOCK=1024)
# Pointers 16-byte aligned and n a multiple of 16, as the launcher specializes for real latents.
aligned = {(i,): [["tt.divisibility", 16]] for i in list(range(12)) + [13]}
variants = [
    (base, full),
    ({**base, "z_ptr": "*bf16", "out_ptr": "*bf16", "step": "i32"}, {**full, "STEP_PTR": False, "NOISE": 2}),
    ({**base, "z_ptr": "*fp16", "out_ptr": "*fp16", "n": "constexpr"},
     {**full, "NOISE": 0, "NUM_HIST": 0, "GUIDED": False, "CLIP": False, "WRITE_X": False, "n": 1}),
]
for arch in (90, 80):
    for sig, consts in variants:
        sig = {**sig, **{c: "constexpr" for c in consts}}
        try:
            attrs = aligned if sig["n"] != "constexpr" else None
            if OLD_API:  # Triton 3.2 (torch 2.6's): constexprs out of the signature, alignment as a descriptor
                src = ASTSource(fn=k.fused_step_kernel, signature={a: t for a, t in sig.items() if t != "constexpr"},
                                constants=consts, attrs=AttrsDescriptor.from_dict({"cls": "AttrsDescriptor",
                                "arg_properties": {"tt.divisibility": [i for (i,) in attrs or ()]}}))
            else:
                src = ASTSource(fn=k.fused_step_kernel, signature=sig, constexprs=consts, attrs=attrs)
            ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 8, **k.COMPILE_OPTIONS})
        except Exception as exc:
            if "ptxas" in str(exc).lower() and "not found" in str(exc).lower():
                print("SKIP: no ptxas:", exc)
                sys.exit(0)
            raise
        ptx = ck.asm["ptx"]
        assert "lg2.approx" not in ptx, "log must not lower to the approximate lg2"
        # Without in-kernel noise every product and sum rounds on its own, as the torch reference's ops
        # (the noise's own fmas are explicit).
        assert consts["NOISE"] == 1 or "fma" not in ptx, "a multiply-add was contracted"
        # Four elements per thread: aligned loads, stores and the noise interleave share one layout.
        assert attrs is None or ck.metadata.shared == 0, f"shared memory: {ck.metadata.shared} B"
print("OK")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile the kernel for real")
def test_compiles_for_gpu_targets():
    """The interpreter skips code generation: compile the main variants for sm_90 and sm_80 ahead of time."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    if proc.stdout.startswith("SKIP"):
        pytest.skip(proc.stdout.strip())
    assert proc.stdout.strip().endswith("OK"), proc.stdout
