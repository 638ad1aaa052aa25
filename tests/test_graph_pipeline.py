"""Pipeline capture: data-flow checks and the eager fallback on the CPU; capture and replay of DDIMPipeline on a GPU."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.utils._pytree as pytree

diffusers = pytest.importorskip("diffusers")
ffd = pytest.importorskip("fastflow.diffusers", reason="fastflow.diffusers (the drop-in schedulers) is not importable")

from diffusers import DDIMPipeline, DiffusionPipeline, UNet2DModel  # noqa: E402
from diffusers import DDIMScheduler as DiffusersDDIM  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402
from tiny_models import (  # noqa: E402
    FLUX_SCHEDULER,
    pooled_embeds,
    tiny_cond_unet,
    tiny_flow_vae,
    tiny_flux_transformer,
    tiny_sd3_transformer,
    tiny_sdxl_unet,
    tiny_vae,
)

from fastflow import graph_pipeline as gp  # noqa: E402
from fastflow.graph_pipeline import (  # noqa: E402
    PipelineFallbackWarning,
    capture_pipeline,
    captured,
    loop_ops,
    params,
    recording,
)


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


@pytest.fixture(autouse=True)
def _fresh_warnings():
    captured._WARNED.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PipelineFallbackWarning)
        yield


# ----------------------------------------------------------------------------- CPU
def test_validation():
    pipe = ddim_pipe()
    with pytest.raises(ValueError, match="max_graphs"):
        capture_pipeline(pipe, max_graphs=0)
    with pytest.raises(ValueError, match="warmup"):
        capture_pipeline(pipe, warmup=0)
    with pytest.raises(ValueError, match="not a torch.nn.Module"):
        capture_pipeline(pipe, model_attr="scheduler")

    class NoModel:
        scheduler = None

    with pytest.raises(ValueError, match="no denoiser"):
        capture_pipeline(NoModel())


def test_ddim_pipeline_loop_is_capturable_data_flow():
    fast = capture_pipeline(ddim_pipe())
    assert fast.explain(batch_size=2, num_inference_steps=3, output_type="np") is None
    model = fast.model
    assert "forward" not in model.__dict__ and "step" not in fast.scheduler.__dict__  # wrappers removed


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("plain", None),
        ("cfg", None),
        ("cfg_scaled", None),
        ("scaled_output", None),
        ("in_place", "changes a loop tensor in place"),
        ("item_assignment", "changes a loop tensor in place"),
        ("many_ops", f"more than {loop_ops._MAX_OPS_BETWEEN_CALLS} tensor operations"),
        ("outside_output", "the step does not take a tensor the loop made"),
        ("extra_call", "comes after the scheduler's last step"),
    ],
)
def test_explain_names_what_breaks_the_loop(mode, expected):
    pipe = LoopPipeline(tiny_unet(), ffd.from_scheduler(DiffusersDDIM(), backend="torch"), mode=mode)
    reason = capture_pipeline(pipe).explain(batch_size=2, num_inference_steps=3)
    if expected is None:
        assert reason is None
    else:
        assert expected in reason


def test_recorded_cfg_loop_has_the_guidance_ops():
    """The pipeline's own guidance arithmetic is recorded between the model call and the step, every step."""
    pipe = LoopPipeline(tiny_unet(), ffd.from_scheduler(DiffusersDDIM(), backend="torch"), mode="cfg_scaled")
    trace, _ = capture_pipeline(pipe)._record((), {"batch_size": 2, "num_inference_steps": 3})
    assert trace.reason is None
    kinds = [ev.kind for ev in trace.events]
    assert kinds.count("model") == 3 and kinds.count("step") == 3 and kinds[-1] == "step"
    names = [recording.describe(ev) for ev in trace.events if ev.kind == "op"]
    assert sum("cat" in n for n in names) == 2  # the first cat runs before the loop: an input of the graph
    assert sum("chunk" in n for n in names) == 3 and sum("sub" in n for n in names) == 3


def test_non_fastflow_scheduler_runs_eagerly():
    pipe = ddim_pipe(fastflow_scheduler=False)
    fast = capture_pipeline(pipe)
    assert any("not a fastflow drop-in" in r for r in fast.blockers())
    with pytest.warns(PipelineFallbackWarning, match="not a fastflow drop-in"):
        got = fast(batch_size=1, num_inference_steps=3, generator=torch.manual_seed(0), output_type="np").images
    ref = pipe(batch_size=1, num_inference_steps=3, generator=torch.manual_seed(0), output_type="np").images
    assert (got == ref).all()
    assert "not a fastflow drop-in" in fast.reason


def test_diffusers_noise_is_not_captured():
    """A drop-in drawing diffusers' noise from torch's global generator (diffusers_noise) is not captured: a replay
    renews only fastflow's own noise."""
    pipe = ddim_pipe()
    pipe.scheduler.diffusers_noise = True
    fast = capture_pipeline(pipe)
    assert any("diffusers_noise=True" in r for r in fast.blockers())


