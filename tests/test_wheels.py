"""The wheels install and work: ``scripts/build_wheels.sh`` builds the pure wheel and the binary
wheel for the running torch (CPU kernel), and each is installed in turn into one fresh virtual
environment (torch installed there from the package index, no dev packages visible), where
``import fastflow``, a sampler step on CPU tensors and ``fastflow info`` must work.

One fresh environment for both wheels: installing torch takes about 35 s and runs while the wheels
are built (the binary one compiles for about a minute on two idle cores). Set
FASTFLOW_SKIP_WHEEL_TEST=1 to skip it.
"""

from __future__ import annotations

import email.message
import email.parser
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from elf_sections import elf_section_names

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "build_wheels.sh"

pytestmark = [
    pytest.mark.skipif(
        os.environ.get("FASTFLOW_SKIP_WHEEL_TEST", "0") not in ("", "0"), reason="FASTFLOW_SKIP_WHEEL_TEST"
    ),
    pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash for scripts/build_wheels.sh"),
    pytest.mark.skipif(sys.platform != "linux", reason="the wheel build script targets Linux"),
]

# Runs inside the fresh environment: one DDIM step through the requested backend, compared with the
# torch reference, plus where fastflow was imported from and its build info and backend report.
CHECK = r"""
import json, sys
from importlib.metadata import version
import torch
import fastflow
from fastflow.backends import backend_report

backend = sys.argv[1]
shape = (2, 3, 4)
results = {}
for name in {backend, "torch"}:
    sampler = fastflow.Sampler(fastflow.schedules.VP(), solver="ddim", prediction="eps", steps=4, backend=name)
    z = sampler.init_noise(shape, seed=0)
    eps = torch.linspace(-1.0, 1.0, z.numel()).reshape(shape)
    results[name] = sampler.step(eps, z, 0)
try:
    from fastflow._build_info import BUILD_INFO
except ImportError:
    BUILD_INFO = None
print(json.dumps({
    "file": fastflow.__file__,
    "version": version("fastflow"),
    "max_diff": (results[backend] - results["torch"]).abs().max().item(),
    "finite": bool(torch.isfinite(results[backend]).all()),
    "build_info": BUILD_INFO,
    "backends": backend_report(),
}))
"""


def _env(extra: dict | None = None) -> dict:
    # No PYTHONPATH: the fresh environment must see only what is installed in it.
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | (extra or {})


