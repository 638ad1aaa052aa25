"""Command line: ``fastflow info`` and ``fastflow demo`` (also ``python -m fastflow ...``)."""

from __future__ import annotations

import argparse
import platform
import sys

import torch


def info() -> int:
    """Versions, devices, and for every backend whether it is available or why not."""
    from importlib import metadata

    from . import __version__
    from .backends import backend_report

    try:  # the installed distribution's version carries the wheel's local label (+cu130.torch2.14)
        version = metadata.version("fastflow")
    except metadata.PackageNotFoundError:
        version = __version__
    print(f"fastflow {version}")
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
    except ImportError:
        print("build    no extension build recorded (pure-Python install)")
    print("backends:")
    for name, reason in backend_report().items():
        if reason is None:
            print(f"  {name:7s} available ({_devices(name)})")
        else:
            print(f"  {name:7s} unavailable: {reason}")
    return 0


def _devices(name: str) -> str:
    """Where an available backend runs: ``cpu: yes; cuda: no, <why>`` (the C++ extension may hold a CPU kernel
    only, so "available" alone does not say whether it steps CUDA tensors)."""
    from .backends import get_backend

    backend = get_backend(name)
    parts = []
    for device in ("cpu", "cuda"):
        why = backend.supports(torch.device(device))
        parts.append(f"{device}: {'yes' if why is None else 'no, ' + why}")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastflow", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions and available backends")
    demo = sub.add_parser("demo", help="sample a 2-D Gaussian mixture with several samplers")
    demo.add_argument("--out", default="fastflow-demo.png", help="figure path")
    demo.add_argument("-n", type=int, default=2000, help="samples per sampler")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--backend", default="auto")
    args = parser.parse_args(argv)
    if args.command == "info":
        return info()
    from .demo import run_demo

    run_demo(args.out, n=args.n, seed=args.seed, backend=args.backend)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