def test_cpu_pipeline_runs_eagerly_with_reason():
    pipe = ddim_pipe()
    fast = capture_pipeline(pipe)
    got = fast(batch_size=2, num_inference_steps=3, generator=torch.manual_seed(1), output_type="np").images
    ref = pipe(batch_size=2, num_inference_steps=3, generator=torch.manual_seed(1), output_type="np").images
    assert (got == ref).all()
    assert "CUDA" in fast.reason and fast.captures == 0


def test_fallback_warning_points_at_the_callers_line():
    fast = capture_pipeline(ddim_pipe())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = sys._getframe().f_lineno + 1
        fast(batch_size=1, num_inference_steps=2, output_type="np")  # the blockers' path: CUDA graphs need CUDA
    ours = [w for w in caught if issubclass(w.category, PipelineFallbackWarning)]
    assert [(w.filename, w.lineno) for w in ours] == [(__file__, line)]


def test_callbacks_block_capture():
    fast = capture_pipeline(ddim_pipe())
    assert any("callback_on_step_end" in r for r in fast.blockers({"callback_on_step_end": print}))


# ----------------------------------------------------------------------------- GPU
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


# ----------------------------------------------------------------------------- CPU: replay logic with a stand-in graph
class StandInGraph:
    """Replays by rerunning the recorded loop and writing into the static outputs, as a CUDA graph would."""

    def __init__(self, fast, trace, originals):
        self.fast, self.trace, self.originals = fast, trace, originals

    def replay(self) -> None:
        trace, scheduler = self.trace, self.fast.scheduler
        if trace.seeds is not None:  # a real graph reads the captured seed tensor, whatever Python state says
            scheduler._ff_seed = 0
            scheduler._ff_seeds[(trace.device, trace.batch)] = trace.seeds
        with torch.no_grad():
            final = self.fast._run_trace(trace, self.originals)
        for dst, src in zip(recording.tree_tensors(trace.outputs), recording.tree_tensors(final), strict=True):
            dst.copy_(src)

    def reset(self) -> None:
        pass


def capture_on_host(fast, trace, make_graph) -> None:
    """What ``CapturedPipeline._capture`` leaves behind (seed buffer, parameters, static outputs), without CUDA:
    the recorded loop run once, and ``make_graph(fast, trace, originals)`` as its graph."""
    originals = fast._originals()
    if trace.stochastic:
        trace.seeds = fast.scheduler._ff_seed_tensor(trace.batch, trace.device)
    params.make_param_values(trace)
    with torch.no_grad():
        final = fast._run_trace(trace, originals)
    trace.outputs = pytree.tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, final)
    trace.graph = make_graph(fast, trace, originals)
    trace.memory_bytes = 1


@pytest.fixture
def stand_in_capture(monkeypatch):
    monkeypatch.setattr(gp.CapturedPipeline, "_capture", lambda self, trace: capture_on_host(self, trace, StandInGraph))
    monkeypatch.setattr(gp.CapturedPipeline, "blockers", lambda self, kwargs=None: [])


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


def test_replay_logic_stochastic_seeds(stand_in_capture):
    pipe = ddim_pipe()
    fast = capture_pipeline(pipe)
    kw = {"batch_size": 2, "num_inference_steps": 4, "eta": 0.8, "output_type": "np"}
    torch.manual_seed(5)
    ref = pipe(**kw).images
    fast(**kw)
    assert fast.captures == 1
    torch.manual_seed(5)
    replay = fast(**kw).images
    assert fast.replays == 1
    assert (replay == ref).all()
    assert not (fast(**kw).images == replay).all()


@pytest.mark.parametrize(
    ("make", "mode"),
    [
        (lambda: diffusers.DPMSolverSDEScheduler(noise_sampler_seed=42), "plain"),
        (diffusers.CosineDPMSolverMultistepScheduler, "step_generator"),
    ],
    ids=["noise_sampler_seed", "step_generator"],
)
def test_replay_draws_the_noise_seed_the_drop_in_would(stand_in_capture, make, mode):
    """Drop-ins that seed their noise from their config (DPMSolverSDE's noise_sampler_seed) or from the step's
    generator (CosineDPMSolverMultistep) give the same images on every eager call of that seed; replays did not (they
    wrote a fresh seed from torch's global generator)."""
    pipe = LoopPipeline(tiny_unet(), ffd.from_scheduler(make(), backend="torch"), mode=mode)
    fast = capture_pipeline(pipe)
    kw = {"batch_size": 2, "num_inference_steps": 3}
    ref = pipe(generator=torch.Generator().manual_seed(7), **kw)
    for _ in range(3):
        assert torch.equal(fast(generator=torch.Generator().manual_seed(7), **kw), ref)
    assert fast.captures == 1 and fast.replays == 2 and fast.reason is None, fast.reason


