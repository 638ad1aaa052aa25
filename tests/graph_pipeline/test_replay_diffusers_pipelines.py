"""Replay logic under the stand-in graph, on diffusers' own pipelines (DDIM, DiT, Stable Diffusion with Euler and PNDM,
img2img, ControlNet, FLUX.1, SD3, SDXL): replays give the eager images, and new inputs replay without a new capture."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
ffd = pytest.importorskip("fastflow.diffusers", reason="fastflow.diffusers (the drop-in schedulers) is not importable")

from tiny_models import pooled_embeds, tiny_cond_unet, tiny_vae  # noqa: E402
from tiny_pipelines import (  # noqa: E402
    controlnet_pipe,
    ddim_pipe,
    dit_pipe,
    euler_dropin,
    flux_pipe,
    sd3_pipe,
    sd_pipe,
    sdxl_pipe,
)

from fastflow.graph_pipeline import capture_pipeline  # noqa: E402


def test_replay_logic_ddim_pipeline(stand_in_capture):
    pipe = ddim_pipe()
    fast = capture_pipeline(pipe)
    kw = {"batch_size": 2, "num_inference_steps": 4, "output_type": "np"}
    ref0 = pipe(generator=torch.manual_seed(0), **kw).images
    ref1 = pipe(generator=torch.manual_seed(1), **kw).images
    assert (fast(generator=torch.manual_seed(0), **kw).images == ref0).all()
    assert fast.captures == 1 and fast.replays == 0 and fast.reason is None
    assert (fast(generator=torch.manual_seed(1), **kw).images == ref1).all()
    assert (fast(generator=torch.manual_seed(0), **kw).images == ref0).all()
    assert fast.replays == 2
    assert "forward" not in pipe.unet.__dict__ and "step" not in pipe.scheduler.__dict__
    # a third signature evicts the oldest (max_graphs=2)
    fast(generator=torch.manual_seed(0), batch_size=1, num_inference_steps=4, output_type="np")
    fast(generator=torch.manual_seed(0), batch_size=2, num_inference_steps=3, output_type="np")
    assert fast.captures == 3 and len(fast._traces) == 2


def test_replay_logic_dit_pipeline_with_guidance(stand_in_capture):
    """A real diffusers pipeline whose loop slices, concatenates and guides in its own code replays to its images."""
    pipe = dit_pipe()
    fast = capture_pipeline(pipe)
    kw = {"class_labels": [1, 2], "guidance_scale": 4.0, "num_inference_steps": 3, "output_type": "np"}
    refs = [pipe(generator=torch.manual_seed(s), **kw).images for s in (0, 1)]
    assert (fast(generator=torch.manual_seed(0), **kw).images == refs[0]).all()
    assert fast.captures == 1 and fast.reason is None
    assert (fast(generator=torch.manual_seed(1), **kw).images == refs[1]).all()
    assert (fast(generator=torch.manual_seed(0), **kw).images == refs[0]).all()
    assert fast.replays == 2
    # A new scale replays the same graph; a scale of 1 turns guidance off (another loop): its own capture.
    for g, captures, replays in ((6.5, 1, 3), (1.0, 2, 3), (6.5, 2, 4), (1.0, 2, 5)):
        ref = pipe(generator=torch.manual_seed(2), **{**kw, "guidance_scale": g}).images
        got = fast(generator=torch.manual_seed(2), **{**kw, "guidance_scale": g}).images
        assert (got == ref).all() and (fast.captures, fast.replays) == (captures, replays), g
    assert not (ref == pipe(generator=torch.manual_seed(2), **kw).images).all()


def test_replay_logic_stable_diffusion_pipeline(stand_in_capture):
    """Stable Diffusion's loop (cat, scale_model_input, cross-attention UNet, guidance, Euler step) replays to its
    images, and new prompt embeddings replay without a new capture (they are inputs of the graph)."""
    pipe = sd_pipe()
    fast = capture_pipeline(pipe)
    g = torch.Generator().manual_seed(3)
    embeds = [(torch.randn(2, 5, 12, generator=g), torch.randn(2, 5, 12, generator=g)) for _ in range(2)]
    kw = {"num_inference_steps": 3, "guidance_scale": 7.5, "height": 8, "width": 8, "output_type": "np"}

    def call(p, k: int, seed: int):
        pe, ne = embeds[k]
        return p(prompt_embeds=pe, negative_prompt_embeds=ne, generator=torch.manual_seed(seed), **kw).images

    refs = {(k, s): call(pipe, k, s) for k in (0, 1) for s in (0, 1)}
    assert (call(fast, 0, 0) == refs[0, 0]).all()
    assert fast.captures == 1 and fast.reason is None, fast.reason
    for k, s in ((1, 0), (0, 1), (1, 1)):
        assert (call(fast, k, s) == refs[k, s]).all()
    assert fast.captures == 1 and fast.replays == 3
    assert not (refs[0, 0] == refs[1, 0]).all()  # the embeddings matter, so the replays did take them


def test_replay_logic_stable_diffusion_pipeline_with_pndm(stand_in_capture):
    """Stable Diffusion 1.x's own scheduler, PNDM (its first calls special, later ones reading three stored model
    outputs): the captured loop replays to the eager images."""
    pipe = sd_pipe()
    pipe.scheduler = ffd.from_scheduler(
        diffusers.PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False), backend="torch",
    )  # fmt: skip
    fast = capture_pipeline(pipe)
    g = torch.Generator().manual_seed(4)
    pe, ne = torch.randn(2, 5, 12, generator=g), torch.randn(2, 5, 12, generator=g)
    kw = {"num_inference_steps": 6, "guidance_scale": 7.5, "height": 8, "width": 8, "output_type": "np"}
    for seed in (0, 1):
        ref = pipe(prompt_embeds=pe, negative_prompt_embeds=ne, generator=torch.manual_seed(seed), **kw).images
        got = fast(prompt_embeds=pe, negative_prompt_embeds=ne, generator=torch.manual_seed(seed), **kw).images
        assert (got == ref).all(), seed
    assert fast.captures == 1 and fast.replays == 1 and fast.reason is None, fast.reason


def test_replay_logic_img2img_pipeline(stand_in_capture):
    """An img2img loop starts mid-schedule (the pipeline sets the drop-in's begin index): new images replay the
    captured loop; a new strength makes a longer loop, which the replay finds (after the graph, at the extra step:
    that call reruns eagerly), and gets its own capture."""
    pytest.importorskip("transformers", reason="StableDiffusionImg2ImgPipeline needs transformers")
    pipe = diffusers.StableDiffusionImg2ImgPipeline(
        vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=tiny_cond_unet(), scheduler=euler_dropin(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    fast = capture_pipeline(pipe)
    g = torch.Generator().manual_seed(3)
    kw = {"prompt_embeds": torch.randn(2, 5, 12, generator=g), "num_inference_steps": 5, "guidance_scale": 7.5,
          "negative_prompt_embeds": torch.randn(2, 5, 12, generator=g), "output_type": "np"}
    images = [torch.rand(2, 3, 8, 8, generator=g) for _ in range(2)]
    cases = [(0, 0.6, 1, 0), (1, 0.6, 1, 1), (0, 0.9, 2, 1), (1, 0.9, 2, 2), (0, 0.6, 2, 3)]
    for k, strength, captures, replays in cases:
        ref = pipe(image=images[k], strength=strength, generator=torch.manual_seed(k), **kw).images
        got = fast(image=images[k], strength=strength, generator=torch.manual_seed(k), **kw).images
        assert (got == ref).all(), (k, strength)
        assert (fast.captures, fast.replays) == (captures, replays) and fast.reason is None, (k, strength, fast.reason)


def test_replay_logic_controlnet_pipeline(stand_in_capture):
    """A ControlNet's calls are loop calls like the denoiser's (captured whole, not op by op): new control images,
    prompts and guidance scales replay the graph; a new conditioning scale (used inside the ControlNet) gets its own
    capture."""
    pipe = controlnet_pipe()
    fast = capture_pipeline(pipe)
    assert list(fast._networks()) == ["model", "model:controlnet"]
    g = torch.Generator().manual_seed(3)
    prompts = [{"prompt_embeds": torch.randn(1, 5, 12, generator=g),
                "negative_prompt_embeds": torch.randn(1, 5, 12, generator=g)} for _ in range(2)]
    images = [torch.rand(1, 3, 8, 8, generator=g) for _ in range(2)]
    kw = {"num_inference_steps": 3, "height": 8, "width": 8, "output_type": "np"}
    # (prompt, image, guidance scale, conditioning scale) -> captures, replays after the call
    cases = [((0, 0, 7.5, 1.0), 1, 0), ((1, 1, 7.5, 1.0), 1, 1), ((0, 1, 4.0, 1.0), 1, 2), ((0, 0, 7.5, 0.5), 2, 2),
             ((1, 0, 7.5, 0.5), 2, 3)]
    for (p, i, gs, cs), captures, replays in cases:
        args = dict(image=images[i], guidance_scale=gs, controlnet_conditioning_scale=cs, **prompts[p], **kw)
        ref = pipe(generator=torch.manual_seed(0), **args).images
        assert (fast(generator=torch.manual_seed(0), **args).images == ref).all(), (p, i, gs, cs)
        assert (fast.captures, fast.replays) == (captures, replays) and fast.reason is None, (p, i, gs, cs, fast.reason)
    assert "forward" not in pipe.unet.__dict__ and "forward" not in pipe.controlnet.__dict__
    two = [pipe(generator=torch.manual_seed(0), image=im, **prompts[0], **kw).images for im in images]
    assert not (two[0] == two[1]).all()  # the control image matters, so the replays did take it


def test_replay_logic_flux_pipeline(stand_in_capture):
    """FLUX.1's loop replays to its images, with true classifier-free guidance (two transformer calls a step);
    new embeddings, a new guidance embedding scale and a new true-CFG scale replay without a new capture."""
    pipe = flux_pipe()
    fast = capture_pipeline(pipe)
    g = torch.Generator().manual_seed(3)
    embeds = [pooled_embeds(g) for _ in range(2)]
    kw = {"num_inference_steps": 3, "height": 16, "width": 16, "output_type": "np"}

    def call(p, k: int, seed: int, guidance: float, true_cfg: float):
        return p(generator=torch.manual_seed(seed), guidance_scale=guidance, true_cfg_scale=true_cfg, **embeds[k],
                 **kw).images

    cases = [(0, 0, 3.5, 2.0), (1, 1, 3.5, 2.0), (0, 1, 5.0, 2.0), (1, 0, 3.5, 4.5), (0, 0, 3.5, 2.0)]
    refs = [call(pipe, *c) for c in cases]
    for n, (case, ref) in enumerate(zip(cases, refs, strict=True)):
        assert (call(fast, *case) == ref).all(), case
        assert fast.captures == 1 and fast.replays == n and fast.reason is None, (case, fast.reason)
    assert len({r.tobytes() for r in refs[:4]}) == 4  # embeddings and both scales matter


def test_replay_logic_sd3_pipeline(stand_in_capture):
    """Stable Diffusion 3's loop (flow matching, guidance in its own code) replays to its images; a new guidance
    scale replays without a new capture."""
    pipe = sd3_pipe()
    fast = capture_pipeline(pipe)
    kw = {"num_inference_steps": 3, "height": 16, "width": 16, "output_type": "np",
          **pooled_embeds(torch.Generator().manual_seed(3))}
    cases = [(0, 5.0), (1, 5.0), (0, 7.3)]
    refs = [pipe(generator=torch.manual_seed(seed), guidance_scale=gs, **kw).images for seed, gs in cases]
    for n, ((seed, gs), ref) in enumerate(zip(cases, refs, strict=True)):
        assert (fast(generator=torch.manual_seed(seed), guidance_scale=gs, **kw).images == ref).all(), (seed, gs)
        assert fast.captures == 1 and fast.replays == n and fast.reason is None, fast.reason
    assert not (refs[0] == refs[2]).all()


def test_replay_logic_sdxl_pipeline(stand_in_capture):
    """SDXL's loop passes a dict of conditioning tensors (pooled embeddings, time ids) to the UNet: they are graph
    inputs too, refreshed on every replay."""
    pipe = sdxl_pipe()
    fast = capture_pipeline(pipe)
    g = torch.Generator().manual_seed(3)

    def embeds() -> dict:
        return {"prompt_embeds": torch.randn(1, 5, 12, generator=g),
                "negative_prompt_embeds": torch.randn(1, 5, 12, generator=g),
                "pooled_prompt_embeds": torch.randn(1, 6, generator=g),
                "negative_pooled_prompt_embeds": torch.randn(1, 6, generator=g)}

    conds = [embeds(), embeds()]
    kw = {"num_inference_steps": 3, "guidance_scale": 5.0, "height": 8, "width": 8, "output_type": "np"}
    refs = [pipe(generator=torch.manual_seed(0), **c, **kw).images for c in conds]
    assert not (refs[0] == refs[1]).all()
    assert (fast(generator=torch.manual_seed(0), **conds[0], **kw).images == refs[0]).all()
    assert fast.captures == 1 and fast.reason is None, fast.reason
    assert (fast(generator=torch.manual_seed(0), **conds[1], **kw).images == refs[1]).all()
    assert (fast(generator=torch.manual_seed(0), **conds[0], **kw).images == refs[0]).all()
    assert fast.replays == 2


def test_a_pil_image_input_replays_the_graph(stand_in_capture):
    """A PIL image is a graph input through the tensor the pipeline makes of it: the same size and mode replay
    the capture (keyed by identity, every call recorded and captured again)."""
    pil = pytest.importorskip("PIL.Image")
    import numpy as np

    pipe = controlnet_pipe()
    fast = capture_pipeline(pipe)
    g = torch.Generator().manual_seed(3)
    embeds = {"prompt_embeds": torch.randn(1, 5, 12, generator=g),
              "negative_prompt_embeds": torch.randn(1, 5, 12, generator=g)}
    kw = {"num_inference_steps": 2, "height": 8, "width": 8, "output_type": "np", **embeds}
    rng = np.random.default_rng(0)
    for _ in range(3):
        image = pil.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
        ref = pipe(generator=torch.manual_seed(0), image=image, **kw).images
        assert (fast(generator=torch.manual_seed(0), image=image, **kw).images == ref).all()
    assert (fast.captures, fast.replays) == (1, 2) and fast.reason is None
