"""The CUDA kernel of the C++ extension on a GPU: against the torch reference, the
Triton kernel and the noise spec; CUDA-graph capture; no host syncs; int64 indexing.

Skipped without a CUDA device (the ``gpu`` marker) or without the CUDA build.
``-s`` shows the timing report of ``test_timing_report``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from backends.step_cases import DTYPES, NOISE_MODES, REF, step_matrix
from csrc_cases import (
    DRAW_PLANS,
    DTYPE_PLAN_OPTIONS,
    DTYPE_PLANS,
    assert_matches,
    cuda_backend,
    draw_plan_clips,
    draw_plan_model_input,
    make_case,
    matrix_case,
    plan_id,
)

from fastflow import noise as noise_spec
from fastflow.backends import get_backend
from fastflow.backends.cuda import CudaBackend, philox_words
from fastflow.plan import NUM_COEFS

pytestmark = pytest.mark.gpu
DEV = "cuda"


@pytest.fixture(scope="module")
def cb() -> CudaBackend:
    backend = cuda_backend()
    reason = backend.supports(torch.device(DEV))
    if reason is not None:
        pytest.skip(reason)
    return backend


@pytest.fixture(scope="module")
def tb():
    backend = get_backend("triton")
    reason = backend.availability() or backend.supports(torch.device(DEV))
    if reason is not None:
        pytest.skip(f"Triton backend: {reason}")
    return backend


# --------------------------------------------------------------------------- matrix


@step_matrix
def test_matrix(cb, zdt, odt, guided, clip, hist, noise):
    """The CPU matrix at a realistic size (2 x 16 x 64 x 64), secondary options rotating."""
    ni = NOISE_MODES.index(noise)
    case = matrix_case((2, 16, 64, 64), zdt, odt, guided, clip, hist, noise, device=DEV)
    in_place = (hist + ni) % 2 == 1
    assert_matches(case.run(cb, in_place=in_place), case.run(REF), exact=False)


@pytest.mark.parametrize("odt", DTYPES, ids=lambda d: f"o_{str(d)[6:]}")
@pytest.mark.parametrize("zdt", DTYPES, ids=lambda d: f"z_{str(d)[6:]}")
def test_bit_exact_without_noise(cb, zdt, odt):
    """Without drawn noise the kernel rounds exactly as the reference (no FMA contraction): bit-identical."""
    case = make_case(
        (2, 16, 32, 32), zdt, odt, hist=3, clip=True, noise="tensor", x_dtype=torch.bfloat16, mi="dup-fp16", device=DEV
    )
    assert_matches(case.run(cb), case.run(REF), exact=True)


@pytest.mark.parametrize("noise", NOISE_MODES)
def test_float64_state(cb, noise):
    case = make_case(
        (2, 4, 33, 9),
        torch.float64,
        torch.float32,
        hist=2,
        noise=noise,
        x_dtype=torch.float64,
        mi="same",
        device=DEV,
        hist_dtypes=(torch.float64, torch.bfloat16),
    )
    got, want = case.run(cb), case.run(REF)
    if noise == "philox":  # device normals are float-accurate in double math: compare loosely
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-9)
    else:
        assert_matches(got, want, exact=False)


@pytest.mark.parametrize(
    "shape",
    [(1, 1), (2, 3), (3, 4), (2, 5), (2, 130), (2, 3, 7, 11), (1, 517), (3, 1030), (1, 16, 21, 90, 160),
     (2, 16, 21, 90, 160)],
    ids=str,
)
def test_odd_and_large_sizes(cb, shape):
    """Scalar tails (samples not a multiple of 8), several items per sample, and video latents of 4.8M and 9.7M
    elements, where the drawing kernel's threads take 2 and 4 items each (step_grid, csrc/step_kernel_body.h)."""
    case = make_case(
        shape, torch.float32, torch.bfloat16, hist=1, noise="philox", x_dtype=torch.float16, mi="dup-bf16", device=DEV
    )
    assert_matches(case.run(cb), case.run(REF), exact=False)