def _run(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), **kw)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Both wheels (the binary one only where a C++ compiler exists) and a fresh venv with only torch
    (the running version) and numpy, which the test's own pip installs into. The build (CPU-bound)
    runs while torch is installed (disk-bound)."""
    out = tmp_path_factory.mktemp("dist")
    cxx = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
    args = ["--pure"]
    if shutil.which(cxx.split()[0]):
        args.append("--binary")
    # The CPU kernel only, even where torch has CUDA: this is the CPU install test.
    cmd = ["bash", str(SCRIPT), *args, "--out", str(out), "--python", sys.executable]
    build = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env({"FASTFLOW_SKIP_CUDA_BUILD": "1"}),
    )
    try:
        venv = tmp_path_factory.mktemp("wheel-venv")
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
        python = venv / "bin" / "python"
        pip = [sys.executable, "-m", "pip", "--python", str(python)]
        proc = subprocess.run(
            [*pip, "install", "-q", f"torch=={torch.__version__}", "numpy"],
            capture_output=True,
            text=True,
            timeout=600,
            env=_env(),
        )
        no_torch = None
        if proc.returncode != 0:
            no_torch = f"cannot install torch {torch.__version__} into a fresh venv: {proc.stderr.strip()[-500:]}"
        log, _ = build.communicate(timeout=900)
    finally:
        if build.poll() is None:
            build.kill()
            build.wait()
    if build.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({build.returncode}):\n{log}")
    wheels = {("binary" if "linux" in w.name else "pure"): w for w in out.glob("*.whl")}
    return {"python": python, "pip": pip, "wheels": wheels, "no_torch": no_torch}


@pytest.fixture(scope="module")
def env(built):
    if built["no_torch"]:
        pytest.skip(built["no_torch"])
    return built["python"], built["pip"]


@pytest.fixture(scope="module")
def wheels(built):
    return built["wheels"]


def _install_and_check(env, wheel: Path, backend: str, tmp_path: Path) -> dict:
    python, pip = env
    _run([*pip, "uninstall", "-q", "-y", "fastflow"], timeout=120)
    _run([*pip, "install", "-q", "--no-deps", str(wheel)], timeout=300)
    # From an empty directory, so the checkout's fastflow/ cannot shadow the installed one.
    proc = _run([str(python), "-c", CHECK, backend], timeout=300, cwd=tmp_path)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(result["file"]).resolve().is_relative_to(python.parent.parent.resolve()), result["file"]
    info = _run([str(python.parent / "fastflow"), "info"], timeout=300, cwd=tmp_path).stdout
    return result, info


def _names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as z:
        return set(z.namelist())


def _expected_modules() -> set[str]:
    """Every module of the source tree, as the wheel must name it."""
    mods = {f"fastflow/{p.relative_to(ROOT / 'fastflow')}" for p in (ROOT / "fastflow").rglob("*.py")}
    mods |= {f"fastflow/kernels/{p.relative_to(ROOT / 'kernels')}" for p in (ROOT / "kernels").rglob("*.py")}
    return {m for m in mods if "__pycache__" not in m}


def test_pure_wheel(env, wheels, tmp_path):
    wheel = wheels["pure"]
    assert wheel.name.endswith("-py3-none-any.whl")
    names = _names(wheel)
    assert not [n for n in names if n.endswith(".so")]
    assert _expected_modules() <= names, sorted(_expected_modules() - names)

    result, info = _install_and_check(env, wheel, "torch", tmp_path)
    assert result["finite"] and result["max_diff"] == 0.0
    assert result["build_info"]["extension"] is False
    assert result["backends"]["torch"] is None
    assert "not built" in result["backends"]["cuda"]
    assert "'extension': False" in info
    assert "cuda    unavailable" in info


def test_binary_cpu_wheel(env, wheels, tmp_path):
    if "binary" not in wheels:
        pytest.skip("no C++ compiler: the binary wheel was not built")
    wheel = wheels["binary"]
    minor = ".".join(torch.__version__.split(".")[:2])
    py = f"cp{sys.version_info.major}{sys.version_info.minor}"
    assert wheel.name.startswith(f"fastflow-{_version()}+"), wheel.name
    assert f".torch{minor}-{py}-{py}-" in wheel.name, wheel.name
    assert f"+cpu.torch{minor}-" in wheel.name, wheel.name  # setup.py's label: the script sets none
    names = _names(wheel)
    (so,) = [n for n in names if n.startswith("fastflow/_C") and n.endswith(".so")]
    assert _expected_modules() <= names, sorted(_expected_modules() - names)
    with zipfile.ZipFile(wheel) as z:
        sections = elf_section_names(Path(z.extract(so, tmp_path / "so")))
    assert not [s for s in sections if s.startswith(".debug")], sorted(sections)  # a release build: no debug info

    result, info = _install_and_check(env, wheel, "cuda", tmp_path)
    assert result["backends"]["cuda"] is None, result["backends"]
    assert result["finite"] and result["max_diff"] < 1e-5, result
    assert result["version"] == wheel.name.split("-")[1]
    build = result["build_info"]
    assert build["extension"] is True and build["torch"] == torch.__version__
    assert f"'torch': '{torch.__version__}'" in info
    assert "cuda    available" in info
    assert "threads  CPU kernel multi-threaded (OpenMP" in info  # GCC on Linux, torch's libgomp


def test_binary_wheel_repair_leaves_torchs_libraries(wheels, tmp_path):
    """auditwheel (scripts/build_wheels.sh's repair step) must not copy into the wheel a library that torch's wheel
    brings and the extension links: a copy is loaded beside torch's, so the extension's -fopenmp code ran on a second
    OpenMP runtime (it grafted libgomp). Checked without auditwheel: every library the built extension needs that
    torch ships in torch/lib must match one of the script's exclusions."""
    if "binary" not in wheels:
        pytest.skip("no C++ compiler: the binary wheel was not built")
    if shutil.which("readelf") is None:
        pytest.skip("needs readelf")
    with zipfile.ZipFile(wheels["binary"]) as z:
        (name,) = [n for n in z.namelist() if n.startswith("fastflow/_C") and n.endswith(".so")]
        so = Path(z.extract(name, tmp_path))
    dynamic = _run(["readelf", "-d", str(so)], timeout=60).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dynamic)
    torch_lib = Path(torch.__file__).resolve().parent / "lib"
    from_torch = [lib for lib in needed if (torch_lib / lib).exists()]
    assert "libc10.so" in from_torch, needed
    line = re.search(r"^REPAIR_EXCLUDES=\((.*)\)$", SCRIPT.read_text(), re.M)
    assert line, "scripts/build_wheels.sh has no REPAIR_EXCLUDES"
    patterns = re.findall(r"'([^']+)'", line.group(1))
    grafted = [lib for lib in from_torch if not any(fnmatch.fnmatchcase(lib, p) for p in patterns)]
    assert not grafted, f"auditwheel would copy {grafted} (torch loads its own) into the wheel; excluded: {patterns}"


