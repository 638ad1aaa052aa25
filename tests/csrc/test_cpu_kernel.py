"""The C++ extension's CPU kernel against the torch reference, the noise spec and torch's op checks.

The CPU kernel evaluates the plan in the reference's operation order with one
rounding per operation and draws the normals in double precision like the
reference, so its outputs are bit-identical to the reference's (noise included,
checked on a million normals); the matrix demands bit equality without noise and
one-ulp agreement with it.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
import torch
from backends.step_cases import DTYPES, NOISE_MODES, REF, step_matrix
from csrc_cases import assert_matches, cuda_backend, make_case, matrix_case

from fastflow import noise as noise_spec
from fastflow.backends import cuda as cuda_mod
from fastflow.backends import get_backend, resolve_backend
from fastflow.backends.cuda import CudaBackend, philox_words
from fastflow.plan import NUM_COEFS


@pytest.fixture(scope="module")
def cb() -> CudaBackend:
    return cuda_backend()


# --------------------------------------------------------------------------- matrix


@step_matrix
def test_matrix(cb, zdt, odt, guided, clip, hist, noise):
    """Every dtype pair x guidance x clip x history depth x noise mode, on a 2 x 105 state.

    The secondary options (x_hat output and its dtype, model-input output with batch
    B or 2B, step as int or int32/int64 tensor, in place) rotate with the case so each
    meets every primary option without multiplying the product.
    """
    ni = NOISE_MODES.index(noise)
    case = matrix_case((2, 3, 5, 7), zdt, odt, guided, clip, hist, noise)
    in_place = (hist + ni) % 2 == 1
    assert_matches(case.run(cb, in_place=in_place), case.run(REF), exact=noise != "philox")


@pytest.mark.parametrize("noise", NOISE_MODES)
@pytest.mark.parametrize("table_dtype", [torch.float32, torch.float64], ids=["tab32", "tab64"])
def test_float64_state(cb, noise, table_dtype):
    """float64 states compute in float64, like the reference (normals in double too)."""
    case = make_case(
        (3, 4, 33),
        torch.float64,
        torch.float32,
        hist=3,
        clip=True,
        noise=noise,
        x_dtype=torch.float64,
        mi="dup-bf16",
        table_dtype=table_dtype,
        hist_dtypes=(torch.float64, torch.float32, torch.bfloat16),
    )
    assert_matches(case.run(cb), case.run(REF), exact=noise != "philox")


@pytest.mark.parametrize("odt", DTYPES, ids=lambda d: str(d)[6:])
def test_float64_table_float32_state(cb, odt):
    """A float64 table is rounded once to float32 for float32 states, as the reference's row.to(float32)."""
    case = make_case((2, 40), torch.float32, odt, noise="tensor", table_dtype=torch.float64, x_dtype=torch.bfloat16)
    assert_matches(case.run(cb), case.run(REF), exact=True)


@pytest.mark.parametrize(
    "shape", [(1, 1), (2, 3), (3, 4), (2, 5), (2, 130), (2, 3, 7, 11), (1, 517), (3, 1030), (2, 4, 8, 8)], ids=str
)
@pytest.mark.parametrize("noise", ["philox", "tensor"])
def test_odd_sizes(cb, shape, noise):
    """Samples that are not a multiple of 4 or of the CPU block (512), several blocks per sample."""
    case = make_case(shape, torch.float32, torch.bfloat16, hist=1, noise=noise, x_dtype=torch.float16, mi="dup-bf16")
    assert_matches(case.run(cb), case.run(REF), exact=noise != "philox")


def test_large_batch(cb):
    """A batch of 9 with every option on: per-sample seeds and offsets."""
    case = make_case((9, 4, 17, 9), torch.bfloat16, torch.float16, hist=3, clip=True, x_dtype=torch.float32, mi="same")
    assert_matches(case.run(cb), case.run(REF), exact=False)


def test_noncontiguous_inputs_and_outputs(cb):
    """Strided inputs are read in row-major order and strided outputs are written back."""
    case = make_case((3, 6, 10), torch.float32, torch.float32, hist=2, noise="philox")
    want = case.run(REF)
    z = case.z.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    mo = case.model_out.transpose(1, 2).contiguous().transpose(1, 2)
    out = torch.full((3, 10, 6), float("nan")).transpose(1, 2)
    x = torch.full((3, 10, 6), float("nan")).transpose(1, 2)
    mi = torch.full((6, 10, 6), float("nan"), dtype=torch.bfloat16).transpose(1, 2)
    hist = [h.transpose(1, 2).contiguous().transpose(1, 2) for h in case.history]
    assert not (z.is_contiguous() or out.is_contiguous() or mi.is_contiguous())
    cb.fused_step(
        z, out, mo, case.uncond, hist, case.table, case.step, seeds=case.seeds, x_out=x, model_in_out=mi, use_noise=True
    )
    torch.testing.assert_close(out, want["out"], rtol=1e-6, atol=1e-6)
    ref_x = torch.empty_like(case.z)
    ref_mi = torch.empty(mi.shape, dtype=torch.bfloat16)
    case.call(REF, case.z, torch.empty_like(case.z), x_out=ref_x, model_in_out=ref_mi)
    assert torch.equal(x, ref_x)
    torch.testing.assert_close(mi.float(), ref_mi.float(), rtol=1.6e-2, atol=1.6e-2)


