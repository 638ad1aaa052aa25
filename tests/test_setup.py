"""setup.py's build logic as pure functions: the compiler flags per compiler family and platform, and the local
version label of a build. setup.py is loaded without running ``setup()`` (it builds only as ``__main__``).

The flags for MSVC and clang / Apple clang are checked here as data only: no build with those compilers has been
run (this suite's machines have GCC on Linux); the build with GCC is checked by every build of the extension.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
from elf_sections import elf_section_names

ROOT = Path(__file__).resolve().parents[1]
SETUP = runpy.run_path(str(ROOT / "setup.py"), run_name="fastflow_setup")
compiler_kind = SETUP["_compiler_kind"]
compile_flags = SETUP["_compile_flags"]
local_label = SETUP["_local_label"]
version = SETUP["_version"]

GCC = "c++ (Debian 12.2.0-14+deb12u1) 12.2.0\nCopyright (C) 2022 Free Software Foundation, Inc.\n"
CLANG = "Debian clang version 14.0.6\nTarget: x86_64-pc-linux-gnu\nThread model: posix\n"
APPLE_CLANG = "Apple clang version 15.0.0 (clang-1500.3.9.4)\nTarget: arm64-apple-darwin23.4.0\nThread model: posix\n"
ICPX = "Intel(R) oneAPI DPC++/C++ Compiler 2024.0.2 (2024.0.2.20231213)\nTarget: x86_64-unknown-linux-gnu\n"


@pytest.mark.parametrize(
    ("platform", "text", "kind"),
    [
        ("linux", GCC, "gcc"),
        ("linux", "g++ (GCC) 11.4.1 20231218 (Red Hat 11.4.1-3)\n", "gcc"),
        ("linux", CLANG, "clang"),
        ("darwin", APPLE_CLANG, "apple-clang"),
        ("darwin", "Homebrew clang version 18.1.8\nTarget: arm64-apple-darwin23.6.0\n", "clang"),
        ("linux", ICPX, "unknown"),
        ("linux", "", "unknown"),  # no compiler answered
        ("win32", "", "msvc"),  # torch builds extensions with cl on Windows
    ],
)
def test_compiler_kind(platform, text, kind):
    assert compiler_kind(platform, text) == kind


def test_gcc_on_linux_threads_the_cpu_kernel_without_debug_info():
    flags = compile_flags("gcc", "linux", torch_openmp=True, debug=False)
    assert flags["openmp"] is True and flags["openmp_skipped"] is None
    assert "-fopenmp" in flags["cxx"] and "-fopenmp" in flags["link"]
    assert {"-O3", "-ffp-contract=off", "-fvisibility=hidden"} <= set(flags["cxx"])
    # Python's CFLAGS carry -g: the extension's own flags come after them and must turn it off
    assert "-g0" in flags["cxx"] and "-g" not in flags["cxx"]
    assert flags["nvcc"] == ["-O3"]


def test_debug_build_keeps_debug_info():
    gcc = compile_flags("gcc", "linux", torch_openmp=True, debug=True)
    assert "-g" in gcc["cxx"] and "-g0" not in gcc["cxx"]
    assert "-lineinfo" in gcc["nvcc"]
    msvc = compile_flags("msvc", "win32", torch_openmp=True, debug=True)
    assert "/Zi" in msvc["cxx"] and "/DEBUG" in msvc["link"]
    assert "/Zi" not in compile_flags("msvc", "win32", torch_openmp=True, debug=False)["cxx"]


def test_torch_without_openmp_gives_a_single_threaded_kernel():
    flags = compile_flags("gcc", "linux", torch_openmp=False, debug=False)
    assert flags["openmp"] is False and flags["openmp_skipped"] == "torch was built without OpenMP"
    assert "-fopenmp" not in flags["cxx"] + flags["link"]


@pytest.mark.parametrize(
    ("kind", "platform", "why"),
    [
        ("clang", "linux", "libomp"),
        ("apple-clang", "darwin", "libomp"),
        ("clang", "darwin", "libomp"),
        ("gcc", "darwin", "libgomp"),
        ("unknown", "linux", "unrecognised"),
    ],
)
def test_other_unix_compilers_build_without_openmp(kind, platform, why):
    """clang's -fopenmp needs libomp (a second OpenMP runtime beside torch's libgomp on Linux; absent from Apple
    clang): the build must not fail for that flag, and the kernel then runs on one thread, with the reason recorded."""
    flags = compile_flags(kind, platform, torch_openmp=True, debug=False)
    assert flags["openmp"] is False and why in flags["openmp_skipped"]
    assert not [f for f in flags["cxx"] + flags["link"] if "openmp" in f]
    assert {"-O3", "-ffp-contract=off", "-fvisibility=hidden", "-g0"} <= set(flags["cxx"])  # clang takes these


def test_msvc_gets_msvc_flags_only():
    flags = compile_flags("msvc", "win32", torch_openmp=True, debug=False)
    assert all(f.startswith("/") for f in flags["cxx"] + flags["link"]), flags  # no GCC option reaches cl
    assert "/O2" in flags["cxx"] and "/fp:precise" in flags["cxx"]  # no FMA contraction, as -ffp-contract=off
    assert flags["openmp"] is False and "vcomp" in flags["openmp_skipped"]


CPU_INFO = {"extension": True, "torch": "2.13.0+cpu", "cuda": None}


@pytest.mark.parametrize(
    ("info", "label"),
    [
        ({"extension": False, "reason": "built without torch (no extension)"}, None),
        (CPU_INFO, "cpu.torch2.13"),
        ({"extension": True, "torch": "2.14.1+cu130", "cuda": "13.0"}, "cu130.torch2.14"),
        ({"extension": True, "torch": "2.8.0+cu128", "cuda": "12.8"}, "cu128.torch2.8"),
        ({"extension": True, "torch": "2.4.1+cu121", "cuda": None}, "cpu.torch2.4"),  # CUDA torch, CPU kernel only
        ({"extension": True, "torch": "2.15.0a0+git1234abc", "cuda": None}, "cpu.torch2.15"),  # a source build
    ],
)
def test_local_label(info, label):
    assert local_label(info) == label


def _base() -> str:
    namespace: dict = {}
    exec((ROOT / "fastflow" / "_version.py").read_text(), namespace)
    return namespace["__version__"]


def test_version_of_a_build_says_what_it_was_built_for(monkeypatch):
    monkeypatch.delenv("FASTFLOW_LOCAL_VERSION", raising=False)
    base = _base()
    assert version(CPU_INFO, ["bdist_wheel"]) == f"{base}+cpu.torch2.13"
    assert version(CPU_INFO, ["dist_info", "--output-dir", "x"]) == f"{base}+cpu.torch2.13"  # pip's metadata step
    assert version({"extension": False}, ["bdist_wheel"]) == base  # the pure wheel
    assert version(CPU_INFO, ["sdist", "--formats", "gztar"]) == base  # source: built for nothing


def test_local_version_override(monkeypatch):
    base = _base()
    monkeypatch.setenv("FASTFLOW_LOCAL_VERSION", "+cpu.myorg1")
    assert version(CPU_INFO, ["bdist_wheel"]) == f"{base}+cpu.myorg1"
    monkeypatch.setenv("FASTFLOW_LOCAL_VERSION", "none")  # e.g. for an index that refuses local labels
    assert version(CPU_INFO, ["bdist_wheel"]) == base
    monkeypatch.setenv("FASTFLOW_LOCAL_VERSION", "cpu_torch")
    with pytest.raises(SystemExit, match="not a PEP 440 local version label"):
        version(CPU_INFO, ["bdist_wheel"])


@pytest.mark.skipif(sys.platform != "linux", reason="reads an ELF file")
def test_the_built_extension_carries_no_debug_info():
    """The extension built in this checkout (scripts/dev.sh builds it in place) is a release build unless it was
    asked for with FASTFLOW_DEBUG=1: no DWARF sections (they were 95% of its 11 MB)."""
    built = sorted((ROOT / "fastflow").glob("_C.*.so"))
    if not built:
        pytest.skip("the extension is not built in this checkout")
    from fastflow.backends.cuda import build_info

    info = build_info() or {}
    if "debug" not in info:
        pytest.skip("built by a setup.py older than its release flags (rebuild it: scripts/dev.sh)")
    if info["debug"]:
        pytest.skip("built with FASTFLOW_DEBUG=1")
    sections = elf_section_names(built[0])
    assert ".text" in sections and ".dynsym" in sections  # the symbols the loader uses (PyInit__C) stay
    assert not [s for s in sections if s.startswith(".debug")], sorted(sections)


def test_build_info_file_reads_back_and_keeps_the_line_length(tmp_path):
    """The generated fastflow/_build_info.py is read back by the loader and scripts/build_wheels.sh, and linted with
    the rest of a checkout (ruff, 120 columns): a full build info used to be one line of about 230 characters."""
    import ast

    info = {
        **CPU_INFO,
        "cuda_archs": ["8.0", "9.0", "10.0", "12.0+PTX"],
        "cuda_skipped": "FASTFLOW_SKIP_CUDA_BUILD is set",
        "openmp": False,
        "openmp_skipped": "clang's -fopenmp links LLVM's libomp, not the OpenMP runtime torch loads",
        "compiler": "clang",
        "debug": False,
        "python": "3.11",
    }
    path = tmp_path / "_build_info.py"
    SETUP["_write_build_info"](info, path)
    text = path.read_text()
    assert max(len(line) for line in text.splitlines()) <= 120, text
    assert ast.literal_eval(text.split("BUILD_INFO = ", 1)[1].strip()) == info
    namespace: dict = {}
    exec(text, namespace)
    assert namespace["BUILD_INFO"] == info
