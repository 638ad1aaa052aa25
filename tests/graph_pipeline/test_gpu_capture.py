"""Capture and replay of pipelines in a CUDA graph (``@gpu``, skipped without CUDA): replays bitwise equal to the
eager calls, and the fallbacks only a device shows."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
ffd = pytest.importorskip("fastflow.diffusers", reason="fastflow.diffusers (the drop-in schedulers) is not importable")

from diffusers import DDIMScheduler as DiffusersDDIM  # noqa: E402
from diffusers import UNet2DModel  # noqa: E402
from tiny_models import pooled_embeds  # noqa: E402
from tiny_pipelines import (  # noqa: E402
    LoopPipeline,
    PartialLoopPipeline,
    controlnet_pipe,
    ddim_pipe,
    dit_pipe,
    euler_dropin,
    flux_pipe,
    sd3_pipe,
    sd_pipe,
    tiny_unet,
)

from fastflow.graph_pipeline import PipelineFallbackWarning, capture_pipeline  # noqa: E402

gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_gpu_ddim_pipeline_replay_equals_eager(backend):
    pipe = ddim_pipe("cuda")
    pipe.scheduler.backend = backend
    fast = capture_pipeline(pipe)
    kw = {"batch_size": 2, "num_inference_steps": 6, "output_type": "pt"}
    ref0 = pipe(generator=torch.Generator("cpu").manual_seed(0), **kw).images
    ref1 = pipe(generator=torch.Generator("cpu").manual_seed(1), **kw).images
    first = fast(generator=torch.Generator("cpu").manual_seed(0), **kw).images  # records, then captures
    assert fast.reason is None and fast.captures == 1, fast.reason
    assert torch.equal(first, ref0)
    second = fast(generator=torch.Generator("cpu").manual_seed(0), **kw).images  # replays
    assert fast.replays == 1
    assert torch.equal(second, ref0), (second - ref0).abs().max()
    third = fast(generator=torch.Generator("cpu").manual_seed(1), **kw).images
    assert fast.replays == 2
    assert torch.equal(third, ref1) and not torch.equal(third, ref0)
    assert fast.memory_bytes > 0
    assert "forward" not in pipe.unet.__dict__ and "step" not in pipe.scheduler.__dict__
    # a new signature (steps) is a new capture; the old one stays (max_graphs=2)
    fast(generator=torch.Generator("cpu").manual_seed(0), batch_size=2, num_inference_steps=4, output_type="pt")
    assert fast.captures == 2


@gpu
@pytest.mark.parametrize("mode", ["cfg", "cfg_scaled"])
def test_gpu_cfg_loop_replay_equals_eager(mode):
    """Guidance arithmetic in the pipeline's own loop, captured into the graph with the model calls and steps."""
    pipe = LoopPipeline(tiny_unet().to("cuda"), ffd.from_scheduler(DiffusersDDIM()), mode=mode)
    fast = capture_pipeline(pipe)
    kw = {"batch_size": 2, "num_inference_steps": 5}
    refs = [pipe(generator=torch.Generator("cpu").manual_seed(s), **kw) for s in (0, 1)]
    first = fast(generator=torch.Generator("cpu").manual_seed(0), **kw)
    assert fast.reason is None and fast.captures == 1, fast.reason
    assert torch.equal(first, refs[0])
    for s in (1, 0):
        assert torch.equal(fast(generator=torch.Generator("cpu").manual_seed(s), **kw), refs[s])
    assert fast.replays == 2


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_new_guidance_scale_replays_equal_eager(dtype):
    """New guidance scales replay the captured graph with their own value (read from device memory), bitwise equal
    to eager calls; 7.3 is not a bfloat16 number, so a factor rounded to the tensor's dtype would show."""
    pipe = LoopPipeline(tiny_unet().to("cuda", dtype), ffd.from_scheduler(DiffusersDDIM()), mode="cfg_shifted")
    fast = capture_pipeline(pipe)
    kw = {"batch_size": 2, "num_inference_steps": 4}
    refs = {g: pipe(generator=torch.Generator("cpu").manual_seed(0), guidance_scale=g, **kw) for g in (2.0, 7.3)}
    assert torch.equal(fast(generator=torch.Generator("cpu").manual_seed(0), guidance_scale=2.0, **kw), refs[2.0])
    assert fast.reason is None and fast.captures == 1, fast.reason
    for g in (7.3, 2.0, 7.3):
        assert torch.equal(fast(generator=torch.Generator("cpu").manual_seed(0), guidance_scale=g, **kw), refs[g])
    assert fast.captures == 1 and fast.replays == 3


