"""benchmarks/test_host_overhead.py: what its whole-loop benchmarks time."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest

pytest.importorskip("pytest_benchmark")
host_overhead = pytest.importorskip("benchmarks.test_host_overhead")


class _FakeBenchmark:
    """Runs what the benchmark fixture would time, noting what ran inside the timed calls."""

    def __init__(self):
        self.timing = False
        self.rounds = 0

    def _timed(self, fn, *args, **kwargs):
        self.timing = True
        try:
            return fn(*args, **kwargs)
        finally:
            self.timing = False

    def __call__(self, fn, *args, **kwargs):
        for _ in range(3):
            self.rounds += 1
            result = self._timed(fn, *args, **kwargs)
        return result

    def pedantic(self, target, args=(), kwargs=None, setup=None, rounds=1, warmup_rounds=0, **_):
        for _ in range(warmup_rounds + rounds):
            if setup is not None:
                setup()
            self.rounds += 1
            self._timed(target, *args, **(kwargs or {}))


def _request():
    options = {"benchmark_max_time": 0.0, "benchmark_min_rounds": 2}
    return SimpleNamespace(config=SimpleNamespace(getoption=lambda name, default=None: options.get(name, default)))


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("family", ["ddim", "dpm++2m"])
def test_loop_times_diffusers_steps_without_set_timesteps(monkeypatch, family):
    """The "loop: 10 steps" group's diffusers rows are its steps (the group says: divide by 10 for per step):
    ``set_timesteps`` runs before each timed loop, not in it. It ran inside, adding its cost to diffusers' figure
    only (fastflow's loops have nothing to reset)."""
    pytest.importorskip("diffusers")
    from benchmarks import impls

    bench = _FakeBenchmark()
    calls = {"timed": 0, "untimed": 0}
    made = []
    init = impls.DiffusersImpl.__init__

    def init_counting(self, case):
        init(self, case)
        set_timesteps = self.scheduler.set_timesteps

        def counting(*args, **kwargs):
            calls["timed" if bench.timing else "untimed"] += 1
            return set_timesteps(*args, **kwargs)

        self.scheduler.set_timesteps = counting
        made.append(self)

    monkeypatch.setattr(impls.DiffusersImpl, "__init__", init_counting)
    test = host_overhead.test_loop
    kwargs = {"benchmark": bench, "kind": "diffusers", "family": family}
    if "request" in inspect.signature(test).parameters:
        kwargs["request"] = _request()
    test(**kwargs)
    assert made and bench.rounds >= 2
    assert calls["timed"] == 0
    assert calls["untimed"] >= bench.rounds  # a fresh schedule before every timed loop
