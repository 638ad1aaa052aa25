"""fastflow's counter-based normal noise: the spec and its torch implementation.

Every backend draws the same numbers, so a sample's noise depends only on its
seed, the step and the element's position inside the sample, never on the batch
it is in, the launch configuration or the backend.

Spec (Philox4x32-10, four normals per call)
-------------------------------------------
For a sample with 64-bit seed ``s``, noise stream ``tag`` (``STEP_TAG`` for the
noise of step ``i``, ``INIT_TAG`` for the initial noise, where ``i = 0``), and the
element at flat index ``e`` inside the sample (row-major over the sample's
shape):

* key     ``k = (s & 0xFFFFFFFF, s >> 32)``
* counter ``c = (g & 0xFFFFFFFF, g >> 32, i, tag)`` with group ``g = e >> 2``
* ``(x0, x1, x2, x3) = Philox4x32-10(c, k)`` (Salmon et al. 2011; round
  multipliers 0xD2511F53, 0xCD9E8D57; Weyl key increments 0x9E3779B9, 0xBB67AE85;
  the key is bumped between rounds, not before the first)
* per 32-bit word: ``m = x >> 9`` (23 bits); radius uniform
  ``u = (2m + 1) * 2**-24`` in (0, 1) and angle uniform
  ``v = (2m + 1) * 2**-23 - 1`` in (-1, 1), both exact in float32
* Box-Muller on the pairs (x0, x1) and (x2, x3):
  ``r = sqrt(-2 ln u0)``, ``n0 = r cos(pi v1)``, ``n1 = r sin(pi v1)``;
  ``r' = sqrt(-2 ln u2)``, ``n2 = r' cos(pi v3)``, ``n3 = r' sin(pi v3)``
* element ``e`` takes ``n[e & 3]``.

The Philox words are the contract bit for bit; the normals involve ``log``,
``cos`` and ``sin`` and agree across backends to float32 round-off (about 1e-6).
The angle is centred on zero so that fast device ``sin``/``cos`` stay accurate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .devices import to_device

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
STEP_TAG = 0
INIT_TAG = 1
_MASK32 = 0xFFFFFFFF
_SEED_MAX = 2**64 - 1
# Seeds fastflow draws, or folds from another generator's seed, lie in [0, 2**62): a batch's seeds (seed + sample
# index) then stay inside int64.
DRAWN_SEED_RANGE = 2**62

__all__ = [
    "DRAWN_SEED_RANGE",
    "INIT_TAG",
    "STEP_TAG",
    "as_seed_tensor",
    "check_normal_args",
    "draw_seed",
    "draw_seed_tensor",
    "normal",
    "philox4x32_numpy",
    "philox4x32_torch",
    "words_to_normals",
]


def draw_seed() -> int:
    """A seed from torch's global CPU generator, so that ``torch.manual_seed`` reproduces it."""
    return int(draw_seed_tensor().item())


def draw_seed_tensor() -> torch.Tensor:
    """:func:`draw_seed`'s draw, as a one-element int64 CPU tensor: for callers that must not read its value (a
    fake tensor has none)."""
    return torch.randint(0, DRAWN_SEED_RANGE, (1,), dtype=torch.int64)


def philox4x32_numpy(c0, c1, c2, c3, k0, k1, rounds: int = PHILOX_ROUNDS):
    """Plain numpy Philox4x32: the executable statement of the spec (uint32 arrays in and out)."""
    c = [np.asarray(v, dtype=np.uint64) & _MASK32 for v in (c0, c1, c2, c3)]
    k0 = np.asarray(k0, dtype=np.uint64) & _MASK32
    k1 = np.asarray(k1, dtype=np.uint64) & _MASK32
    for r in range(rounds):
        if r:
            k0 = (k0 + PHILOX_W0) & _MASK32
            k1 = (k1 + PHILOX_W1) & _MASK32
        p0 = np.uint64(PHILOX_M0) * c[0]
        p1 = np.uint64(PHILOX_M1) * c[2]
        c = [
            (p1 >> np.uint64(32)) ^ c[1] ^ k0,
            p1 & _MASK32,
            (p0 >> np.uint64(32)) ^ c[3] ^ k1,
            p0 & _MASK32,
        ]
    return tuple(v.astype(np.uint32) for v in c)


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of ``a * b`` for a 32-bit constant ``a`` and int64 tensor ``b < 2**32``."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    p_lo = b * a_lo  # < 2**48
    p_hi = b * a_hi  # < 2**48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = ((p_hi & 0xFFFF) << 16).add_(p_lo).bitwise_and_(_MASK32)
    return hi, lo