def test_in_place_all_outputs(cb):
    """out is z, and x_out aliases a history tensor that is also read: each element is read before written."""
    case = make_case((2, 3, 5, 7), torch.float32, torch.bfloat16, hist=2, noise="tensor", x_dtype=torch.float32)
    want = case.run(REF)
    z = case.z.clone()
    h0 = case.history[0].float().clone()
    cb.fused_step(
        z,
        z,
        case.model_out,
        case.uncond,
        [h0, case.history[1]],
        case.table,
        case.step,
        noise=case.noise,
        x_out=h0,
        use_noise=True,
    )
    assert torch.equal(z, want["out"])
    assert torch.equal(h0, want["x"])


@pytest.mark.parametrize("written", ["out", "x_out", "model_in_out"])
def test_outputs_overlapping_an_input_in_part_are_refused(cb, written):
    """An output one element off an input was written block by block, silently wrong (a state shifted by one element
    under ``out``); every output the caller gives is now checked, the same tensor (out is z) still allowed."""
    n = 1031
    case = make_case((2, n), torch.float32, torch.float32, guided=False, hist=1, noise="none")
    buf = torch.zeros(2 * n + 1)
    buf[:-1] = case.z.flatten()
    z, shifted = buf[:-1].view(2, n), buf[1:].view(2, n)
    outputs = {"out": torch.empty_like(case.z), "x_out": None, "model_in_out": None} | {written: shifted}
    with pytest.raises(ValueError, match=f"{written} overlaps the state in part"):
        cb.fused_step(z, outputs["out"], case.model_out, None, case.history, case.table, case.step,
                      x_out=outputs["x_out"], model_in_out=outputs["model_in_out"])
    buf[:-1] = case.history[0].flatten()
    with pytest.raises(ValueError, match=f"{written} overlaps a history tensor in part"):
        cb.fused_step(case.z, outputs["out"], case.model_out, None, [z], case.table, case.step,
                      x_out=outputs["x_out"], model_in_out=outputs["model_in_out"])
    want = case.run(REF)["out"]
    z = case.z.clone()
    cb.fused_step(z, z, case.model_out, None, case.history, case.table, case.step)
    assert torch.equal(z, want)


def test_outputs_starting_where_an_input_starts_are_refused_unless_the_same(cb):
    """Only the very same bytes in the same element size are an input written in place: an x_hat in bfloat16 over the
    first half of a float32 state, or a model input of batch 2B starting where the state starts, begin at the state's
    address but overlap it in part, and are refused (written block by block, they would change state elements not
    yet read)."""
    n = 64
    case = make_case((2, n), torch.float32, torch.float32, guided=False, hist=0, noise="none")
    buf = torch.zeros(4 * n)
    z = buf[: 2 * n].view(2, n)
    z.copy_(case.z)
    outputs = {"x_out": buf.view(torch.bfloat16)[: 2 * n].view(2, n), "model_in_out": buf.view(4, n)}
    for name, t in outputs.items():
        with pytest.raises(ValueError, match=f"{name} overlaps the state in part"):
            cb.fused_step(z, torch.empty_like(z), case.model_out, None, [], case.table, case.step, **{name: t})
        with pytest.raises(ValueError, match=f"{name} overlaps the state in part"):
            kw = {"x_out": None, "model_in_out": None} | {name: t}
            torch.ops.fastflow.fused_step(z, torch.empty_like(z), case.model_out, None, [], case.table, case.step,
                                          None, None, None, kw["x_out"], kw["model_in_out"], None, False)
    assert torch.equal(z, case.z)


def test_model_input_of_another_sample_shape_is_refused(cb):
    """The next model input must have the state's sample shape (batch B or 2B): one of as many dimensions but fewer
    elements a sample would be written past its end, one of more elements left partly unwritten. Refused by the
    registered operator and the eager entry, which take it from the caller."""
    import fastflow._C as fastflow_c

    case = make_case((2, 3, 4), torch.float32, torch.float32, guided=False, hist=0, noise="none")
    for shape in ((2, 3, 3), (4, 3, 5), (2, 4, 3)):
        mi = torch.empty(shape)
        with pytest.raises(ValueError, match="model input output has shape"):
            torch.ops.fastflow.fused_step(case.z, torch.empty_like(case.z), case.model_out, None, [], case.table,
                                          case.step, None, None, None, None, mi, None, False)
        with pytest.raises(ValueError, match="model input output has shape"):
            fastflow_c.fused_step(case.z, torch.empty_like(case.z), case.model_out, None, [], case.table, case.step,
                                  None, None, None, None, mi, None, False)


def test_the_registered_operator_refuses_what_the_eager_entry_refuses(cb):
    """A traced step calls torch.ops.fastflow.fused_step: an out one element off the state was written there block by
    block (wrong numbers), where the eager entry raised."""
    n = 1031
    case = make_case((2, n), torch.float32, torch.float32, guided=False, hist=0, noise="none")
    buf = torch.zeros(2 * n + 1)
    buf[:-1] = case.z.flatten()
    z, shifted = buf[:-1].view(2, n), buf[1:].view(2, n)
    with pytest.raises(ValueError, match="out overlaps the state in part"):
        torch.ops.fastflow.fused_step(z, shifted, case.model_out, None, [], case.table, case.step, None, None, None,
                                      None, None, None, False)
    x = torch.empty(2 * n + 1)
    with pytest.raises(ValueError, match="out and x_out overlap in part"):
        torch.ops.fastflow.fused_step(case.z, x[:-1].view(2, n), case.model_out, None, [], case.table, case.step,
                                      None, None, None, x[1:].view(2, n), None, None, False)


