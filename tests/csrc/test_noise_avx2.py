"""The CPU kernel's AVX2 noise path (``csrc/noise_avx2.h``) writes the exact path's float32 normals, bit for bit.

The path approximates the double-precision transform without libm calls and rounds to float32 only where the
rounding is decided, re-evaluating the rest exactly; this holds it to the exact path (``words_to_normals_f64``)
over millions of normals, seeds past 2**63, counters past 2**32 and the largest step, built with the host compiler
(the tests against the torch reference run it through the extension). Skipped off x86-64, without a compiler or
on a CPU without AVX2.
"""

from __future__ import annotations

import ctypes
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def check(tmp_path_factory):
    compiler = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if platform.machine() not in ("x86_64", "AMD64") or compiler is None:
        pytest.skip("needs x86-64 and a C++ compiler")
    lib = tmp_path_factory.mktemp("noise_avx2") / "check_noise_avx2.so"
    subprocess.run(
        [compiler, "-O2", "-ffp-contract=off", "-std=c++17", "-shared", "-fPIC", f"-I{ROOT / 'csrc'}",
         str(Path(__file__).with_name("check_noise_avx2.cpp")), "-o", str(lib)],
        check=True,
    )  # fmt: skip
    module = ctypes.CDLL(str(lib))
    module.avx2_noise_mismatches.restype = ctypes.c_int64
    module.avx2_noise_mismatches.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int64, ctypes.c_uint32,
                                             ctypes.c_uint32, ctypes.POINTER(ctypes.c_int64)]  # fmt: skip
    if not module.avx2_noise_available():
        pytest.skip("this CPU has no AVX2: the CPU kernel takes the exact path")
    return module


@pytest.mark.parametrize(
    "seed, g0, step, tag",
    [(0, 0, 0, 0), (2**64 - 1, 2**32 - 8, 2**32 - 1, 1), (2**63 + 5, 3 * 2**32, 17, 0), (12345, 1000, 999, 1)],
)
def test_avx2_normals_equal_the_exact_path(check, seed, g0, step, tag):
    """4 million normals equal, and some of their groups went through the exact re-evaluation (about 1 in 10^4):
    the rounding test's fallback runs and writes the exact path's values too."""
    chunks = 1 << 18
    reevaluated = ctypes.c_int64(-1)
    assert check.avx2_noise_mismatches(seed, g0, chunks, step, tag, ctypes.byref(reevaluated)) == 0
    assert 0 < reevaluated.value < chunks  # 4 groups a chunk: well under 1 in 4 re-evaluated
