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


def test_sync_count_leaves_out_torchs_notice_on_switching_the_mode_on(monkeypatch):
    """Only the warnings that report a synchronizing operation count: torch's once-per-process notice that sync
    debug mode is a prototype (raised when the mode is switched on) was counted too, as one sync of the first loop
    timed (``ddim 4x16x21x90x160 naive``, or ``fastflow-triton`` in 5374fcd's run, in the recorded GPU runs)."""
    import warnings

    def set_mode(mode: str) -> None:
        if mode == "warn":
            warnings.warn(
                "Synchronization debug mode is a prototype feature and does not yet detect all synchronizing "
                "operations (Triggered internally at /pytorch/torch/csrc/cuda/Module.cpp:833.)", UserWarning,
                stacklevel=2,
            )

    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", set_mode)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)

    def run() -> None:
        warnings.warn("called a synchronizing CUDA operation (Triggered internally at "
                      "/pytorch/c10/cuda/CUDAFunctions.cpp:162.)", UserWarning, stacklevel=2)
        warnings.warn("an unrelated warning", UserWarning, stacklevel=2)

    count, sources = timing.count_syncs(lambda: None, run, torch.device("cuda"))
    assert count == 1
    assert len(sources) == 1 and "called a synchronizing CUDA operation" in sources[0]