def test_replay_divergence_is_reported(stand_in_capture):
    pipe = LoopPipeline(tiny_unet(), ffd.from_scheduler(DiffusersDDIM(), backend="torch"))
    fast = capture_pipeline(pipe)
    fast(batch_size=2, num_inference_steps=3)
    assert fast.captures == 1
    pipe.mode = "scaled_output"  # the pipeline's code changes between calls
    torch.manual_seed(0)
    ref = pipe(batch_size=2, num_inference_steps=3)
    torch.manual_seed(0)
    with pytest.warns(PipelineFallbackWarning, match="diverged"):
        got = fast(batch_size=2, num_inference_steps=3)  # found mid-call: the call reruns eagerly from its start
    assert torch.equal(got, ref) and "diverged" in fast.reason and fast.replays == 0
    assert "forward" not in pipe.unet.__dict__
    torch.manual_seed(1)
    ref = pipe(batch_size=2, num_inference_steps=3)
    torch.manual_seed(1)
    got = fast(batch_size=2, num_inference_steps=3)  # this signature runs eagerly from now on
    assert torch.equal(got, ref) and "diverged" in fast.reason


@pytest.mark.parametrize("mode", ["cfg", "cfg_scaled"])
def test_replay_logic_cfg_pipeline(stand_in_capture, mode):
    """A loop with classifier-free guidance in the pipeline's own code replays to the eager images; a new
    guidance scale is a new signature (its own capture), replayed just as well."""
    pipe = LoopPipeline(tiny_unet(), ffd.from_scheduler(DiffusersDDIM(), backend="torch"), mode=mode)
    fast = capture_pipeline(pipe)
    kw = {"batch_size": 2, "num_inference_steps": 4}
    refs = {(seed, g): pipe(generator=torch.manual_seed(seed), guidance_scale=g, **kw) for seed in (0, 1)
            for g in (2.0, 5.0)}
    assert torch.equal(fast(generator=torch.manual_seed(0), **kw), refs[0, 2.0])
    assert fast.captures == 1 and fast.reason is None
    for seed in (1, 0):
        assert torch.equal(fast(generator=torch.manual_seed(seed), **kw), refs[seed, 2.0])
    assert fast.replays == 2
    assert torch.equal(fast(generator=torch.manual_seed(1), guidance_scale=5.0, **kw), refs[1, 5.0])
    assert torch.equal(fast(generator=torch.manual_seed(0), guidance_scale=5.0, **kw), refs[0, 5.0])
    assert fast.captures == 2 and fast.replays == 3
    assert "forward" not in pipe.unet.__dict__ and "step" not in pipe.scheduler.__dict__
    assert not torch.overrides._get_current_function_mode_stack()  # the op recorder is gone after each call


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_new_guidance_scale_replays_without_a_new_capture(stand_in_capture, dtype):
    """The guidance scale is a parameter of the capture: new scales (7.3 is not a bfloat16 number) replay the same
    graph with their own value, bitwise equal to the eager calls, and the old scale still replays as before."""
    pipe = LoopPipeline(tiny_unet().to(dtype), ffd.from_scheduler(DiffusersDDIM(), backend="torch"), mode="cfg_shifted")
    fast = capture_pipeline(pipe)
    kw = {"batch_size": 2, "num_inference_steps": 3}
    scales = (2.0, 5.0, 7.3)
    refs = {(g, seed): pipe(generator=torch.manual_seed(seed), guidance_scale=g, **kw) for g in scales
            for seed in (0, 1)}
    assert torch.equal(fast(generator=torch.manual_seed(0), guidance_scale=2.0, **kw), refs[2.0, 0])
    assert fast.captures == 1 and len(fast._traces[next(iter(fast._traces))].params) == 3  # one per step
    for g, seed in ((5.0, 1), (7.3, 0), (2.0, 1), (7.3, 1), (5.0, 0)):
        assert torch.equal(fast(generator=torch.manual_seed(seed), guidance_scale=g, **kw), refs[g, seed]), (g, seed)
    assert fast.captures == 1 and fast.replays == 5 and fast.reason is None
    assert not torch.equal(refs[5.0, 0], refs[7.3, 0])  # the scale matters, so the replays did take it


def test_new_prompt_string_replays_without_a_new_capture(stand_in_capture):
    """A prompt string reaches the loop only through tensors made before it (the text encoding): a new prompt
    replays the captured graph with its embeddings as inputs, together with a new guidance scale too."""
    pipe = LoopPipeline(tiny_unet(), ffd.from_scheduler(DiffusersDDIM(), backend="torch"), mode="cfg_shifted")
    fast = capture_pipeline(pipe)
    kw = {"batch_size": 2, "num_inference_steps": 3}
    cases = [("a cat", 2.0), ("a dog on a sofa", 2.0), ("a cat", 5.5), ("", 2.0)]
    refs = [pipe(generator=torch.manual_seed(0), prompt=p, guidance_scale=g, **kw) for p, g in cases]
    for n, ((p, g), ref) in enumerate(zip(cases, refs, strict=True)):
        assert torch.equal(fast(generator=torch.manual_seed(0), prompt=p, guidance_scale=g, **kw), ref), (p, g)
        assert (fast.captures, fast.replays) == (1, n) and fast.reason is None, (p, g, fast.reason)
    assert len({r.numpy().tobytes() for r in refs}) == len(refs)  # prompts and scales matter


