"""End-to-end loop time: diffusers' DDIM eager, fastflow eager, fastflow with the whole loop captured.

Two small random-weight models in bfloat16, batch 4, 4x32x32 latents, 30 DDIM
steps: a ``UNet2DModel`` and a ``DiTTransformer2DModel`` (DiT-S/2-like). Small
models are launch bound, which is where capturing the whole loop pays: the
eager loop's GPU waits on Python, the replay issues one launch. Then a whole
diffusers ``DiTPipeline`` call (classifier-free guidance in the pipeline's own loop,
so batch 2x4 through the model) with the same transformer: diffusers' DDIM, the
fastflow drop-in, and the drop-in with ``capture_pipeline`` (then at another guidance
scale, expected to replay the same graph: ``new_scale_*`` in the JSON say whether it did). Last, a UNet of Stable
Diffusion 1.x's widths on batch 2 of 4x64x64 latents (compute bound: the capture must
not be slower than eager there; ``E2E_SKIP_LARGE=1`` skips it).

Run on a GPU: ``python benchmarks/e2e_graph.py [out_dir]`` (about 30 s on an
H100). Prints a table and writes ``e2e_graph.json`` with medians and ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

BATCH = 4
LATENT = (4, 32, 32)
STEPS = 30
REPEATS = 7
LARGE_BATCH = 2
LARGE_LATENT = (4, 64, 64)
LARGE_REPEATS = 3


def _time_ms(fn: Callable[[], object], repeats: int = REPEATS, warmup: int = 2) -> dict:
    """Median wall time of ``fn`` in ms, host included (synchronized before and after each run)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "runs_ms": times}


