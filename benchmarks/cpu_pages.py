"""CPU step time at a large size: torch's default CPU allocations, transparent huge pages, glibc's heap.

    python benchmarks/cpu_pages.py                          # (4,16,21,90,160), 3 alternating rounds
    python benchmarks/cpu_pages.py --shape 1 16 128 128 --rounds 5

On a CPU every tensor over glibc's mmap threshold (32 MB at most) is fresh memory, so
each step's new outputs are page-faulted in, 4 KiB at a time. torch backs CPU
tensors of 2 MB and more with transparent huge pages when ``THP_MEM_ALLOC_ENABLE=1``
is set before it starts (the kernel's THP mode must be ``always`` or ``madvise``);
glibc keeps freed memory for reuse when its mmap and trim thresholds are raised
(``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``), at the cost of holding it.
Each round runs one subprocess per setting, alternating, so drift hits both alike;
each subprocess times ``Sampler.step`` loops of the C++ CPU kernel (``backend="cuda"``)
and of the torch reference.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOLVERS = ("ddim", "dpm++2m", "unipc")
BACKENDS = ("cuda", "torch")
SETTINGS = {
    "default": {},
    "THP_MEM_ALLOC_ENABLE=1": {"THP_MEM_ALLOC_ENABLE": "1"},
    "glibc heap": {"MALLOC_MMAP_THRESHOLD_": str(1 << 34), "MALLOC_TRIM_THRESHOLD_": str(1 << 36)},
}

_OWN = {key for extra in SETTINGS.values() for key in extra}


def _child(shape: tuple[int, ...], steps: int) -> dict[str, float]:
    """Median ms per step of each solver and backend (run inside the timed subprocess)."""
    import torch

    import fastflow

    torch.manual_seed(0)
    z0 = torch.randn(shape)
    out = torch.randn(shape, dtype=torch.bfloat16)
    result = {}
    for backend in BACKENDS:
        for solver in SOLVERS:
            sampler = fastflow.Sampler(fastflow.schedules.VP(beta_schedule="scaled_linear"), solver=solver,
                                       prediction="eps", steps=steps, backend=backend)
            times = []
            for loop in range(3):  # the first loop is a warm-up (the process's heap grows there)
                z = z0
                for i in range(steps):
                    t0 = time.perf_counter()
                    z = sampler.step(out, z, i)
                    if loop:
                        times.append(time.perf_counter() - t0)
            result[f"{solver} ({backend})"] = statistics.median(times) * 1e3
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs="+", default=[4, 16, 21, 90, 160])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(tuple(args.shape), args.steps)))
        return
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in SETTINGS}
    for _ in range(args.rounds):
        for name, extra in SETTINGS.items():
            env = {k: v for k, v in os.environ.items() if k not in _OWN} | extra
            env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
            cmd = [sys.executable, __file__, "--child", "--steps", str(args.steps), "--shape", *map(str, args.shape)]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    elements = 1
    for d in args.shape:
        elements *= d
    names = list(SETTINGS)
    print(f"shape {tuple(args.shape)} ({elements} elements), {args.steps}-step loops, {args.rounds} rounds; "
          "ms per step, median of the rounds' medians\n")
    ratios = [f"{name} / {names[0]}" for name in names[1:]]
    print(f"| case | {' | '.join(names + ratios)} |")
    print("|---|" + "---|" * (2 * len(names) - 1))
    for case in runs[names[0]][0]:
        med = [statistics.median(r[case] for r in runs[name]) for name in names]
        cells = [f"{m:.1f}" for m in med] + [f"{m / med[0]:.2f}" for m in med[1:]]
        print(f"| {case} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
