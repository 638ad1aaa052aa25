"""Build script: the pure-Python package, plus the C++/CUDA extension when torch is importable.

``kernels/`` installs as ``fastflow.kernels`` (one top-level import name).

The extension ``fastflow._C`` (sources in ``csrc/``):

* its CPU kernel is always built when torch can be imported at build time;
* its CUDA kernel is added when torch has CUDA and nvcc is found, for the
  architectures in ``FASTFLOW_CUDA_ARCHS`` or ``TORCH_CUDA_ARCH_LIST`` (default 9.0),
  unless ``FASTFLOW_SKIP_CUDA_BUILD=1``;
* without torch (e.g. pip's build isolation) only the pure-Python package is built.
  Build the extension with ``pip install --no-build-isolation -e .``.

The build writes ``fastflow/_build_info.py`` (torch and CUDA versions, archs), which
``fastflow.backends.cuda`` reads before loading the extension: into the built package, and
into the checkout only where the extension is built in place (``build_ext --inplace``,
editable installs), so installing a wheel built from a checkout leaves its own build alone.

Compiler flags come from ``_compile_flags`` (by compiler family and platform): release builds carry no
debug info (``FASTFLOW_DEBUG=1`` keeps it), and the CPU kernel is threaded with OpenMP only where the
OpenMP runtime is the one torch loads (GCC on Linux); elsewhere it runs on one thread, which the build
info records and ``fastflow info`` prints.

A build that compiles the extension labels its version with what it was built for (``_local_label``:
``0.1.0+cpu.torch2.13``, ``0.1.0+cu130.torch2.14``); a build without torch and an sdist carry the bare
version of ``fastflow/_version.py``. ``FASTFLOW_LOCAL_VERSION`` replaces the label (``none`` drops it).
"""

from __future__ import annotations

import os
import pprint
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
BUILD_INFO = ROOT / "fastflow" / "_build_info.py"
# Every fastflow subpackage, found rather than listed (a new one must not silently miss the wheel);
# kernels/ lives outside fastflow/ and installs as fastflow.kernels.
PACKAGES = [*find_packages(include=["fastflow", "fastflow.*"]), "fastflow.kernels"]


def _say(msg: str) -> None:
    print(f"fastflow setup: {msg}", file=sys.stderr)


def _cuda_archs() -> list[str]:
    """Architectures like ``["9.0"]`` from FASTFLOW_CUDA_ARCHS or TORCH_CUDA_ARCH_LIST (sm_90, 90, 9.0 all work;
    an arch-specific ``90a`` or family ``120f`` keeps its letter: ``9.0a``, ``12.0f``)."""
    raw = os.environ.get("FASTFLOW_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST") or "9.0"
    archs = []
    for tok in raw.replace(",", ";").replace(" ", ";").split(";"):
        tok = tok.strip().lower().removeprefix("sm_").removeprefix("compute_")
        if not tok:
            continue
        ptx = tok.endswith("+ptx")
        tok = tok.removesuffix("+ptx")
        letter = tok[-1] if tok[-1] in "af" else ""
        tok = tok.removesuffix(letter) if letter else tok
        if "." not in tok:
            tok = f"{tok[:-1]}.{tok[-1]}"
        archs.append(tok + letter + ("+PTX" if ptx else ""))
    return archs


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _default_cuda_home() -> None:
    """Point CUDA_HOME at /usr/local/cuda when unset: torch otherwise derives it from the nvcc on PATH,
    which may be a wrapper script outside the toolkit (then -lcudart is not found)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    if (Path("/usr/local/cuda") / "bin" / "nvcc").exists():
        os.environ["CUDA_HOME"] = "/usr/local/cuda"


def _local_label(info: dict) -> str | None:
    """The PEP 440 local version label of a build that compiles the extension: what its kernels need (``cpu``, or
    ``cu130`` for a torch with CUDA 13.0) and the torch minor it was compiled against (its C++ API has no ABI
    promise across releases): ``cpu.torch2.13``, ``cu130.torch2.14``. None when nothing is compiled."""
    if not info.get("extension"):
        return None
    variant = f"cu{info['cuda'].replace('.', '')}" if info.get("cuda") else "cpu"
    major, minor = re.match(r"(\d+)\.(\d+)", info["torch"]).groups()
    return f"{variant}.torch{major}.{minor}"


def _version(info: dict, commands: list[str]) -> str:
    """The package version: ``_version.py``'s (the single base version), plus the local label of the build
    (``_local_label``) so that a wheel or install with the extension says what it was built for.
    ``FASTFLOW_LOCAL_VERSION`` replaces the label (``none``: no label, e.g. for an index that refuses local labels).
    An sdist is source, built for nothing: never labelled."""
    text = (ROOT / "fastflow" / "_version.py").read_text()
    version = re.search(r"__version__\s*=\s*[\"']([^\"']+)[\"']", text).group(1)
    if "sdist" in commands:
        return version
    local = os.environ.get("FASTFLOW_LOCAL_VERSION", "").strip().lstrip("+")
    if local.lower() == "none":
        return version
    local = local or _local_label(info)
    if local:
        if not re.fullmatch(r"[A-Za-z0-9]+(\.[A-Za-z0-9]+)*", local):
            raise SystemExit(f"FASTFLOW_LOCAL_VERSION={local!r} is not a PEP 440 local version label")
        version = f"{version}+{local}"
    return version


def _compiler_kind(platform: str, version_text: str) -> str:
    """The family of the C++ compiler torch builds the extension with: ``msvc`` on Windows (torch's default there,
    ``cl``), else from the compiler's ``--version`` output: ``apple-clang``, ``clang``, ``gcc`` or ``unknown``."""
    if platform == "win32":
        return "msvc"
    text = version_text.lower()
    if "apple clang" in text or "apple llvm" in text:  # Xcode's clang; not a clang built for macOS (Homebrew's)
        return "apple-clang"
    if "clang" in text:
        return "clang"
    if "free software foundation" in text or re.search(r"\b(gcc|g\+\+)\b", text):
        return "gcc"
    return "unknown"