def _version() -> str:
    namespace: dict = {}
    exec((ROOT / "fastflow" / "_version.py").read_text(), namespace)
    return namespace["__version__"]


def _source_copy(tmp_path: Path) -> Path:
    """A copy of what an sdist is made of, to build from: a checkout's old egg-info (whose SOURCES.txt sdist would
    also take), its built extension and its generated build info stay out of it."""
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, tree / name)
    for name in ("fastflow", "kernels", "csrc", "tests"):
        skip = shutil.ignore_patterns("__pycache__", "*.so", "_build_info.py")
        shutil.copytree(ROOT / name, tree / name, ignore=skip)
    return tree


def _build_sdist(tree: Path, out: Path) -> tuple[set[str], email.message.Message]:
    """The paths (below its top folder) in the sdist that ``setup.py sdist`` makes of ``tree``, and its PKG-INFO."""
    build = subprocess.run(
        [sys.executable, "setup.py", "-q", "sdist", "-d", str(out)],
        cwd=tree, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-2000:]
    (sdist,) = out.glob("fastflow-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
        info = tar.extractfile(f"{sdist.name.removesuffix('.tar.gz')}/PKG-INFO").read().decode()
    return names, email.parser.Parser().parsestr(info)


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    """The sdist of a clean copy of the checkout: its paths and its metadata (about 5 s)."""
    tmp = tmp_path_factory.mktemp("sdist")
    return _build_sdist(_source_copy(tmp), tmp)


def test_sdist_has_every_extension_source(sdist):
    """The source distribution carries all of csrc/ (headers and the CUDA files included, which setup.py does not
    list on a machine without CUDA), so the extension builds from it anywhere."""
    names, _ = sdist
    sources = {f"csrc/{p.name}" for p in (ROOT / "csrc").iterdir() if p.suffix in (".h", ".cpp", ".cu")}
    assert {"csrc/step_kernel.cu", "csrc/step_plans.h", "csrc/fastflow_step.h"} <= sources
    assert sources <= names, sorted(sources - names)
    assert {"setup.py", "pyproject.toml", "LICENSE", "kernels/step.py"} <= names
    assert not [n for n in names if n.startswith("tests/")]  # setuptools' default took a broken part of the suite


def test_sdist_from_a_built_checkout_leaves_out_its_build(tmp_path):
    """An sdist made in a checkout where the extension was built in place (scripts/dev.sh does) carries neither the
    compiled module nor the build info setup.py wrote for it: that file said "extension built for torch X" in an
    sdist that has no extension, and a build from the sdist that compiles nothing (an editable one) kept it."""
    tree = _source_copy(tmp_path)
    (tree / "fastflow" / "_build_info.py").write_text("BUILD_INFO = {'extension': True, 'torch': 'the checkout'}\n")
    (tree / "fastflow" / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"\x7fELF not really")
    (tree / "fastflow" / "__pycache__").mkdir(exist_ok=True)
    (tree / "fastflow" / "__pycache__" / "cli.cpython-311.pyc").write_bytes(b"")
    names, _ = _build_sdist(tree, tmp_path)
    assert "fastflow/cli.py" in names and "csrc/ops.cpp" in names
    assert not [n for n in names if n.endswith((".so", ".pyc")) or "_build_info" in n], sorted(names)


def test_sdist_metadata(sdist):
    """What pip and an index read: the version of fastflow/_version.py (no local label), the extras the README and
    docs name, the license, and classifiers that claim no more than is built (no OS or Python version list)."""
    _, meta = sdist
    assert meta["Name"] == "fastflow" and meta["Version"] == _version()
    assert meta["Requires-Python"] == ">=3.10"
    assert meta["License-Expression"] == "MIT"
    assert set(meta.get_all("Provides-Extra")) == {"triton", "demo", "diffusers", "test", "bench"}
    requires = meta.get_all("Requires-Dist")
    assert [r for r in requires if r.startswith("torch>=")] and not [r for r in requires if r.startswith("torch==")]
    assert 'diffusers>=0.39; extra == "diffusers"' in requires
    classifiers = set(meta.get_all("Classifier") or [])
    assert {"Programming Language :: Python :: 3 :: Only", "Programming Language :: C++"} <= classifiers
    assert not [c for c in classifiers if c.startswith(("Operating System ::", "License ::"))]


def _setup_version(tree: Path, *, hide_torch: bool, env: dict | None = None) -> str:
    """What ``setup.py --version`` prints in ``tree``, with torch importable (as in a build without isolation) or
    hidden (as in pip's isolated build)."""
    code = "import runpy, sys; sys.argv[0] = 'setup.py'; runpy.run_path('setup.py', run_name='__main__')"
    if hide_torch:
        code = "import sys; sys.modules['torch'] = None; " + code
    proc = subprocess.run(
        [sys.executable, "-c", code, "--version"],
        cwd=tree, capture_output=True, text=True, timeout=300, env=_env(env),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1]


def test_a_build_with_the_extension_is_labelled_with_what_it_was_built_for(tmp_path, monkeypatch):
    """Any wheel or install that compiles the extension (``pip wheel --no-build-isolation .``, not only
    scripts/build_wheels.sh) carries the local label of its kernels and torch: ``+cpu.torch2.13``; a build without
    torch carries the bare version (an sdist too: test_sdist_metadata)."""
    monkeypatch.delenv("FASTFLOW_LOCAL_VERSION", raising=False)
    tree = _source_copy(tmp_path)
    minor = ".".join(torch.__version__.split(".")[:2])
    cpu = _setup_version(tree, hide_torch=False, env={"FASTFLOW_SKIP_CUDA_BUILD": "1"})
    assert cpu == f"{_version()}+cpu.torch{minor}"
    assert _setup_version(tree, hide_torch=True) == _version()
    assert _setup_version(tree, hide_torch=False, env={"FASTFLOW_LOCAL_VERSION": "none"}) == _version()


def test_a_pure_wheel_built_in_a_checkout_leaves_its_build_info(tmp_path):
    """``pip install .`` builds in the checkout: the wheel gets build info saying it has no extension, and the
    checkout keeps the build info of its own in-place extension (it was overwritten before, which made the
    checkout's extension refuse to load)."""
    tree = _source_copy(tmp_path)
    in_place = tree / "fastflow" / "_build_info.py"
    in_place.write_text("BUILD_INFO = {'extension': True, 'torch': 'the in-place build'}\n")
    # setup.py as pip's isolated build runs it: torch is not importable there.
    hide_torch = (
        "import runpy, sys; sys.modules['torch'] = None; sys.argv[0] = 'setup.py'; "
        "runpy.run_path('setup.py', run_name='__main__')"
    )
    build = subprocess.run(
        [sys.executable, "-c", hide_torch, "-q", "bdist_wheel", "-d", str(tmp_path)],
        cwd=tree, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-2000:]
    assert in_place.read_text() == "BUILD_INFO = {'extension': True, 'torch': 'the in-place build'}\n"
    (wheel,) = tmp_path.glob("fastflow-*.whl")
    with zipfile.ZipFile(wheel) as z:
        text = z.read("fastflow/_build_info.py").decode()
    assert "'extension': False" in text and "built without torch" in text