def test_operators_refuse_bad_counters_and_clips(cb):
    """Inputs the Python wrappers and the reference refuse, refused by the raw operators and entries too (a bool
    step was row 1, a float step tensor was truncated, a counter past 32 bits wrapped, rounds were cast, a clip past
    float32 clamped nothing)."""
    alloc = cb.alloc_entry()
    case = make_case((2, 3, 8), torch.float32, torch.float32, hist=0, noise="none")
    with pytest.raises(TypeError, match="step must be an int or a tensor, got bool"):
        alloc(case.z, None, case.model_out, None, [], case.table, True, None, None, False, None, None, False, None,
              False, False)
    seeds = torch.tensor([1, 2])
    with pytest.raises(TypeError, match="step tensor must be int64 or int32"):
        torch.ops.fastflow.noise(seeds, [4], 0, torch.tensor(2.7), 0)
    for step, tag in ((2**32, 0), (-1, 0), (0, 2**32)):
        with pytest.raises(ValueError, match="must be in \\[0, 2\\*\\*32\\)"):
            torch.ops.fastflow.noise(seeds, [4], step, None, tag)
    counter, key = torch.zeros(1, 4, dtype=torch.int64), torch.zeros(1, 2, dtype=torch.int64)
    for rounds in (-5, 2**32 + 10):
        with pytest.raises(ValueError, match="philox rounds must be in"):
            torch.ops.fastflow.philox(counter, key, rounds)
    for backend in (cb, REF):
        with pytest.raises(ValueError, match="clip 1e\\+300 is past float32's range"):
            backend.fused_step(case.z, torch.empty_like(case.z), case.model_out, None, [], case.table, case.step,
                               clip=1e300)
    z64 = case.z.double()
    cb.fused_step(z64, torch.empty_like(z64), case.model_out, None, [], case.table, case.step, clip=1e300)


def test_step_tensor_equals_int(cb):
    """Graph mode (the step read from a tensor) gives the same numbers and the same noise as a Python int."""
    case = make_case((2, 50), torch.float32, torch.float32, noise="philox", mi="dup-fp16", x_dtype=torch.float32)
    a = case.run(cb)
    for dt in (torch.int32, torch.int64):
        case.step = torch.tensor(3, dtype=dt)  # a 0-d tensor works too
        assert_matches(case.run(cb), a, exact=True)


def test_step_out_of_range(cb):
    """A host step outside the table raises; a device step outside it gives NaN outputs (the kernel cannot raise)."""
    case = make_case((2, 8), torch.float32, torch.float32, noise="none")
    case.step = 5
    with pytest.raises(IndexError):
        case.run(cb)
    case.step = -1
    with pytest.raises(IndexError):
        case.run(cb)
    case.step = torch.tensor([5])
    assert torch.isnan(case.run(cb)["out"]).all()


# --------------------------------------------------------------------------- noise


def test_philox_words_bit_exact(cb):
    """The extension's Philox4x32-10 words equal the numpy statement of the spec bit for bit."""
    g = torch.Generator().manual_seed(1)
    counter = torch.randint(0, 2**32, (4096, 4), generator=g, dtype=torch.int64)
    key = torch.randint(0, 2**32, (4096, 2), generator=g, dtype=torch.int64)
    counter[:4] = torch.tensor([[0, 0, 0, 0], [2**32 - 1] * 4, [1, 0, 0, 0], [0, 0, 2**32 - 1, 1]])
    key[:4] = torch.tensor([[0, 0], [2**32 - 1] * 2, [0, 0], [2**32 - 1, 0]])
    want = noise_spec.philox4x32_numpy(*counter.T.numpy(), *key.T.numpy())
    got = philox_words(counter, key)
    assert np.array_equal(got.numpy(), np.stack(want, axis=1).astype(np.int64))
    for rounds in (1, 7):
        want = noise_spec.philox4x32_numpy(*counter.T.numpy(), *key.T.numpy(), rounds=rounds)
        assert np.array_equal(philox_words(counter, key, rounds).numpy(), np.stack(want, axis=1).astype(np.int64))


def test_philox_known_answers(cb):
    """Published Philox4x32-10 test vectors (zero, all-ones and digits-of-pi inputs)."""
    counter = torch.tensor(
        [[0, 0, 0, 0], [0xFFFFFFFF] * 4, [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344]], dtype=torch.int64
    )
    key = torch.tensor([[0, 0], [0xFFFFFFFF] * 2, [0xA4093822, 0x299F31D0]], dtype=torch.int64)
    want = torch.tensor(
        [
            [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8],
            [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD],
            [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1],
        ],
        dtype=torch.int64,
    )
    assert torch.equal(philox_words(counter, key), want)


