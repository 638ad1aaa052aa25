"""A numpy statement of the GPU kernels' float32 angle evaluation (``fastflow.noise`` writes it out),
with exactly rounded fmas, so the Triton and CUDA implementations can each be checked against it bit for bit
on the CPU. Imported as ``noise_f32`` (``tests/`` is on ``sys.path`` through its conftest).
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


def cos_sin_pi(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 cos(pi v), sin(pi v): quarter-turn reduction, fma polynomials, swap and signs."""
    v = np.asarray(v, np.float32)
    q = np.floor(v * np.float32(2) + np.float32(0.5)).astype(np.float32)
    t = ((v + q * np.float32(-0.5)) * np.float32(np.pi)).astype(np.float32)
    s = t * t
    s0, s1, s2 = (np.float32(c) for c in noise.SIN_POLY)
    c0, c1, c2, c3 = (np.float32(c) for c in noise.COS_POLY)
    sin_t = fma32(t * s, fma32(s, fma32(s, s2, s1), s0), t)
    cos_t = fma32(s, fma32(s, fma32(s, fma32(s, c3, c2), c1), c0), np.float32(1))
    quarter = q.astype(np.int64) & 3
    odd = (quarter & 1) != 0
    sin_v = np.where(odd, cos_t, sin_t)
    cos_v = np.where(odd, sin_t, cos_t)
    sin_v = np.where((quarter & 2) != 0, -sin_v, sin_v)
    cos_v = np.where(((quarter + 1) & 2) != 0, -cos_v, cos_v)
    return cos_v.astype(np.float32), sin_v.astype(np.float32)