@pytest.mark.parametrize("noise", ["philox", "tensor"])
def test_batch_past_the_grid_rows(cb, noise):
    """More samples than the grid's 65535 rows: blocks stride over samples; tiny samples get one-warp blocks."""
    case = make_case((70001, 6), torch.float32, torch.bfloat16, hist=1, noise=noise, mi="dup-bf16", device=DEV)
    assert_matches(case.run(cb), case.run(REF), exact=noise != "philox")


def test_unaligned_tensors_use_the_scalar_path(cb):
    """Tensors starting one element past a 16-byte boundary give the same numbers as aligned ones."""
    case = make_case((2, 8, 64), torch.float32, torch.bfloat16, hist=2, noise="philox", mi="dup-bf16", device=DEV)
    want = case.run(REF)

    def shifted(t: torch.Tensor) -> torch.Tensor:
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=DEV)
        view = buf[1:].view(t.shape)
        view.copy_(t)
        return view

    case.z, case.model_out, case.uncond = shifted(case.z), shifted(case.model_out), shifted(case.uncond)
    case.history = [shifted(h) for h in case.history]
    assert case.z.data_ptr() % 16 != 0
    assert_matches(case.run(cb), want, exact=False)


def test_sample_alone_equals_in_batch(cb):
    case = make_case((4, 16, 32, 32), torch.float32, torch.bfloat16, hist=2, noise="philox", device=DEV)
    full = case.run(cb)
    k = 3
    case.z, case.model_out, case.uncond = case.z[k : k + 1], case.model_out[k : k + 1], case.uncond[k : k + 1]
    case.history = [h[k : k + 1] for h in case.history]
    case.seeds = case.seeds[k : k + 1]
    assert torch.equal(case.run(cb)["out"][0], full["out"][k])


def test_cpu_and_cuda_builds_agree(cb):
    """The same header on both sides: equal without noise, float-ulp close with it."""
    for noise in ("tensor", "philox"):
        case = make_case((2, 16, 32, 32), torch.float32, torch.bfloat16, hist=3, clip=True, noise=noise, mi="same")
        cpu = case.run(cb)
        gpu_case = make_case(
            (2, 16, 32, 32), torch.float32, torch.bfloat16, hist=3, clip=True, noise=noise, mi="same", device=DEV
        )
        gpu = {k: v.cpu() for k, v in gpu_case.run(cb).items()}
        assert_matches(gpu, cpu, exact=noise != "philox")


# --------------------------------------------------------------------------- noise


def test_philox_words_bit_exact(cb):
    g = torch.Generator().manual_seed(2)
    counter = torch.randint(0, 2**32, (1 << 16, 4), generator=g, dtype=torch.int64)
    key = torch.randint(0, 2**32, (1 << 16, 2), generator=g, dtype=torch.int64)
    want = np.stack(noise_spec.philox4x32_numpy(*counter.T.numpy(), *key.T.numpy()), axis=1).astype(np.int64)
    got = philox_words(counter.to(DEV), key.to(DEV)).cpu().numpy()
    assert np.array_equal(got, want)