@pytest.mark.parametrize("tag", [noise_spec.STEP_TAG, noise_spec.INIT_TAG])
def test_normals_bit_identical(cb, tag):
    """The normals equal fastflow.noise.normal bit for bit (over a million of them, seeds past 2**63 included)."""
    seeds = noise_spec.as_seed_tensor([0, 1, 2**32 + 7, 2**64 - 1], 4, "cpu")
    for step, shape in ((0, (16, 128, 128)), (17, (3, 5, 7))):
        got = cb.noise(seeds, shape, step=step, tag=tag)
        want = noise_spec.normal(seeds, shape, step=step, tag=tag)
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert torch.equal(got, want), f"{(got != want).sum().item()} normals differ"


def test_noise_step_tensor(cb):
    seeds = torch.tensor([5, 6], dtype=torch.int64)
    want = noise_spec.normal(seeds, (9,), step=4)
    assert torch.equal(cb.noise(seeds, (9,), step=torch.tensor([4], dtype=torch.int32)), want)


def test_fused_noise_is_the_spec(cb):
    """With z = 0 and only CN = 1, the fused step writes exactly the spec's noise."""
    seeds = torch.tensor([3, 2**40], dtype=torch.int64)
    table = torch.zeros(8, NUM_COEFS)
    table[6, 8] = 1.0  # CN
    z = torch.zeros(2, 3, 11, 13)
    out = torch.empty_like(z)
    cb.fused_step(z, out, torch.zeros_like(z), None, [], table, 6, seeds=seeds, use_noise=True)
    assert torch.equal(out, noise_spec.normal(seeds, z.shape[1:], step=6))


def test_sample_alone_equals_in_batch(cb):
    """A sample's result (noise included) does not depend on the batch it is in."""
    case = make_case((4, 3, 9, 9), torch.float32, torch.bfloat16, hist=2, noise="philox", mi="dup-bf16")
    full = case.run(cb)
    k = 2
    alone = make_case((4, 3, 9, 9), torch.float32, torch.bfloat16, hist=2, noise="philox", mi="dup-bf16")
    alone.z, alone.model_out, alone.uncond = case.z[k : k + 1], case.model_out[k : k + 1], case.uncond[k : k + 1]
    alone.history = [h[k : k + 1] for h in case.history]
    alone.seeds = case.seeds[k : k + 1]
    got = alone.run(cb)
    assert torch.equal(got["out"][0], full["out"][k])
    assert torch.equal(got["mi"][0], full["mi"][k]) and torch.equal(got["mi"][1], full["mi"][4 + k])


# --------------------------------------------------------------------------- errors


def _args(**kw):
    z = torch.randn(2, 3)
    a = dict(
        z=z,
        out=torch.empty_like(z),
        model_out=torch.randn(2, 3),
        model_out_uncond=None,
        history=[],
        table=torch.randn(4, NUM_COEFS),
        step=1,
    )
    a.update(kw)
    return a


@pytest.mark.parametrize(
    "kw, exc",
    [
        (dict(model_out=torch.randn(2, 4)), ValueError),
        (dict(model_out=torch.randn(2, 3).int()), TypeError),
        (dict(out=torch.empty(2, 3, dtype=torch.float16)), TypeError),
        (dict(model_out_uncond=torch.randn(3, 3)), ValueError),
        (dict(history=[torch.randn(2, 3)] * 4), ValueError),
        (dict(history=[torch.randn(2, 2)]), ValueError),
        (dict(use_noise=True), ValueError),
        (dict(use_noise=True, seeds=torch.zeros(3, dtype=torch.int64)), ValueError),
        (dict(use_noise=True, seeds=torch.zeros(2, dtype=torch.int32)), ValueError),
        (dict(noise=torch.randn(2, 4), use_noise=True), ValueError),
        (dict(table=torch.randn(4, 3, 10)), ValueError),
        (dict(model_in_out=torch.empty(3, 3)), ValueError),
        (dict(x_out=torch.empty(2, 2)), ValueError),
        (dict(step=4), IndexError),
    ],
)
def test_errors_match_reference(cb, kw, exc):
    """Bad arguments raise the same exception type as the torch reference (the contract's check_step_args)."""
    with pytest.raises(exc):
        REF.fused_step(**_args(**kw))
    with pytest.raises(exc):
        cb.fused_step(**_args(**kw))


def test_kernel_specific_errors(cb):
    with pytest.raises(ValueError, match="coefficient table"):
        cb.fused_step(**_args(table=torch.randn(4, 9)))
    with pytest.raises(TypeError, match="step tensor"):
        cb.fused_step(**_args(step=torch.tensor([1.0])))
    with pytest.raises(TypeError, match="table"):
        cb.fused_step(**_args(table=torch.randn(4, NUM_COEFS).half()))


