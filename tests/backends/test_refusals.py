"""Backends are interchangeable for bad calls too: each refuses the same ones with the same error, or, where a
device cannot raise, gives the same visible result (NaN)."""

from __future__ import annotations

import pytest
import torch
from backends.step_cases import make_case

from fastflow import noise as noise_spec
from fastflow.backends import get_backend
from fastflow.plan import NUM_COEFS

BACKENDS = ("torch", "cuda", "triton")
SHAPE = (2, 3, 37)  # 111 elements per sample


def _backend(name: str):
    backend = get_backend(name)
    reason = backend.availability() or backend.supports(torch.device("cpu"))
    if reason is not None:
        pytest.skip(f"{name} backend: {reason}")
    return backend


def _case(**kw):
    return make_case(SHAPE, torch.float32, torch.float32, guided=False, hist=1, noise="none", seed=11, **kw)


def _call(backend, case, out=None, **kw):
    out = torch.empty_like(case.z) if out is None else out
    args = dict(seeds=case.seeds, noise=case.noise, use_noise=case.use_noise, clip=case.clip) | kw
    step = args.pop("step", case.step)
    backend.fused_step(case.z, out, case.model_out, case.uncond, case.history, case.table, step, **args)
    return out


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("clip", [-1.0, 0.0, float("nan")])
def test_a_clip_that_is_not_positive_is_refused(name, clip):
    """A negative clip clamped to -clip on one backend and swapped its bounds on another; a NaN clip gave NaN on
    one and no clamp on the others."""
    with pytest.raises(ValueError, match="clip must be a positive number"):
        _call(_backend(name), _case(), clip=clip)


@pytest.mark.parametrize("name", BACKENDS)
def test_a_nan_prediction_stays_nan_under_clip(name):
    """torch.clamp keeps NaN; so does every kernel (Triton's min/max had turned it into +-clip)."""
    case = _case()
    case.model_out[0, 0, 0] = float("nan")
    x = torch.empty_like(case.z)
    out = _call(_backend(name), case, clip=0.5, x_out=x)
    assert torch.isnan(x[0, 0, 0]) and torch.isnan(out[0, 0, 0])
    assert x.isnan().sum() == 1 and x.nan_to_num(0.0).abs().max().item() <= 0.5


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize(("step", "error"), [(-1, IndexError), (5, IndexError), (1.0, TypeError), (True, TypeError)])
def test_a_host_step_outside_the_table_or_not_an_int_is_refused(name, step, error):
    """``table[-1]`` was the last row on the reference only; a float step was truncated by the kernels' int()."""
    with pytest.raises(error):
        _call(_backend(name), _case(), step=step)