def test_prompts_replayed_as_aliases_are_bounded(stand_in_capture, monkeypatch):
    """A server replays one capture for endless prompts: the signatures it remembers as replaying that capture are a
    bounded, least recently used table (one per prompt kept every prompt for the capture's life), and a prompt
    forgotten from it replays the same capture again."""
    monkeypatch.setattr(gp.captured, "_MAX_ALIASES", 2, raising=False)
    pipe = LoopPipeline(tiny_unet(), ffd.from_scheduler(DiffusersDDIM(), backend="torch"), mode="cfg_shifted")
    fast = capture_pipeline(pipe)
    kw = {"batch_size": 1, "num_inference_steps": 2, "guidance_scale": 3.0}
    prompts = ["a", "b", "c", "d", "e", "b"]  # "b" again after it was forgotten
    refs = {p: pipe(generator=torch.manual_seed(1), prompt=p, **kw) for p in set(prompts)}
    for p in prompts:
        assert torch.equal(fast(generator=torch.manual_seed(1), prompt=p, **kw), refs[p]), p
        assert len(fast._aliases) <= 2
    assert fast.captures == 1 and fast.replays == len(prompts) - 1 and fast.reason is None


def test_a_float_beyond_a_multiplication_gets_its_own_capture(stand_in_capture):
    """Guidance written as torch.lerp takes the scale as an argument the graph holds fixed: a new scale is found to
    differ as the loop runs, and that call is recorded (from its own random state) and captured on its own."""
    pipe = LoopPipeline(tiny_unet(), ffd.from_scheduler(DiffusersDDIM(), backend="torch"), mode="cfg_lerp")
    fast = capture_pipeline(pipe)
    kw = {"batch_size": 2, "num_inference_steps": 3}
    refs = {g: pipe(generator=torch.Generator().manual_seed(4), guidance_scale=g, **kw) for g in (2.0, 5.0)}
    assert torch.equal(fast(generator=torch.Generator().manual_seed(4), guidance_scale=2.0, **kw), refs[2.0])
    assert torch.equal(fast(generator=torch.Generator().manual_seed(4), guidance_scale=5.0, **kw), refs[5.0])
    assert fast.captures == 2 and fast.replays == 0 and fast.reason is None
    for g in (2.0, 5.0):
        assert torch.equal(fast(generator=torch.Generator().manual_seed(4), guidance_scale=g, **kw), refs[g])
    assert fast.captures == 2 and fast.replays == 2


