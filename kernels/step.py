"""The fused step kernel: one pass over memory evaluates one stage of a step plan.

Per element (see :mod:`fastflow.plan`), in float32::

    o      = o_uncond + W * (o_cond - o_uncond)      # GUIDED
    x_hat  = clamp(AZ * z + AO * o, -clip, clip)     # CLIP
    z_next = CZ * z + CX * x_hat + H0 * h0 + H1 * h1 + H2 * h2 + CN * xi
    model_in = CIN * z_next

Layout: grid ``(cdiv(n, BLOCK), B)`` where ``n`` is the number of elements of one
sample. A program covers ``BLOCK`` consecutive elements of one sample, so the
sample-local index that keys the noise is ``pid0 * BLOCK + lane`` and the noise
groups of four never straddle programs (``BLOCK`` is a multiple of 4). Offsets are
int64, so tensors past 2**31 elements are fine. ``BLOCK`` is 1024 (smaller for small
samples) with four elements per thread; see ``_launch_config``.

Compile-time switches (each a small specialization, no dead loads):
``STEP_PTR`` (step row read from a device tensor: graph mode), ``GUIDED``,
``NUM_HIST`` (0..3), ``CLIP``, ``NOISE`` (0 none, 1 Philox in the kernel, 2 an
explicit tensor), ``WRITE_X``, ``WRITE_MI`` and ``MI_DUP`` (write the model input
to both halves of a ``2B`` batch).

Noise follows :mod:`fastflow.noise` exactly: one Philox4x32-10 call per group of
four elements, whose four normals are interleaved back into element order.

Kernels launch with ``enable_fp_fusion=False`` (``COMPILE_OPTIONS``): every
multiply and add rounds once, in the order written, as the torch reference's
separate ops do (and as the CUDA kernel's ``__fmul_rn``/``__fadd_rn``), whatever
the compiler's default: the backends round alike on the same inputs.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastflow import noise as _noise_spec
from fastflow import plan as _plan

# Column indices and noise constants, as compile-time values of the kernel.
_W = tl.constexpr(_plan.W)
_AZ = tl.constexpr(_plan.AZ)
_AO = tl.constexpr(_plan.AO)
_CZ = tl.constexpr(_plan.CZ)
_CX = tl.constexpr(_plan.CX)
_H0 = tl.constexpr(_plan.H0)
_H1 = tl.constexpr(_plan.H1)
_H2 = tl.constexpr(_plan.H2)
_CN = tl.constexpr(_plan.CN)
_CIN = tl.constexpr(_plan.CIN)
_NUM_COEFS = tl.constexpr(_plan.NUM_COEFS)

_PHILOX_M0 = tl.constexpr(_noise_spec.PHILOX_M0)
_PHILOX_M1 = tl.constexpr(_noise_spec.PHILOX_M1)
_PHILOX_W0 = tl.constexpr(_noise_spec.PHILOX_W0)
_PHILOX_W1 = tl.constexpr(_noise_spec.PHILOX_W1)
_PHILOX_ROUNDS = tl.constexpr(_noise_spec.PHILOX_ROUNDS)
_S0, _S1, _S2 = (tl.constexpr(c) for c in _noise_spec.SIN_POLY)
_C0, _C1, _C2, _C3 = (tl.constexpr(c) for c in _noise_spec.COS_POLY)

NOISE_NONE = 0
NOISE_PHILOX = 1
NOISE_TENSOR = 2


@triton.jit
def philox4x32(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 counters and key; the key is bumped between rounds only."""
    m0 = tl.full(c0.shape, _PHILOX_M0, tl.uint32)
    m1 = tl.full(c0.shape, _PHILOX_M1, tl.uint32)
    for r in tl.static_range(_PHILOX_ROUNDS):
        if r > 0:
            k0 = k0 + _PHILOX_W0
            k1 = k1 + _PHILOX_W1
        hi0 = tl.umulhi(m0, c0)
        lo0 = m0 * c0
        hi1 = tl.umulhi(m1, c2)
        lo1 = m1 * c2
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