def test_alloc_entry_argument_errors(cb):
    """The front ends' entry (fastflow._C.fused_step_alloc, its arguments parsed by hand) names what is wrong with
    an argument, as Python's own errors would, and reads numpy integers, tuples of history and truthy flags."""
    alloc = cb.alloc_entry()
    case = make_case((2, 3, 8), torch.float32, torch.float32, hist=1, noise="philox")

    def args(**kw):
        a = dict(z=case.z, out=None, model_out=case.model_out, uncond=None, history=list(case.history),
                 table=case.table, step=case.step, seeds=case.seeds, noise=None, want_x=True, x_dtype=None,
                 model_in_dtype=None, model_in_double=False, clip=None, use_noise=True, paired=False)
        a.update(kw)
        return tuple(a.values())

    want = alloc(*args())
    same = alloc(*args(history=tuple(case.history), step=np.int64(case.step), want_x=1, clip=None))
    assert all(torch.equal(a, b) for a, b in zip(want[:2], same[:2], strict=True)) and same[2] is None
    with pytest.raises(TypeError, match="takes 16 positional arguments"):
        alloc(*args()[:-1])
    with pytest.raises(TypeError, match="model_out must be a tensor, got list"):
        alloc(*args(model_out=[1.0]))
    with pytest.raises(TypeError, match="history must be a list or tuple"):
        alloc(*args(history=case.history[0]))
    with pytest.raises(TypeError, match="history holds a int"):
        alloc(*args(history=[3]))
    with pytest.raises(TypeError, match="step must be an int or a tensor, got float"):
        alloc(*args(step=1.0))
    with pytest.raises(TypeError, match="x_dtype must be a torch.dtype or None, got str"):
        alloc(*args(x_dtype="float32"))
    with pytest.raises(TypeError, match="must be real number"):
        alloc(*args(clip="1"))
    with pytest.raises(IndexError, match="outside the table"):
        alloc(*args(step=10**6))
    with pytest.raises(OverflowError):
        alloc(*args(step=2**70))


# --------------------------------------------------------------------------- torch integration


def _op_samples():
    case = make_case((2, 3, 8), torch.float32, torch.bfloat16, hist=2, noise="philox", clip=True)
    z = case.z
    yield (
        z,
        torch.empty_like(z),
        case.model_out,
        case.uncond,
        case.history,
        case.table,
        3,
        None,
        case.seeds,
        None,
        torch.empty_like(z),
        torch.empty((4, 3, 8), dtype=torch.bfloat16),
        0.8,
        True,
    )
    yield (
        z,
        torch.empty_like(z),
        case.model_out,
        None,
        [],
        case.table,
        0,
        torch.tensor([2]),
        None,
        None,
        None,
        None,
        None,
        False,
    )
    yield (
        z,
        torch.empty_like(z),
        case.model_out,
        None,
        [case.history[0]],
        case.table,
        0,
        None,
        None,
        torch.randn_like(z),
        None,
        torch.empty_like(z),
        None,
        True,
    )


def test_opcheck_fused_step(cb):
    for args in _op_samples():
        torch.library.opcheck(torch.ops.fastflow.fused_step.default, args)


def test_opcheck_noise_and_philox(cb):
    seeds = torch.tensor([1, 2], dtype=torch.int64)
    torch.library.opcheck(torch.ops.fastflow.noise.default, (seeds, [3, 5], 2, None, 0))
    torch.library.opcheck(torch.ops.fastflow.noise.default, (seeds, [7], 0, torch.tensor([3]), 1))
    counter = torch.randint(0, 2**32, (5, 4), dtype=torch.int64)
    key = torch.randint(0, 2**32, (5, 2), dtype=torch.int64)
    torch.library.opcheck(torch.ops.fastflow.philox.default, (counter, key, 10))


def test_compile_fullgraph(cb):
    """torch.compile(fullgraph=True) traces a step through this backend (no graph break) and matches eager."""
    torch._dynamo.reset()
    case = make_case((2, 4, 6), torch.float32, torch.bfloat16, hist=1, noise="philox", mi="dup-bf16")

    def step(z, mo, uncond, h, table, step_t, seeds):
        out = torch.empty_like(z)
        mi = torch.empty((2 * z.shape[0], *z.shape[1:]), dtype=torch.bfloat16)
        cb.fused_step(z, out, mo, uncond, [h], table, step_t, seeds=seeds, model_in_out=mi, use_noise=True)
        return out * 1.0, mi

    args = (case.z, case.model_out, case.uncond, case.history[0], case.table, torch.tensor([3]), case.seeds)
    eager = step(*args)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(*args)
    assert torch.equal(eager[0], compiled[0]) and torch.equal(eager[1], compiled[1])


def test_compile_fullgraph_inductor_in_place(cb):
    """Inductor (functionalized, in place on the state) gives the eager result."""
    torch._dynamo.reset()
    case = make_case((2, 4, 6), torch.float32, torch.float32, hist=0, noise="tensor")

    def step(z, mo, table, noise):
        cb.fused_step(z, z, mo, None, [], table, 3, noise=noise, use_noise=True)
        return z + 0.0

    z_eager = case.z.clone()
    eager = step(z_eager, case.model_out, case.table, case.noise)
    z_comp = case.z.clone()
    compiled = torch.compile(step, fullgraph=True)(z_comp, case.model_out, case.table, case.noise)
    assert torch.equal(eager, compiled) and torch.equal(z_eager, z_comp)


def test_compile_noise_op(cb):
    torch._dynamo.reset()
    seeds = torch.tensor([1, 2], dtype=torch.int64)
    fn = torch.compile(lambda s: cb.noise(s, (4, 5), step=3) * 2.0, fullgraph=True, backend="aot_eager")
    assert torch.equal(fn(seeds), noise_spec.normal(seeds, (4, 5), step=3) * 2.0)


# --------------------------------------------------------------------------- availability and dispatch


def test_dispatch_picks_extension_on_cpu(cb):
    assert isinstance(resolve_backend("cuda", "cpu"), CudaBackend)
    assert resolve_backend("auto", "cpu").name == "cuda"
    assert get_backend("cuda").supports(torch.device("cpu")) is None


