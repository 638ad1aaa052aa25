"""Host time per step of fastflow's front ends, for this tree against another checkout, side by side.

    python benchmarks/host_ab.py                         # this tree only
    python benchmarks/host_ab.py --base /path/to/other   # alternate rounds of both, print ratios
    python benchmarks/host_ab.py --steps 30              # loops of 30 steps (default 10)
    python benchmarks/host_ab.py --classes PNDMScheduler,LMSDiscreteScheduler   # these drop-ins only
    python benchmarks/host_ab.py --classes PNDMScheduler --shape 1 4 64 64      # their loops at that size

The other checkout needs its extension built in place (``python setup.py build_ext
--inplace``). Each round runs every case in a fresh subprocess per tree (so the two
``fastflow`` packages never share a process) and the rounds alternate, so drift of a
shared machine hits both sides alike. Cases are CPU-only: host-bound loops on tiny
tensors (``Sampler.step``, and every diffusers drop-in's ``step`` with ``scale_model_input``
with diffusers' own scheduler beside them; float32 latents, and float16 ones for two
classes that upcast), and the C++ CPU kernel at (1,16,128,128) beside the torch
reference. Children run with fixed glibc malloc thresholds (see ``MALLOC_ENV``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# glibc returns freed megabyte buffers to the OS (mmap, heap trim) depending on what ran
# before, and the page faults then cost a torch op up to 10x: fixed thresholds keep every
# allocation in the heap, so both trees time the same allocator state.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
TINY = (1, 4, 16, 16)
KERNEL_SHAPE = (1, 16, 128, 128)
LOOP_STEPS = 10  # steps of a timed loop unless --steps says otherwise
DROPINS = ("DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
           "FlowMatchEulerDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
           "HeunDiscreteScheduler", "LCMScheduler", "EDMEulerScheduler", "EDMDPMSolverMultistepScheduler",
           "PNDMScheduler", "LMSDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
           "DEISMultistepScheduler", "TCDScheduler",
           "DPMSolverSinglestepScheduler", "CogVideoXDDIMScheduler",
           "FlowMatchHeunDiscreteScheduler", "IPNDMScheduler", "DPMSolverSDEScheduler",
           "CosineDPMSolverMultistepScheduler", "LTXEulerAncestralRFScheduler",
           "DDIMInverseScheduler", "DPMSolverMultistepInverseScheduler", "SASolverScheduler",
           "UnCLIPScheduler",
           "CMStochasticIterativeScheduler", "FlowMapEulerDiscreteScheduler",
           "SCMScheduler", "DDPMWuerstchenScheduler", "CogVideoXDPMScheduler")
DROPIN_CONFIG = {"PNDMScheduler": dict(skip_prk_steps=True)}  # Stable Diffusion 1.x's PNDM: no Runge-Kutta warm-up
HALF_DROPINS = ("EulerDiscreteScheduler", "FlowMatchEulerDiscreteScheduler")


def _median_us(fn: Callable[[], object], per_call: int, calls: int, repeats: int = 7) -> float:
    """Median over ``repeats`` of the time of ``calls`` calls of ``fn``, per unit (``per_call`` units a call)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / (calls * per_call) * 1e6)
    return statistics.median(times)


def _pipeline_loop(sched, z0, o):
    """A pipeline-style loop of ``step`` calls over the schedule (``set_timesteps`` already run); the last sample."""
    scale = getattr(sched, "scale_model_input", None)  # flow-matching schedulers have none
    z = z0
    for t in sched.timesteps:
        if scale is not None:
            scale(z, t)  # the model's input, as a pipeline makes it; step takes the unscaled sample
        z = sched.step(o, t, z).prev_sample
    return z


def _last_free_loop(sched, z0, o):
    """Sana Sprint's loop: every timestep but the last (0, where the schedule ends)."""
    z = z0
    for t in sched.timesteps[:-1]:
        z = sched.step(o, t, z).prev_sample
    return z


def _wuerstchen_loop(sched, z0, o):
    """Stable Cascade's loop: every timestep but the last, expanded over the batch."""
    z = z0
    for t in sched.timesteps[:-1]:
        z = sched.step(o, t.expand(z.shape[0]), z).prev_sample
    return z


def _cogvideox_dpm_loop(sched, z0, o):
    """CogVideoX's loop: the previous step's prediction and timestep passed back, as its pipeline does."""
    z, old_pred, ts = z0, None, sched.timesteps
    for i, t in enumerate(ts):
        z, old_pred = sched.step(o, old_pred, t, ts[i - 1] if i > 0 else None, z, return_dict=False)
    return z