@pytest.mark.parametrize("tag", [noise_spec.STEP_TAG, noise_spec.INIT_TAG])
def test_normals_match_reference(cb, tag):
    """Device normals (float logf/sqrtf/sincospif) against the reference's double-precision transform."""
    seeds = noise_spec.as_seed_tensor([0, 1, 2**32 + 7, 2**64 - 1], 4, DEV)
    got = cb.noise(seeds, (16, 128, 128), step=11, tag=tag)
    want = noise_spec.normal(seeds, (16, 128, 128), step=11, tag=tag)
    rel = ((got.double() - want.double()).abs() / want.double().abs().clamp_min(1e-3)).max().item()
    same = (got == want).double().mean().item()
    print(f"\nnormals: {same:.4%} bit-identical to the reference, max relative difference {rel:.3g}")
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    fused = torch.zeros(4, 16, 128, 128, device=DEV)
    table = torch.zeros(12, NUM_COEFS, device=DEV)
    table[11, 8] = 1.0
    if tag == noise_spec.STEP_TAG:
        cb.fused_step(fused, fused, torch.zeros_like(fused), None, [], table, 11, seeds=seeds, use_noise=True)
        print(f"fused step normals bit-identical to the noise kernel's: {torch.equal(fused, got)}")
        torch.testing.assert_close(fused, got, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("noise", NOISE_MODES)
def test_cuda_equals_triton(cb, tb, noise):
    """Switching backends gives the same outputs on the same inputs, bit for bit: both kernels round each mul
    and add once in the reference's order and draw the same normals."""
    case = make_case(
        (2, 16, 64, 64),
        torch.float32,
        torch.bfloat16,
        hist=2,
        clip=True,
        noise=noise,
        x_dtype=torch.float32,
        mi="dup-bf16",
        device=DEV,
    )
    assert_matches(case.run(cb), case.run(tb), exact=True)


@pytest.mark.parametrize("plan", DRAW_PLANS, ids=plan_id)
def test_draw_plans_equal_triton(cb, tb, plan):
    """Every compile-time plan of the drawing kernel (the CPU emulation checks that the launcher picks it) gives
    the Triton kernel's bits, with each clipping setting it runs and the step index on the device; the
    float32/bfloat16 plans also at 9.7M elements, where threads take 4 items each."""
    big = (plan.z, plan.model_out) == (torch.float32, torch.bfloat16)
    shapes = [(2, 16, 64, 64)] + ([(2, 16, 21, 90, 160)] if big else [])
    for shape in shapes:
        for clip in draw_plan_clips(plan):
            case = make_case(
                shape, plan.z, plan.model_out, guided=plan.guided, hist=0, clip=clip, noise="philox",
                x_dtype=plan.x_dtype, mi=draw_plan_model_input(plan), step_kind="i64", device=DEV,
            )  # fmt: skip
            got = case.run(cb)
            assert_matches(got, case.run(tb), exact=True)
            assert_matches(got, case.run(REF), exact=False)


@pytest.mark.parametrize("plan", DTYPE_PLANS, ids=plan_id)
def test_dtype_plans_bit_exact(cb, tb, plan):
    """Every dtype plan of the deterministic kernel (the CPU emulation checks that the launcher picks it), over
    the options it leaves to the launch: the reference's bits, and the Triton kernel's; also on samples of an odd
    size (the scalar path)."""
    zdt, odt, x_dtype = plan
    for k, (guided, hist, noise, x_out, mi, clip, step_kind) in enumerate(DTYPE_PLAN_OPTIONS):
        shape = (3, 16, 37, 41) if k == len(DTYPE_PLAN_OPTIONS) - 1 else (2, 16, 64, 64)
        case = make_case(
            shape, zdt, odt, guided=guided, hist=hist, clip=clip, noise=noise, x_dtype=x_dtype if x_out else None,
            mi=mi, step_kind=step_kind, hist_dtypes=(zdt,), noise_dtype=zdt, device=DEV,
        )  # fmt: skip
        got = case.run(cb)
        assert_matches(got, case.run(REF), exact=True)
        assert_matches(got, case.run(tb), exact=True)


def test_cuda_and_triton_draw_the_same_noise(cb, tb):
    """The two kernels evaluate the same float32 transform (fastflow.noise, csrc/noise_poly.h): the same bits."""
    seeds = torch.tensor([7, 2**40 + 3], dtype=torch.int64, device=DEV)
    n_cuda = cb.noise(seeds, (4, 96, 96), step=5)
    n_triton = tb.noise(seeds, (4, 96, 96), step=5)
    print(f"\nCUDA vs Triton normals: max abs difference {(n_cuda - n_triton).abs().max().item():.3g}")
    assert torch.equal(n_cuda, n_triton)


# --------------------------------------------------------------------------- graphs, syncs, streams


def test_cuda_graph_capture_loop(cb):
    """Five stages with history and noise, the step counter advanced on the device, captured and replayed."""
    torch.manual_seed(0)
    shape = (2, 16, 32, 32)
    table = torch.randn(5, NUM_COEFS, device=DEV) * 0.5
    seeds = torch.tensor([1, 2], dtype=torch.int64, device=DEV)
    model_out = torch.randn(shape, device=DEV, dtype=torch.bfloat16)
    z0 = torch.randn(shape, device=DEV)

    def loop(z, x_prev, step):
        for _ in range(5):
            cb.fused_step(z, z, model_out, None, [x_prev], table, step, seeds=seeds, x_out=x_prev, use_noise=True)
            step.add_(1)

    z_e, x_e, s_e = z0.clone(), torch.zeros(shape, device=DEV), torch.zeros(1, dtype=torch.int64, device=DEV)
    loop(z_e, x_e, s_e)

    z_g, x_g, s_g = z0.clone(), torch.zeros(shape, device=DEV), torch.zeros(1, dtype=torch.int64, device=DEV)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture
        loop(z_g.clone(), x_g.clone(), s_g.clone())
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loop(z_g, x_g, s_g)
    z_g.copy_(z0)
    x_g.zero_()
    s_g.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(z_g, z_e) and torch.equal(x_g, x_e) and int(s_g) == 5


def test_no_host_sync(cb):
    """No call syncs the host: int and device steps, noise, 2B model input, strided output, the noise op."""
    case = make_case(
        (2, 16, 32, 32),
        torch.float32,
        torch.bfloat16,
        hist=3,
        clip=True,
        noise="philox",
        device=DEV,
        x_dtype=torch.float32,
        mi="dup-bf16",
    )
    out = torch.empty_like(case.z)
    strided_out = torch.empty(2, 32, 32, 16, device=DEV).permute(0, 3, 1, 2)
    # Device tensors are made before the check: creating them from host data syncs by itself.
    steps = (3, torch.tensor([3], device=DEV), torch.tensor(3, dtype=torch.int32, device=DEV))
    noise_step = torch.tensor([2], device=DEV)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in steps:
            case.step = step
            case.run(cb)
            cb.fused_step(case.z, strided_out, case.model_out, None, [], case.table, step)
            cb.fused_step(
                case.z, out, case.model_out, case.uncond, case.history, case.table, step, noise=out, use_noise=True
            )
        cb.noise(case.seeds, (4, 8), step=noise_step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_runs_on_the_current_stream(cb):
    case = make_case((2, 16, 64, 64), torch.float32, torch.float32, noise="philox", device=DEV)
    want = case.run(REF)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = case.run(cb)
    torch.cuda.current_stream().wait_stream(side)
    assert_matches(got, want, exact=False)


def test_compile_fullgraph_on_cuda(cb):
    torch._dynamo.reset()
    case = make_case((2, 16, 32, 32), torch.float32, torch.bfloat16, hist=1, noise="philox", device=DEV)

    def step(z, mo, uncond, h, table, step_t, seeds):
        out = torch.empty_like(z)
        cb.fused_step(z, out, mo, uncond, [h], table, step_t, seeds=seeds, use_noise=True)
        return out * 2.0

    args = (case.z, case.model_out, case.uncond, case.history[0], case.table, torch.tensor([3], device=DEV), case.seeds)
    assert torch.equal(torch.compile(step, fullgraph=True)(*args), step(*args))


def test_int64_indexing(cb):
    """More than 2**31 elements in one launch: the last elements of the second sample are right."""
    numel = 2**30 + 40  # per sample: two samples pass 2**31 elements (vector path: 40 is a multiple of 8)
    free, _ = torch.cuda.mem_get_info()
    if free < 12 * 2**30:
        pytest.skip("needs 12 GiB of free device memory")
    z = torch.ones(2, numel, dtype=torch.float16, device=DEV)
    mo = torch.full_like(z, 0.5)
    tail = slice(numel - 1000, numel)
    z[1, tail] = torch.linspace(-1, 1, 1000, device=DEV).half()
    table = torch.randn(2, NUM_COEFS, device=DEV)
    want = torch.empty(1, 1000, dtype=torch.float16, device=DEV)
    REF.fused_step(z[1:, tail].contiguous(), want, mo[1:, tail].contiguous(), None, [], table, 1)
    cb.fused_step(z, z, mo, None, [], table, 1)
    torch.cuda.synchronize()
    assert torch.equal(z[1:, tail], want)
    del z, mo
    torch.cuda.empty_cache()


def test_opcheck_cuda(cb):
    """torch.library.opcheck on CUDA tensors (schema, fake impls, functionalization)."""
    case = make_case((2, 3, 8), torch.float32, torch.bfloat16, hist=2, noise="philox", clip=True, device=DEV)
    z = case.z
    args = (z, torch.empty_like(z), case.model_out, case.uncond, case.history, case.table, 0,
            torch.tensor([3], device=DEV), case.seeds, None, torch.empty_like(z),
            torch.empty((4, 3, 8), dtype=torch.bfloat16, device=DEV), 0.8, True)  # fmt: skip
    torch.library.opcheck(torch.ops.fastflow.fused_step.default, args)
    torch.library.opcheck(torch.ops.fastflow.noise.default, (case.seeds, [3, 5], 2, None, 0))
    counter = torch.randint(0, 2**32, (5, 4), dtype=torch.int64, device=DEV)
    key = torch.randint(0, 2**32, (5, 2), dtype=torch.int64, device=DEV)
    torch.library.opcheck(torch.ops.fastflow.philox.default, (counter, key, 10))


# --------------------------------------------------------------------------- timing (report only)


def _device_us(fn, iters: int = 50) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / iters


def test_timing_report(cb):
    """Device time at 19.4M elements against copy bandwidth, and host time per call at (1,16,128,128)."""
    import time

    shape = (4, 16, 21, 90, 160)
    z = torch.randn(shape, device=DEV)
    out = torch.empty_like(z)
    mo = torch.randn(shape, device=DEV, dtype=torch.bfloat16)
    table = torch.randn(4, NUM_COEFS, device=DEV)
    seeds = torch.arange(4, dtype=torch.int64, device=DEV)
    src = torch.empty(z.numel() * 10 // 2, dtype=torch.bfloat16, device=DEV)  # a copy moving the same bytes
    dst = torch.empty_like(src)
    copy_us = _device_us(lambda: dst.copy_(src))
    det_us = _device_us(lambda: cb.fused_step(z, out, mo, None, [], table, 1))
    sto_us = _device_us(lambda: cb.fused_step(z, out, mo, None, [], table, 1, seeds=seeds, use_noise=True))
    small = torch.randn(1, 16, 128, 128, device=DEV)
    small_mo = torch.randn_like(small, dtype=torch.bfloat16)
    small_out = torch.empty_like(small)
    step_t = torch.zeros(1, dtype=torch.int64, device=DEV)
    n = 2000
    for _ in range(100):
        cb.fused_step(small, small_out, small_mo, None, [], table, step_t)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        cb.fused_step(small, small_out, small_mo, None, [], table, step_t)
    host_us = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    print(
        f"\n19.4M elements (fp32 state, bf16 model output, 10 B/elem): copy {copy_us:.1f} us, "
        f"deterministic step {det_us:.1f} us ({copy_us / det_us:.0%} of copy bandwidth), "
        f"stochastic {sto_us:.1f} us ({copy_us / sto_us:.0%}); host time per call at (1,16,128,128): {host_us:.2f} us"
    )
