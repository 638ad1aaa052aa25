"""Timers: device time of one call, host-inclusive loop time, CUDA-graph loop time, host syncs, copy bandwidth.

Device time uses CUDA events around each call with the L2 cache flushed before
it, so a small step is timed from DRAM, and the host's launch cost is hidden
behind the flush and a short GPU spin. Host-inclusive time runs the Python loop and synchronizes
only at its end. On a CPU every timer falls back to ``time.perf_counter``.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable

import torch

__all__ = [
    "copy_bandwidth_gbs", "count_syncs", "device_time_us", "graph_loop_us", "host_loop_us", "sync", "sync_warnings",
]

_FLUSH: dict[torch.device, torch.Tensor] = {}
L2_FLUSH_BYTES = 256 * 1024 * 1024


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _flush_buffer(device: torch.device) -> torch.Tensor:
    if device not in _FLUSH:
        _FLUSH[device] = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
    return _FLUSH[device]


def _gpu_spin(cycles: int = 200_000) -> None:
    """About 100 us of GPU busy-wait (no-op where torch lacks the helper)."""
    spin = getattr(torch.cuda, "_sleep", None)
    if spin is not None:
        spin(cycles)


def _reps_for(estimate_s: float, budget_s: float, min_reps: int, max_reps: int) -> int:
    if estimate_s <= 0:
        return max_reps
    return int(max(min_reps, min(max_reps, budget_s / estimate_s)))


def device_time_us(
    fn: Callable[[], object],
    device: torch.device,
    budget_s: float = 0.05,
    min_reps: int = 10,
    max_reps: int = 500,
    flush: bool = True,
) -> float:
    """Median device time of ``fn()`` in microseconds (CPU: wall time of the call)."""
    for _ in range(3):
        fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    reps = _reps_for(time.perf_counter() - t0, budget_s, min_reps, max_reps)
    if device.type != "cuda":
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples) * 1e6
    cache = _flush_buffer(device) if flush else None
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends, strict=True):
        if cache is not None:
            cache.zero_()
        # Keep the GPU busy a little longer so the host has queued all of fn's launches before its start event.
        _gpu_spin()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)) * 1e3


def host_loop_us(
    prepare: Callable[[], object],
    run: Callable[[], object],
    steps: int,
    device: torch.device,
    reps: int = 5,
    budget_s: float = 0.0,
    max_reps: int = 50,
) -> float:
    """Median per-step time of ``run()`` (a whole loop of ``steps`` steps), host work included.

    ``prepare()`` (reset history, set timesteps) runs untimed before each repetition;
    the device is synchronized before the clock starts and once at the end. At least
    ``reps`` loops run, more (up to ``max_reps``) while the timed loops total less than
    ``budget_s``: fast loops, whose per-step time the host's jitter moves most, get a
    steadier median at little cost.
    """
    samples: list[float] = []
    timed = 0.0
    while len(samples) < reps or (timed < budget_s and len(samples) < max_reps):
        prepare()
        sync(device)
        t0 = time.perf_counter()
        run()
        sync(device)
        elapsed = time.perf_counter() - t0
        timed += elapsed
        samples.append(elapsed / steps)
    return statistics.median(samples) * 1e6


def graph_loop_us(
    prepare: Callable[[], object],
    run: Callable[[], object],
    steps: int,
    device: torch.device,
    replays: int = 5,
) -> float:
    """Per-step time of the loop ``run()`` captured once in a CUDA graph and replayed ``replays`` times.

    Raises RuntimeError on a CPU, and whatever capture raises when the loop is not capturable.
    """
    if device.type != "cuda":
        raise RuntimeError("CUDA graphs need a CUDA device")
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            prepare()
            run()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    prepare()
    with torch.cuda.graph(graph):
        run()
    try:
        for _ in range(2):
            graph.replay()
        torch.cuda.synchronize(device)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) * 1e3 / (replays * steps)
    finally:
        del graph


def count_syncs(
    prepare: Callable[[], object], run: Callable[[], object], device: torch.device
) -> tuple[int, list[str]] | None:
    """Host syncs in one run of the loop, as counted by torch's sync debug mode, and where each came from
    (``file:line: message``, the Python line that made it); None on a CPU."""
    if device.type != "cuda":
        return None
    prepare()
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize(device)
    syncs = sync_warnings(caught)
    return len(syncs), [f"{w.filename}:{w.lineno}: {str(w.message).splitlines()[0][:120]}" for w in syncs]


def sync_warnings(caught: list[warnings.WarningMessage]) -> list[warnings.WarningMessage]:
    """The warnings of sync debug mode that report a synchronizing operation ("called a synchronizing CUDA
    operation"). Torch's own notice on switching the mode on ("Synchronization debug mode is a prototype
    feature ...", once per process) is no sync, and is left out: matched on "synchroniz" it was counted, as one
    sync of whichever loop ran first."""
    return [w for w in caught if "synchronizing" in str(w.message).lower()
            and "prototype" not in str(w.message).lower()]


def copy_bandwidth_gbs(device: torch.device, nbytes: int | None = None) -> tuple[float, int]:
    """Device-to-device copy bandwidth in GB/s (read + write counted), and the buffer size used."""
    if nbytes is None:
        nbytes = 512 * 1024 * 1024 if device.type == "cuda" else 64 * 1024 * 1024
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t_us = device_time_us(lambda: dst.copy_(src), device, budget_s=0.3, min_reps=20, flush=False)
    return 2 * nbytes / (t_us * 1e-6) / 1e9, nbytes