def _unet(device: torch.device, latent: tuple[int, ...] = LATENT, widths: tuple[int, ...] = (64, 128, 256, 256),
          up_attention: bool = False) -> tuple[torch.nn.Module, Callable]:
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DModel(
            sample_size=latent[1],
            in_channels=latent[0],
            out_channels=latent[0],
            layers_per_block=2,
            block_out_channels=widths,
            down_block_types=("AttnDownBlock2D" if up_attention else "DownBlock2D", "AttnDownBlock2D",
                              "AttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D",
                            "AttnUpBlock2D" if up_attention else "UpBlock2D"),
        )
    unet = unet.to(device, torch.bfloat16).eval()

    def model_fn(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return unet(z, t).sample

    return unet, model_fn


def _dit(device: torch.device, out_channels: int | None = None) -> tuple[torch.nn.Module, Callable]:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    dit = DiTTransformer2DModel(
        num_attention_heads=6,
        attention_head_dim=64,
        in_channels=LATENT[0],
        out_channels=out_channels,
        num_layers=12,
        sample_size=LATENT[1],
        patch_size=2,
    )
    dit = dit.to(device, torch.bfloat16).eval()
    labels = torch.arange(BATCH, device=device) % 1000

    def model_fn(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # DiT's time embedding takes one timestep per sample.
        return dit(z, timestep=t.reshape(1).to(z.device).expand(z.shape[0]), class_labels=labels).sample

    return dit, model_fn


def _unet_large(device: torch.device) -> tuple[torch.nn.Module, Callable]:
    """A UNet of Stable Diffusion 1.x's widths (no cross-attention) on 4x64x64 latents: compute bound, where
    a captured loop has little launch time to save and must not cost time either."""
    return _unet(device, LARGE_LATENT, (320, 640, 1280, 1280), up_attention=True)


def _bench_model(
    name: str, build: Callable, device: torch.device, shape: tuple[int, ...] = (BATCH, *LATENT),
    repeats: int = REPEATS,
) -> dict:
    from diffusers import DDIMScheduler

    import fastflow
    from fastflow.backends import resolve_backend
    from fastflow.graph import capture

    _, model_fn = build(device)
    result: dict = {"model": name, "shape": list(shape), "steps": STEPS, "model_dtype": "bfloat16"}

    with torch.no_grad():
        # 1. diffusers' DDIM scheduler, eager, as DDIMPipeline runs it: latents in the model's dtype,
        #    timesteps on the host.
        scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", clip_sample=False)
        latents0 = torch.randn(shape, device=device, generator=torch.Generator(device).manual_seed(0))

        def diffusers_loop() -> torch.Tensor:
            scheduler.set_timesteps(STEPS)
            x = latents0.to(torch.bfloat16)
            for t in scheduler.timesteps:
                x = scheduler.step(model_fn(x, t), t, x).prev_sample
            return x

        result["diffusers_ddim_eager"] = _time_ms(diffusers_loop, repeats)

        # 2. fastflow eager: float32 state, bf16 model input, one fused step per stage.
        sampler = fastflow.Sampler(fastflow.VP(), "ddim", prediction="eps", steps=STEPS)
        result["backend"] = resolve_backend(sampler.backend, device).name
        noise = sampler.init_noise(shape, seed=0, device=device)

        def fastflow_loop() -> torch.Tensor:
            return fastflow.sample(model_fn, noise, sampler, model_dtype=torch.bfloat16)

        result["fastflow_eager"] = _time_ms(fastflow_loop, repeats)

        # 3. fastflow, the whole loop (30 model calls + 30 steps) captured once and replayed.
        torch.cuda.synchronize()
        start = time.perf_counter()
        loop = capture(model_fn, sampler, shape, device=device, model_dtype=torch.bfloat16)
        torch.cuda.synchronize()
        result["capture_s"] = time.perf_counter() - start
        result["captured"] = loop.captured
        result["fallback_reason"] = loop.reason
        result["graph_pool_bytes"] = loop.memory_bytes
        result["fastflow_captured"] = _time_ms(lambda: loop(noise=noise), repeats)

        eager_out = fastflow_loop()
        replay_out = loop(noise=noise)
        result["replay_equals_eager"] = bool(torch.equal(eager_out, replay_out))
        result["replay_max_abs_diff"] = float((eager_out - replay_out).abs().max())

    d = result["diffusers_ddim_eager"]["median_ms"]
    e = result["fastflow_eager"]["median_ms"]
    c = result["fastflow_captured"]["median_ms"]
    result["speedup_captured_vs_diffusers"] = d / c
    result["speedup_captured_vs_fastflow_eager"] = e / c
    result["speedup_fastflow_eager_vs_diffusers"] = d / e
    return result


def _bench_pipeline(device: torch.device) -> dict:
    """A DiTPipeline call (guidance 4.0, a tiny VAE so decoding stays cheap), eager and captured."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    from fastflow.diffusers import from_scheduler
    from fastflow.graph_pipeline import capture_pipeline

    dit, _ = _dit(device, out_channels=2 * LATENT[0])  # noise and variance halves, as DiT's checkpoints
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT[0], block_out_channels=(32,), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), sample_size=LATENT[1],
    ).to(device, torch.bfloat16).eval()
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", clip_sample=False)
    pipe = DiTPipeline(transformer=dit, vae=vae, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    kw = {"class_labels": list(range(BATCH)), "guidance_scale": 4.0, "num_inference_steps": STEPS, "output_type": "pt"}
    result: dict = {"model": "DiTPipeline (CFG)", "shape": [BATCH, *LATENT], "steps": STEPS, "model_dtype": "bfloat16"}

    def call(p) -> torch.Tensor:
        return p(generator=torch.Generator("cpu").manual_seed(0), **kw).images

    result["diffusers_ddim_eager"] = _time_ms(lambda: call(pipe))
    pipe.scheduler = from_scheduler(scheduler)
    result["backend"] = pipe.scheduler.backend
    result["fastflow_eager"] = _time_ms(lambda: call(pipe))
    eager_out = call(pipe)
    fast = capture_pipeline(pipe)
    torch.cuda.synchronize()
    start = time.perf_counter()
    call(fast)  # records the loop and captures it
    torch.cuda.synchronize()
    result["capture_s"] = time.perf_counter() - start
    result["captured"] = fast.captures == 1 and fast.reason is None
    result["fallback_reason"] = fast.reason
    result["graph_pool_bytes"] = fast.memory_bytes
    result["fastflow_captured"] = _time_ms(lambda: call(fast))
    replay_out = call(fast)
    result["replay_equals_eager"] = bool(torch.equal(eager_out, replay_out))
    result["replay_max_abs_diff"] = float((eager_out.float() - replay_out.float()).abs().max())
    # Another guidance scale: the same graph, its scale written into device memory (no new capture).
    kw["guidance_scale"] = 6.5
    eager_new = call(pipe)
    result["new_scale_captured"] = _time_ms(lambda: call(fast))
    result["new_scale_replays_same_graph"] = fast.captures == 1 and fast.reason is None
    result["new_scale_equals_eager"] = bool(torch.equal(call(fast), eager_new))
    kw["guidance_scale"] = 4.0
    d, e, c = (result[k]["median_ms"] for k in ("diffusers_ddim_eager", "fastflow_eager", "fastflow_captured"))
    result["speedup_captured_vs_diffusers"] = d / c
    result["speedup_captured_vs_fastflow_eager"] = e / c
    result["speedup_fastflow_eager_vs_diffusers"] = d / e
    return result


def main(out_dir: str | os.PathLike | None = None) -> dict:
    """Run every case; print a table and write ``e2e_graph.json`` under ``out_dir`` (default: cwd)."""
    if not torch.cuda.is_available():
        raise SystemExit("e2e_graph needs a CUDA device")
    device = torch.device("cuda", torch.cuda.current_device())
    report = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "batch": BATCH,
        "latent": list(LATENT),
        "steps": STEPS,
        "repeats": REPEATS,
        "results": [],
    }
    try:
        import diffusers

        report["diffusers"] = diffusers.__version__
    except ImportError as exc:
        raise SystemExit(f"e2e_graph needs diffusers: {exc}") from exc
    cases = [(name, lambda b=build, n=name: _bench_model(n, b, device))
             for name, build in (("UNet2DModel", _unet), ("DiTTransformer2DModel", _dit))]
    cases.append(("DiTPipeline (CFG)", lambda: _bench_pipeline(device)))
    if os.environ.get("E2E_SKIP_LARGE", "0") in ("", "0"):
        large = "UNet2DModel, SD-1.x widths"
        cases.append((large, lambda: _bench_model(large, _unet_large, device, (LARGE_BATCH, *LARGE_LATENT),
                                                  LARGE_REPEATS)))
    out = Path(out_dir or ".")
    out.mkdir(parents=True, exist_ok=True)
    for name, run in cases:
        try:
            with torch.no_grad():
                report["results"].append(run())
        except Exception as exc:  # one case failing must not lose the others' numbers
            report["results"].append({"model": name, "error": f"{type(exc).__name__}: {exc}"})
        torch.cuda.empty_cache()
        (out / "e2e_graph.json").write_text(json.dumps(report, indent=2))  # after every case: a time limit loses one

    print(f"{report['device']}: {STEPS}-step DDIM loop, median ms (shapes per case in e2e_graph.json)")
    header = ("model", "diffusers", "ff eager", "ff graph", "x diffusers", "x ff eager")
    print(f"{header[0]:28s} {header[1]:>10s} {header[2]:>10s} {header[3]:>10s} {header[4]:>12s} {header[5]:>11s}")
    for r in report["results"]:
        if "error" in r:
            print(f"{r['model']:28s} error: {r['error']}")
            continue
        note = "" if r["captured"] else f"  (not captured: {r['fallback_reason']})"
        print(
            f"{r['model']:28s} {r['diffusers_ddim_eager']['median_ms']:10.2f} {r['fastflow_eager']['median_ms']:10.2f} "
            f"{r['fastflow_captured']['median_ms']:10.2f} {r['speedup_captured_vs_diffusers']:11.2f}x "
            f"{r['speedup_captured_vs_fastflow_eager']:10.2f}x{note}"
        )
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", nargs="?", default=os.environ.get("OUT"),
                        help="where e2e_graph.json goes (default: $OUT, else the working directory)")
    main(parser.parse_args().out_dir)
