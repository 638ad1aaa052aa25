"""Replays under :class:`FrozenArgsGraph`, which holds its ops' arguments as captured, as a CUDA graph does: noise
counters a longer schedule replaces, and a scheduler or schedule changed in place after its capture."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
ffd = pytest.importorskip("fastflow.diffusers", reason="fastflow.diffusers (the drop-in schedulers) is not importable")

from diffusers import UNet2DModel  # noqa: E402
from stand_in_graphs import FrozenArgsGraph  # noqa: E402
from tiny_pipelines import LoopPipeline, euler_dropin, tiny_unet  # noqa: E402

from fastflow import graph_pipeline as gp  # noqa: E402
from fastflow.graph_pipeline import capture_pipeline  # noqa: E402


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
