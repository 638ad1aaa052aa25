"""The noise spec: Philox known answers, the torch implementation against numpy, batch independence."""

import noise_f32
import numpy as np
import pytest
import torch

from fastflow import noise

# Known-answer vectors of Philox4x32-10 (Salmon et al. 2011, Random123's kat_vectors).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_philox_known_answers(ctr, key, expected):
    assert tuple(int(v) for v in noise.philox4x32_numpy(*ctr, *key)) == expected
    t = [torch.tensor([v], dtype=torch.int64) for v in (*ctr, *key)]
    assert tuple(int(v) for v in noise.philox4x32_torch(*t)) == expected


def test_torch_philox_matches_numpy_bit_for_bit():
    rng = np.random.default_rng(0)
    words = rng.integers(0, 2**32, size=(6, 4096), dtype=np.uint64)
    ref = noise.philox4x32_numpy(*words)
    got = noise.philox4x32_torch(*[torch.from_numpy(w.astype(np.int64)) for w in words])
    for r, g in zip(ref, got, strict=True):
        np.testing.assert_array_equal(r.astype(np.int64), g.numpy())


def _spec_normals(seed: int, n: int, step: int, tag: int) -> np.ndarray:
    """The spec written out with numpy only, element by element order."""
    e = np.arange(n, dtype=np.uint64)
    g = e >> np.uint64(2)
    words = noise.philox4x32_numpy(g & 0xFFFFFFFF, g >> np.uint64(32), np.full_like(g, step), np.full_like(g, tag),
                                   seed & 0xFFFFFFFF, seed >> 32)
    m = [w.astype(np.float64) // 512 for w in words]
    u0, u2 = (2 * m[0] + 1) * 2.0**-24, (2 * m[2] + 1) * 2.0**-24
    v1, v3 = (2 * m[1] + 1) * 2.0**-23 - 1, (2 * m[3] + 1) * 2.0**-23 - 1
    r0, r2 = np.sqrt(-2 * np.log(u0)), np.sqrt(-2 * np.log(u2))
    four = np.stack(
        [r0 * np.cos(np.pi * v1), r0 * np.sin(np.pi * v1), r2 * np.cos(np.pi * v3), r2 * np.sin(np.pi * v3)]
    )
    return four[(e & np.uint64(3)).astype(np.int64), np.arange(n)]


@pytest.mark.parametrize("seed", [0, 12345, 2**63 + 7, 2**64 - 1])
def test_normal_matches_spec(seed):
    seeds = noise.as_seed_tensor([seed], 1, "cpu")
    got = noise.normal(seeds, (3, 7), step=5, tag=noise.STEP_TAG, dtype=torch.float64).reshape(-1).numpy()
    np.testing.assert_allclose(got, _spec_normals(seed, 21, 5, noise.STEP_TAG), rtol=0, atol=1e-12)


def test_sample_noise_independent_of_batch():
    alone = noise.normal(noise.as_seed_tensor([42], 1, "cpu"), (5, 9), step=3)
    batch = noise.normal(noise.as_seed_tensor([7, 42, 9, 1], 4, "cpu"), (5, 9), step=3)
    torch.testing.assert_close(alone[0], batch[1], rtol=0, atol=0)


def test_streams_differ_by_step_tag_and_seed():
    s = noise.as_seed_tensor(1, 1, "cpu")
    a = noise.normal(s, (64,), step=0)
    assert not torch.equal(a, noise.normal(s, (64,), step=1))
    assert not torch.equal(a, noise.normal(s, (64,), step=0, tag=noise.INIT_TAG))
    assert not torch.equal(a, noise.normal(noise.as_seed_tensor(2, 1, "cpu"), (64,), step=0))


def test_step_may_be_a_tensor():
    s = noise.as_seed_tensor(3, 2, "cpu")
    torch.testing.assert_close(noise.normal(s, (10,), step=torch.tensor([4])), noise.normal(s, (10,), step=4))


def test_normal_statistics():
    x = noise.normal(noise.as_seed_tensor(0, 1, "cpu"), (200_000,), dtype=torch.float64)[0]
    assert abs(float(x.mean())) < 4 / 200_000**0.5
    assert abs(float(x.std()) - 1) < 0.01
    assert abs(float((x**4).mean()) - 3) < 0.1  # kurtosis of a normal
    assert float(x.abs().max()) < 5.8  # the 23-bit uniform bounds the tail


def test_seed_validation():
    with pytest.raises(ValueError, match="seeds for a batch"):
        noise.as_seed_tensor([1, 2], 3, "cpu")
    with pytest.raises(ValueError, match="outside"):
        noise.as_seed_tensor(-1, 1, "cpu")
    with pytest.raises(ValueError, match="int64"):
        noise.as_seed_tensor(torch.zeros(2, dtype=torch.int32), 2, "cpu")
    # the last seed of a batch past 64 bits is named as what it is, not as an out-of-range seed the caller never gave
    with pytest.raises(ValueError, match="seeds a batch of 2 with seed \\+ b"):
        noise.as_seed_tensor(2**64 - 1, 2, "cpu")
    assert noise.as_seed_tensor(2**64 - 1, 1, "cpu").tolist() == [-1]


@pytest.mark.parametrize(
    "seed", [3.0, True, "12", b"12", [1.9, 2.2], [1, 2.0], [True, False], np.array([1.5, 2.5]), {1, 2}],
    ids=["float", "bool", "str", "bytes", "floats", "int-and-float", "bools", "float-array", "set"],
)
def test_seeds_that_are_not_ints_are_refused(seed):
    """A float, bool or string seed is a TypeError, never truncated or read character by character."""
    with pytest.raises(TypeError, match="seed"):
        noise.as_seed_tensor(seed, 2, "cpu")


def test_int_seeds_of_every_kind_agree():
    want = noise.as_seed_tensor([5, 6], 2, "cpu")
    for seed in (5, np.int32(5), np.uint64(5), (5, 6), [np.int64(5), 6], np.array([5, 6]), range(5, 7)):
        assert torch.equal(noise.as_seed_tensor(seed, 2, "cpu"), want)


def test_fma32_rounds_once():
    """The tests' float32 fma rounds the exact a*b + c once, where a float64 sum would round twice."""
    a = np.float32(1 + 2.0**-12)
    c = np.float32(-(1 + 2.0**-11))
    # a*a + c = 2**-24 exactly: any correct fma gives it, a float32 multiply-then-add gives 0.
    assert noise_f32.fma32(a, a, c) == np.float32(2.0**-24)
    assert np.float32(a * a) + c == 0
    # 1 + 2**-23 + 2**-24 - 2**-70 is just under a float32 midpoint: it rounds down to 1 + 2**-23, while the
    # float64 sum rounds to the midpoint itself and then to the even 1 + 2**-22.
    a, b, c = np.float32(1 + 2.0**-23), np.float32((1 - 2.0**-23) * 2.0**-24), np.float32(1 + 2.0**-23)
    assert np.float32(np.float64(a) * np.float64(b) + np.float64(c)) == np.float32(1 + 2.0**-22)
    assert noise_f32.fma32(a, b, c) == np.float32(1 + 2.0**-23)


def test_angle_part_over_every_angle_in_float32():
    """The kernels' angle part exactly as fastflow.noise writes it (quarter-turn reduction, fma polynomials,
    swap and signs), in float32 for every one of the 2**23 angles a Philox word gives: within 1e-7 of float64
    cos/sin(pi v) (float32's own ulp near 1 is 6e-8), so the normals keep the 1e-6 tolerance."""
    v = noise_f32.all_angles()
    cos_v, sin_v = noise_f32.cos_sin_pi(v)
    exact = np.pi * v.astype(np.float64)
    assert np.abs(sin_v - np.sin(exact)).max() < 1e-7
    assert np.abs(cos_v - np.cos(exact)).max() < 1e-7


@pytest.mark.parametrize("sample_shape", [(), (7,), (3, 5)], ids=str)
def test_normal_traces_with_fullgraph_for_every_sample_rank(sample_shape):
    """torch.compile(fullgraph=True) traces normal(): np.prod of a one-element shape broke the graph (int() of a
    traced tensor), so a stochastic torch-backend step of a [batch, dim] state did not trace."""
    seeds = noise.as_seed_tensor(3, 2, "cpu")
    torch._dynamo.reset()
    traced = torch.compile(lambda s: noise.normal(s, sample_shape, step=1), fullgraph=True, backend="eager")
    assert torch.equal(traced(seeds), noise.normal(seeds, sample_shape, step=1))


def test_stochastic_torch_step_of_a_2d_state_traces_with_fullgraph():
    """The README's claim that Sampler.step traces under fullgraph=True, for a DDPM step on the torch reference
    with a [batch, dim] state (as the Gaussian-mixture demo steps)."""
    import fastflow as ff

    sampler = ff.Sampler(ff.VP(), "ddpm", steps=3, backend="torch").prepare("cpu")
    eager = ff.Sampler(ff.VP(), "ddpm", steps=3, backend="torch")
    z = zz = sampler.init_noise((4, 2), seed=0)
    eager.init_noise((4, 2), seed=0)
    torch._dynamo.reset()
    step = torch.compile(sampler.step, fullgraph=True, backend="eager")
    for i in range(sampler.num_stages):
        z = step(torch.tanh(z), z, i)
        zz = eager.step(torch.tanh(zz), zz, i)
    assert torch.equal(z, zz)


def test_a_0d_integer_array_is_one_seed():
    """``np.array(3)`` (what indexing or reducing an array gives) failed with "iteration over a 0-d array"; it is the
    seed 3, and a 0-d float array stays refused like a float."""
    assert torch.equal(noise.as_seed_tensor(np.array(3), 2, "cpu"), torch.tensor([3, 4]))
    with pytest.raises(TypeError, match="got float64"):
        noise.as_seed_tensor(np.array(3.0), 2, "cpu")