def test_cuda_support_reason(cb):
    reason = cb.supports(torch.device("cuda"))
    if not cuda_mod.has_cuda_kernels():
        assert "no CUDA kernels" in reason
    elif not torch.cuda.is_available():
        assert "no CUDA device" in reason
    assert "not meta" in cb.supports(torch.device("meta"))


def test_build_info_recorded(cb):
    info = cuda_mod.build_info()
    assert info is not None and info["extension"] and info["torch"] == torch.__version__
    assert set(info) >= {"torch", "cuda", "cuda_archs", "python"}


def test_torch_mismatch_is_refused(monkeypatch):
    """An extension built for another torch is not loaded, and the reason says so."""
    monkeypatch.setattr(cuda_mod, "_STATE", {})
    monkeypatch.setattr(cuda_mod, "build_info", lambda: {"extension": True, "torch": "0.0.1"})
    reason = CudaBackend().availability()
    assert reason is not None and "built for torch 0.0.1" in reason
    monkeypatch.setattr(cuda_mod, "_STATE", {})
    monkeypatch.setattr(cuda_mod, "build_info", lambda: None)
    assert "not built" in CudaBackend().availability()


@pytest.mark.parametrize(
    "solver, eta, guided", [("ddim", 1.0, False), ("dpm++2m", None, False), ("sde-dpm++2m", None, False),
                            ("ddim", None, True)]
)
def test_compile_sampler_step(cb, solver, eta, guided):
    """A Sampler step with backend="cuda" compiles with fullgraph=True on CPU and matches eager (a guided
    model's doubled batch included: eager calls hand it to C++ whole, traced ones split it in the graph)."""
    from fastflow import FlowMatching, Sampler

    torch._dynamo.reset()
    kw = {} if eta is None else {"eta": eta}
    if guided:
        kw["guidance_scale"] = 4.0
    sampler = Sampler(FlowMatching(), solver=solver, prediction="flow", steps=4, backend="cuda", **kw)
    z = sampler.init_noise((2, 4, 8, 8), seed=1)
    mo = torch.randn(4 if guided else 2, 4, 8, 8)

    def f(mo, z):
        return sampler.step(mo, z, 0)

    eager = f(mo, z)
    sampler.runner.reset()
    assert torch.equal(torch.compile(f, fullgraph=True)(mo, z), eager)


def _entry_calls(cb: CudaBackend, z: torch.Tensor, table: torch.Tensor) -> dict[str, Callable[[], object]]:
    """Both bindings on ``z``: the direct one into outputs made here, the allocating one making its own."""
    direct_out = torch.empty_like(z)
    x_out = torch.empty_like(z)

    def direct() -> tuple[torch.Tensor, torch.Tensor]:
        cb.fused_step(z, direct_out, z * 0.5, None, [], table, 1, x_out=x_out)
        return direct_out, x_out

    def alloc() -> tuple[torch.Tensor | None, ...]:
        return cb.alloc_entry()(z, None, z * 0.5, None, [], table, 1, None, None, True, torch.float16, torch.bfloat16,
                                True, None, False, False)

    return {"direct": direct, "alloc": alloc}


@pytest.mark.parametrize("entry", ["direct", "alloc"])
def test_fake_tensors_take_the_operator(cb, entry):
    """A step on a FakeTensorMode's tensors (shape inference, memory planning) reaches the operator's fake
    implementation through either binding and returns fake outputs of the right shapes and dtypes."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    case = make_case((2, 3, 5), torch.float32, torch.float32, hist=0, noise="none")
    with FakeTensorMode(allow_non_fake_inputs=True):
        z = torch.empty(2, 3, 5)
        outputs = _entry_calls(cb, z, case.table)[entry]()
    assert all(isinstance(t, FakeTensor) for t in outputs)
    assert [t.shape for t in outputs] == ([(2, 3, 5)] * 2 if entry == "direct" else [(2, 3, 5), (2, 3, 5), (4, 3, 5)])
    if entry == "alloc":
        assert [t.dtype for t in outputs] == [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("entry", ["direct", "alloc"])
def test_dispatch_modes_see_the_operator(cb, entry):
    """Under a TorchDispatchMode (a FLOP counter, a debugging mode) both bindings step through the operator, so the
    mode sees the step, and the numbers are those of the plain call."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    case = make_case((2, 3, 5), torch.float32, torch.float32, hist=0, noise="none")
    plain = [t.clone() for t in _entry_calls(cb, case.z, case.table)[entry]()]
    with Recorder() as recorder:
        seen = _entry_calls(cb, case.z, case.table)[entry]()
    assert "fastflow.fused_step.default" in recorder.ops
    assert all(torch.equal(a, b) for a, b in zip(seen, plain, strict=True))


