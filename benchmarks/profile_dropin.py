"""Where a drop-in step's host time goes: Python's profiler over loops of ``step`` calls.

    python benchmarks/profile_dropin.py [--device cuda] [--loops 100] [CLASS ...]

For each diffusers class named (default: a deterministic and a stochastic few), the drop-in runs
pipeline-style loops of 10 steps on (1,4,16,16) tensors: three unprofiled (warm-up), then ``--loops``
with their ``step`` calls under ``cProfile`` (``set_timesteps`` outside it). It prints the
profiled time per ``step`` call (a loop of 10 steps calls it 19 times for Heun's, say) and the functions with the
most time of their own, with their calls per ``step`` call.
The profiler's own cost inflates every figure, so read the table for what is called and how often,
and ``benchmarks/test_host_overhead.py`` for times.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats

import torch

DEFAULT = ("DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
           "LCMScheduler")
STEPS = 10


def profile_class(name: str, device: torch.device, loops: int, top: int) -> str:
    import diffusers

    from fastflow.diffusers import from_scheduler

    sched = from_scheduler(getattr(diffusers, name)())
    z0 = torch.randn(1, 4, 16, 16, device=device)
    o = torch.randn_like(z0)

    def loop(profiler: cProfile.Profile | None = None) -> int:
        """One loop; the number of ``step`` calls it made (19 for Heun's 10 steps, for example)."""
        sched.set_timesteps(STEPS, device=device)
        if profiler is not None:
            profiler.enable()
        z, calls = z0, 0
        for t in sched.timesteps:
            z = sched.step(o, t, z, return_dict=False)[0]
            calls += 1
        if profiler is not None:
            profiler.disable()
        return calls

    for _ in range(3):
        loop()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    profiler = cProfile.Profile()
    calls = sum(loop(profiler) for _ in range(loops))  # per step call: a loop may call step more than STEPS times
    stats = pstats.Stats(profiler)
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]  # by own time
    total = sum(v[2] for v in stats.stats.values())
    lines = [f"## {name} on {device}: {total / calls * 1e6:.1f} us a step call under the profiler "
             f"({calls // loops} calls a {STEPS}-step loop)",
             "", "| own us / step call | calls / step call | function |", "|---|---|---|"]
    for (path, line, func), (_, ncalls, own, _, _) in rows:
        where = f"{path.rsplit('/', 2)[-1]}:{line}" if line else path
        lines.append(f"| {own / calls * 1e6:.2f} | {ncalls / calls:.2f} | {func} ({where}) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("classes", nargs="*", default=list(DEFAULT))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--loops", type=int, default=100)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device")
    from fastflow.diffusers import supported

    unknown = [name for name in args.classes if name not in supported()]
    if unknown:
        parser.error(f"not drop-in classes: {', '.join(unknown)} (fastflow.diffusers.supported() lists them)")
    for name in args.classes:
        print(profile_class(name, device, args.loops, args.top), end="\n\n", flush=True)


if __name__ == "__main__":
    main()
