"""Stochastic drop-in steps at a large size on a CPU: fastflow's in-kernel noise against torch's.

    python benchmarks/cpu_noise.py                                   # (1,16,128,128), 5 rounds
    python benchmarks/cpu_noise.py --shape 1 4 64 64 --rounds 3 DDPMScheduler

On a GPU a stochastic step draws its noise inside the fused kernel at no extra memory
traffic. The C++ CPU kernel's normals are the torch reference's, bit for bit (the
spec's transform in double precision; with AVX2, csrc/noise_avx2.h), so on a CPU the
draw costs more per element than ``torch.randn``. This times, per
class, 10-step ``step`` loops of diffusers' own scheduler, of the drop-in with its
in-kernel noise (the default) and of the drop-in with ``diffusers_noise = True``
(torch's global generator draws, diffusers' way, and the kernel reads the tensor),
interleaved round by round in one process; it prints the median us per step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

CLASSES = ("DDPMScheduler", "EulerAncestralDiscreteScheduler", "LCMScheduler")
STEPS = 10


def _schedulers(name: str) -> dict[str, object]:
    import diffusers

    from fastflow.diffusers import from_scheduler

    kernel_noise = from_scheduler(getattr(diffusers, name)())
    torch_noise = from_scheduler(getattr(diffusers, name)())
    torch_noise.diffusers_noise = True
    return {"diffusers": getattr(diffusers, name)(), "drop-in, in-kernel noise": kernel_noise,
            "drop-in, diffusers_noise": torch_noise}


def _loop_us(sched, z0: torch.Tensor, out: torch.Tensor, repeats: int) -> float:
    """Median us per step over ``repeats`` loops of ``STEPS`` steps (``set_timesteps`` untimed)."""
    times = []
    for _ in range(repeats):
        sched.set_timesteps(STEPS)
        z = z0
        start = time.perf_counter()
        for t in sched.timesteps:
            z = sched.step(out, t, z, return_dict=False)[0]
        times.append((time.perf_counter() - start) / STEPS * 1e6)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("classes", nargs="*", default=list(CLASSES))
    parser.add_argument("--shape", type=int, nargs="+", default=[1, 16, 128, 128])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5, help="loops per round and case")
    args = parser.parse_args()
    from diffusers.utils import logging as diffusers_logging

    from fastflow.diffusers import supported

    unknown = [name for name in args.classes if name not in supported()]
    if unknown:
        parser.error(f"not drop-in classes: {', '.join(unknown)} (fastflow.diffusers.supported() lists them)")

    diffusers_logging.set_verbosity_error()  # the Euler classes log a scale_model_input reminder per loop
    gen = torch.Generator().manual_seed(0)
    z0 = torch.randn(*args.shape, generator=gen)
    out = torch.randn(*args.shape, generator=gen)
    print(f"shape {tuple(args.shape)}, {torch.get_num_threads()} threads, median of {args.rounds} rounds (us per step)")
    print()
    print("| class | diffusers | drop-in, in-kernel noise | drop-in, diffusers_noise |")
    print("|---|---|---|---|")
    for name in args.classes:
        scheds = _schedulers(name)
        for sched in scheds.values():  # warm-up: plans built, allocator primed
            _loop_us(sched, z0, out, 1)
        rounds: dict[str, list[float]] = {case: [] for case in scheds}
        for _ in range(args.rounds):
            for case, sched in scheds.items():
                rounds[case].append(_loop_us(sched, z0, out, args.repeats))
        cells = " | ".join(f"{statistics.median(rounds[case]):.0f}" for case in scheds)
        print(f"| {name} | {cells} |")


if __name__ == "__main__":
    main()