@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_a_device_step_outside_the_table_gives_nan(name):
    """A step tensor is not read on the host (a sync): a row outside the table makes every output NaN, on both
    kernels (Triton read past the table's end)."""
    x = torch.empty(SHAPE)
    out = _call(_backend(name), _case(), step=torch.tensor([7]), x_out=x)
    assert out.isnan().all() and x.isnan().all()


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("kind", ["out-x_out", "out-z"])
def test_outputs_overlapping_in_part_are_refused(name, kind):
    """Two outputs sharing memory in part, or an output over an input in part, end with values that depend on the
    kernel's blocks; every backend refuses them (the reference computed them, Triton's direct form wrote them)."""
    case = _case()
    n = case.z.numel()
    buf = torch.zeros(n + n // 2)
    if kind == "out-x_out":
        out, kw = buf[n // 2 :].view(SHAPE), {"x_out": buf[:n].view(SHAPE)}
    else:
        case.z = buf[:n].view(SHAPE).copy_(case.z)
        out, kw = buf[n // 2 :].view(SHAPE), {}
    with pytest.raises(ValueError, match="overlap"):
        _call(_backend(name), case, out=out, **kw)


@pytest.mark.parametrize("name", BACKENDS)
def test_the_same_output_twice_is_taken(name):
    """x_out that is out itself is not a partial overlap: each element is written from the same thread."""
    case = _case()
    out = torch.empty_like(case.z)
    _call(_backend(name), case, out=out, x_out=out)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize(("width", "dtype", "error", "match"), [
    (NUM_COEFS - 1, torch.float32, ValueError, r"table must be \[stages, 10\]"),
    (NUM_COEFS, torch.float16, TypeError, "table must be float32 or float64"),
])
def test_a_table_of_another_width_or_dtype_is_refused(name, width, dtype, error, match):
    """The reference computed with either (its row has enough columns, a float16 row casts)."""
    case = _case()
    case.table = torch.zeros(5, width, dtype=dtype)
    with pytest.raises(error, match=match):
        _call(_backend(name), case)


def test_spec_noise_refuses_narrow_seeds_and_tags_outside_32_bits():
    """int32 seeds gave NaN (the key's shifts overflow), a tag of -1 NaN: the spec takes int64 keys and a 32-bit
    counter word, as the C++ kernel does."""
    with pytest.raises(TypeError, match="int64"):
        noise_spec.normal(torch.tensor([5, 6], dtype=torch.int32), (8,))
    for tag in (-1, 2**32):
        with pytest.raises(ValueError, match="tag must be an int in"):
            noise_spec.normal(torch.tensor([5, 6]), (8,), tag=tag)
    assert torch.isfinite(noise_spec.normal(torch.tensor([5, -6, 2**40]), (8,), tag=2**32 - 1)).all()


_SEEDS = torch.tensor([5, 2**40 + 3])


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize(
    ("args", "kw", "error", "match"),
    [
        ((_SEEDS.view(2, 1), (8,)), {}, ValueError, "seeds must be 1-D"),
        ((_SEEDS[0], (8,)), {}, ValueError, "seeds must be 1-D"),
        ((_SEEDS.int(), (8,)), {}, TypeError, "int64"),
        ((_SEEDS, (-3,)), {}, ValueError, "non-negative ints"),
        ((_SEEDS, (2.0, 4)), {}, ValueError, "non-negative ints"),
        ((_SEEDS, 8), {}, TypeError, "sequence of ints"),
        ((_SEEDS, (8,)), {"dtype": torch.int32}, TypeError, "floating-point"),
        ((_SEEDS, (8,)), {"dtype": torch.bool}, TypeError, "floating-point"),
        ((_SEEDS, (8,)), {"step": -1}, ValueError, "third counter word"),
        ((_SEEDS, (8,)), {"step": 2**32}, ValueError, "third counter word"),
        ((_SEEDS, (8,)), {"step": 1.5}, TypeError, "step must be an int"),
        ((_SEEDS, (8,)), {"step": True}, TypeError, "step must be an int"),
        ((_SEEDS, (8,)), {"step": torch.tensor([1.0])}, TypeError, "one integer"),
        ((_SEEDS, (8,)), {"step": torch.tensor([1, 2])}, TypeError, "one integer"),
        ((_SEEDS, (8,)), {"tag": 2**32}, ValueError, "fourth counter word"),
    ],
    ids=[
        "2d-seeds", "0d-seeds", "int32-seeds", "negative-dim", "float-dim", "int-shape", "int-dtype", "bool-dtype",
        "negative-step", "step-past-32-bits", "float-step", "bool-step", "float-step-tensor", "two-step-tensor",
        "tag-past-32-bits",
    ],
)
def test_a_noise_draw_every_backend_refuses_alike(name, args, kw, error, match):
    """The torch spec flattened 2-D seeds and took 0-d ones that the C++ kernel refused; integer dtypes gave
    truncated normals, a float step was truncated and the C++ draw aliased a tag past 32 bits onto another
    stream, on every backend or some."""
    with pytest.raises(error, match=match):
        _backend(name).noise(*args, **kw)


@pytest.mark.parametrize("name", BACKENDS)
def test_noise_edge_shapes_agree_with_the_spec(name):
    """An empty sample shape and a zero-sized dimension are draws of their own, the same on every backend."""
    backend = _backend(name)
    for shape in ((), (0, 3), (5,)):
        got = backend.noise(_SEEDS, shape, step=2**32 - 1, tag=3)
        want = noise_spec.normal(_SEEDS, shape, step=2**32 - 1, tag=3)
        assert got.shape == (2, *shape)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("role", ["state", "model output", "history tensor h0"])
def test_a_float8_tensor_is_refused(name, role):
    """No kernel reads or writes float8; the reference had cast through it silently, returning a float8 state."""
    case = _case()
    f8 = torch.float8_e4m3fn
    if role == "state":
        case.z = case.z.to(f8)
        out = torch.empty_like(case.z)
    else:
        out = None
        if role == "model output":
            case.model_out = case.model_out.to(f8)
        else:
            case.history = [case.history[0].to(f8)]
    with pytest.raises(TypeError, match="float32, float16, bfloat16 or float64"):
        _call(_backend(name), case, out=out)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("use_noise", [True, False], ids=["drawn", "unused"])
def test_a_noise_tensor_in_a_dtype_no_kernel_reads_is_refused(name, use_noise):
    """A noise tensor is checked even at a stage that adds none (as its shape is): the C++ entry had refused an
    integer one only where the stage drew noise, and took it silently where the reference and Triton refuse it."""
    case = _case()
    with pytest.raises(TypeError, match="float32, float16, bfloat16 or float64"):
        _call(_backend(name), case, noise=torch.zeros(case.z.shape, dtype=torch.int64), use_noise=use_noise)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize(
    ("step", "error"),
    [
        (torch.tensor([1, 2]), ValueError),
        (torch.tensor([1.0]), TypeError),
        (torch.tensor(1, dtype=torch.int16), TypeError),
    ],
    ids=["two-elements", "float", "int16"],
)
def test_a_step_tensor_of_another_size_or_dtype_is_refused_alike(name, step, error):
    """Its size is a ValueError, its dtype a TypeError, as for every other tensor argument: the reference had raised
    a TypeError for both, Triton a ValueError for both."""
    with pytest.raises(error, match="step tensor"):
        _call(_backend(name), _case(), step=step)


@pytest.mark.parametrize("form", ["direct", "alloc"])
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("what", ["table", "step", "seeds"])
def test_an_output_overlapping_what_every_block_reads_is_refused(name, what, form):
    """Every block of the kernels reads the table row, a step tensor and the seeds it draws from while others write
    their outputs: an ``out`` sharing their memory would change them under a running launch. Every backend refuses
    it alike, in the direct form and as the allocating form's given ``out`` (the C++ entries did; the others took
    it)."""
    case = _case()
    z, table, step, seeds = case.z, case.table, case.step, None
    size = z.numel()
    if what == "table":  # out's last elements are the table
        buf = torch.zeros(size + table.numel(), device=z.device)
        table = buf[size:].view_as(table).copy_(table)
        out = buf[table.numel() :].view_as(z)
    elif what == "step":  # out's first element holds the step
        buf = torch.zeros(size, device=z.device)
        out, step = buf.view_as(z), buf[:1].view(torch.int32)
    else:  # out's first elements hold the seeds
        buf = torch.zeros(size, device=z.device)
        out, seeds = buf.view_as(z), buf[: 2 * z.shape[0]].view(torch.int64)
    backend = _backend(name)
    with pytest.raises(ValueError, match="which every block of the kernels reads"):
        if form == "direct":
            backend.fused_step(z, out, case.model_out, None, case.history, table, step, seeds=seeds,
                               use_noise=seeds is not None)
        else:
            backend.fused_step_alloc(z, case.model_out, None, case.history, table, step, out=out, seeds=seeds,
                                     use_noise=seeds is not None)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_an_output_state_in_another_dtype_than_the_state_is_refused(name, dtype):
    """The next state is written in the state's dtype: an ``out`` in another one is refused by every backend (a
    kernel would write the state's element size into it)."""
    with pytest.raises(TypeError, match="dtype"):
        _call(_backend(name), _case(), out=torch.empty(SHAPE, dtype=dtype))


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("seeds", [torch.arange(3), torch.arange(1), torch.arange(2, dtype=torch.int32)],
                         ids=["batch 3", "batch 1", "int32"])
def test_seeds_that_are_not_one_int64_per_sample_are_refused(name, seeds):
    """A stage drawing its noise in the kernel reads one int64 seed per sample: seeds for another batch (the kernel
    would read past them, or leave samples unseeded) or of another dtype are refused alike."""
    case = make_case(SHAPE, torch.float32, torch.float32, guided=False, hist=1, noise="philox", seed=11)
    assert case.use_noise and case.noise is None
    with pytest.raises(ValueError, match="seeds"):
        _call(_backend(name), case, seeds=seeds)


@pytest.mark.parametrize("name", BACKENDS)
def test_outputs_side_by_side_in_one_buffer_are_taken(name):
    """Outputs that end where the next begins share no element: taken, with the values of separate tensors (an
    overlap test that counted a shared end address refused them)."""
    case = _case()
    n = case.z.numel()
    buf = torch.full((2 * n,), float("nan"))
    out, x_out = buf[:n].view(SHAPE), buf[n:].view(SHAPE)
    _call(_backend(name), case, out=out, x_out=x_out)
    ref_x = torch.empty_like(case.z)
    ref = _call(_backend(name), case, x_out=ref_x)
    assert torch.equal(out, ref) and torch.equal(x_out, ref_x)


@pytest.mark.parametrize("name", BACKENDS)
def test_outputs_on_the_same_memory_in_another_order_are_refused(name):
    """x_out over out's very bytes but transposed (same span, shape and dtype, other strides): each element would
    get the other output's value of another element, so it is refused as a partial overlap is."""
    shape = (2, 6, 6)
    case = make_case(shape, torch.float32, torch.float32, guided=False, hist=1, noise="none", seed=11)
    out = torch.empty(shape)
    with pytest.raises(ValueError, match="overlap"):
        _call(_backend(name), case, out=out, x_out=out.transpose(1, 2))
