"""Replay logic under the stand-in graph, on hand-written loops: noise seeds, guidance scales and prompts as graph
parameters and inputs, divergence found mid-call, inputs a graph cannot take, and loops that start or stop
mid-schedule."""

from __future__ import annotations

import warnings

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
ffd = pytest.importorskip("fastflow.diffusers", reason="fastflow.diffusers (the drop-in schedulers) is not importable")

from diffusers import DDIMScheduler as DiffusersDDIM  # noqa: E402
from diffusers import DiffusionPipeline  # noqa: E402
from stand_in_graphs import RecordedStepsGraph, capture_on_host  # noqa: E402
from tiny_pipelines import LoopPipeline, PartialLoopPipeline, ddim_pipe, euler_dropin, tiny_unet  # noqa: E402

from fastflow import graph_pipeline as gp  # noqa: E402
from fastflow.graph_pipeline import PipelineFallbackWarning, capture_pipeline  # noqa: E402


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