@pytest.mark.parametrize(("changed", "message"), [
    ("cfg_scaled", "loop call 0 is scheduler.scale_model_input, recorded the model call"),  # one more loop call
    ("cfg_lerp", "calls the operation"),  # another operation on the loop's tensors
])
def test_replay_of_cfg_loop_diverging_is_reported(stand_in_capture, changed, message):
    """The pipeline's guidance code changing between calls is caught op by op; that call and later ones run eagerly
    (the first rerun from the random state it started from)."""
    pipe = LoopPipeline(tiny_unet(), ffd.from_scheduler(DiffusersDDIM(), backend="torch"), mode="cfg")
    fast = capture_pipeline(pipe)
    fast(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    assert fast.captures == 1
    pipe.mode = changed
    gen = torch.Generator().manual_seed(4)
    ref = pipe(batch_size=2, num_inference_steps=3, generator=gen)
    gen.manual_seed(4)
    with pytest.warns(PipelineFallbackWarning, match="diverged"):
        got = fast(batch_size=2, num_inference_steps=3, generator=gen)  # reruns eagerly, generator rewound
    assert message in fast.reason and torch.equal(got, ref) and fast.replays == 0
    assert not torch.overrides._get_current_function_mode_stack()
    ref = pipe(batch_size=2, num_inference_steps=3, generator=gen.manual_seed(5))
    got = fast(batch_size=2, num_inference_steps=3, generator=gen.manual_seed(5))
    assert torch.equal(got, ref) and "diverged" in fast.reason


@pytest.mark.parametrize("mode", ["in_place", "many_ops"])
def test_uncapturable_glue_runs_eagerly(stand_in_capture, mode):
    pipe = LoopPipeline(tiny_unet(), ffd.from_scheduler(DiffusersDDIM(), backend="torch"), mode=mode)
    fast = capture_pipeline(pipe)
    with pytest.warns(PipelineFallbackWarning) as caught:
        got = [fast(batch_size=2, num_inference_steps=3, generator=torch.manual_seed(s)) for s in (0, 0)]
    assert caught[0].filename == __file__
    ref = pipe(batch_size=2, num_inference_steps=3, generator=torch.manual_seed(0))
    assert fast.captures == 0 and fast.reason is not None
    assert torch.equal(got[0], ref) and torch.equal(got[1], ref)


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


@gpu
@pytest.mark.parametrize("build", ["flux_pipe", "sd3_pipe"])
def test_gpu_flow_matching_pipelines_replay_equal_eager(build):
    """FLUX.1 (true CFG) and SD3 loops captured on the GPU replay to their eager images, a new scale included."""
    pipe, fast = on_gpu(globals()[build]())
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


def sdxl_pipe():
    """diffusers' StableDiffusionXLPipeline with tiny random weights, driven by embeddings (no text encoders)."""
    pytest.importorskip("transformers", reason="StableDiffusionXLPipeline needs transformers")
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
        unet=tiny_sdxl_unet(), scheduler=euler_dropin(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


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


class _LinearNet(torch.nn.Module):
    """A denoiser of (x, t, embedding) with one linear layer: enough data flow for the replay checks."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(3, 3)

    def forward(self, x, t, emb):
        return self.lin(x.transpose(1, -1)).transpose(1, -1) * torch.cos(t.reshape(-1, 1, 1, 1) / 500) + emb


class OutsideInputsPipeline(DiffusionPipeline):
    """Loops that hand the model tensors from outside the loop the ways a graph cannot take: ``pair`` passes
    two embeddings (FLUX's true CFG), ``refill`` refills one preallocated timestep tensor each step,
    ``trajectory`` stacks the loop's states after it, ``last_output`` returns the last model output."""

    def __init__(self, unet, scheduler, mode: str):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.mode = mode

    @torch.no_grad()
    def __call__(self, positive, negative, generator=None):
        x = torch.randn((2, 3, 4, 4), generator=generator)
        tt = torch.zeros(2)
        self.scheduler.set_timesteps(3)
        states = [x]
        for t in self.scheduler.timesteps:
            if self.mode == "refill":
                tt.fill_(float(t))
            step_t = tt if self.mode == "refill" else t.expand(2)
            pos = self.unet(x, step_t, positive)
            o = pos if self.mode != "pair" else self.unet(x, step_t, negative) * -1.0 + pos * 2.0
            x = self.scheduler.step(o, t, x).prev_sample
            states.append(x)
        if self.mode == "trajectory":
            return torch.stack(states)
        return (x, o) if self.mode == "last_output" else x


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("pair", "takes another tensor, or one changed in place, where the recorded loop passed again"),
        ("refill", "changed in place between loop calls"),
        ("trajectory", "calls stack after the loop's last step on a tensor of the loop"),
        ("last_output", "returns a tensor of the loop other than its last step's outputs"),
    ],
)
def test_outside_inputs_a_graph_cannot_take_run_eagerly_with_the_reason(stand_in_capture, mode, reason):
    """Each of these replayed wrong numbers without a word: the pair (recorded with one tensor at both places) read
    the positive embedding twice; the refilled tensor held its first value for every step; stand-ins of the loop's
    tensors came back from the graph as garbage. They now run eagerly, saying why."""
    pipe = OutsideInputsPipeline(_LinearNet(), ffd.from_scheduler(DiffusersDDIM(), backend="torch"), mode)
    fast = capture_pipeline(pipe)
    g = torch.Generator().manual_seed(2)
    same = torch.randn(1, 3, 1, 1, generator=g)
    fast(same, same, generator=torch.manual_seed(0))  # the recording call: one tensor for both embeddings
    calls = [(torch.randn(1, 3, 1, 1, generator=g), torch.randn(1, 3, 1, 1, generator=g)) for _ in range(2)]
    for k, (positive, negative) in enumerate(calls):
        want = pipe(positive, negative, generator=torch.manual_seed(k + 1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PipelineFallbackWarning)
            got = fast(positive, negative, generator=torch.manual_seed(k + 1))
        for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,),
                        strict=True):
            assert torch.equal(a, b), (mode, k)
    assert fast.replays == 0 and reason in fast.reason


class PromptEditPipeline(DiffusionPipeline):
    """Conditions every step on an embedding it makes before the loop; from step ``edit_step`` on (a prompt-to-prompt
    style edit set on the pipeline, off by default) it changes that embedding in place."""

    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.edit_step: int | None = None

    @torch.no_grad()
    def __call__(self, prompt_embeds, generator=None):
        x = torch.randn((2, 3, 4, 4), generator=generator)
        emb = prompt_embeds * 2.0  # the "encoding": the pipeline's own tensor, from outside the loop
        self.scheduler.set_timesteps(3)
        for i, t in enumerate(self.scheduler.timesteps):
            if i == self.edit_step:
                emb.mul_(-1.0)
            x = self.scheduler.step(self.unet(x, t.expand(2), emb), t, x).prev_sample
        return x


