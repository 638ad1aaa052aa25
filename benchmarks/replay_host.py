"""Host time of a ``capture_pipeline`` replay call, the graph's own device work left out (runs on a CPU).

    python benchmarks/replay_host.py            # DiTPipeline and StableDiffusionPipeline, 30 steps

A replayed call still runs the pipeline's Python and, inside the loop, matches every
model call, step and operation against the recording and hands out placeholders;
all of that happens before the graph is launched at the last step, so it adds to
the call's time. Here the capture is replaced by a graph that does nothing, so the
median call time is that host work (plus the pipeline's own, which eager calls pay
too). Tiny random-weight pipelines from the tests; compare two checkouts by running
this in each, side by side.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' own helper modules
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "graph_pipeline"))  # and graph_pipeline's

from stand_in_graphs import capture_on_host  # noqa: E402
from tiny_pipelines import dit_pipe, sd_pipe  # noqa: E402

import fastflow.graph_pipeline as gp  # noqa: E402

STEPS = 30


class _NoGraph:
    """A graph whose replay does nothing: the call's time is then its host work."""

    def __init__(self, *_: object):
        pass

    def replay(self) -> None:
        pass

    def reset(self) -> None:
        pass


def _cases() -> dict:
    g = torch.Generator().manual_seed(3)
    return {
        "DiTPipeline": (dit_pipe, {"class_labels": [1, 2], "guidance_scale": 4.0}),
        "StableDiffusionPipeline": (sd_pipe, {
            "prompt_embeds": torch.randn(2, 5, 12, generator=g),
            "negative_prompt_embeds": torch.randn(2, 5, 12, generator=g),
            "guidance_scale": 7.5, "height": 8, "width": 8,
        }),
    }


def main(repeats: int = 9) -> None:
    gp.CapturedPipeline._capture = lambda self, trace: capture_on_host(self, trace, _NoGraph)
    gp.CapturedPipeline.blockers = lambda self, kwargs=None: []
    for name, (build, kw) in _cases().items():
        fast = gp.capture_pipeline(build())
        kw = {**kw, "num_inference_steps": STEPS, "output_type": "latent"}
        fast(generator=torch.manual_seed(0), **kw)
        events = len(next(iter(fast._traces.values())).events)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fast(generator=torch.manual_seed(0), **kw)
            times.append(time.perf_counter() - t0)
        assert fast.replays == repeats, fast.reason
        median_ms = statistics.median(times) * 1e3
        print(f"{name}: {STEPS} steps, {events} loop events recorded, replay call {median_ms:.2f} ms (median, host)")


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
