"""Pipeline capture on the CPU, no graph: argument checks, the recorded data flow of a loop, ``explain`` naming what
breaks it, and the eager fallback with its reason and warning."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

pytest.importorskip("diffusers")
ffd = pytest.importorskip("fastflow.diffusers", reason="fastflow.diffusers (the drop-in schedulers) is not importable")

from diffusers import DDIMScheduler as DiffusersDDIM  # noqa: E402
from tiny_pipelines import LoopPipeline, ddim_pipe, tiny_unet  # noqa: E402

from fastflow.graph_pipeline import PipelineFallbackWarning, capture_pipeline, loop_ops, recording  # noqa: E402


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