@gpu
def test_gpu_dit_pipeline_replay_equals_eager():
    pipe = dit_pipe().to("cuda")
    fast = capture_pipeline(pipe)
    kw = {"class_labels": [1, 2], "guidance_scale": 4.0, "num_inference_steps": 4, "output_type": "pt"}
    refs = [pipe(generator=torch.Generator("cpu").manual_seed(s), **kw).images for s in (0, 1)]
    first = fast(generator=torch.Generator("cpu").manual_seed(0), **kw).images
    assert fast.reason is None and fast.captures == 1, fast.reason
    assert torch.equal(first, refs[0])
    assert torch.equal(fast(generator=torch.Generator("cpu").manual_seed(1), **kw).images, refs[1])
    assert fast.replays == 1


def on_gpu(pipe):
    """``pipe`` on the GPU with its drop-in on the default backend, and its capture."""
    pipe.to("cuda")
    pipe.scheduler.backend = "auto"
    return pipe, capture_pipeline(pipe)


@gpu
def test_gpu_stable_diffusion_pipeline_replay_equals_eager():
    pipe, fast = on_gpu(sd_pipe())
    g = torch.Generator().manual_seed(3)
    embeds = [(torch.randn(2, 5, 12, generator=g).cuda(), torch.randn(2, 5, 12, generator=g).cuda()) for _ in range(2)]
    kw = {"num_inference_steps": 5, "guidance_scale": 7.5, "height": 8, "width": 8, "output_type": "pt"}

    def call(p, k: int) -> torch.Tensor:
        pe, ne = embeds[k]
        gen = torch.Generator("cpu").manual_seed(k)
        return p(prompt_embeds=pe, negative_prompt_embeds=ne, generator=gen, **kw).images

    refs = [call(pipe, k) for k in (0, 1)]
    assert torch.equal(call(fast, 0), refs[0])
    assert fast.reason is None and fast.captures == 1, fast.reason
    assert torch.equal(call(fast, 1), refs[1]) and torch.equal(call(fast, 0), refs[0])
    assert fast.replays == 2


@gpu
def test_gpu_stochastic_ddim_fresh_noise_per_replay():
    pipe = ddim_pipe("cuda")
    fast = capture_pipeline(pipe)
    kw = {"batch_size": 2, "num_inference_steps": 5, "eta": 0.7, "output_type": "pt"}
    torch.manual_seed(3)
    ref = pipe(**kw).images
    fast(**kw)  # record + capture
    assert fast.reason is None, fast.reason
    torch.manual_seed(3)
    replay = fast(**kw).images  # same global RNG state: same latents and the same loop seed as eager
    assert fast.replays == 1
    assert torch.equal(replay, ref), (replay - ref).abs().max()
    again = fast(**kw).images
    assert not torch.equal(again, replay)


@gpu
def test_gpu_cpu_generator_noise_falls_back():
    pipe = ddim_pipe("cuda")
    fast = capture_pipeline(pipe)
    kw = {"batch_size": 2, "num_inference_steps": 4, "eta": 0.5, "output_type": "pt"}
    with pytest.warns(PipelineFallbackWarning, match="scheduler.step"):
        got = fast(generator=torch.Generator("cpu").manual_seed(0), **kw).images
    assert fast.captures == 0 and "synchroniz" in fast.reason
    ref = pipe(generator=torch.Generator("cpu").manual_seed(0), **kw).images
    assert torch.equal(got, ref)
    assert torch.equal(fast(generator=torch.Generator("cpu").manual_seed(0), **kw).images, ref)


@gpu
def test_gpu_sync_in_pipeline_code_falls_back():
    pipe = LoopPipeline(tiny_unet(), ffd.from_scheduler(DiffusersDDIM(), backend="torch"), mode="sync").to("cuda")
    fast = capture_pipeline(pipe)
    got = fast(batch_size=2, num_inference_steps=3, generator=torch.Generator("cpu").manual_seed(0))
    assert fast.captures == 0
    assert "pipeline's own code between scheduler.step at loop call 1" in fast.reason
    ref = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator("cpu").manual_seed(0))
    assert torch.equal(got, ref)


