"""Real diffusers pipelines, built offline with tiny random weights: same images with the drop-ins."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dropin_helpers import SD
from posterior_model import tiny_unet

import fastflow.diffusers as ffd

diffusers = pytest.importorskip("diffusers")


def _images(pipe_cls, scheduler, **kwargs) -> np.ndarray:
    pipe = pipe_cls(unet=tiny_unet(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(generator=torch.Generator().manual_seed(0), output_type="np", batch_size=2, **kwargs).images


@pytest.mark.parametrize(
    "config,kwargs",
    [
        (dict(), dict(num_inference_steps=10)),  # clip_sample=True, eps from the unclipped output
        (dict(clip_sample=False, timestep_spacing="trailing"), dict(num_inference_steps=8)),
        (dict(), dict(num_inference_steps=10, eta=1.0)),  # stochastic: generator path
        (dict(), dict(num_inference_steps=10, eta=0.5, use_clipped_model_output=True)),
    ],
    ids=["default", "trailing", "eta1", "eta-clipped-eps"],
)
def test_ddim_pipeline(config, kwargs):
    ref = diffusers.DDIMScheduler(**config)
    ff = ffd.from_scheduler(ref, backend="torch")
    assert type(ff) is ffd.DDIMScheduler
    a = _images(diffusers.DDIMPipeline, ref, **kwargs)
    b = _images(diffusers.DDIMPipeline, ff, **kwargs)
    assert a.shape == b.shape == (2, 8, 8, 3)
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)


def test_ddpm_pipeline():
    ref = diffusers.DDPMScheduler(num_train_timesteps=50)
    ff = ffd.from_scheduler(ref, backend="torch")
    a = _images(diffusers.DDPMPipeline, ref, num_inference_steps=50)
    b = _images(diffusers.DDPMPipeline, ff, num_inference_steps=50)
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)


def test_pndm_pipeline():
    """diffusers' PNDMPipeline keeps its scheduler's default config: twelve Runge-Kutta calls, then PLMS (Stable
    Diffusion's pipelines set ``skip_prk_steps=True`` on any PNDM scheduler they are given). The pipeline
    rebuilds diffusers' class from the scheduler it is constructed with, so the drop-in is set afterwards."""
    ref = diffusers.PNDMScheduler()
    images = []
    for scheduler in (ref, ffd.from_scheduler(ref, backend="torch")):
        pipe = diffusers.PNDMPipeline(unet=tiny_unet(), scheduler=ref)
        pipe.scheduler = scheduler
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            images.append(pipe(generator=torch.Generator().manual_seed(0), output_type="np", batch_size=2,
                               num_inference_steps=8).images)
    assert type(pipe.scheduler) is ffd.PNDMScheduler and len(pipe.scheduler.timesteps) == 8 + 9
    np.testing.assert_allclose(images[1], images[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "name,config",
    [
        ("EulerDiscreteScheduler", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)),
        ("EulerDiscreteScheduler", dict(use_karras_sigmas=True, prediction_type="v_prediction")),
        ("EDMEulerScheduler", dict()),
        ("DDIMScheduler", dict(clip_sample=False, timestep_spacing="trailing")),
    ],
    ids=["euler", "euler-karras-v", "edm-euler", "ddim"],
)
def test_latent_pipeline(name, config):
    """LDMPipeline: init_noise_sigma, scale_model_input, step's signature inspection and a VQ decoder."""
    torch.manual_seed(0)
    vq = diffusers.VQModel(
        in_channels=3, out_channels=3, latent_channels=3, block_out_channels=(8,), layers_per_block=1,
        norm_num_groups=4, num_vq_embeddings=16, down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
    ).eval()
    unet = tiny_unet()
    ref = getattr(diffusers, name)(**config)
    images = []
    for scheduler in (ref, ffd.from_scheduler(ref, backend="torch")):
        pipe = diffusers.LDMPipeline(vqvae=vq, unet=unet, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            out = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=10,
                       output_type="np")
        images.append(out.images)
    np.testing.assert_allclose(images[1], images[0], rtol=0, atol=1e-5)


def test_swap_by_from_config_on_a_pipeline():
    pipe = diffusers.DDIMPipeline(unet=tiny_unet(), scheduler=diffusers.DDIMScheduler())
    pipe.scheduler = ffd.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, diffusers.DDIMScheduler)
    with torch.no_grad():
        out = pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=3, output_type="np").images
    assert np.isfinite(out).all()


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_a_pipeline_saved_with_a_drop_in_loads_it_back(tmp_path, name):
    """``pipe.save_pretrained`` records a drop-in by its module's path, as diffusers records any component from
    outside its libraries; ``DiffusionPipeline.from_pretrained`` then looks up how to load it in that module (it
    refused the drop-in: "cannot be loaded as it does not seem to have any of the loading methods"), and a
    scheduler passed to ``from_pretrained`` is checked against it (a TypeError)."""
    pipe = diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=diffusers.DDPMScheduler())
    pipe.scheduler = getattr(ffd, name).from_config(pipe.scheduler.config)
    pipe.save_pretrained(tmp_path)
    back = diffusers.DiffusionPipeline.from_pretrained(tmp_path)
    assert type(back) is diffusers.DDPMPipeline and type(back.scheduler) is getattr(ffd, name)
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert public(back.scheduler.config) == public(pipe.scheduler.config)
    given = diffusers.DDIMScheduler()
    assert diffusers.DDPMPipeline.from_pretrained(tmp_path, scheduler=given).scheduler is given


