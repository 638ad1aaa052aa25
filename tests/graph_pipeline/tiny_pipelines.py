"""Tiny pipelines the graph_pipeline tests capture: diffusers' own (DDIM, DiT, Stable Diffusion, ControlNet, FLUX.1,
SD3, SDXL) with random weights from ``tiny_models``, and hand-written loops (:class:`LoopPipeline`,
:class:`PartialLoopPipeline`). Imported by bare name, after the test files' ``importorskip`` of diffusers (and by
benchmarks/replay_host.py)."""

from __future__ import annotations

import diffusers
import pytest
import torch
from diffusers import DDIMPipeline, DiffusionPipeline, UNet2DModel
from diffusers import DDIMScheduler as DiffusersDDIM
from diffusers.utils.torch_utils import randn_tensor
from tiny_models import (
    FLUX_SCHEDULER,
    tiny_cond_unet,
    tiny_flow_vae,
    tiny_flux_transformer,
    tiny_sd3_transformer,
    tiny_sdxl_unet,
    tiny_vae,
)

import fastflow.diffusers as ffd
from fastflow.graph_pipeline import loop_ops


def tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(16, 32),
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).eval()


def ddim_pipe(device: str = "cpu", fastflow_scheduler: bool = True) -> DDIMPipeline:
    pipe = DDIMPipeline(unet=tiny_unet(), scheduler=DiffusersDDIM(num_train_timesteps=1000)).to(device)
    if fastflow_scheduler:  # DDIMPipeline converts any scheduler to diffusers' DDIM on construction
        pipe.scheduler = ffd.from_scheduler(pipe.scheduler, backend="torch")
    pipe.set_progress_bar_config(disable=True)
    return pipe


class LoopPipeline(DiffusionPipeline):
    """A hand-written loop; ``mode`` writes it the ways real pipelines do, some of them uncapturable."""

    def __init__(self, unet, scheduler, mode: str = "plain"):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.mode = mode
        self.final_sigma: float | None = None

    @torch.no_grad()
    def __call__(self, batch_size: int = 2, num_inference_steps: int = 4, generator=None, guidance_scale: float = 2.0,
                 prompt: str = "", final_sigma: float | None = None):
        shape = (batch_size, 3, 8, 8)
        device = self.unet.device
        x = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        # "Text encoding" before the loop: the prompt becomes a device tensor the loop reads.
        cond = torch.full((1,), sum(map(ord, prompt)) % 17 / 17.0, device=device, dtype=self.unet.dtype)
        self.scheduler.set_timesteps(num_inference_steps)
        final_sigma = self.final_sigma if final_sigma is None else final_sigma
        if final_sigma is not None:  # an edit of the schedule after set_timesteps, as Cosmos 2 pipelines make one
            self.scheduler.sigmas[-1] = final_sigma
        for t in self.scheduler.timesteps:
            if self.mode in ("cfg", "cfg_scaled"):  # as StableDiffusionPipeline does it
                inp = torch.cat([x] * 2)
                if self.mode == "cfg_scaled":
                    inp = self.scheduler.scale_model_input(inp, t)
                o = self.unet(inp, t).sample
                uncond, cond = o.chunk(2)
                o = uncond + guidance_scale * (cond - uncond)
            elif self.mode == "cfg_shifted":  # halves that differ, as a prompt and an empty prompt make them
                uncond, text = self.unet(torch.cat([x, x + 1.0 + cond]), t).sample.chunk(2)
                o = uncond + guidance_scale * (text - uncond)
            elif self.mode == "cfg_lerp":  # the same guidance written with another operation
                uncond, cond = self.unet(torch.cat([x] * 2), t).sample.chunk(2)
                o = torch.lerp(uncond, cond, guidance_scale)
            elif self.mode == "scaled_output":
                o = self.unet(x, t).sample * 0.5
            elif self.mode == "in_place":
                o = self.unet(x, t).sample
                o.mul_(0.5)
            elif self.mode == "item_assignment":
                o = self.unet(x, t).sample
                o[:, 0] = 0.0
            elif self.mode == "many_ops":
                o = self.unet(x, t).sample
                for _ in range(loop_ops._MAX_OPS_BETWEEN_CALLS + 1):
                    o = o + 0.0
            elif self.mode == "outside_output":
                self.unet(x, t)
                o = torch.zeros_like(x) if x.device.type == "meta" else torch.ones(shape, device=device)
            else:
                o = self.unet(x, t).sample
            # "step_generator": the step takes the generator, as Stable Audio's pipeline passes it
            step_kw = {"generator": generator} if self.mode == "step_generator" else {}
            x = self.scheduler.step(o, t, x, **step_kw).prev_sample
            if self.mode == "sync" and torch.isnan(x).any():  # a data-dependent branch: a host sync
                raise FloatingPointError("NaN latents")
        if self.mode == "extra_call":  # one more model call after the scheduler's last step
            x = self.unet(x, t).sample
        return (x / 2 + 0.5).clamp(0, 1)  # post-processing after the loop: not part of it