def test_an_input_changed_in_place_between_loop_calls_of_a_replay_runs_eagerly(stand_in_capture):
    """The recording passed one unchanged embedding to every model call, so the graph loads it once, at the first;
    a replay whose loop changes it in place between two of them would run the later steps on its old values. The
    in-place change shows in the tensor's version: the call runs eagerly with the divergence warning."""
    pipe = PromptEditPipeline(_LinearNet(), ffd.from_scheduler(DiffusersDDIM(), backend="torch"))
    fast = capture_pipeline(pipe)
    emb = torch.randn(1, 3, 1, 1, generator=torch.Generator().manual_seed(2))
    for seed in (0, 1):  # records, then replays
        assert torch.equal(fast(emb, generator=torch.manual_seed(seed)), pipe(emb, generator=torch.manual_seed(seed)))
    assert (fast.captures, fast.replays) == (1, 1) and fast.reason is None, fast.reason
    unedited = pipe(emb, generator=torch.manual_seed(2))
    pipe.edit_step = 1
    want = pipe(emb, generator=torch.manual_seed(2))
    assert not torch.equal(want, unedited)  # the edit matters: a replay on the old embedding would show
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = fast(emb, generator=torch.manual_seed(2))
    assert torch.equal(got, want), (got - want).abs().max()
    warned = [str(w.message) for w in caught if w.category is PipelineFallbackWarning]
    assert len(warned) == 1 and warned[0].endswith(fast.reason)
    assert "diverged" in fast.reason and "changed in place" in fast.reason and fast.replays == 1


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


class RecordedStepsGraph(StandInGraph):
    """A stand-in that, as a CUDA graph does, takes the steps the recorded loop took (their indices are fixed in the
    captured kernels), whatever step the replaying call's loop starts at; the timesteps are still its inputs."""

    def replay(self) -> None:
        scheduler = self.fast.scheduler
        now = scheduler._begin_index, scheduler._step_index
        scheduler._begin_index, scheduler._step_index = self.trace.begin_index, None
        try:
            super().replay()
        finally:
            scheduler._begin_index, scheduler._step_index = now


