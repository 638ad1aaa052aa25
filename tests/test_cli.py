"""The command line: `fastflow info` and `fastflow demo`."""

import sys
import types

import pytest
import torch

from fastflow import backends, cli, demo
from fastflow.backends.reference import TorchBackend
from fastflow.solvers import SOLVER_NAMES


def test_info_lists_every_backend(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("torch", "triton", "cuda"):
        assert f"  {name}" in out
    assert "fastflow 0." in out
    cuda = "yes" if torch.cuda.is_available() else "no, "
    assert f"  torch   available (cpu: yes; cuda: {cuda}" in out  # an available backend says where it runs


def test_version_flag(capsys):
    """`fastflow --version` (and `python -m fastflow --version`) prints the version and exits 0."""
    import fastflow

    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"fastflow {fastflow.__version__}"), out  # an installed binary wheel adds its local label


@pytest.mark.parametrize(
    ("openmp", "skipped", "says"),
    [
        (True, None, "threads  CPU kernel multi-threaded (OpenMP; torch uses"),
        (False, "clang's -fopenmp links libomp", "threads  CPU kernel single-threaded: built without OpenMP (clang"),
    ],
)
def test_info_says_whether_the_cpu_kernel_is_threaded(capsys, monkeypatch, openmp, skipped, says):
    """A compiler without a usable OpenMP (clang, MSVC) builds a CPU kernel that runs on one thread: info says so."""
    build = types.ModuleType("fastflow._build_info")
    build.BUILD_INFO = {"extension": True, "torch": torch.__version__, "openmp": openmp, "openmp_skipped": skipped}
    monkeypatch.setitem(sys.modules, "fastflow._build_info", build)
    assert cli.main(["info"]) == 0
    assert says in capsys.readouterr().out


def test_info_says_nothing_of_threads_without_an_extension(capsys, monkeypatch):
    build = types.ModuleType("fastflow._build_info")
    build.BUILD_INFO = {"extension": False, "reason": "built without torch (no extension)"}
    monkeypatch.setitem(sys.modules, "fastflow._build_info", build)
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "'extension': False" in out and "threads" not in out


def test_info_says_no_cuda_without_a_device(capsys, monkeypatch):
    """The torch reference steps CUDA tensors, but without a CUDA device there are none to step."""
    backends.backend_report()  # availability is probed once and cached: probe it with the real device state
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "device   no CUDA device" in out
    assert "  torch   available (cpu: yes; cuda: no, " in out
    assert "cuda: yes" not in out


def test_demo_writes_its_figure(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(demo, "RUNS", demo.RUNS[:4])
    rows = demo.run_demo(tmp_path / "demo.png", n=300, backend="torch")
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    assert [r["sampler"] for r in rows] == ["DDIM", "DDPM", "DDPM", "flow-matching Euler"]
    assert all(r["distance"] < 0.5 for r in rows)  # every sampler lands near the mixture
    assert "two true draws" in capsys.readouterr().out


@pytest.mark.parametrize("n", [1, 7])
def test_demo_with_fewer_samples_than_drawn_paths(tmp_path, monkeypatch, n):
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(demo, "RUNS", demo.RUNS[:4])
    assert cli.main(["demo", "-n", str(n), "--out", str(tmp_path / "demo.png"), "--backend", "torch"]) == 0
    assert (tmp_path / "demo.png").exists()


def test_demo_runs_every_sampler():
    """The README says the demo samples the mixture with every sampler."""
    assert {run.solver for run in demo.RUNS} == set(SOLVER_NAMES)


@pytest.mark.parametrize(
    "args, message",
    [
        (["-n", "0"], "-n: must be at least 1"),
        (["-n", "ten"], "-n: expected an integer"),
        (["--backend", "bogus"], "--backend: invalid choice: 'bogus'"),
        (["--seed", "-1"], "--seed: must be in [0, 2**64)"),
        (["--seed", str(2**64)], "--seed: must be in [0, 2**64)"),
        (["--seed", str(2**64 - 3), "-n", "5"], "runs past 2**64 - 1"),
        (["--out", "figure.xyz"], "--out figure.xyz: the figure's format comes from its suffix, one of"),
        (["--out", "figure"], "--out figure: the figure's format comes from its suffix"),
    ],
)
def test_demo_refuses_bad_arguments(capsys, args, message):
    if "figure's format" in message:  # the formats are matplotlib's; without it the demo skips the figure (said)
        pytest.importorskip("matplotlib")
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: fastflow demo" in err and message in err


def test_demo_refuses_an_out_that_is_a_directory(capsys, tmp_path):
    """Found before the samplers run (it failed in savefig after all of them)."""
    folder = tmp_path / "figure.png"
    folder.mkdir()
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--out", str(folder)])
    assert exc.value.code == 2 and "is a directory" in capsys.readouterr().err


def test_demo_refuses_an_out_under_a_file(capsys, monkeypatch, tmp_path):
    """Found before the samplers run (creating the figure's folder failed after all of them)."""
    monkeypatch.setattr(demo, "RUNS", demo.RUNS[:1])
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "-n", "5", "--out", str(tmp_path / "notes.txt" / "figures" / "demo.png")])
    assert exc.value.code == 2 and f"{tmp_path / 'notes.txt'} is not a directory" in capsys.readouterr().err


def test_demo_says_why_its_figure_was_not_written(capsys, monkeypatch, tmp_path):
    """A write that fails anyway ends with a usage error naming the path, not a traceback."""
    def unwritable(out, *args):
        raise PermissionError(13, "Permission denied", str(out))

    monkeypatch.setattr(demo, "RUNS", demo.RUNS[:1])
    monkeypatch.setattr(demo, "_figure", unwritable)
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "-n", "5", "--out", str(tmp_path / "demo.png")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"--out {tmp_path / 'demo.png'}: cannot write the figure: Permission denied" in err


def test_demo_without_matplotlib_names_no_figure(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(demo, "RUNS", demo.RUNS[:1])
    demo.run_demo(tmp_path / "f.png", n=50)
    out = capsys.readouterr().out
    assert "skipping the figure" in out and "figure:" not in out and not (tmp_path / "f.png").exists()


class CudaOnly(TorchBackend):
    def supports(self, device):
        return None if torch.device(device).type == "cuda" else "it runs on CUDA devices only"


def test_demo_refuses_a_backend_that_cannot_run_on_the_cpu(capsys, monkeypatch):
    monkeypatch.setitem(backends._CACHE, "cuda", CudaOnly())
    monkeypatch.setattr(backends, "_RESOLVED", {})
    with pytest.raises(SystemExit):
        cli.main(["demo", "--backend", "cuda"])
    assert "--backend cuda: backend 'cuda' cannot run on cpu: it runs on CUDA devices only" in capsys.readouterr().err


def test_run_demo_refuses_no_samples(tmp_path):
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        demo.run_demo(tmp_path / "demo.png", n=0)


def test_info_into_a_closed_pipe_stops_without_a_traceback():
    """`fastflow info | head -1`: the reader goes away before fastflow writes; the command stops quietly (exit 1)
    rather than ending in a BrokenPipeError traceback, at its write or at the interpreter's flush on exit."""
    import os
    import subprocess

    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first write
    try:
        proc = subprocess.run([sys.executable, "-m", "fastflow", "info"], stdout=write, stderr=subprocess.PIPE,
                              text=True, timeout=120)
    finally:
        os.close(write)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 1, proc.stderr