def test_entry_is_the_binding_with_a_traced_stand_in(cb):
    """Front ends call the binding itself, eagerly and under torch.compile (the tracer is given
    ``fused_step_alloc_args`` in its place); a torch without ``substitute_in_graph`` gets the Python entry, which
    tracing can enter, and the same numbers."""
    from fastflow import FlowMatching, Sampler

    assert cb.alloc_entry() is cuda_mod._STATE["alloc"] is not None
    sampler = Sampler(FlowMatching(), solver="dpm++2m", prediction="flow", steps=4, backend="cuda")
    z = sampler.init_noise((2, 4, 8, 8), seed=3)
    mo = torch.randn(2, 4, 8, 8)
    want = sampler.step(mo, z, 0)

    state = dict(cuda_mod._STATE)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.delattr(torch.compiler, "substitute_in_graph")
            cuda_mod._STATE.clear()
            old_torch = CudaBackend()
            entry = old_torch.alloc_entry()
            assert cuda_mod._STATE["alloc"] is None
            assert entry.__func__ is CudaBackend.fused_step_alloc_args
            sampler = Sampler(FlowMatching(), solver="dpm++2m", prediction="flow", steps=4, backend="cuda")
            assert torch.equal(sampler.step(mo, z, 0), want)
            sampler.runner.reset()
            torch._dynamo.reset()
            assert torch.equal(torch.compile(lambda mo, z: sampler.step(mo, z, 0), fullgraph=True)(mo, z), want)
    finally:
        cuda_mod._STATE.clear()
        cuda_mod._STATE.update(state)


@pytest.mark.parametrize(
    "archs, cap, ok",
    [
        (["9.0"], (9, 0), True),
        (["8.0"], (8, 6), True),
        (["9.0"], (8, 0), False),
        (["8.0"], (9, 0), False),
        (["8.0+PTX"], (9, 0), True),
        (["8.0", "9.0"], (9, 0), True),
        (["9.0a"], (9, 0), True),
        (["9.0a"], (9, 1), False),  # arch-specific: that arch only
        (["10.0a", "12.0f"], (12, 1), True),
        (["12.0f"], (10, 0), False),
        (["90.a"], (8, 0), True),  # a spelling older builds recorded: left to the launch to report
    ],
)
def test_arch_check(monkeypatch, archs, cap, ok):
    """A CUDA build is refused, with a reason, on a device its archs cannot run on."""
    monkeypatch.setattr(cuda_mod, "_STATE", {})
    monkeypatch.setattr(cuda_mod, "build_info", lambda: {"cuda_archs": archs})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: cap)
    reason = cuda_mod._arch_reason(torch.device("cuda", 0))
    assert (reason is None) == ok
    if not ok:
        assert f"sm_{cap[0]}{cap[1]}" in reason


def test_reload_after_reset(monkeypatch):
    """Loading again after the state is reset (fakes are registered once per process) works."""
    cuda_backend()
    monkeypatch.setattr(cuda_mod, "_STATE", {})
    assert CudaBackend().availability() is None
    assert CudaBackend().supports(torch.device("cpu")) is None


