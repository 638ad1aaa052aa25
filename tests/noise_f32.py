"""A numpy statement of the GPU kernels' float32 angle evaluation (``fastflow.noise`` writes it out),
with exactly rounded fmas, so the Triton and CUDA implementations can each be checked against it bit for bit
on the CPU; and of the CUDA kernel's radius log (``log_uniform``). Imported as ``noise_f32`` (``tests/`` is on
``sys.path`` through its conftest).
"""

from __future__ import annotations

import numpy as np

from fastflow import noise


def fma32(a, b, c) -> np.ndarray:
    """float32 fma, rounded once: the float32 product is exact in float64, the float64 sum is rounded to odd
    (its error found by TwoSum), and a float64 rounded to odd rounds to float32 as the exact sum would."""
    p = np.asarray(a, np.float32).astype(np.float64) * np.asarray(b, np.float32).astype(np.float64)
    c = np.broadcast_to(np.asarray(c, np.float32).astype(np.float64), p.shape)
    s = p + c
    bp = s - c
    err = (p - bp) + (c - (s - bp))
    inexact_even = (err != 0) & ((s.view(np.int64) & 1) == 0)
    s = np.where(inexact_even, np.nextafter(s, np.copysign(np.inf, err)), s)
    return s.astype(np.float32)


def all_angles() -> np.ndarray:
    """Every ``v = (2m + 1) 2**-23 - 1`` a Philox word gives (m < 2**23), in float32 (exact)."""
    m = np.arange(1 << 23, dtype=np.int64)
    return ((2 * m + 1).astype(np.float32) * np.float32(2.0**-23) - np.float32(1)).astype(np.float32)


def mul_add32(a, b, c) -> np.ndarray:
    """float32 ``a * b + c`` rounded twice (the product, then the sum): an fma as an evaluator without one makes it."""
    return (np.asarray(a, np.float32) * np.asarray(b, np.float32)).astype(np.float32) + np.asarray(c, np.float32)


def cos_sin_pi(v: np.ndarray, fused: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """float32 cos(pi v), sin(pi v): quarter-turn reduction, fma polynomials, swap and signs. ``fused=False``: each
    fma rounded twice, as Triton's interpreter before 3.9 evaluates ``tl.fma``."""
    fma = fma32 if fused else mul_add32
    v = np.asarray(v, np.float32)
    q = np.floor(v * np.float32(2) + np.float32(0.5)).astype(np.float32)
    t = ((v + q * np.float32(-0.5)) * np.float32(np.pi)).astype(np.float32)
    s = t * t
    s0, s1, s2 = (np.float32(c) for c in noise.SIN_POLY)
    c0, c1, c2, c3 = (np.float32(c) for c in noise.COS_POLY)
    sin_t = fma(t * s, fma(s, fma(s, s2, s1), s0), t)
    cos_t = fma(s, fma(s, fma(s, fma(s, c3, c2), c1), c0), np.float32(1))
    quarter = q.astype(np.int64) & 3
    odd = (quarter & 1) != 0
    sin_v = np.where(odd, cos_t, sin_t)
    cos_v = np.where(odd, sin_t, cos_t)
    sin_v = np.where((quarter & 2) != 0, -sin_v, sin_v)
    cos_v = np.where(((quarter + 1) & 2) != 0, -cos_v, cos_v)
    return cos_v.astype(np.float32), sin_v.astype(np.float32)


# log_uniform's polynomial P(f), highest power first, and ln 2 (float32 values: CUDA's logf, read off its code).
LOG_POLY = tuple(float.fromhex(c) for c in (
    "-0x1.0aa04ep-3", "0x1.2073ecp-3", "-0x1.f19b98p-4", "0x1.1e52aap-3", "-0x1.55b172p-3", "0x1.99da16p-3",
    "-0x1.fffe44p-3", "0x1.5554f0p-2", "-0x1p-1",
))  # fmt: skip
LN2 = float.fromhex("0x1.62e430p-1")


def log_uniform(u: np.ndarray) -> np.ndarray:
    """float32 log(u) for a transform's uniform u, as csrc/fastflow_step.h's log_uniform_f32 (CUDA's logf for a
    positive normal input): u = 2**k (1 + f) with 1 + f in [2/3, 4/3), then k ln2 + f + f**2 P(f) in fmas."""
    bits = np.asarray(u, np.float32).view(np.uint32)
    k_bits = (bits - np.uint32(0x3F2AAAAB)) & np.uint32(0xFF800000)
    f = (bits - k_bits).view(np.float32) - np.float32(1)
    k = k_bits.view(np.int32).astype(np.float32) * np.float32(2.0**-23)
    p = fma32(f, LOG_POLY[0], LOG_POLY[1])
    for c in LOG_POLY[2:]:
        p = fma32(f, p, c)
    p = f * p
    return fma32(k, LN2, fma32(f, p, f))
