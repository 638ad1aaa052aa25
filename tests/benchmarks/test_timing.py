"""benchmarks.timing's host-loop measurement: how many loops it times."""

from __future__ import annotations

import time

import torch

from benchmarks import timing

CPU = torch.device("cpu")


def _counting_loop(seconds: float):
    calls = {"prepare": 0, "run": 0}

    def prepare() -> None:
        calls["prepare"] += 1

    def run() -> None:
        calls["run"] += 1
        time.sleep(seconds)

    return calls, prepare, run


def test_fast_loops_repeat_within_the_budget():
    """Loops far shorter than the budget run up to max_reps times, each after its prepare()."""
    calls, prepare, run = _counting_loop(0.0)
    us = timing.host_loop_us(prepare, run, steps=10, device=CPU, reps=3, budget_s=10.0, max_reps=25)
    assert calls == {"prepare": 25, "run": 25}
    assert us >= 0.0


def test_slow_loops_run_the_minimum():
    """Loops longer than the whole budget run exactly ``reps`` times; the result is per step."""
    calls, prepare, run = _counting_loop(0.02)
    us = timing.host_loop_us(prepare, run, steps=4, device=CPU, reps=3, budget_s=0.01, max_reps=25)
    assert calls == {"prepare": 3, "run": 3}
    assert us >= 0.02 / 4 * 1e6


def test_no_budget_keeps_the_old_count():
    calls, prepare, run = _counting_loop(0.0)
    timing.host_loop_us(prepare, run, steps=1, device=CPU, reps=5)
    assert calls["run"] == 5