def philox4x32_torch(c0, c1, c2, c3, k0, k1, rounds: int = PHILOX_ROUNDS):
    """Philox4x32 on int64 tensors holding uint32 values; works on any device and under graph capture."""
    for r in range(rounds):
        if r:
            k0 = (k0 + PHILOX_W0) & _MASK32
            k1 = (k1 + PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def words_to_normals(x0, x1, x2, x3):
    """The spec's uniform and Box-Muller transform, in float64, for int64 tensors of uint32 words."""
    m = [(w >> 9).to(torch.float64) for w in (x0, x1, x2, x3)]
    u0 = (2 * m[0] + 1) * 2.0**-24
    u2 = (2 * m[2] + 1) * 2.0**-24
    v1 = (2 * m[1] + 1) * 2.0**-23 - 1
    v3 = (2 * m[3] + 1) * 2.0**-23 - 1
    r0 = torch.sqrt(-2 * torch.log(u0))
    r2 = torch.sqrt(-2 * torch.log(u2))
    return (
        r0 * torch.cos(torch.pi * v1),
        r0 * torch.sin(torch.pi * v1),
        r2 * torch.cos(torch.pi * v3),
        r2 * torch.sin(torch.pi * v3),
    )


# Float32 evaluation of the angle part on the GPU. The kernels reduce ``pi * v`` by
# whole quarter turns, q = floor(2v + 1/2), to t = (v - q/2) * pi in [-pi/4, pi/4]
# (v - q/2 is exact; one rounding) and evaluate, with s = t * t and each fma
# rounding once,
#   sin t = fma(t * s, fma(s, fma(s, S2, S1), S0), t)
#   cos t = fma(s, fma(s, fma(s, fma(s, C3, C2), C1), C0), 1)
# (least-squares fits on Chebyshev nodes whose float32 error is under 7e-8, about an
# ulp, like libdevice's sinf/cosf at a fraction of the instructions); quarter q swaps
# sine and cosine when odd and negates sine for q & 2, cosine for (q + 1) & 2. The
# normals stay within 1e-6 of the float64 spec (tests check it), and the Triton and
# CUDA kernels, which both evaluate exactly this (csrc/noise_poly.h is generated from
# these constants), are meant to draw the same bits (a GPU test asserts it).
SIN_POLY = (-0.166666543393371, 0.008332148256325866, -0.0001951393256217636)
COS_POLY = (-0.4999999971772059, 0.04166662270225072, -0.0013886748001630312, 2.4389203420783876e-05)


def as_seed_tensor(seed: int | Sequence[int] | torch.Tensor, batch: int, device) -> torch.Tensor:
    """Per-sample seeds as an int64 tensor of shape ``[batch]`` (an int seeds sample b with ``seed + b``).

    A seed is an int or a numpy integer; several are a sequence of them or an int64 tensor of shape ``[batch]``
    (its values taken as the seeds' 64 bits). Anything else (a float, a bool, a string, which would be read
    character by character) raises a TypeError: truncating it would give other noise silently.
    """
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.shape != (batch,):
            raise ValueError(f"seed tensor must be int64 of shape ({batch},), got {seed.dtype} {tuple(seed.shape)}")
        return to_device(seed, device)
    if isinstance(seed, np.ndarray) and seed.ndim == 0:  # a 0-d array holds one seed (it cannot be iterated)
        seed = seed[()]
    if _is_int(seed):
        if 0 <= seed <= _SEED_MAX < seed + batch - 1:
            raise ValueError(f"seed {seed} seeds a batch of {batch} with seed + b, past 2**64 - 1: pass a smaller seed")
        seeds = [int(seed) + b for b in range(batch)]
    elif isinstance(seed, (str, bytes)) or not isinstance(seed, (Sequence, np.ndarray)):
        raise TypeError(f"seed must be an int, a sequence of ints or an integer tensor, got {type(seed).__name__}")
    else:
        bad = next((s for s in seed if not _is_int(s)), None)
        if bad is not None:
            raise TypeError(f"seeds must be ints, got a {type(bad).__name__} ({bad!r})")
        seeds = [int(s) for s in seed]
        if len(seeds) != batch:
            raise ValueError(f"got {len(seeds)} seeds for a batch of {batch}")
    for s in seeds:
        if not 0 <= s <= _SEED_MAX:
            raise ValueError(f"seed {s} is outside [0, 2**64)")
    # int64 holds the seed's 64 bits (values past 2**63 wrap to negatives).
    host = torch.tensor([s - 2**64 if s >= 2**63 else s for s in seeds], dtype=torch.int64)
    return to_device(host, device)  # no host sync on the way to a GPU


def _is_int(value: object) -> bool:
    """A Python or numpy integer, not a bool (True is an int to Python, never a seed)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_normal_args(
    seeds: torch.Tensor, sample_shape: Sequence[int], step: int | torch.Tensor, tag: int, dtype: torch.dtype
) -> None:
    """The arguments every backend's draw of :func:`normal` refuses alike (metadata only: no host sync).

    A counter word is 32 bits, so a host ``step`` or ``tag`` outside ``[0, 2**32)`` would alias another stream;
    a float or bool step would be truncated; an integer ``dtype`` would truncate the normals. A step held in a
    device tensor is not read here (that would sync): the CPU kernels refuse one outside that range when they read
    it, and the GPU kernels take its low 32 bits.
    """
    # On a step's path (a stochastic step of the torch backend draws here): the usual types are tested first.
    if not isinstance(seeds, torch.Tensor) or seeds.dtype != torch.int64:
        got = seeds.dtype if isinstance(seeds, torch.Tensor) else type(seeds).__name__
        raise TypeError(f"seeds must be an int64 tensor (the 64-bit Philox key), got {got}")
    if seeds.dim() != 1:
        raise ValueError(f"seeds must be 1-D, one per sample, got shape {tuple(seeds.shape)}")
    if type(sample_shape) is not torch.Size:  # a tensor's shape holds ints; anything else is read element by element
        if isinstance(sample_shape, (str, bytes, torch.Tensor)) or not isinstance(sample_shape, Sequence):
            raise TypeError(f"sample_shape must be a sequence of ints, got {type(sample_shape).__name__}")
        if not all(_is_int(d) for d in sample_shape):
            raise ValueError(f"sample_shape must hold non-negative ints, got {tuple(sample_shape)!r}")
    for d in sample_shape:  # not min(), which compares sizes: torch 2.6's export made that a guard (h >= 4)
        if d < 0:
            raise ValueError(f"sample_shape must hold non-negative ints, got {tuple(sample_shape)!r}")
    if type(step) is not int and isinstance(step, torch.Tensor):  # an int, the usual step, tested first
        if step.numel() != 1 or step.dtype.is_floating_point or step.dtype.is_complex or step.dtype == torch.bool:
            raise TypeError(f"a step tensor must hold one integer, got {step.dtype} of shape {tuple(step.shape)}")
    else:
        if type(step) is not int and not _is_int(step):
            raise TypeError(f"step must be an int or a one-element integer tensor, got {type(step).__name__}")
        if not 0 <= step <= _MASK32:
            raise ValueError(f"step must be in [0, 2**32), the spec's third counter word, got {step}")
    if (type(tag) is not int and not _is_int(tag)) or not 0 <= tag <= _MASK32:
        raise ValueError(f"tag must be an int in [0, 2**32), the spec's fourth counter word, got {tag!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"noise dtype must be a floating-point torch.dtype, got {dtype}")


def normal(
    seeds: torch.Tensor,
    sample_shape: Sequence[int],
    step: int | torch.Tensor = 0,
    tag: int = STEP_TAG,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Noise of the spec for each sample: shape ``[len(seeds), *sample_shape]``.

    ``step`` may be a device tensor (graph mode); the result never syncs the host. ``seeds`` is an int64 tensor
    (its 64 bits are the key: a narrower dtype would give other words) and ``tag`` a 32-bit counter word.
    """
    check_normal_args(seeds, sample_shape, step, tag, dtype)
    device = seeds.device
    # math.prod, not np.prod: torch.compile traces np.prod of a one-element shape as a tensor op whose int() it
    # cannot put in a graph, so a stochastic step of a [batch, dim] state broke fullgraph=True.
    n = math.prod(sample_shape)
    groups = (n + 3) // 4
    g = torch.arange(groups, device=device, dtype=torch.int64)
    k0 = (seeds & _MASK32).view(-1, 1)
    k1 = ((seeds >> 32) & _MASK32).view(-1, 1)
    c0 = (g & _MASK32).view(1, -1).expand(seeds.numel(), -1)
    c1 = (g >> 32).view(1, -1).expand(seeds.numel(), -1)
    if isinstance(step, torch.Tensor):
        c2 = (step.to(device=device, dtype=torch.int64).reshape(1, 1) & _MASK32).expand_as(c0)
    else:  # a fill, not a host-to-device copy: safe under graph capture and sync checks
        c2 = torch.full_like(c0, int(step) & _MASK32)
    c3 = torch.full_like(c0, tag)
    words = philox4x32_torch(c0, c1, c2, c3, k0, k1)
    normals = torch.stack(words_to_normals(*words), dim=-1).reshape(seeds.numel(), groups * 4)
    return normals[:, :n].to(dtype).reshape(seeds.numel(), *sample_shape)
