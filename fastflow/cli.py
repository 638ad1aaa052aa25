"""Command line: ``fastflow info`` and ``fastflow demo`` (also ``python -m fastflow ...``)."""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import torch

from .backends import BACKEND_NAMES


def installed_version() -> str:
    """The installed distribution's version, which carries a binary wheel's local label (``0.1.0+cu130.torch2.14``);
    ``fastflow.__version__`` (the base version) for a checkout that is not installed."""
    from importlib import metadata

    from . import __version__

    try:
        return metadata.version("fastflow")
    except metadata.PackageNotFoundError:
        return __version__


def info() -> int:
    """Versions, devices, and for every backend whether it is available or why not."""
    from .backends import backend_report

    print(f"fastflow {installed_version()}")
    print(f"python   {platform.python_version()} ({sys.executable})")
    print(f"torch    {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    try:
        import triton

        print(f"triton   {triton.__version__}")
    except ImportError:
        print("triton   not installed")
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        print(f"device   {torch.cuda.get_device_name()} (capability {major}.{minor})")
    else:
        print("device   no CUDA device")
    try:
        from ._build_info import BUILD_INFO

        print(f"build    {BUILD_INFO}")
        threads = cpu_kernel_threads(BUILD_INFO)
        if threads:
            print(f"threads  {threads}")
    except ImportError:
        print("build    no extension build recorded (pure-Python install)")
    print("backends:")
    for name, reason in backend_report().items():
        if reason is None:
            print(f"  {name:7s} available ({_devices(name)})")
        else:
            print(f"  {name:7s} unavailable: {reason}")
    return 0


def cpu_kernel_threads(info: dict) -> str | None:
    """Whether the extension's CPU kernel runs threaded, from its build info (None when no extension was built):
    it threads only when compiled with OpenMP, which setup.py uses with GCC on Linux only."""
    if not info.get("extension"):
        return None
    if info.get("openmp"):
        return f"CPU kernel multi-threaded (OpenMP; torch uses {torch.get_num_threads()} threads)"
    why = info.get("openmp_skipped") or "built without OpenMP"
    return f"CPU kernel single-threaded: built without OpenMP ({why})"


def _devices(name: str) -> str:
    """Where an available backend runs: ``cpu: yes; cuda: no, <why>`` (the C++ extension may hold a CPU kernel
    only, so "available" alone does not say whether it steps CUDA tensors)."""
    from .backends import get_backend

    backend = get_backend(name)
    parts = []
    for device in ("cpu", "cuda"):
        why = backend.supports(torch.device(device))
        if why is None and device == "cuda" and not torch.cuda.is_available():
            # supports() says whether the backend can step such tensors; there must also be a device to make them on
            why = "no CUDA device" if torch.version.cuda else "torch is a CPU-only build"
        parts.append(f"{device}: {'yes' if why is None else 'no, ' + why}")
    return "; ".join(parts)


_SEED_END = 2**64  # fastflow's seeds (and torch.Generator's) are 64-bit


def positive_int(text: str) -> int:
    """argparse type: an int >= 1 (the benchmarks' command line uses it too)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _seed(text: str) -> int:
    """argparse type: a seed in [0, 2**64)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value < _SEED_END:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**64), got {value}")
    return value


def _check_demo_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What the demo needs beyond each argument's own range; parser.error exits with a usage message."""
    from .backends import resolve_backend

    # sample b draws from seed + b, and the reference draws use seed + 1 and seed + 2
    if args.seed + max(args.n - 1, 2) >= _SEED_END:
        parser.error(f"--seed {args.seed} with -n {args.n} runs past 2**64 - 1 (sample b uses seed + b)")
    try:
        resolve_backend(args.backend, "cpu")  # the demo runs on the CPU
    except RuntimeError as exc:
        parser.error(f"--backend {args.backend}: {exc}")
    if Path(args.out).is_dir():
        parser.error(f"--out {args.out} is a directory; give the figure's file path")
    folder = next(p for p in Path(args.out).absolute().parents if p.exists())  # the demo creates the rest
    if not folder.is_dir():
        parser.error(f"--out {args.out}: {folder} is not a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        parser.error(f"--out {args.out}: cannot write in {folder}")
    formats = _figure_formats()
    suffix = Path(args.out).suffix.lower().lstrip(".")
    if formats is not None and suffix not in formats:  # found before the samplers run, not when saving
        kinds = ", ".join(sorted(formats))
        parser.error(f"--out {args.out}: the figure's format comes from its suffix, one of {kinds}")


def _figure_formats() -> set[str] | None:
    """The file suffixes matplotlib saves figures as (None without matplotlib: the demo says so itself)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return set(Figure().canvas.get_supported_filetypes())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastflow", description=__doc__.replace("``", "`"))
    parser.add_argument("--version", action="version", version=f"fastflow {installed_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions and available backends")
    demo = sub.add_parser("demo", help="sample a 2-D Gaussian mixture with every sampler")
    demo.add_argument("--out", default="fastflow-demo.png", help="figure path")
    demo.add_argument("-n", type=positive_int, default=2000, help="samples per sampler (at least 1)")
    demo.add_argument("--seed", type=_seed, default=0, help="seed of the first sample, in [0, 2**64)")
    demo.add_argument("--backend", default="auto", choices=BACKEND_NAMES, help="the backend every sampler steps with")
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            return info()
        _check_demo_args(demo, args)
        from .demo import run_demo

        try:
            run_demo(args.out, n=args.n, seed=args.seed, backend=args.backend)
        except BrokenPipeError:  # stdout closed early: not the figure
            raise
        except OSError as exc:  # the figure could not be written (the only file the demo writes)
            demo.error(f"--out {args.out}: cannot write the figure: {exc.strerror or exc}")
    except BrokenPipeError:
        return _stdout_closed()
    return 0


def _stdout_closed() -> int:
    """The reader of stdout went away (``fastflow info | head -1``): stop without a traceback, and point stdout at
    the null device so that the interpreter's own flush at exit does not raise again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