# Classes whose pipelines call step otherwise, or whose set_timesteps needs more than a step count.
DROPIN_LOOPS = {"SCMScheduler": _last_free_loop, "DDPMWuerstchenScheduler": _wuerstchen_loop,
                "CogVideoXDPMScheduler": _cogvideox_dpm_loop}
SET_KWARGS = {"SCMScheduler": dict(intermediate_timesteps=None)}  # (its intermediate angle is for two steps only)


def _dropin_steps_us(sched, z0, o, steps: int = LOOP_STEPS, repeats: int = 7) -> float:
    """Median per-step time of a pipeline-style loop of ``steps`` steps (300 steps' worth of loops a repeat);
    ``set_timesteps`` runs untimed before each loop."""
    name = type(sched).__name__
    loop, set_kwargs = DROPIN_LOOPS.get(name, _pipeline_loop), SET_KWARGS.get(name, {})
    loops = max(1, 300 // steps)
    times = []
    for _ in range(repeats + 1):
        total = 0.0
        for _ in range(loops):
            sched.set_timesteps(steps, **set_kwargs)
            t0 = time.perf_counter()
            loop(sched, z0, o)
            total += time.perf_counter() - t0
        times.append(total / (loops * steps) * 1e6)  # per loop step (two calls for Heun's, for example)
    return statistics.median(times[1:])  # the first repeat warms up


def _cases(
    steps: int = LOOP_STEPS, classes: tuple[str, ...] | None = None, shape: tuple[int, ...] = TINY
) -> dict[str, float]:
    """Every case of this tree, in microseconds per step of ``steps``-step loops (run inside the subprocess);
    ``classes``: only these drop-ins' loops (and diffusers' beside them); ``shape``: the drop-in loops' latents."""
    import warnings

    import torch

    import fastflow

    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    results: dict[str, float] = {}
    for solver, extra in () if classes else (("ddim", {}), ("ddpm", {}), ("dpm++2m", {}),
                                             ("ddim", {"guidance_scale": 5.0})):
        name = f"Sampler.step loop {solver}{' cfg' if extra else ''} (cuda backend)"
        s = fastflow.Sampler(fastflow.VP(), solver, steps=steps, backend="cuda", **extra)
        s.prepare("cpu")
        z0 = s.init_noise(TINY, seed=0)
        o = torch.randn(TINY).to(torch.bfloat16)
        o = torch.cat([o, o]) if extra else o
        bufs = [torch.empty_like(z0), torch.empty_like(z0)]

        def loop(s=s, z0=z0, o=o, bufs=bufs, guided=bool(extra)) -> None:
            z = z0
            for i in range(steps):
                z, _ = s.step(o, z, i, out=bufs[i % 2], return_model_input=True,
                              model_input_dtype=torch.bfloat16, duplicate_model_input=guided)

        results[name] = _median_us(loop, steps, max(1, 2000 // steps))

    import diffusers

    import fastflow.diffusers as ffd

    for cls_name in classes or DROPINS:
        ref = getattr(diffusers, cls_name)(**DROPIN_CONFIG.get(cls_name, {}))
        for label, sched in (("diffusers", ref), ("fastflow drop-in", getattr(ffd, cls_name).from_config(ref.config))):
            if label != "diffusers":
                sched.backend = "cuda"
            z0, o = torch.randn(shape), torch.randn(shape)
            results[f"{cls_name} steps ({label})"] = _dropin_steps_us(sched, z0, o, steps)
    for cls_name in (c for c in HALF_DROPINS if not classes or c in classes):  # float16 latents, as fp16 pipelines
        ref = getattr(diffusers, cls_name)()
        for label, sched in (("diffusers", ref), ("fastflow drop-in", getattr(ffd, cls_name).from_config(ref.config))):
            if label != "diffusers":
                sched.backend = "cuda"
            z0, o = torch.randn(shape).half(), torch.randn(shape).half()
            results[f"{cls_name} float16 steps ({label})"] = _dropin_steps_us(sched, z0, o, steps)

    if classes:
        return results
    sys.path.insert(0, str(Path.cwd() / "tests"))  # the tree under test's helpers
    from backends.step_cases import make_case

    from fastflow.backends import get_backend

    for name, kw in (("plain", dict(guided=False, hist=0, noise="none")),
                     ("cfg", dict(guided=True, hist=0, noise="none")),
                     ("2 history", dict(guided=False, hist=2, noise="none")),
                     ("philox noise", dict(guided=False, hist=0, noise="philox"))):
        c = make_case(KERNEL_SHAPE, torch.float32, torch.bfloat16, mi="same", **kw)
        for backend in ("torch", "cuda"):
            b = get_backend(backend)

            def kernel(b=b, c=c) -> None:
                b.fused_step(c.z, torch.empty_like(c.z), c.model_out, c.uncond, c.history, c.table, c.step,
                             seeds=c.seeds, noise=c.noise, use_noise=c.use_noise,
                             model_in_out=torch.empty(c.z.shape, dtype=c.mi_dtype))

            results[f"step {KERNEL_SHAPE} {name} ({backend} backend)"] = _median_us(kernel, 1, 20, repeats=5)
    return results


def _run_tree(tree: Path, steps: int, classes: str | None, shape: list[int]) -> dict[str, float]:
    """This file's cases in a subprocess that imports ``fastflow`` (and the test helpers) from ``tree``."""
    env = dict(os.environ, PYTHONPATH=str(tree), **MALLOC_ENV)
    out = subprocess.run(
        [sys.executable, __file__, "--child", "--steps", str(steps), *(["--classes", classes] if classes else []),
         "--shape", *map(str, shape)],
        cwd=tree, env=env, capture_output=True, text=True,
    )
    if out.returncode != 0:
        raise SystemExit(f"host_ab: the run in {tree} failed (exit {out.returncode}):\n{out.stderr.strip()[-4000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    where = Path(result.pop("fastflow")).resolve()
    if tree not in where.parents:
        raise RuntimeError(f"the run for {tree} imported fastflow from {where}")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, help="another checkout to compare with (its extension built in place)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=LOOP_STEPS, help="steps of each timed loop")
    parser.add_argument("--absolute", action="store_true", help="also print the medians (us; this machine's)")
    parser.add_argument("--classes", help="comma-separated drop-in classes: time only their loops")
    parser.add_argument("--shape", type=int, nargs="+", default=list(TINY), help="the drop-in loops' latents")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.base is not None and not (args.base / "fastflow" / "__init__.py").is_file():
        parser.error(f"--base {args.base}: not a fastflow checkout (no fastflow/__init__.py in it)")
    unknown = [name for name in (args.classes or "").split(",") if name and name not in DROPINS]
    if unknown:
        parser.error(f"--classes: not drop-in classes: {', '.join(unknown)}")
    if args.child:
        import fastflow

        classes = tuple(args.classes.split(",")) if args.classes else None
        print(json.dumps({**_cases(args.steps, classes, tuple(args.shape)), "fastflow": fastflow.__file__}))
        return
    trees = {"this": ROOT} if args.base is None else {"base": args.base.resolve(), "this": ROOT}
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in trees}
    for _ in range(args.rounds):
        for key, tree in trees.items():
            runs[key].append(_run_tree(tree, args.steps, args.classes, args.shape))
    med = {k: {name: statistics.median(r[name] for r in runs[k]) for name in runs[k][0]} for k in trees}
    if args.absolute:
        print("| case (us per step, median of rounds) | " + " | ".join(trees) + " |")
        print("|---" * (len(trees) + 1) + "|")
        for name in med["this"]:
            print(f"| {name} | " + " | ".join(f"{med[k].get(name, float('nan')):.1f}" for k in trees) + " |")
        print()
    if args.base is not None:
        print("| case | time this / base |")
        print("|---|---|")
        for name in med["this"]:
            if name in med["base"]:
                print(f"| {name} | {med['this'][name] / med['base'][name]:.2f} |")
        print()
    print("| within a tree | " + " | ".join(trees) + " |")
    print("|---" * (len(trees) + 1) + "|")
    for label, num, den in _pairs(med["this"]):
        cells = " | ".join(f"{med[k][num] / med[k][den]:.2f}" if num in med[k] and den in med[k] else "-"
                           for k in trees)
        print(f"| {label} | {cells} |")


def _pairs(names) -> list[tuple[str, str, str]]:
    """(label, numerator, denominator): fastflow against the comparison run beside it in the same tree."""
    pairs = []
    for name in names:
        if name.endswith("(fastflow drop-in)"):
            ref = name.replace("(fastflow drop-in)", "(diffusers)")
            pairs.append((f"{name.removesuffix(' steps (fastflow drop-in)')}: drop-in / diffusers", name, ref))
        elif name.endswith("(cuda backend)") and name.startswith("step "):
            ref = name.replace("(cuda backend)", "(torch backend)")
            pairs.append((f"{name.removesuffix(' (cuda backend)')}: C++ CPU kernel / torch reference", name, ref))
    return pairs

if __name__ == "__main__":
    main()