def dit_pipe() -> diffusers.DiTPipeline:
    """diffusers' DiTPipeline (class-conditional, classifier-free guidance in its own loop) with tiny random weights."""
    torch.manual_seed(0)
    transformer = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1, sample_size=8,
        patch_size=2, num_embeds_ada_norm=1000,
    ).eval()
    vae = tiny_vae()
    pipe = diffusers.DiTPipeline(transformer=transformer, vae=vae,
                                 scheduler=ffd.from_scheduler(DiffusersDDIM(), backend="torch"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def euler_dropin():
    return ffd.from_scheduler(diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear"), backend="torch")


def sd_pipe():
    """diffusers' StableDiffusionPipeline with tiny random weights, driven by prompt embeddings (no text encoder)."""
    pytest.importorskip("transformers", reason="StableDiffusionPipeline needs transformers")
    pipe = diffusers.StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=tiny_cond_unet(), scheduler=euler_dropin(),
        safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def controlnet_pipe():
    """diffusers' StableDiffusionControlNetPipeline with a tiny UNet and a ControlNet made from it."""
    pytest.importorskip("transformers", reason="StableDiffusionControlNetPipeline needs transformers")
    unet = tiny_cond_unet()
    torch.manual_seed(1)
    controlnet = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4,))
    with torch.no_grad():  # its zero-initialized output convolutions would make the control image irrelevant
        for param in controlnet.parameters():
            if not param.any():
                param.normal_(0.0, 0.1)
    pipe = diffusers.StableDiffusionControlNetPipeline(
        vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=unet, controlnet=controlnet, scheduler=euler_dropin(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_pipe():
    """diffusers' FluxPipeline with tiny random weights (packed latents, rotary ids, guidance embedding, dynamic
    shifting), driven by embeddings (no text encoders)."""
    pytest.importorskip("transformers", reason="FluxPipeline needs transformers")
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    pipe = diffusers.FluxPipeline(
        scheduler=ffd.from_scheduler(scheduler, backend="torch"), vae=tiny_flow_vae(), text_encoder=None,
        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=tiny_flux_transformer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_pipe():
    """diffusers' StableDiffusion3Pipeline with tiny random weights, driven by embeddings (no text encoders)."""
    pytest.importorskip("transformers", reason="StableDiffusion3Pipeline needs transformers")
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(),
        scheduler=ffd.from_scheduler(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), backend="torch"),
        vae=tiny_flow_vae(), text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        text_encoder_3=None, tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_pipe():
    """diffusers' StableDiffusionXLPipeline with tiny random weights, driven by embeddings (no text encoders)."""
    pytest.importorskip("transformers", reason="StableDiffusionXLPipeline needs transformers")
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
        unet=tiny_sdxl_unet(), scheduler=euler_dropin(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


class PartialLoopPipeline(DiffusionPipeline):
    """An img2img loop given both ends, as SDXL's ``denoising_start`` with ``denoising_end`` makes it: ``steps``
    steps of a fixed schedule from ``denoising_start`` on (the pipeline's ``default_start`` where not given).
    Another start keeps the loop's length and the scheduler's timesteps; only its ``begin_index`` differs."""

    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.default_start = 0.0

    @torch.no_grad()
    def __call__(self, generator=None, denoising_start: float | None = None, steps: int = 3):
        x = randn_tensor((2, 3, 8, 8), generator=generator, device=self.unet.device, dtype=self.unet.dtype)
        self.scheduler.set_timesteps(6)
        begin = round((self.default_start if denoising_start is None else denoising_start) * 6)
        self.scheduler.set_begin_index(begin)
        for t in self.scheduler.timesteps[begin : begin + steps]:
            o = self.unet(self.scheduler.scale_model_input(x, t), t).sample
            x = self.scheduler.step(o, t, x).prev_sample
        return x