@gpu
def test_gpu_controlnet_pipeline_replay_equals_eager():
    pipe, fast = on_gpu(controlnet_pipe())
    g = torch.Generator().manual_seed(3)
    kw = {"prompt_embeds": torch.randn(1, 5, 12, generator=g).cuda(), "num_inference_steps": 4, "height": 8,
          "negative_prompt_embeds": torch.randn(1, 5, 12, generator=g).cuda(), "width": 8, "output_type": "pt"}
    images = [torch.rand(1, 3, 8, 8, generator=g).cuda() for _ in range(2)]
    refs = [pipe(image=im, generator=torch.Generator("cpu").manual_seed(0), **kw).images for im in images]
    for n, (im, ref) in enumerate(zip(images, refs, strict=True)):
        assert torch.equal(fast(image=im, generator=torch.Generator("cpu").manual_seed(0), **kw).images, ref)
        assert fast.captures == 1 and fast.replays == n and fast.reason is None, fast.reason


@gpu
@pytest.mark.parametrize("build", ["flux_pipe", "sd3_pipe"])
def test_gpu_flow_matching_pipelines_replay_equal_eager(build):
    """FLUX.1 (true CFG) and SD3 loops captured on the GPU replay to their eager images, a new scale included."""
    pipe, fast = on_gpu({"flux_pipe": flux_pipe, "sd3_pipe": sd3_pipe}[build]())
    embeds = {k: v.cuda() for k, v in pooled_embeds(torch.Generator().manual_seed(3)).items()}
    kw = {"num_inference_steps": 4, "height": 16, "width": 16, "output_type": "pt", **embeds}
    if build == "flux_pipe":
        kw["true_cfg_scale"] = 2.0

    def call(p, seed: int, scale: float) -> torch.Tensor:
        return p(generator=torch.Generator("cpu").manual_seed(seed), guidance_scale=scale, **kw).images

    cases = [(0, 4.0), (1, 4.0), (0, 6.5)]
    refs = [call(pipe, *c) for c in cases]
    for n, (case, ref) in enumerate(zip(cases, refs, strict=True)):
        assert torch.equal(call(fast, *case), ref), case
        assert fast.captures == 1 and fast.replays == n and fast.reason is None, fast.reason


@gpu
def test_gpu_loop_that_stops_early_replays_its_own_steps():
    """A CUDA graph fixes its steps' indices when it is captured, after warm-up runs: a loop that stops before its
    schedule's end must be captured taking its own steps (they were the next ones, 3-5 of 6, before the fix)."""
    pipe = PartialLoopPipeline(tiny_unet().to("cuda"), euler_dropin())
    fast = capture_pipeline(pipe)
    refs = [pipe(generator=torch.manual_seed(seed)) for seed in (0, 1)]
    for seed in (0, 0, 1):
        out = fast(generator=torch.manual_seed(seed))
        assert fast.reason is None, fast.reason
        assert torch.equal(out, refs[seed]), (out - refs[seed]).abs().max()
    assert (fast.captures, fast.replays) == (1, 2)


@gpu
def test_gpu_replay_after_a_longer_schedule_draws_the_recorded_noise():
    """The CUDA counterpart of test_a_capture_holds_the_noise_counters_a_longer_schedule_replaces
    (test_frozen_args_replay.py; unverified on a GPU when written): small blocks allocated after the
    longer schedule's call take over freed memory, which a replay reading a freed counter would show."""
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=6, layers_per_block=1, block_out_channels=(16, 32),
                       norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval().to("cuda")
    pipe = LoopPipeline(unet, ffd.from_scheduler(diffusers.DDPMScheduler(variance_type="learned_range")))
    fast = capture_pipeline(pipe)
    for steps in (3, 3, 5):
        fast(batch_size=2, num_inference_steps=steps)
    filler = [torch.full((8,), 7, dtype=torch.int64, device="cuda") for _ in range(64)]  # noqa: F841
    torch.manual_seed(9)
    want = pipe(batch_size=2, num_inference_steps=3)
    torch.manual_seed(9)
    got = fast(batch_size=2, num_inference_steps=3)
    assert fast.reason is None and fast.replays == 2, fast.reason
    assert torch.equal(got, want), (got - want).abs().max()
