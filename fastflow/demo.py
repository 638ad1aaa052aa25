"""``fastflow demo``: sample a 2-D Gaussian mixture with its exact denoiser through every sampler.

Prints, per sampler, the sliced Wasserstein distance of its samples to fresh
draws of the true distribution (with the distance between two true draws as the
floor) and the host time per sampler step, and writes a figure of trajectories.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .mixture import GaussianMixture, sliced_wasserstein
from .sampler import Sampler
from .schedules import EDM, VP, FlowMatching, Schedule


@dataclass
class Run:
    label: str
    schedule: Schedule
    solver: str
    prediction: str
    steps: int
    options: dict


RUNS = [
    Run("DDIM", VP(), "ddim", "eps", 20, {}),
    Run("DDPM", VP(), "ddpm", "eps", 20, {}),
    Run("DDPM", VP(), "ddpm", "eps", 100, {}),
    Run("flow-matching Euler", FlowMatching(), "flow-euler", "flow", 20, {}),
    Run("Euler ancestral", VP(), "euler-ancestral", "eps", 20, {}),
    Run("EDM Euler + churn", EDM(), "euler", "x0", 20, {"s_churn": 20.0, "s_tmin": 0.05, "s_tmax": 10.0}),
    Run("EDM Heun", EDM(), "heun", "x0", 10, {}),
    Run("DPM-Solver++ 1", VP(), "dpm++1", "eps", 10, {"grid": "logsnr", "t_min": 1.0}),
    Run("DPM-Solver++ 2M", VP(), "dpm++2m", "eps", 10, {"grid": "logsnr", "t_min": 1.0}),
    Run("DPM-Solver++ 3M", VP(), "dpm++3m", "eps", 10, {"grid": "logsnr", "t_min": 1.0}),
    Run("SDE-DPM-Solver++ 2M", VP(), "sde-dpm++2m", "eps", 20, {}),
    Run("UniPC bh2 (order 2)", VP(), "unipc", "eps", 10, {"grid": "logsnr", "t_min": 1.0}),
]
FIGURE_RUNS = ("DDIM", "DDPM", "flow-matching Euler")
FIGURE_PATHS = 40  # trajectories drawn per panel (all of them when fewer samples are drawn)


def _sample(run: Run, mixture: GaussianMixture, n: int, seed: int, backend: str):
    options = dict(run.options)
    sampler = Sampler(run.schedule, run.solver, prediction=run.prediction, steps=run.steps, backend=backend, **options)
    model = mixture.model(run.schedule, run.prediction)
    z = sampler.init_noise((n, 2), seed=seed)
    sampler.prepare(z.device)  # the table upload and backend load are not part of a step's time
    path = [z.clone()]
    step_time = 0.0
    z_in = sampler.model_input(z, 0)
    for i, t in enumerate(sampler.timesteps):
        out = model(z_in, t)
        t0 = time.perf_counter()
        z, z_in = sampler.step(out, z, i, return_model_input=True)
        step_time += time.perf_counter() - t0
        path.append(z.clone())
    return z, torch.stack(path), step_time / sampler.num_stages, sampler


def run_demo(out: str | Path = "fastflow-demo.png", n: int = 2000, seed: int = 0, backend: str = "auto") -> list[dict]:
    """Run every demo sampler, print the table, write the figure; returns the table rows."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1 (samples per sampler), got {n!r}")
    mixture = GaussianMixture.ring()
    truth = mixture.sample(n, torch.Generator().manual_seed(seed + 1))
    floor = sliced_wasserstein(mixture.sample(n, torch.Generator().manual_seed(seed + 2)), truth)
    rows, paths = [], {}
    print(f"{'sampler':24s} {'schedule':28s} {'steps':>5s} {'calls':>5s} {'SW distance':>11s} {'step (us)':>9s}")
    for run in RUNS:
        x, path, per_step, sampler = _sample(run, mixture, n, seed, backend)
        dist = sliced_wasserstein(x.double(), truth)
        rows.append({"sampler": run.label, "schedule": repr(run.schedule), "steps": run.steps,
                     "calls": sampler.num_stages, "distance": dist, "step_us": per_step * 1e6})
        print(f"{run.label:24s} {run.schedule!r:28s} {run.steps:5d} {sampler.num_stages:5d} {dist:11.4f} "
              f"{per_step * 1e6:9.1f}")
        if run.label in FIGURE_RUNS and run.label not in paths:
            paths[run.label] = (path, sampler)
    print(f"{'two true draws (floor)':24s} {'':28s} {'':5s} {'':5s} {floor:11.4f}")
    if _figure(Path(out), mixture, truth, paths):
        print(f"figure: {out}")
    return rows


def _figure(out: Path, mixture: GaussianMixture, truth: torch.Tensor, paths: dict) -> bool:
    """Write the figure; False (said why) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; skipping the figure (pip install fastflow[demo])")
        return False
    fig, axes = plt.subplots(1, len(paths), figsize=(5 * len(paths), 5), squeeze=False)
    for ax, (label, (path, sampler)) in zip(axes[0], paths.items(), strict=True):
        # Plot z / sqrt(alpha^2 + sigma^2): every schedule's state at a common, unit scale.
        norm = [float(a * a + s * s) ** 0.5 for a, s in zip(sampler.stage_alpha, sampler.stage_sigma, strict=True)]
        view = path / torch.tensor(norm + [1.0], dtype=path.dtype)[:, None, None]
        ax.scatter(truth[:, 0], truth[:, 1], s=2, c="0.8", label="data")
        for k in range(min(FIGURE_PATHS, view.shape[1])):
            ax.plot(view[:, k, 0], view[:, k, 1], lw=0.7, alpha=0.8)
        ax.scatter(view[-1, :, 0], view[-1, :, 1], s=2, c="k", label="samples")
        ax.set_title(f"{label}: {sampler.steps} steps")
        ax.set_xlim(-3.5, 3.5)
        ax.set_ylim(-3.5, 3.5)
        ax.set_aspect("equal")
    axes[0][0].legend(loc="upper left")
    fig.suptitle("fastflow: sample paths of z / sqrt(alpha^2 + sigma^2), exact Gaussian-mixture denoiser")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True