def test_threads_first_using_the_backend_load_it_once(monkeypatch):
    """Threads that first use the backend at once (a server's pool) each get it, loaded once: a second traceable
    stand-in for the binding raises (torch refuses a duplicate rule for it), which reached some of the threads."""
    cuda_backend()
    registered: list[int] = []

    def substitute(original, **kwargs):  # as torch's: one rule per binding; slow, so the threads meet here
        time.sleep(0.05)
        if id(original) in registered:
            raise ValueError(f"Duplicate dispatch rule for {original}")
        registered.append(id(original))
        return lambda fn: fn

    monkeypatch.setattr(cuda_mod, "_STATE", {})
    monkeypatch.setattr(cuda_mod, "_TRACED_ALLOC", set())
    monkeypatch.setattr(torch.compiler, "substitute_in_graph", substitute)
    n = 8
    barrier = threading.Barrier(n)
    reasons: list[object] = []

    def first_use() -> None:
        barrier.wait()
        try:
            reasons.append(CudaBackend().availability())
        except Exception as exc:  # noqa: BLE001 - the assertion below names it
            reasons.append(exc)

    threads = [threading.Thread(target=first_use) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert reasons == [None] * n
    assert len(registered) == 1



def test_threads_split_the_work_not_the_result(cb):
    """The kernel runs on torch's intra-op threads (OpenMP where torch has it); any thread count gives the same bits.
    Only GCC's builds on Linux use OpenMP (setup.py's _compile_flags); a clang build runs on one thread and says so."""
    info = cuda_mod.build_info()
    if info.get("compiler") == "gcc" and torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
        assert info.get("openmp") is True, "built without OpenMP: at::parallel_for would run on one thread"
    elif info.get("openmp") is False:
        assert info.get("openmp_skipped"), "a single-threaded build must say why"
    case = make_case((3, 70_001), torch.float32, torch.bfloat16, guided=True, hist=2, noise="philox",
                     x_dtype=torch.float32, mi="dup-bf16", seed=4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = case.run(cb)
        torch.set_num_threads(max(2, before))
        many = case.run(cb)
    finally:
        torch.set_num_threads(before)
    assert_matches(many, one, exact=True)


def _entry_runs_without_the_gil(entry: Callable[[], object]) -> bool:
    """Whether another Python thread ran while a long call of ``entry`` was in its C++ body.

    Holding the GIL, the call lets the other thread run only before it enters C++ (microseconds,
    or the OS's few milliseconds of scheduling) and after it returns (as long as the OS likes);
    released, throughout. So the window checked runs from a fifth to three fifths of the call's
    duration measured alone (after a first call, which may pay for warming up).
    """
    entry()
    t0 = time.perf_counter()
    entry()
    alone = time.perf_counter() - t0
    stamps: list[float] = []
    stop = threading.Event()

    def count() -> None:
        while not stop.is_set():
            stamps.append(time.perf_counter())

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    worker = threading.Thread(target=count)
    worker.start()
    try:
        for _ in range(5):
            t0 = time.perf_counter()
            entry()
            if alone > 0.01 and any(t0 + alone / 5 < t < t0 + 3 * alone / 5 for t in stamps):
                return True
        return False
    finally:
        stop.set()
        worker.join()
        sys.setswitchinterval(interval)


@pytest.mark.parametrize("entry", ["fused_step_alloc", "fused_step"])
def test_entries_release_the_gil(cb, entry):
    """A CPU step takes tens of milliseconds at megabytes: other Python threads (a UI, a data loader) run meanwhile,
    as they do during torch's own ops."""
    z = torch.randn(2, 1 << 23)  # tens of milliseconds a call on one thread
    o = torch.randn_like(z)
    out = torch.empty_like(z)
    table = _copy_table(0.5, 0.5, 0.5, 0.5)
    if entry == "fused_step_alloc":
        call = lambda: _entry_outputs(cb, z, o, table)  # noqa: E731
    else:
        call = lambda: cb.fused_step(z, out, o, None, [], table, 0)  # noqa: E731
    assert _entry_runs_without_the_gil(call)


def _copy_table(az: float, ao: float, cz: float, cx: float) -> torch.Tensor:
    """One plan row: x_hat = az z + ao o, next state cz z + cx x_hat, next model input 1 x the next state."""
    from fastflow.plan import AO, AZ, CIN, CX, CZ, W

    row = torch.zeros(1, NUM_COEFS, dtype=torch.float32)
    row[0, W], row[0, AZ], row[0, AO], row[0, CZ], row[0, CX], row[0, CIN] = 1.0, az, ao, cz, cx, 1.0
    return row


def _all_16_bit_patterns(dtype: torch.dtype) -> torch.Tensor:
    """Every 16-bit pattern once, as a (2, 32768) tensor of ``dtype`` (two samples, each 64 blocks of 512)."""
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).reshape(2, 2**15)


def _entry_outputs(backend, z, o, table, x_dtype=None, mi_dtype=None) -> tuple:
    return backend.alloc_entry()(z, None, o, None, [], table, 0, None, None, x_dtype is not None, x_dtype, mi_dtype,
                                 False, None, False, False)


def _same_bits_or_both_nan(a: torch.Tensor, b: torch.Tensor) -> bool:
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a.view(torch.int16)[~nan], b.view(torch.int16)[~nan])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_16_bit_loads_and_stores_are_exact(cb, dtype):
    """Each 16-bit pattern read into float32 and stored back (a 16-bit state stepped by 1 x z) is itself where
    finite (an infinity meets 0 x z in x_hat: NaN), as in the torch reference. The loads and stores run eight or
    more elements at a time where the CPU allows."""
    z = _all_16_bit_patterns(dtype)
    table = _copy_table(0.0, 0.0, 1.0, 0.0)
    out = _entry_outputs(cb, z, z, table)[0]
    finite = z.isfinite()
    assert torch.equal(out.view(torch.int16)[finite], z.view(torch.int16)[finite])
    assert _same_bits_or_both_nan(out, _entry_outputs(get_backend("torch"), z, z, table)[0])


@pytest.mark.parametrize("n", [50000, 50003])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_float32_to_16_bits_rounds_to_nearest_even(cb, dtype, n):
    """float32 model outputs written as 16-bit x_hat and next model input (x_hat = o, next state = x_hat, from a
    state of -0) round to nearest even as torch's conversion does: values over the whole range, midpoints between
    16-bit neighbours, overflow, subnormals, signed zeros and infinities; a length that leaves a tail."""
    g = torch.Generator().manual_seed(3)
    grid = _all_16_bit_patterns(dtype).reshape(-1).float()
    grid = grid[grid.isfinite()]
    half_ulp = 1 << (12 if dtype == torch.float16 else 15)  # float32 bits between a 16-bit value and a midpoint
    midpoints = (grid.view(torch.int32) + half_ulp).view(torch.float32)
    specials = torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, -65520.0, 1e-8, -1e-8, 6e-8, 3e38, -3e38,
                             float("inf"), -float("inf"), float("nan"), 2**-24, 2**-25, 3 * 2**-26, 1e-40, -1e-40])
    payload_nans = torch.tensor([0x7F800001, -0x7F800001, 0x7FBFFFFF, -0x00400000], dtype=torch.int32).view(
        torch.float32)  # NaNs whose rounding would carry into the exponent (an infinity) if not caught
    spread = torch.randn(n, generator=g) * 10.0 ** torch.randint(-9, 9, (n,), generator=g).float()
    # the special values first (in full groups of eight), then the rest (its length leaving a tail)
    values = torch.cat([specials, payload_nans, spread, midpoints[midpoints.isfinite()], specials, payload_nans])
    values = values.reshape(1, -1)
    z = torch.full_like(values, -0.0)
    _, x_hat, model_in = _entry_outputs(cb, z, values, _copy_table(0.0, 1.0, 0.0, 1.0), dtype, dtype)
    want = values.to(dtype)
    assert x_hat.dtype == model_in.dtype == dtype
    assert _same_bits_or_both_nan(x_hat, want) and _same_bits_or_both_nan(model_in, want)