@triton.jit
def cos_sin_pi(v):
    """float32 ``cos(pi v)`` and ``sin(pi v)`` for ``v`` in (-1, 1), evaluated as :mod:`fastflow.noise` writes it.

    The angle is reduced to ``t`` in ``[-pi/4, pi/4]`` by whole quarter turns (exact
    in float32, since ``v`` has 23 fraction bits), where the short polynomials of
    :data:`fastflow.noise.SIN_POLY` and ``COS_POLY`` are within an ulp; the quarter
    turn then swaps and negates them. The polynomials are explicit fmas and the
    kernels compile without fp fusion, so these bits do not depend on the compiler's
    contraction choices and the CUDA kernel (``cos_sin_pi`` in ``csrc/fastflow_step.h``)
    reproduces them.
    """
    q = tl.floor(v * 2.0 + 0.5)
    t = (v + q * -0.5) * 3.141592653589793
    t2 = t * t
    s = tl.fma(t * t2, tl.fma(t2, tl.fma(t2, _S2, _S1), _S0), t)
    c = tl.fma(t2, tl.fma(t2, tl.fma(t2, tl.fma(t2, _C3, _C2), _C1), _C0), 1.0)
    quarter = q.to(tl.int32) & 3
    odd = (quarter & 1) != 0  # a quarter turn swaps sine and cosine
    sin_v = tl.where(odd, c, s)
    cos_v = tl.where(odd, s, c)
    sin_v = tl.where((quarter & 2) != 0, -sin_v, sin_v)  # quarters 2, 3
    cos_v = tl.where(((quarter + 1) & 2) != 0, -cos_v, cos_v)  # quarters 1, 2
    return cos_v, sin_v


@triton.jit
def _box_muller(xa, xb):
    """Two normals from two Philox words: radius from ``xa``, angle from ``xb`` (both uniforms exact)."""
    u = ((xa >> 9).to(tl.float32) * 2.0 + 1.0) * 5.9604644775390625e-08  # (2m+1) * 2**-24
    v = ((xb >> 9).to(tl.float32) * 2.0 + 1.0) * 1.1920928955078125e-07 - 1.0  # (2m+1) * 2**-23 - 1
    r = tl.sqrt_rn(-2.0 * tl.log(u))
    cos_v, sin_v = cos_sin_pi(v)
    return r * cos_v, r * sin_v


@triton.jit
def philox_normals(g, step, seed, TAG: tl.constexpr):
    """The spec's four normals of each noise group ``g`` (int64) for ``step`` and an int64 ``seed``."""
    c0 = g.to(tl.uint32)
    c1 = (g >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0) + step.to(tl.uint32)
    c3 = tl.full(c0.shape, TAG, tl.uint32)
    k0 = seed.to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    x0, x1, x2, x3 = philox4x32(c0, c1, c2, c3, k0, k1)
    n0, n1 = _box_muller(x0, x1)
    n2, n3 = _box_muller(x2, x3)
    return n0, n1, n2, n3


@triton.jit
def philox_block_noise(pid_n, step, seed, BLOCK: tl.constexpr, TAG: tl.constexpr):
    """Noise for elements ``pid_n * BLOCK + arange(BLOCK)`` of one sample: one Philox call per four."""
    GROUPS: tl.constexpr = BLOCK // 4
    g = pid_n.to(tl.int64) * GROUPS + tl.arange(0, GROUPS).to(tl.int64)
    n0, n1, n2, n3 = philox_normals(g, step, seed, TAG)
    # [G, 2, 2] with [g, i, j] = n[2i + j]; row-major flattening gives n0, n1, n2, n3 per group.
    return tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), (BLOCK,))