SD_CLASSES = [
    ("DDIMScheduler", dict(SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1)),
    ("DDPMScheduler", dict(SD, clip_sample=False)),
    ("EulerDiscreteScheduler", dict(SD)),
    ("EulerAncestralDiscreteScheduler", dict(SD)),
    ("DPMSolverMultistepScheduler", dict(SD)),
    ("DPMSolverMultistepScheduler", dict(SD, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True)),
    ("UniPCMultistepScheduler", dict(SD)),
    ("HeunDiscreteScheduler", dict(SD)),
    ("LCMScheduler", dict(SD)),
    ("EDMEulerScheduler", dict()),
    ("EDMDPMSolverMultistepScheduler", dict()),
    ("PNDMScheduler", dict(SD, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)),
    ("LMSDiscreteScheduler", dict(SD)),
    ("KDPM2DiscreteScheduler", dict(SD)),
    ("KDPM2AncestralDiscreteScheduler", dict(SD)),
    ("DEISMultistepScheduler", dict(SD)),
    ("TCDScheduler", dict(SD)),
    ("DPMSolverSinglestepScheduler", dict(SD)),
    ("DPMSolverSinglestepScheduler", dict(SD, algorithm_type="sde-dpmsolver++", solver_order=3)),
]


@pytest.mark.parametrize("kind", ["txt2img", "img2img", "inpaint"])
@pytest.mark.parametrize(("name", "config"), SD_CLASSES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(SD_CLASSES)])
def test_stable_diffusion_pipelines(name, config, kind):
    """Stable Diffusion's text-to-image, image-to-image and inpainting pipelines (guidance in their own loop;
    img2img and inpainting start part-way through the schedule, counting steps by the scheduler's order, and
    inpainting with a 4-channel UNet re-noises the kept region with ``add_noise`` at every step) give the same
    images with every drop-in, stochastic ones drawing from the pipeline's generator, on the default backend."""
    pytest.importorskip("transformers", reason="the Stable Diffusion pipelines need transformers")
    from tiny_models import stable_diffusion_call, stable_diffusion_images, tiny_cond_unet, tiny_vae

    vae, unet = tiny_vae(), tiny_cond_unet()
    pipe_cls, kwargs = stable_diffusion_call(kind, 6)
    ref = getattr(diffusers, name)(**config)
    images = [stable_diffusion_images(pipe_cls, s, kwargs, vae, unet) for s in (ref, ffd.from_scheduler(ref))]
    np.testing.assert_allclose(images[1], images[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("stochastic", [False, True], ids=["ode", "stochastic_sampling"])
@pytest.mark.parametrize("model", ["flux", "sd3"])
def test_flow_matching_pipelines(model, stochastic):
    """FLUX.1 (true CFG, dynamic shifting from the image size) and SD3 (guidance in its loop): the same images with
    the drop-in; these pipelines pass no generator to ``step``, so stochastic sampling matches diffusers' draws
    from torch's global generator with ``diffusers_noise``."""
    pytest.importorskip("transformers", reason="the FLUX.1 and SD3 pipelines need transformers")
    from tiny_models import FLUX_SCHEDULER, pooled_embeds, tiny_flow_vae, tiny_flux_transformer, tiny_sd3_transformer

    encoders = dict(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    if model == "flux":
        config = dict(FLUX_SCHEDULER, stochastic_sampling=stochastic)
        pipe = diffusers.FluxPipeline(scheduler=None, vae=tiny_flow_vae(), transformer=tiny_flux_transformer(),
                                      **encoders)
        kwargs = dict(guidance_scale=3.5, true_cfg_scale=2.0)
    else:
        config = dict(shift=3.0, stochastic_sampling=stochastic)
        pipe = diffusers.StableDiffusion3Pipeline(scheduler=None, vae=tiny_flow_vae(),
                                                  transformer=tiny_sd3_transformer(), text_encoder_3=None,
                                                  tokenizer_3=None, **encoders)
        kwargs = dict(guidance_scale=5.0)
    pipe.set_progress_bar_config(disable=True)
    ref = diffusers.FlowMatchEulerDiscreteScheduler(**config)
    images = []
    for scheduler in (ref, ffd.from_scheduler(ref, diffusers_noise=True)):
        pipe.scheduler = scheduler
        with torch.no_grad():
            images.append(pipe(generator=torch.manual_seed(0), num_inference_steps=5, height=16, width=16,
                               output_type="np", **pooled_embeds(torch.Generator().manual_seed(3)), **kwargs).images)
    np.testing.assert_allclose(images[1], images[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("img2img", [False, True], ids=["denoising_end", "denoising_start"])
@pytest.mark.parametrize(
    ("name", "config"),
    [("EulerDiscreteScheduler", dict(SD, timestep_spacing="leading", steps_offset=1)),
     ("DPMSolverMultistepScheduler", dict(SD, use_karras_sigmas=True)), ("HeunDiscreteScheduler", dict(SD))],
    ids=["euler", "dpm-karras", "heun"],
)
def test_sdxl_base_and_refiner_pipelines(name, config, img2img):
    """SDXL's base pipeline stopping at denoising_end (its loop cut short of the schedule, guidance rescaled) and
    its img2img pipeline starting at denoising_start (the refiner's half): the same images with the drop-in."""
    pytest.importorskip("transformers", reason="the SDXL pipelines need transformers")
    from tiny_models import pooled_embeds, tiny_sdxl_unet, tiny_vae

    encoders = dict(text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None)
    if img2img:
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline(vae=tiny_vae(), unet=tiny_sdxl_unet(), scheduler=None,
                                                          requires_aesthetics_score=False, **encoders)
        kwargs = dict(denoising_start=0.7, image=torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(4)))
    else:
        pipe = diffusers.StableDiffusionXLPipeline(vae=tiny_vae(), unet=tiny_sdxl_unet(), scheduler=None, **encoders)
        kwargs = dict(denoising_end=0.7, guidance_rescale=0.7, height=8, width=8)
    pipe.set_progress_bar_config(disable=True)
    ref = getattr(diffusers, name)(**config)
    images = []
    for scheduler in (ref, ffd.from_scheduler(ref)):
        pipe.scheduler = scheduler
        with torch.no_grad():
            images.append(pipe(generator=torch.manual_seed(0), num_inference_steps=8, guidance_scale=5.0,
                               output_type="np", **pooled_embeds(torch.Generator().manual_seed(3)), **kwargs).images)
    np.testing.assert_allclose(images[1], images[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("video2video", [False, True], ids=["text2video", "video2video"])
@pytest.mark.parametrize("name", ["CogVideoXDDIMScheduler", "CogVideoXDPMScheduler"])
def test_cogvideox_pipelines(name, video2video):
    """CogVideoX's text-to-video pipeline (classifier-free guidance; the DPM scheduler's caller-held history) and its
    video-to-video pipeline (starting part-way by slicing the timesteps, with no set_begin_index): the same videos
    with each drop-in."""
    pytest.importorskip("transformers", reason="the CogVideoX pipelines need transformers")
    from tiny_models import tiny_cogvideox_transformer, tiny_cogvideox_vae

    transformer, vae = tiny_cogvideox_transformer(), tiny_cogvideox_vae()
    embeds = [torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(seed)) for seed in (1, 2)]
    kwargs = dict(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], height=16, width=16,
                  num_inference_steps=6, guidance_scale=6.0, output_type="np", max_sequence_length=8)
    if video2video:
        cls = diffusers.CogVideoXVideoToVideoPipeline
        frames = torch.rand(9, 3, 16, 16, generator=torch.Generator().manual_seed(3))
        kwargs.update(video=[frames[i] for i in range(9)], strength=0.6)
    else:
        cls = diffusers.CogVideoXPipeline
        kwargs.update(num_frames=9)
    ref = getattr(diffusers, name)()
    videos = []
    for scheduler in (ref, ffd.from_scheduler(ref)):
        pipe = cls(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            videos.append(np.asarray(pipe(generator=torch.Generator().manual_seed(0), **kwargs).frames))
    assert videos[0].shape[:2] == (1, 9)
    np.testing.assert_allclose(videos[1], videos[0], rtol=0, atol=1e-5)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("stochastic", [False, True], ids=["ode", "stochastic_sampling"])
def test_ltx_condition_pipeline(stochastic):
    """LTX-Video's conditioning pipeline (an image held at frame 0; its tokens step with per-token timesteps, guided):
    the same latents with the flow-matching Euler drop-in (with stochastic sampling, drawing diffusers' noise from
    the global generator as the pipeline passes none)."""
    pytest.importorskip("transformers", reason="the LTX-Video pipelines need transformers")
    from diffusers.pipelines.ltx.pipeline_ltx_condition import LTXVideoCondition
    from tiny_models import tiny_ltx_transformer, tiny_ltx_vae

    transformer, vae = tiny_ltx_transformer(), tiny_ltx_vae()
    g = torch.Generator().manual_seed(0)
    embeds, negative = torch.randn(1, 4, 16, generator=g), torch.randn(1, 4, 16, generator=g)
    image = torch.rand(1, 3, 32, 32, generator=g)
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=stochastic)
    latents = []
    for scheduler in (ref, ffd.from_scheduler(ref, diffusers_noise=True)):
        pipe = diffusers.LTXConditionPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
                                              transformer=transformer)
        pipe.set_progress_bar_config(disable=True)
        torch.manual_seed(7)
        with torch.no_grad():
            latents.append(pipe(
                conditions=[LTXVideoCondition(image=image, frame_index=0)], prompt_embeds=embeds,
                prompt_attention_mask=torch.ones(1, 4), negative_prompt_embeds=negative,
                negative_prompt_attention_mask=torch.ones(1, 4), height=32, width=32, num_frames=9,
                num_inference_steps=4, guidance_scale=3.0, generator=torch.Generator().manual_seed(1),
                output_type="latent",
            ).frames)
    assert torch.isfinite(latents[0]).all()
    torch.testing.assert_close(latents[1], latents[0], rtol=1e-5, atol=1e-5)



FLOW_SOLVERS = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)


@pytest.mark.parametrize(
    ("model", "name", "config"),
    [("sana", "DPMSolverMultistepScheduler", FLOW_SOLVERS),
     ("sana", "DPMSolverMultistepScheduler", dict(FLOW_SOLVERS, algorithm_type="sde-dpmsolver++")),
     ("sana", "DPMSolverSinglestepScheduler", FLOW_SOLVERS),
     ("wan", "UniPCMultistepScheduler", FLOW_SOLVERS),
     ("wan", "UniPCMultistepScheduler", dict(FLOW_SOLVERS, solver_order=3))],
    ids=["sana-dpm", "sana-sde-dpm", "sana-dpm-singlestep", "wan-unipc", "wan-unipc-order3"],
)
def test_flow_prediction_solver_pipelines(model, name, config):
    """Sana's (DPM-Solver on flow sigmas, guided, its generator passed to ``step``) and Wan 2.1's text-to-video
    pipeline (UniPC on flow sigmas, ``set_begin_index(0)``): the same latents with the drop-in."""
    pytest.importorskip("transformers", reason="the Sana and Wan pipelines need transformers")
    from tiny_models import tiny_sana_transformer, tiny_wan_transformer

    g = torch.Generator().manual_seed(1)
    if model == "sana":
        transformer, pipe_cls, field, width = tiny_sana_transformer(), diffusers.SanaPipeline, "images", 8
        kwargs = dict(prompt_attention_mask=torch.ones(1, 5), negative_prompt_attention_mask=torch.ones(1, 5),
                      height=256, width=256, use_resolution_binning=False, complex_human_instruction=None)
    else:
        transformer, pipe_cls, field, width = tiny_wan_transformer(), diffusers.WanPipeline, "frames", 16
        kwargs = dict(height=16, width=16, num_frames=5)
    kwargs.update(prompt_embeds=torch.randn(1, 5, width, generator=g),
                  negative_prompt_embeds=torch.randn(1, 5, width, generator=g))
    ref = getattr(diffusers, name)(**config)
    latents = []
    for scheduler in (ref, ffd.from_scheduler(ref)):
        pipe = pipe_cls(tokenizer=None, text_encoder=None, vae=None, transformer=transformer, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            out = pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=5, guidance_scale=4.5,
                       negative_prompt=None, output_type="latent", **kwargs)
        latents.append(getattr(out, field))
    assert torch.isfinite(latents[0]).all()
    torch.testing.assert_close(latents[1], latents[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["EulerAncestralDiscreteScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler"])
def test_dit_pipeline(name):
    """DiTPipeline (class-conditional, guided, the learned sigma split off before ``step``): it passes no generator
    to ``step``, so the stochastic classes match diffusers' draws from torch's global generator with
    ``diffusers_noise``."""
    vae = _seeded_tiny_vae()
    torch.manual_seed(0)
    transformer = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=8, num_layers=1, sample_size=8,
        patch_size=2, norm_num_groups=2,
    ).eval()
    ref = getattr(diffusers, name)()
    images = []
    for scheduler in (ref, ffd.from_scheduler(ref, diffusers_noise=True)):
        pipe = diffusers.DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        torch.manual_seed(7)
        with torch.no_grad():
            images.append(pipe(class_labels=[1, 7], generator=torch.Generator().manual_seed(0), num_inference_steps=5,
                               guidance_scale=4.0, output_type="np").images)
    np.testing.assert_allclose(images[1], images[0], rtol=0, atol=1e-5)


def _seeded_tiny_vae():
    """:func:`tiny_models.tiny_vae` with the same weights at every call (it draws from torch's global generator)."""
    from tiny_models import tiny_vae

    torch.manual_seed(0)
    return tiny_vae()


def test_latent_upscaler_pipeline():
    """The SD x2 latent upscaler: Euler with sample prediction, ``scale_model_input`` called twice a step (on the
    latents, and on the 0-dim sigma to precondition the output), the loop's sigmas read from ``scheduler.sigmas``."""
    pytest.importorskip("transformers", reason="the latent upscaler pipeline needs transformers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        act_fn="gelu", attention_head_dim=8, norm_num_groups=None, block_out_channels=(32, 32, 64, 64),
        time_cond_proj_dim=140, conv_in_kernel=1, conv_out_kernel=1, cross_attention_dim=12,
        down_block_types=("KDownBlock2D",) + ("KCrossAttnDownBlock2D",) * 3, in_channels=8, mid_block_type=None,
        only_cross_attention=False, out_channels=5, resnet_time_scale_shift="scale_shift",
        time_embedding_type="fourier", timestep_post_act="gelu",
        up_block_types=("KCrossAttnUpBlock2D",) * 3 + ("KUpBlock2D",),
    ).eval()
    g = torch.Generator().manual_seed(1)
    kwargs = dict(image=torch.randn(1, 4, 8, 8, generator=g), prompt_embeds=torch.randn(1, 5, 12, generator=g),
                  negative_prompt_embeds=torch.randn(1, 5, 12, generator=g),
                  pooled_prompt_embeds=torch.randn(1, 12, generator=g),
                  negative_pooled_prompt_embeds=torch.randn(1, 12, generator=g))
    ref = diffusers.EulerDiscreteScheduler(**SD, prediction_type="sample")
    latents = []
    for scheduler in (ref, ffd.from_scheduler(ref)):
        pipe = diffusers.StableDiffusionLatentUpscalePipeline(vae=_seeded_tiny_vae(), text_encoder=None, tokenizer=None,
                                                              unet=unet, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            latents.append(pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=5, guidance_scale=3.0,
                                output_type="latent", **kwargs).images)
    assert latents[0].shape == (1, 4, 16, 16)
    torch.testing.assert_close(latents[1], latents[0], rtol=1e-5, atol=1e-5)
