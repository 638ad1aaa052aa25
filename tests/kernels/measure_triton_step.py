"""Host overhead, graph-replay time and bandwidth of the Triton fused step (needs a CUDA device).

Usage: ``python tests/kernels/measure_triton_step.py [out.json]``. Prints one JSON
object (and writes it to the given path or to ``$OUT/triton_step.json``):

* ``host_us``: Python time per ``fused_step`` call (validation plus launch), no sync;
* ``graph_us_per_step``: a captured loop of 20 steps at (1,16,128,128), replayed, per step;
* ``device``: device time per step (launches captured in a graph, so host time is
  excluded) and bandwidth at (1,16,128,128) and at 19.4M elements against a
  device-to-device copy, counting the bytes of ``BYTES`` (fp32 state, bf16 model
  tensors: 10 per element for a plain step, 14 with a guidance pair and the model
  input), for a few block sizes.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from fastflow.backends import get_backend
from fastflow.plan import AO, AZ, CIN, CN, CX, CZ, NUM_COEFS, W


def _table(stages: int) -> torch.Tensor:
    t = torch.zeros(stages, NUM_COEFS)
    t[:, W], t[:, AZ], t[:, AO], t[:, CZ], t[:, CX], t[:, CN], t[:, CIN] = 3.0, 1.0, -0.2, 0.9, 0.1, 0.05, 1.0
    return t.cuda()


def _inputs(shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    b = shape[0]
    o2 = torch.randn(2 * b, *shape[1:], device="cuda", dtype=torch.bfloat16)
    return {
        "z": torch.randn(shape, device="cuda"),
        "cond": o2[:b],
        "uncond": o2[b:],
        "seeds": torch.arange(b, dtype=torch.int64, device="cuda"),
        "mi": torch.empty(2 * b, *shape[1:], device="cuda", dtype=torch.bfloat16),
        "step": torch.zeros(1, dtype=torch.int64, device="cuda"),
    }


# Bytes per element for an fp32 state and bf16 model tensors: read z 4, read each output 2,
# write z 4, write each model-input copy 2.
VARIANTS = {
    "deterministic": dict(guided=False, noise=False, mi=None),
    "stochastic": dict(guided=False, noise=True, mi=None),
    "guided_modelin": dict(guided=True, noise=False, mi="single"),
    "guided_noise_modelin_dup": dict(guided=True, noise=True, mi="dup"),
}
BYTES = {"deterministic": 10, "stochastic": 10, "guided_modelin": 14, "guided_noise_modelin_dup": 16}


def _call(tb, x: dict, table: torch.Tensor, v: dict, step, block=None) -> None:
    tb.fused_step(
        x["z"],
        x["z"],
        x["cond"],
        x["uncond"] if v["guided"] else None,
        [],
        table,
        step,
        seeds=x["seeds"],
        model_in_out=None if v["mi"] is None else (x["mi"] if v["mi"] == "dup" else x["mi"][: x["z"].shape[0]]),
        use_noise=v["noise"],
        **({} if block is None else {"block": block}),  # only the Triton backend takes a block size
    )


def _capture(fn, reps: int) -> torch.cuda.CUDAGraph:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    return graph


def _device_us(fn, reps: int = 20, replays: int = 10) -> float:
    """Device time per call: ``reps`` calls captured in one graph, so host time is excluded."""
    graph = _capture(fn, reps)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (reps * replays)


def main() -> dict:
    tb = get_backend("triton")
    reason = tb.availability() or tb.supports(torch.device("cuda"))
    if reason:
        raise SystemExit(f"Triton backend unavailable: {reason}")
    table = _table(64)
    res: dict = {"gpu": torch.cuda.get_device_name(), "host_us": {}, "graph_us_per_step": {}, "device": {}}

    small = _inputs((1, 16, 128, 128))
    for name, v in VARIANTS.items():
        for step_kind in ("int", "tensor"):
            step = 3 if step_kind == "int" else small["step"]
            _call(tb, small, table, v, step)
            torch.cuda.synchronize()
            n = 2000
            t0 = time.perf_counter()
            for _ in range(n):
                _call(tb, small, table, v, step)
            host = (time.perf_counter() - t0) / n * 1e6
            torch.cuda.synchronize()
            res["host_us"][f"{name}/{step_kind}"] = round(host, 2)
    ref = get_backend("torch")
    v = VARIANTS["guided_noise_modelin_dup"]
    t0 = time.perf_counter()
    for _ in range(200):
        _call(ref, small, table, v, small["step"])
    torch.cuda.synchronize()
    res["host_us"]["torch_reference/guided_noise_modelin_dup (incl. device)"] = round(
        (time.perf_counter() - t0) / 200 * 1e6, 2
    )

    # Graph replay of 20 steps: the step row either from a counter bumped in the graph
    # (one extra tiny kernel per step) or from a per-step slice of a device arange.
    steps = torch.arange(20, dtype=torch.int64, device="cuda")
    for name, v in VARIANTS.items():
        for mode in ("counter", "slices"):

            def loop(v=v, mode=mode) -> None:
                step_t = small["step"]
                step_t.zero_()
                for i in range(20):
                    if mode == "counter":
                        _call(tb, small, table, v, step_t)
                        step_t.add_(1)
                    else:
                        _call(tb, small, table, v, steps[i : i + 1])

            res["graph_us_per_step"][f"{name}/{mode}"] = round(_device_us(loop, reps=1, replays=20) / 20, 2)

    for label, shape in (("1x16x128x128", (1, 16, 128, 128)), ("4x16x21x90x160", (4, 16, 21, 90, 160))):
        x = _inputs(shape)
        numel = x["z"].numel()
        src = torch.empty(numel, device="cuda")
        dst = torch.empty_like(src)
        copy_us = _device_us(lambda src=src, dst=dst: dst.copy_(src))
        copy_gbs = 8 * numel / copy_us / 1e3
        entry: dict = {"elements": numel, "copy_us": round(copy_us, 2), "copy_GBps": round(copy_gbs, 1)}
        for name, v in VARIANTS.items():
            for block in (None, 2048, 4096):
                us = _device_us(lambda v=v, x=x, block=block: _call(tb, x, table, v, 3, block))
                gbs = BYTES[name] * numel / us / 1e3
                entry[f"{name}/block={block or 'default'}"] = {
                    "us": round(us, 2),
                    "GBps": round(gbs, 1),
                    "fraction_of_copy": round(gbs / copy_gbs, 3),
                }
        res["device"][label] = entry
        del x, src, dst
        torch.cuda.empty_cache()
    return res


if __name__ == "__main__":
    result = main()
    text = json.dumps(result, indent=2)
    print(text)
    target = (
        sys.argv[1]
        if len(sys.argv) > 1
        else (Path(os.environ["OUT"]) / "triton_step.json" if "OUT" in os.environ else None)
    )
    if target:
        Path(target).write_text(text)