@triton.jit
def _store(ptrs, x, mask):
    """Store float32 ``x`` rounded once to nearest-even in the pointer's dtype.

    bfloat16 is rounded with integer ops so the CPU interpreter (whose own cast
    truncates) and the GPU give the same bits.
    """
    if ptrs.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (((bits >> 16) & 1) + 0x7FFF)
        y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        tl.store(ptrs, tl.where(x != x, x.to(tl.bfloat16), y), mask=mask)
    else:
        tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["step", "rows"])
def fused_step_kernel(
    z_ptr,
    out_ptr,
    o_ptr,
    ou_ptr,
    h0_ptr,
    h1_ptr,
    h2_ptr,
    xi_ptr,
    seeds_ptr,
    x_ptr,
    mi_ptr,
    table_ptr,
    step,
    n,
    rows,
    clip,
    STEP_PTR: tl.constexpr,
    GUIDED: tl.constexpr,
    NUM_HIST: tl.constexpr,
    CLIP: tl.constexpr,
    NOISE: tl.constexpr,
    WRITE_X: tl.constexpr,
    WRITE_MI: tl.constexpr,
    MI_DUP: tl.constexpr,
    TAG: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs = pid_n.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < n
    idx = pid_b.to(tl.int64) * n + offs

    if STEP_PTR:  # noqa: SIM108 (compile-time switch)
        row_step = tl.load(step).to(tl.int64)
    else:
        row_step = step.to(tl.int64)
    # A step outside the table (a device tensor the host never reads) reads row 0 and makes every output NaN, as
    # the CUDA kernel does: the device cannot raise, and NaN makes the error visible.
    in_table = (row_step >= 0) & (row_step < rows)
    row = table_ptr + tl.where(in_table, row_step, 0) * _NUM_COEFS
    az = tl.where(in_table, tl.load(row + _AZ).to(tl.float32), float("nan"))
    ao = tl.where(in_table, tl.load(row + _AO).to(tl.float32), float("nan"))
    cz = tl.where(in_table, tl.load(row + _CZ).to(tl.float32), float("nan"))
    cx = tl.load(row + _CX).to(tl.float32)

    z = tl.load(z_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    o = tl.load(o_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    if GUIDED:
        w = tl.load(row + _W).to(tl.float32)
        ou = tl.load(ou_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        o = ou + w * (o - ou)
    x = az * z + ao * o
    if CLIP:
        x = tl.where(x != x, x, tl.minimum(tl.maximum(x, -clip), clip))  # NaN stays NaN, as torch.clamp keeps it
    zn = cz * z + cx * x
    if NUM_HIST >= 1:
        zn = zn + tl.load(row + _H0).to(tl.float32) * tl.load(h0_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    if NUM_HIST >= 2:
        zn = zn + tl.load(row + _H1).to(tl.float32) * tl.load(h1_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    if NUM_HIST >= 3:
        zn = zn + tl.load(row + _H2).to(tl.float32) * tl.load(h2_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    if NOISE == 1:
        seed = tl.load(seeds_ptr + pid_b)
        xi = philox_block_noise(pid_n, row_step, seed, BLOCK, TAG)
        zn = zn + tl.load(row + _CN).to(tl.float32) * xi
    if NOISE == 2:
        xi = tl.load(xi_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        zn = zn + tl.load(row + _CN).to(tl.float32) * xi

    # Every load above precedes every store, so out (or x_out) may alias z or a history input.
    if WRITE_X:
        _store(x_ptr + idx, x, mask)
    if WRITE_MI:
        mi = tl.load(row + _CIN).to(tl.float32) * zn
        _store(mi_ptr + idx, mi, mask)
        if MI_DUP:
            _store(mi_ptr + tl.num_programs(1).to(tl.int64) * n + idx, mi, mask)
    _store(out_ptr + idx, zn, mask)


@triton.jit(do_not_specialize=["step"])
def noise_kernel(out_ptr, seeds_ptr, step, n, TAG: tl.constexpr, BLOCK: tl.constexpr):
    """The spec's noise for each sample of ``out`` ([B, n], float32 or lower): same code path as the step."""
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs = pid_n.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < n
    seed = tl.load(seeds_ptr + pid_b)
    xi = philox_block_noise(pid_n, step, seed, BLOCK, TAG)
    _store(out_ptr + pid_b.to(tl.int64) * n + offs, xi, mask)


# Launch configuration: BLOCK elements per program (a power of two, >= 4) with four
# elements per thread. Four per thread lets every access of mixed float32/bfloat16
# tensors, and the interleave of the four normals of a Philox call, share one
# register layout; more per thread makes Triton shuffle values through shared memory.
MAX_BLOCK = 1024
MIN_BLOCK = 128
# Options of every launch (see the module docstring): no multiply-add contraction.
COMPILE_OPTIONS = {"enable_fp_fusion": False}
MAX_GRID_Y = 65535


def _launch_config(n: int, block: int | None) -> tuple[int, int, int]:
    """(BLOCK, num_warps, programs per sample); plain integer math, since host time per launch counts."""
    if block is None:
        block = min(MAX_BLOCK, max(MIN_BLOCK, 1 << (n - 1).bit_length()))
    elif block < 4 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 4, got {block}")
    return block, min(32, max(1, block // 128)), -(-n // block)


def launch_fused_step(
    z,
    out,
    model_out,
    model_out_uncond,
    history,
    table,
    step,
    seeds,
    noise,
    x_out,
    model_in_out,
    clip,
    use_noise: bool,
    block: int | None = None,
) -> None:
    """Launch the fused step on validated, contiguous tensors (see ``fastflow.backends.triton``).

    Unused pointer slots get ``z`` as a placeholder; the compile-time switches keep
    the kernel from touching them.
    """
    batch = z.shape[0]
    if batch == 0:
        return
    n = z.numel() // batch
    if n == 0:
        return
    blk, warps, programs = _launch_config(n, block)
    nh = len(history)
    h0 = history[0] if nh > 0 else z
    h1 = history[1] if nh > 1 else z
    h2 = history[2] if nh > 2 else z
    if not use_noise:
        mode = NOISE_NONE
    elif noise is None:
        mode = NOISE_PHILOX
    else:
        mode = NOISE_TENSOR
    step_ptr = not isinstance(step, int)
    fused_step_kernel[(programs, batch)](
        z,
        out,
        model_out,
        z if model_out_uncond is None else model_out_uncond,
        h0,
        h1,
        h2,
        z if noise is None else noise,
        z if seeds is None else seeds,
        z if x_out is None else x_out,
        z if model_in_out is None else model_in_out,
        table,
        step,
        n,
        table.shape[0],
        0.0 if clip is None else float(clip),
        STEP_PTR=step_ptr,
        GUIDED=model_out_uncond is not None,
        NUM_HIST=nh,
        CLIP=clip is not None,
        NOISE=mode,
        WRITE_X=x_out is not None,
        WRITE_MI=model_in_out is not None,
        MI_DUP=model_in_out is not None and model_in_out.shape[0] != batch,
        TAG=_noise_spec.STEP_TAG,
        BLOCK=blk,
        num_warps=warps,
        **COMPILE_OPTIONS,
    )


def launch_noise(out, seeds, step: int, tag: int = _noise_spec.STEP_TAG, block: int | None = None) -> None:
    """Fill contiguous ``out`` ([B, ...]) with the spec's noise; used by tests and for initial latents."""
    batch = out.shape[0]
    n = out.numel() // batch if batch else 0
    if n == 0:
        return
    blk, warps, programs = _launch_config(n, block)
    noise_kernel[(programs, batch)](out, seeds, step, n, TAG=tag, BLOCK=blk, num_warps=warps, **COMPILE_OPTIONS)
