"""The CUDA kernel's code, run on the CPU: the per-thread function of
``csrc/step_kernel_body.h`` executed thread by thread (``emulate_cuda_kernel.cpp``).

This checks the device code's item mapping, 16-byte vector loads and stores (bf16
and fp16 packing), scalar tails, the grid-stride loop and the 2B model-input write
without a GPU. Only the device-only arithmetic differs from the device (the normal
transform takes its host branch, as in the CPU kernel), so the emulation must equal
the CPU kernel bit for bit. The float32 transform the device runs instead is built
here too and checked on its own: its angle part bit for bit against the numpy
statement that the Triton kernel is also held to. Needs CUDA's headers (for the fp16/bf16 types) and a
host compiler; skipped otherwise.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from pathlib import Path

import noise_f32
import numpy as np
import pytest
import torch
from backends.step_cases import DTYPES, MI_MODES, NOISE_MODES, REF, Case
from csrc_cases import (
    DRAW_PLANS,
    DTYPE_PLAN_OPTIONS,
    DTYPE_PLANS,
    assert_matches,
    cuda_backend,
    draw_plan_clips,
    draw_plan_label,
    draw_plan_model_input,
    dtype_plan_label,
    make_case,
    plan_id,
)

from fastflow import noise as noise_spec
from fastflow.plan import CIN, CN, H1, H2, W

ROOT = Path(__file__).resolve().parents[2]


def _cuda_include() -> Path | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "include" / "cuda_fp16.h").exists():
            return Path(home) / "include"
    return None


@pytest.fixture(scope="module")
def emu():
    cuda_backend()  # the CPU kernel is the oracle
    include = _cuda_include()
    if include is None:
        pytest.skip("CUDA headers (cuda_fp16.h) not found; set CUDA_HOME")
    from torch.utils.cpp_extension import load

    # torch rebuilds a JIT extension when its sources or build arguments change, not its headers: the headers'
    # digest among the flags makes an edited kernel header rebuild the emulator instead of testing a stale one.
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted((ROOT / "csrc").glob("*.h")))).hexdigest()
    return load(
        name="fastflow_emulate_cuda_kernel",
        sources=[str(Path(__file__).with_name("emulate_cuda_kernel.cpp"))],
        extra_include_paths=[str(ROOT / "csrc"), str(include)],
        extra_cflags=["-O2", "-ffp-contract=off", "-fno-strict-aliasing", f"-DFASTFLOW_HEADERS_DIGEST={digest[:16]}"],
        verbose=False,
    )


class Emulated:
    """A backend whose fused_step runs the emulated CUDA kernel on a given grid: ``threads`` along a sample's
    items and ``rows`` along the batch (0: one per item, one per sample; ``threads=-1``: the launcher's grid)."""

    def __init__(self, module, threads: int = 0, rows: int = 0):
        self.module, self.threads, self.rows = module, threads, rows

    def fused_step(self, z, out, model_out, model_out_uncond, history, table, step, seeds=None, noise=None,
                   x_out=None, model_in_out=None, clip=None, use_noise=False):  # fmt: skip
        step_int, step_tensor = (0, step) if isinstance(step, torch.Tensor) else (int(step), None)
        self.module.fused_step(
            z, out, model_out, model_out_uncond, list(history), table, step_int, step_tensor, seeds,
            noise, x_out, model_in_out, None if clip is None else float(clip), use_noise, self.threads, self.rows,
        )  # fmt: skip


def _check(emu, case: Case, threads: int = 0, rows: int = 0) -> None:
    assert_matches(case.run(Emulated(emu, threads, rows)), case.run(cuda_backend()), exact=True)


@pytest.mark.parametrize("noise", NOISE_MODES)
@pytest.mark.parametrize("hist", [0, 3])
@pytest.mark.parametrize("guided", [False, True], ids=["cond", "cfg"])
@pytest.mark.parametrize("odt", DTYPES, ids=lambda d: f"o_{str(d)[6:]}")
@pytest.mark.parametrize("zdt", DTYPES, ids=lambda d: f"z_{str(d)[6:]}")
def test_matrix_vectorized(emu, zdt, odt, guided, hist, noise):
    """Every dtype pair through the 16-byte path (sample of 2 x 64 elements), options rotating."""
    ni = NOISE_MODES.index(noise)
    case = make_case(
        (3, 2, 64),
        zdt,
        odt,
        guided=guided,
        hist=hist,
        clip=bool((hist + ni) % 2),
        noise=noise,
        x_dtype=(zdt, None, torch.float32, torch.bfloat16)[(hist + guided + ni) % 4],
        mi=MI_MODES[(hist + ni + guided) % 4],
        step_kind=("int", "i64", "i32")[(ni + guided) % 3],
        seed=zlib.crc32(repr(("emu", zdt, odt, guided, hist, noise)).encode()),
    )
    assert emu.vectorized(case.z, torch.empty_like(case.z), case.model_out)
    _check(emu, case)


@pytest.mark.parametrize(
    "shape", [(1, 1), (2, 3), (3, 4), (2, 5), (2, 12), (2, 130), (2, 3, 7, 11), (1, 517), (3, 1030)], ids=str
)
@pytest.mark.parametrize("zdt", [torch.float32, torch.bfloat16, torch.float64], ids=["z_f32", "z_bf16", "z_f64"])
def test_tails_and_scalar_path(emu, shape, zdt):
    """Partial last items, samples that break 16-byte alignment, float32 samples of 4 mod 8 (vector + tail);
    float64 states draw in items of 8, so their scalar path takes two Philox groups an item."""
    case = make_case(shape, zdt, torch.float16, hist=2, noise="philox", x_dtype=torch.float32, mi="dup-bf16")
    _check(emu, case)


@pytest.mark.parametrize("rows", [1, 2, 0])
@pytest.mark.parametrize("threads", [1, 7, 64])
def test_grid_stride_loop(emu, threads, rows):
    """Fewer threads than a sample's items, fewer grid rows than samples: each thread walks its samples and
    items with the grid's strides."""
    for noise in ("philox", "tensor"):
        case = make_case((3, 4, 8, 9), torch.float32, torch.bfloat16, hist=1, noise=noise, mi="dup-fp16")
        _check(emu, case, threads, rows)


# (numel, batch, draws, drawing item width) -> (threads, blocks along x, rows): the launcher's grid (step_grid).
LAUNCH_GRIDS = {
    (16 * 21 * 90 * 160, 4, True, 4): (256, 1182, 4),  # 19.4M elements: 4 items per thread
    (16 * 21 * 90 * 160, 1, True, 4): (256, 2363, 1),  # 4.8M: 2 items per thread keep 2048 blocks
    (16 * 21 * 90 * 160, 4, True, 8): (256, 1182, 4),  # 19.4M in items of 8: 2 items per thread
    (16 * 21 * 90 * 160, 1, True, 8): (256, 2363, 1),  # 4.8M in items of 8: one item per thread
    (16 * 128 * 128, 1, True, 4): (256, 256, 1),  # one item per thread
    (16 * 128 * 128, 1, True, 8): (256, 128, 1),
    (16 * 21 * 90 * 160, 4, False, 4): (128, 4725, 4),  # deterministic: 128 threads, one 8-element item each
    (6, 70001, True, 4): (32, 1, 65535),  # tiny samples: one-warp blocks, rows strided past the grid's limit
    (0, 3, True, 8): (256, 0, 0),  # nothing to launch
}


@pytest.mark.parametrize("key", LAUNCH_GRIDS, ids=str)
def test_launch_grid(emu, key):
    """The launch shapes of csrc/step_kernel_body.h: 128-thread blocks without drawing; with drawing, up to 16
    elements per thread (4 items of 4 or 2 of 8) while the grid keeps 2048 blocks."""
    assert tuple(emu.step_grid(*key)) == LAUNCH_GRIDS[key]


@pytest.mark.parametrize("numel", [1, 31, 300, 4096, 100_003, 1 << 20, 5_000_000])
@pytest.mark.parametrize("draw", [False, 4, 8], ids=["det", "draw4", "draw8"])
def test_launch_grid_covers_every_item(emu, numel, draw):
    """Every item of every sample has a thread, and no thread takes more than 16 elements of a sample when
    drawing (4 items of 4 or 2 of 8), one item without."""
    width, most = (draw, 16 // draw) if draw else (8, 1)
    items = -(-numel // width)
    for batch in (1, 3, 70001):
        threads, blocks_x, rows = emu.step_grid(numel, batch, bool(draw), width)
        assert threads % 32 == 0 and threads <= 256 and rows == min(batch, 65535)
        assert threads * blocks_x * most >= items
        assert -(-items // (threads * blocks_x)) <= most


def test_launcher_grid_emulated(emu):
    """The launcher's own grid where the drawing kernel's threads take 2 items each: 4 samples of 1M elements in
    items of 4 (a step with stored predictions on unaligned samples: GenericPlan), 4 samples of 2M elements in
    items of 8 (aligned: AlignedPlan)."""
    assert emu.step_grid(1 << 20, 4, True, 4) == (256, 512, 4)
    assert emu.step_grid(1 << 21, 4, True, 8) == (256, 512, 4)
    unaligned = make_case((4, (1 << 20) - 3), torch.float32, torch.bfloat16, hist=1, noise="philox", mi="dup-bf16")
    assert _plan(emu, unaligned) == "generic"
    assert emu.step_grid((1 << 20) - 3, 4, True, 4) == (256, 512, 4)
    _check(emu, unaligned, threads=-1)
    aligned = make_case((4, 1 << 21), torch.float32, torch.bfloat16, hist=1, noise="philox", mi="dup-bf16")
    assert _plan(emu, aligned) == "aligned"
    _check(emu, aligned, threads=-1)


def test_unaligned_pointers(emu):
    """A tensor starting 4 bytes past a 16-byte boundary turns the vector path off and still gives the same result."""
    case = make_case((2, 4, 64), torch.float32, torch.bfloat16, hist=2, noise="philox", mi="same")
    want = case.run(cuda_backend())
    buf = torch.empty(case.z.numel() + 1)
    shifted = buf[1:].view(case.z.shape)
    shifted.copy_(case.z)
    assert not emu.vectorized(shifted, torch.empty_like(shifted), case.model_out)
    case.z = shifted
    assert_matches(case.run(Emulated(emu)), want, exact=True)


def _guarded(shape: tuple[int, ...], dtype: torch.dtype, pad: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """A tensor of ``shape`` inside a buffer of sentinels (7.0), ``pad`` bytes of them on each side (its start
    stays 16-byte aligned): (buffer, tensor)."""
    n = 1
    for s in shape:
        n *= s
    k = pad // torch.empty((), dtype=dtype).element_size()
    buf = torch.full((n + 2 * k,), 7.0, dtype=dtype)
    return buf, buf[k : k + n].view(shape)


@pytest.mark.parametrize("noise", ["philox", "tensor"])
@pytest.mark.parametrize(
    "shape,zdt,odt",
    [((3, 12), torch.float32, torch.float32), ((2, 3, 4), torch.float64, torch.float32),
     ((3, 20), torch.float32, torch.float32)],
    ids=str,
)  # fmt: skip
def test_partial_last_item_of_aligned_samples(emu, shape, zdt, odt, noise):
    """Samples aligned for 16-byte accesses whose last item (8 elements) is partial: float32 samples of 4 mod 8
    elements, float64 ones of 4 mod 8. That item takes the scalar path: no access runs past a sample's end into the
    next sample (which another block may have stepped already: the in-place run) or past an output's end (each
    output sits between sentinels, the doubled model input too)."""
    case = make_case(shape, zdt, odt, guided=True, hist=1, noise=noise, x_dtype=zdt, mi="same",
                     hist_dtypes=(torch.float32,), noise_dtype=torch.float32)  # fmt: skip
    case.mi_dup = True
    want = case.run(cuda_backend())
    z = case.z.clone()
    out_buf, out = _guarded(z.shape, zdt)
    x_buf, x = _guarded(z.shape, zdt)
    mi_buf, mi = _guarded((2 * z.shape[0], *z.shape[1:]), zdt)
    assert emu.vectorized(z, out, case.model_out)
    case.call(Emulated(emu), z, out, x_out=x, model_in_out=mi)
    assert_matches({"out": out, "x": x, "mi": mi}, want, exact=True)
    for buf, t in ((out_buf, out), (x_buf, x), (mi_buf, mi)):
        k = (buf.numel() - t.numel()) // 2
        assert (buf[:k] == 7).all() and (buf[k + t.numel() :] == 7).all(), "a write landed past an output"
    assert_matches(case.run(Emulated(emu), in_place=True), case.run(cuda_backend(), in_place=True), exact=True)


def test_vector_path_needs_16_byte_alignment(emu):
    """16-byte vector accesses need every tensor to start on a 16-byte boundary and every sample to span a multiple
    of 16 bytes (the device faults on a misaligned one; the emulation would not notice): a tensor 8 bytes past a
    boundary (aligned for 8-byte accesses only), or samples of 24 bytes (12 bfloat16 elements) that 16-byte-aligned
    tensors start, take the scalar path."""
    z, mo = torch.randn(2, 12), torch.randn(2, 12)
    assert emu.vectorized(z, torch.empty_like(z), mo)
    buf = torch.empty(z.numel() + 2)
    shifted = buf[2:].view(z.shape)  # 8 bytes past the buffer's (aligned) start
    assert not emu.vectorized(shifted, torch.empty_like(z), mo)
    assert not emu.vectorized(z, shifted, mo)
    assert not emu.vectorized(z, torch.empty_like(z), mo.bfloat16())


@pytest.mark.parametrize("written", ["out", "x_out"])
def test_outputs_overlapping_the_table_are_refused(emu, written):
    """Every block of the CUDA kernel reads the coefficient row while others write their outputs: an output sharing
    memory with the table would change the row under the launch (one emulated thread per item, as a GPU may run them,
    read rows the first items had overwritten). Refused, by the emulated launcher's argument handling and the CPU
    kernel's alike."""
    b, n = 2, 64
    buf = torch.zeros(b * n + 10)
    table = buf[b * n :].view(1, 10)  # the buffer's last 10 floats; the output's last 10 elements
    table.copy_(torch.tensor([[0, 1, 0.5, 0.5, 0.5, 0, 0, 0, 0, 0]]))
    aliased = buf[10 : 10 + b * n].view(b, n)
    z, model_out = torch.randn(b, n), torch.randn(b, n)
    out, x_out = (aliased, None) if written == "out" else (torch.empty(b, n), aliased)
    args = (z, out, model_out, None, [], table, 0, None, None, None, x_out, None, None, False)
    with pytest.raises(ValueError, match="overlaps the coefficient table"):
        emu.fused_step(*args, 0, 0)
    with pytest.raises(ValueError, match="overlaps the coefficient table"):
        cuda_backend().fused_step(z, out, model_out, None, [], table, 0, x_out=x_out)


def _plan(emu, case: Case) -> str:
    """The plan the launcher picks for ``case`` (outputs allocated as ``Case.run`` does)."""
    z = case.z
    x = None if case.x_dtype is None else torch.empty(z.shape, dtype=case.x_dtype)
    mi = None
    if case.mi_dtype is not None:
        mi = torch.empty((z.shape[0] * (2 if case.mi_dup else 1), *z.shape[1:]), dtype=case.mi_dtype)
    return emu.launch_plan(z, torch.empty_like(z), case.model_out, case.uncond, list(case.history), case.table,
                           case.seeds, case.noise, x, mi, case.clip, case.use_noise)  # fmt: skip


@pytest.mark.parametrize("plan", DRAW_PLANS, ids=plan_id)
def test_draw_plans(emu, plan):
    """Each compile-time plan of the drawing kernel: the launcher picks it for the launches it covers, and its
    emulated kernel (the plan's values pinned, checked to change no parameter) gives the CPU kernel's bits, with
    its runtime switches (clipping, where the plan leaves it, and the step index on the device) both ways and on
    the launcher's grid."""
    clips = draw_plan_clips(plan)
    for clip, step_kind, shape in ((False, "int", (3, 2, 64)), (True, "i64", (2, 3, 40)), (True, "i32", (4, 1000))):
        clip = clip if clip in clips else clips[0]
        case = make_case(
            shape, plan.z, plan.model_out, guided=plan.guided, hist=0, clip=clip, noise="philox",
            x_dtype=plan.x_dtype, mi=draw_plan_model_input(plan), step_kind=step_kind,
            seed=zlib.crc32(repr(("plan", plan_id(plan), shape)).encode()),
        )  # fmt: skip
        assert _plan(emu, case) == draw_plan_label(plan)
        _check(emu, case)
        _check(emu, case, threads=-1)


@pytest.mark.parametrize("plan", DTYPE_PLANS, ids=plan_id)
def test_dtype_plans(emu, plan):
    """Each dtype plan of the deterministic kernel: the launcher picks it for every launch in its dtypes,
    whatever the options (one without x_hat runs the pair's first plan), and its emulated kernel (the dtypes
    pinned, checked to change nothing the launch reads) gives the CPU kernel's bits, also on the launcher's
    grid."""
    zdt, odt, x_dtype = plan
    shapes = [(3, 2, 64), (2, 3, 40), (4, 1000), (2, 37)]  # the last: samples of 37 elements, the scalar path
    for k, (options, shape) in enumerate(zip(DTYPE_PLAN_OPTIONS, shapes, strict=True)):
        guided, hist, noise, x_out, mi, clip, step_kind = options
        case = make_case(
            shape, zdt, odt, guided=guided, hist=hist, clip=clip, noise=noise, x_dtype=x_dtype if x_out else None,
            mi=mi, step_kind=step_kind, hist_dtypes=(zdt,), noise_dtype=zdt,
            seed=zlib.crc32(repr(("dtype plan", plan_id(plan), k)).encode()),
        )  # fmt: skip
        assert _plan(emu, case) == dtype_plan_label(zdt, odt, x_dtype if x_out else zdt), k
        _check(emu, case)
        _check(emu, case, threads=-1)


def test_deterministic_launches_no_plan_covers_run_generic(emu):
    """A deterministic launch with a tensor outside its pair's dtypes (a stored prediction, x_hat or explicit
    noise not in the state's dtype, a model input not in the model output's, a float64 table, a state and model
    output of different 16-bit dtypes) runs the generic kernel."""
    base = dict(guided=True, hist=1, noise="none", hist_dtypes=(torch.float32,))
    others = [
        (torch.float32, torch.bfloat16, dict(base, hist_dtypes=(torch.float32, torch.bfloat16), hist=2)),
        (torch.float32, torch.bfloat16, dict(base, x_dtype=torch.bfloat16)),
        (torch.float32, torch.bfloat16, dict(base, noise="tensor")),
        (torch.float32, torch.bfloat16, dict(base, mi="same")),
        (torch.float32, torch.bfloat16, dict(base, mi="dup-fp16")),
        (torch.float32, torch.bfloat16, dict(base, table_dtype=torch.float64)),
        (torch.bfloat16, torch.float16, dict(base, hist_dtypes=(torch.bfloat16,))),
    ]
    for zdt, odt, kw in others:
        case = make_case((2, 64), zdt, odt, **kw)
        assert _plan(emu, case) == "generic", (zdt, odt, kw)
        _check(emu, case)


def test_every_plan_is_tested(emu):
    """The launcher's plans are exactly those test_draw_plans and test_dtype_plans (and the GPU tests) go
    through, DRAW_PLANS and DTYPE_PLANS, and the drawing kernel's AlignedPlan (the launches of
    test_drawing_launches_no_plan_covers_run_generic)."""
    for draw, want in ((True, {draw_plan_label(p) for p in DRAW_PLANS}),
                       (False, {dtype_plan_label(*p) for p in DTYPE_PLANS})):
        got = emu.plans(draw)
        assert len(got) == len(set(got)) and set(got) == want | ({"aligned"} if draw else set())


def test_drawing_launches_no_plan_covers_run_generic(emu):
    """A drawing launch outside every DrawPlan (guidance with clipping, x_hat, a single model input or a 16-bit
    state; history, other output dtypes, an unguided doubled model input, a float64 table, mixed 16-bit dtypes)
    runs the generic kernel in items of 8 (AlignedPlan), or of 4 (GenericPlan) when its samples are not
    aligned for vector accesses."""
    base = dict(guided=False, hist=0, noise="philox")
    others = [
        ((2, 64), torch.float32, torch.bfloat16, dict(base, guided=True, clip=True)),
        ((2, 64), torch.float32, torch.bfloat16, dict(base, guided=True, x_dtype=torch.float32)),
        ((2, 64), torch.float32, torch.bfloat16, dict(base, guided=True, mi="model")),
        ((2, 64), torch.bfloat16, torch.bfloat16, dict(base, guided=True)),
        ((2, 64), torch.float32, torch.bfloat16, dict(base, hist=1)),
        ((2, 64), torch.float32, torch.bfloat16, dict(base, x_dtype=torch.bfloat16)),
        ((2, 64), torch.float32, torch.bfloat16, dict(base, mi="same")),
        ((2, 64), torch.float32, torch.bfloat16, dict(base, mi="dup-bf16")),
        ((2, 64), torch.float32, torch.bfloat16, dict(base, table_dtype=torch.float64)),
        ((2, 37), torch.float32, torch.bfloat16, base),
        ((2, 64), torch.bfloat16, torch.float16, base),
        ((2, 64), torch.bfloat16, torch.float32, base),
    ]
    for shape, zdt, odt, kw in others:
        case = make_case(shape, zdt, odt, **kw)
        assert _plan(emu, case) == ("generic" if shape == (2, 37) else "aligned"), (shape, zdt, odt, kw)
        _check(emu, case)


@pytest.mark.parametrize("noise", NOISE_MODES)
def test_float64(emu, noise):
    case = make_case(
        (2, 3, 16),
        torch.float64,
        torch.bfloat16,
        hist=3,
        clip=True,
        noise=noise,
        x_dtype=torch.float64,
        mi="dup-bf16",
        hist_dtypes=(torch.float64, torch.float32, torch.float16),
    )
    _check(emu, case)


def test_equals_reference_in_place(emu):
    case = make_case((2, 16, 8, 8), torch.bfloat16, torch.bfloat16, hist=1, noise="tensor", mi="dup-bf16")
    assert_matches(case.run(Emulated(emu), in_place=True), case.run(REF), exact=True)


@pytest.mark.parametrize("table_dtype", [torch.float32, torch.float64], ids=["table_f32", "table_f64"])
def test_unused_table_columns_are_never_read(emu, table_dtype):
    """Columns a launch does not use cannot reach its outputs (the kernels now load only the used ones): NaN in
    the guidance weight of an unguided step, the history slots past the history given, and the noise and
    model-input columns when absent changes nothing, in the emulated CUDA kernel and in the CPU kernel. (A used
    column left unread would read as 0, which the matrix tests catch.)"""
    case = make_case((2, 4, 16), torch.float32, torch.bfloat16, guided=False, hist=1, noise="none", mi=None,
                     table_dtype=table_dtype)
    want = case.run(cuda_backend())
    case.table[:, [W, H1, H2, CN, CIN]] = float("nan")
    assert_matches(case.run(Emulated(emu)), want, exact=True)
    assert_matches(case.run(cuda_backend()), want, exact=True)


# --------------------------------------------------------------------------- the GPU kernels' float32 normals


def test_angle_part_bit_exact_over_every_angle(emu):
    """cos_sin_pi, the angle part the CUDA kernel runs, equals the numpy statement of fastflow.noise's
    evaluation bit for bit for all 2**23 angles (the Triton kernel is held to the same statement)."""
    v = noise_f32.all_angles()
    got_cos, got_sin = emu.cos_sin_pi(torch.from_numpy(v))
    want_cos, want_sin = noise_f32.cos_sin_pi(v)
    np.testing.assert_array_equal(got_cos.numpy().view(np.int32), want_cos.view(np.int32))
    np.testing.assert_array_equal(got_sin.numpy().view(np.int32), want_sin.view(np.int32))


def test_float32_normals_within_spec(emu):
    """The device's float32 transform (its host build computes the device's bits: explicit fmas, a correctly
    rounded square root) stays within 1e-6 of the float64 spec, over random words and the extreme uniforms and
    quarter-turn angles."""
    rng = np.random.default_rng(5)
    words = rng.integers(0, 2**32, size=(1 << 18, 4), dtype=np.uint64)
    m = np.array([0, 1, 2, (1 << 21) - 1, 1 << 21, (1 << 22) - 1, 1 << 22, 3 << 21, (3 << 21) - 1, (1 << 23) - 1],
                 dtype=np.uint64)
    edges = (m[:, None] << np.uint64(9)) | np.array([0, 511], dtype=np.uint64)[None, :]
    edge_words = np.stack(np.meshgrid(edges.ravel(), edges.ravel(), indexing="ij"), -1).reshape(-1, 2)
    words = np.concatenate([words, np.concatenate([edge_words, edge_words], axis=1)]).astype(np.int64)
    got = emu.normals_f32(torch.from_numpy(words)).double()
    w = torch.from_numpy(words)
    want = torch.stack(noise_spec.words_to_normals(*(w[:, j] for j in range(4))), dim=-1)
    err = (got - want).abs() / want.abs().clamp(min=1.0)
    assert err.max().item() <= 1e-6


def test_log_uniform_on_every_uniform(emu):
    """The radius's log (log_uniform_f32: CUDA's logf without its special-case tests; a GPU check,
    scripts/check_noise_math.cu, compares the two bit for bit) is within one float32 ulp of the exact log on
    each of the 2**23 uniforms (2m + 1) 2**-24 the transform takes."""
    u = (torch.arange(1 << 23, dtype=torch.float64) * 2 + 1) * 2.0**-24
    got = emu.log_uniform_f32(u.float()).double()
    want = torch.log(u)
    ulp = (torch.nextafter(got.float(), torch.tensor(-float("inf"))).double() - got).abs()
    assert ((got - want).abs() <= ulp).all()
    assert not torch.equal(got, want.float().double())  # not the correctly rounded log: about 1 ulp, as logf


def test_log_uniform_bit_exact_over_every_uniform(emu):
    """log_uniform_f32 equals the numpy statement of its reduction and fmas (noise_f32.log_uniform) bit for bit on
    every uniform: the GPU check holds it to logf, and a changed constant or step, within an ulp of the log
    still, would move the device's normals off the Triton kernel's."""
    u = ((np.arange(1 << 23, dtype=np.int64) * 2 + 1) * 2.0**-24).astype(np.float32)
    got = emu.log_uniform_f32(torch.from_numpy(u)).numpy()
    np.testing.assert_array_equal(got.view(np.int32), noise_f32.log_uniform(u).view(np.int32))