@pytest.mark.parametrize("via", ["denoising_start", "default_start"])
def test_a_loop_that_starts_at_another_step_is_not_replayed(monkeypatch, via):
    """A loop of the recorded length from another step of the same schedule: every loop call matches the recording
    but the steps a graph would take. Its begin index tells it apart: a new ``denoising_start`` (a float, which
    would replay the capture) is recorded and captured anew; a call of the recorded signature whose loop starts
    elsewhere (the pipeline's default changed) runs eagerly with the divergence warning. Both give eager's result."""
    monkeypatch.setattr(gp.CapturedPipeline, "_capture",
                        lambda self, trace: capture_on_host(self, trace, RecordedStepsGraph))
    monkeypatch.setattr(gp.CapturedPipeline, "blockers", lambda self, kwargs=None: [])
    pipe = PartialLoopPipeline(tiny_unet(), euler_dropin())
    fast = capture_pipeline(pipe)
    kw = {"denoising_start": 0.0} if via == "denoising_start" else {}
    for seed in (0, 1):  # records, then replays
        assert torch.equal(fast(generator=torch.manual_seed(seed), **kw), pipe(generator=torch.manual_seed(seed), **kw))
    assert (fast.captures, fast.replays) == (1, 1) and fast.reason is None, fast.reason
    if via == "denoising_start":
        kw = {"denoising_start": 0.5}
    else:
        pipe.default_start = 0.5
    want = pipe(generator=torch.manual_seed(2), **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = fast(generator=torch.manual_seed(2), **kw)
    assert torch.equal(got, want), (got - want).abs().max()
    assert fast.replays == 1
    warned = [str(w.message) for w in caught if w.category is PipelineFallbackWarning]
    if via == "denoising_start":  # a sibling's replay that diverges records the call: no warning
        assert warned == [] and fast.captures == 2 and fast.reason is None, fast.reason
    else:
        assert len(warned) == 1 and warned[0].endswith(fast.reason)
        assert fast.captures == 1 and "diverged" in fast.reason and "begin_index" in fast.reason
    assert torch.equal(fast(generator=torch.manual_seed(3), **kw), pipe(generator=torch.manual_seed(3), **kw))


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


def test_a_new_scheduler_at_a_freed_one_s_address_is_not_replayed(stand_in_capture, monkeypatch):
    """Captures were keyed by ``id()`` of the networks and the scheduler, which a new object takes over once the old
    one is freed: a pipeline given a new scheduler there (another prediction type, the same timesteps) replayed the
    old one's capture. ``id`` is made to collide here, as CPython's allocator makes it in a long-running process."""
    monkeypatch.setattr(gp.captured, "id", lambda obj: 1, raising=False)
    pipe = LoopPipeline(tiny_unet(), ffd.from_scheduler(DiffusersDDIM(), backend="torch"))
    fast = capture_pipeline(pipe)
    kw = {"batch_size": 2, "num_inference_steps": 3}
    fast(generator=torch.Generator().manual_seed(3), **kw)
    pipe.scheduler = ffd.from_scheduler(DiffusersDDIM(prediction_type="sample"), backend="torch")
    want = pipe(generator=torch.Generator().manual_seed(3), **kw)
    got = fast(generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(got, want) and fast.captures == 2 and fast.replays == 0


def test_the_runs_of_a_capture_take_the_recorded_steps_of_a_loop_that_stops_early():
    """A loop that stops before its schedule's end (SDXL's ``denoising_end``) leaves the scheduler's step counter
    mid-schedule, where a next run of the recorded loop would go on. Warm-up, the sync probe and the capture each run
    the recorded loop: each must take the recorded steps (a graph captured from another run would replay the wrong
    ones), and leave the counter as they found it (where the eager call left it)."""
    pipe = PartialLoopPipeline(tiny_unet(), euler_dropin())
    fast = capture_pipeline(pipe)
    ref = pipe(generator=torch.manual_seed(0))
    trace, result = fast._record((), {"generator": torch.manual_seed(0)})
    assert trace.reason is None and torch.equal(result, ref)
    end = pipe.scheduler.step_index
    assert end == 3  # steps 0-2 of 6
    for _ in range(3):
        with torch.no_grad():
            out = fast._run_trace(trace, fast._originals())
        assert torch.equal(out.prev_sample, ref)
        assert pipe.scheduler.step_index == end


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


# ----------------------------------------------------------------------------- CPU: a stand-in with frozen arguments
class FrozenArgsGraph:
    """A CPU stand-in closer to a CUDA graph than :class:`StandInGraph`: it records the ATen ops of its capture and
    replays them with their arguments as captured (Python numbers, step indices and tensors alike), running no
    Python of the scheduler. Tensors the capture made stay held (a graph's private pool); tensors from before it are
    only weakly referenced, as a graph holds none: a replay that would read freed memory raises."""

    def __init__(self):
        self.ops: list | None = None

    def capture_begin(self, *args, **kwargs) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        ops = self.ops = []

        class Record(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                ops.append((func, (args, kwargs or {}), out))
                return out

        self.mode = Record()
        self.mode.__enter__()

    def capture_end(self) -> None:
        import itertools
        import weakref

        self.mode.__exit__(None, None, None)
        slots = itertools.count()
        made: dict[int, int] = {}  # id(tensor made during capture) -> slot
        self.pool: dict[int, torch.Tensor] = {}  # slot -> tensor with memory of its own (the pool)
        tape = []
        for func, inputs, out in self.ops:
            leaves, spec = pytree.tree_flatten(inputs)
            storages = {t.untyped_storage().data_ptr() for t in leaves if isinstance(t, torch.Tensor)}
            refs = [("slot", made[id(t)]) if isinstance(t, torch.Tensor) and id(t) in made
                    else ("outside", weakref.ref(t)) if isinstance(t, torch.Tensor) else ("const", t) for t in leaves]
            outs = []
            for t in pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    made[id(t)] = slot = next(slots)
                    if t.untyped_storage().data_ptr() not in storages:  # not a view of an input: pool memory
                        self.pool[slot] = t
                    outs.append(slot)
                else:
                    outs.append(None)
            tape.append((func, refs, spec, outs))
        self.ops.clear()  # the capture's references go: a graph holds none to what it did not allocate
        self.ops, self.mode, self.tape = None, None, tape

    def replay(self) -> None:
        env = dict(self.pool)
        with torch.no_grad():
            for func, refs, spec, outs in self.tape:
                leaves = []
                for kind, ref in refs:
                    if kind == "outside" and ref() is None:
                        raise RuntimeError(f"the graph's {func} reads a tensor from before its capture that was freed")
                    leaves.append(env[ref] if kind == "slot" else ref() if kind == "outside" else ref)
                args, kwargs = pytree.tree_unflatten(leaves, spec)
                for slot, t in zip(outs, pytree.tree_leaves(func(*args, **kwargs)), strict=True):
                    if slot in self.pool:
                        if t is not self.pool[slot]:
                            self.pool[slot].copy_(t)
                    elif slot is not None:
                        env[slot] = t

    def reset(self) -> None:
        self.tape = self.pool = None


@pytest.fixture
def frozen_args_capture(monkeypatch):
    """``CapturedPipeline._capture`` itself runs on the CPU, :class:`FrozenArgsGraph` as its CUDA graph."""
    import contextlib

    class Stream:
        def __init__(self, *args):
            pass

        def wait_stream(self, other):
            pass

    for name, value in {
        "device": lambda *a: contextlib.nullcontext(), "stream": lambda *a: contextlib.nullcontext(),
        "Stream": Stream, "current_stream": lambda *a: Stream(), "synchronize": lambda *a: None,
        "memory_reserved": lambda *a: 0, "CUDAGraph": FrozenArgsGraph, "get_sync_debug_mode": lambda: 0,
        "set_sync_debug_mode": lambda mode: None,
    }.items():
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setattr(gp.CapturedPipeline, "blockers", lambda self, kwargs=None: [])


def test_frozen_args_graph_replays_a_capture(frozen_args_capture):
    """The stand-in itself: replays of the captured ops give eager's results for new inputs and guidance scales."""
    pipe = LoopPipeline(tiny_unet(), euler_dropin(), mode="cfg_scaled")
    fast = capture_pipeline(pipe)
    for seed, scale in ((0, 2.0), (1, 2.0), (2, 5.0)):
        want = pipe(generator=torch.manual_seed(seed), guidance_scale=scale)
        assert torch.equal(fast(generator=torch.manual_seed(seed), guidance_scale=scale), want)
    assert (fast.captures, fast.replays) == (1, 2) and isinstance(fast._traces.popitem()[1].graph, FrozenArgsGraph)
    assert pipe.scheduler.step_index is None  # a replay runs no step's Python (graph_pipeline's docstring says so)


def test_a_capture_holds_the_noise_counters_a_longer_schedule_replaces(frozen_args_capture, monkeypatch):
    """On a CUDA device a noisy step's counter is a view of ``_ff_row``'s counter tensor, which the drop-in keeps
    across schedules and replaces, in place in its dict, by a longer one when a longer schedule needs it. A capture
    held that dict, not the tensor: a later call with more steps freed the memory the graph's noise draws read
    (DDPM's learned variance draws its noise outside the kernel, from those views alone)."""
    from fastflow.diffusers._noise_draws import KernelNoise

    monkeypatch.setattr(KernelNoise, "_ff_noise_counter", lambda self, k, device: self._ff_row(k, device))
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=6, layers_per_block=1, block_out_channels=(16, 32),
                       norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()
    scheduler = ffd.from_scheduler(diffusers.DDPMScheduler(variance_type="learned_range"), backend="torch")
    pipe = LoopPipeline(unet, scheduler)
    fast = capture_pipeline(pipe)
    for steps in (3, 3, 5, 3):
        torch.manual_seed(steps)
        want = pipe(batch_size=2, num_inference_steps=steps)
        torch.manual_seed(steps)
        assert torch.equal(fast(batch_size=2, num_inference_steps=steps), want)
    assert (fast.captures, fast.replays, fast.reason) == (2, 2, None)


@gpu
def test_gpu_replay_after_a_longer_schedule_draws_the_recorded_noise():
    """The CUDA counterpart of the test above (unverified on a GPU when written): small blocks allocated after the
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


@pytest.mark.parametrize("change", ["config", "config attribute", "attribute"])
def test_a_scheduler_changed_in_place_after_its_capture_is_not_replayed(frozen_args_capture, change):
    """A graph steps with the coefficient tables of its capture; a scheduler reconfigured in place (the same object,
    so the same signature) with the same timesteps builds others, which the graph would never read. The call runs
    eagerly with the divergence warning, and gives the reconfigured scheduler's result."""
    pipe = LoopPipeline(tiny_unet(), euler_dropin())
    fast = capture_pipeline(pipe)
    for seed in (0, 1):
        assert torch.equal(fast(generator=torch.manual_seed(seed)), pipe(generator=torch.manual_seed(seed)))
    assert (fast.captures, fast.replays) == (1, 1)
    if change == "config":
        pipe.scheduler.register_to_config(prediction_type="v_prediction")
    elif change == "config attribute":  # Stable Cascade's pipeline edits a scheduler's config this way
        pipe.scheduler.config.prediction_type = "v_prediction"
    else:
        pipe.scheduler.compute_pred_original_sample = False
    want = pipe(generator=torch.manual_seed(2))
    with pytest.warns(gp.PipelineFallbackWarning, match="scheduler"):
        got = fast(generator=torch.manual_seed(2))
    assert torch.equal(got, want) and fast.replays == 1


@pytest.mark.parametrize("edit_from", ["argument", "attribute"])
def test_a_schedule_edited_in_place_is_replayed_only_with_the_recorded_edit(frozen_args_capture, edit_from):
    """A pipeline may edit the scheduler's ``sigmas`` between ``set_timesteps`` and its loop (Cosmos 2 pipelines set
    ``sigmas[-1] = sigmas[-2]``); the drop-in follows the edit, so the graph holds tables built from the edited
    schedule. The same edit at every call replays. Another edit with the same timesteps was replayed with the
    recorded one's tables: now a float argument that makes it gets a capture of its own, and an edit the call's
    arguments do not show (the pipeline's own state) runs eagerly with the divergence warning."""
    pipe = LoopPipeline(tiny_unet(), euler_dropin())
    fast = capture_pipeline(pipe)

    def call(seed: int, final_sigma: float, run: Callable) -> torch.Tensor:
        if edit_from == "argument":
            return run(generator=torch.manual_seed(seed), final_sigma=final_sigma)
        pipe.final_sigma = final_sigma
        return run(generator=torch.manual_seed(seed))

    for seed in (0, 1, 2):
        assert torch.equal(call(seed, 0.5, fast), call(seed, 0.5, pipe))
    assert (fast.captures, fast.replays) == (1, 2)
    want = call(3, 0.25, pipe)
    assert not torch.equal(want, call(3, 0.5, pipe))  # the edit matters
    if edit_from == "argument":
        got = call(3, 0.25, fast)
        assert (fast.captures, fast.replays) == (2, 2)
    else:
        with pytest.warns(gp.PipelineFallbackWarning, match="sigmas differ"):
            got = call(3, 0.25, fast)
        assert (fast.captures, fast.replays) == (1, 2)
    assert torch.equal(got, want)