def _detect_compiler_kind() -> str:
    """``_compiler_kind`` of the compiler torch's build runs: ``$CXX`` or ``c++`` (``cl`` on Windows)."""
    if sys.platform == "win32":
        return "msvc"
    try:
        cmd = [*shlex.split(os.environ.get("CXX") or "c++"), "--version"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError, ValueError):
        return "unknown"
    return _compiler_kind(sys.platform, out)


def _compile_flags(kind: str, platform: str, *, torch_openmp: bool, debug: bool) -> dict:
    """The extension's flags for a compiler family (``_compiler_kind``) on a platform (``sys.platform``).

    Returns ``cxx`` (host compile), ``link``, ``nvcc`` (device compile) and ``openmp`` (whether the CPU kernel is
    threaded), with ``openmp_skipped`` saying why not. ``at::parallel_for`` threads only in code compiled with
    OpenMP, and that code must use the OpenMP runtime torch loaded: torch's Linux wheels bring GCC's libgomp, so
    GCC on Linux gets ``-fopenmp``. clang's ``-fopenmp`` links LLVM's libomp (a second runtime beside torch's; Apple
    clang has no OpenMP at all without a separately installed libomp), and MSVC's ``/openmp`` links vcomp, not the
    Intel OpenMP torch's Windows build loads: those build a single-threaded CPU kernel instead of failing.
    Release builds carry no debug info (Python's own CFLAGS have ``-g``); ``debug`` keeps it."""
    nvcc = ["-O3"]  # torch adds -std
    if debug:
        nvcc.append("-lineinfo")
    if kind == "msvc":
        # /fp:precise: no contraction into FMA (the kernels match the reference bit for bit, as -ffp-contract=off).
        cxx = ["/O2", "/fp:precise", *(["/Zi"] if debug else [])]
        link = ["/DEBUG"] if debug else []
        openmp_skipped = "MSVC's /openmp runtime (vcomp) is not the OpenMP runtime torch loads"
    else:
        cxx = ["-O3", "-ffp-contract=off", "-fvisibility=hidden", "-g" if debug else "-g0"]
        link = []
        if kind != "gcc":
            openmp_skipped = {
                "apple-clang": "Apple clang has no OpenMP runtime (libomp) of its own",
                "clang": "clang's -fopenmp links LLVM's libomp, not the OpenMP runtime torch loads",
            }.get(kind, "unrecognised C++ compiler (OpenMP only with GCC)")
        elif not platform.startswith("linux"):
            openmp_skipped = f"GCC's libgomp is not the OpenMP runtime torch uses on {platform}"
        else:
            openmp_skipped = None
    if openmp_skipped is None and not torch_openmp:
        openmp_skipped = "torch was built without OpenMP"
    openmp = openmp_skipped is None
    if openmp:
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    return {"cxx": cxx, "link": link, "nvcc": nvcc, "openmp": openmp, "openmp_skipped": openmp_skipped}


def _write_build_info(info: dict, path: Path) -> None:
    lines = [
        '"""Generated by setup.py: how the compiled extension was built (do not edit)."""',
        "",
        # one key a line where it would be long: the file stays within the project's line length (ruff)
        f"BUILD_INFO = {pprint.pformat(info, width=100, sort_dicts=False)}",
        "",
    ]
    text = "\n".join(lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def _with_build_info(info: dict, cmdclass: dict) -> dict:
    """``build_py`` and ``build_ext`` that write ``info`` where the built package is: into the build tree (the
    wheel's copy), and into the checkout only when the extension itself is built there (``build_ext --inplace``,
    editable installs). A wheel built from a checkout, pure or binary, then never rewrites the build info of the
    checkout's own in-place extension."""
    from setuptools.command.build_ext import build_ext
    from setuptools.command.build_py import build_py

    class BuildPy(build_py):
        def run(self) -> None:
            super().run()
            if not getattr(self, "editable_mode", False):
                _write_build_info(info, Path(self.build_lib) / "fastflow" / "_build_info.py")

    class BuildExt(cmdclass.get("build_ext", build_ext)):
        def run(self) -> None:
            super().run()
            if self.inplace or getattr(self, "editable_mode", False):
                _write_build_info(info, BUILD_INFO)

    return {**cmdclass, "build_py": BuildPy, "build_ext": BuildExt}


def _extensions() -> tuple[list, dict, dict]:
    """The extension modules, their build commands, and the build info to record."""
    _default_cuda_home()  # before cpp_extension reads it at import
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _say(
            "torch is not importable at build time; building the pure-Python package without fastflow._C "
            "(use `pip install --no-build-isolation .` with torch installed to build the extension)"
        )
        return [], {}, {"extension": False, "reason": "built without torch (no extension)"}

    sources = ["csrc/ops.cpp", "csrc/step_cpu.cpp"]
    debug = os.environ.get("FASTFLOW_DEBUG", "0") not in ("", "0")
    compiler = _detect_compiler_kind()
    flags = _compile_flags(compiler, sys.platform, torch_openmp=torch.backends.openmp.is_available(), debug=debug)
    cxx, link, nvcc_flags = flags["cxx"], flags["link"], flags["nvcc"]
    if not flags["openmp"]:
        _say(f"the CPU kernel will run on one thread: no OpenMP ({flags['openmp_skipped']})")
    archs: list[str] = []
    cuda_reason = None
    nvcc = _nvcc()
    if os.environ.get("FASTFLOW_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        cuda_reason = "FASTFLOW_SKIP_CUDA_BUILD is set"
    elif torch.version.cuda is None:
        cuda_reason = f"torch {torch.__version__} has no CUDA"
    elif nvcc is None:
        cuda_reason = "nvcc not found (set CUDA_HOME)"
    use_cuda = cuda_reason is None
    if use_cuda:
        archs = _cuda_archs()
        for a in archs:
            num = a.removesuffix("+PTX").replace(".", "")
            nvcc_flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
            if a.endswith("+PTX"):
                nvcc_flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
        # torch adds no arch flags of its own when the flags already name one.
        sources += ["csrc/step_kernel.cu", "csrc/step_cuda.cpp"]
        ext = cpp_extension.CUDAExtension(
            "fastflow._C",
            sources,
            extra_compile_args={"cxx": [*cxx, "-DFASTFLOW_WITH_CUDA"], "nvcc": nvcc_flags},
            extra_link_args=link,
        )
        _say(f"building fastflow._C with CPU and CUDA kernels (archs {', '.join(archs)}, nvcc {nvcc})")
    else:
        ext = cpp_extension.CppExtension(
            "fastflow._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link
        )
        _say(f"building fastflow._C with the CPU kernel only: {cuda_reason}")

    info = {
        "extension": True,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if use_cuda else None,
        "cuda_archs": archs,
        "cuda_skipped": cuda_reason,
        "openmp": flags["openmp"],
        "openmp_skipped": flags["openmp_skipped"],
        "compiler": compiler,
        "debug": debug,
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
    }
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}, info


if __name__ == "__main__":  # setup.py's helpers import without building (tests/test_wheels.py)
    ext_modules, cmdclass, build_info = _extensions()
    setup(
        version=_version(build_info, sys.argv[1:]),
        packages=PACKAGES,
        package_dir={"fastflow.kernels": "kernels"},
        ext_modules=ext_modules,
        cmdclass=_with_build_info(build_info, cmdclass),
    )
