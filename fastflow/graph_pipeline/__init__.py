"""CUDA graph capture of a diffusers pipeline's denoising loop (model calls + fastflow scheduler steps).

    pipe.scheduler = fastflow.diffusers.from_scheduler(pipe.scheduler)
    fast = fastflow.graph_pipeline.capture_pipeline(pipe)
    images = fast(batch_size=4, num_inference_steps=30).images   # 1st call: eager, records the loop
    images = fast(batch_size=4, num_inference_steps=30).images   # later calls: one graph replay

How: for the length of a call, the denoiser's ``forward`` (and a ControlNet's, when
the pipeline has one) and the scheduler's ``step`` (and ``scale_model_input``) are
wrapped, and from the first of those loop calls to the last step a torch function
mode sees the pipeline's own tensor operations. The first call with a given
signature (its arguments' types, shapes and values; tensors by shape, dtype and
device) runs eagerly and records the loop: the model calls, the steps, and every
operation the pipeline's code makes from their outputs in between (classifier-free
guidance: ``torch.cat([latents] * 2)``, ``chunk``, ``uncond + scale * (cond -
uncond)``). Right after it, that loop is
replayed on static buffers, warmed up on a side stream and captured into one CUDA
graph with its own memory pool. A later call with the same signature lets the
pipeline's own code run (text encoding, initial noise, ``set_timesteps``, decoding,
post-processing), but inside the loop the wrappers and the mode only copy the call's
new inputs (the initial latents and any device tensor from outside the loop, such as
prompt embeddings, class labels or timesteps) into the static buffers and hand back
placeholder tensors (no memory, no kernels); at the last step the graph replays and
the real final latents are returned. Every call and operation is checked against the
recording as it comes: a loop that changed is not replayed; that call reruns eagerly
from the random state it started from (its generators and torch's), with a warning
that says where it diverged, and so do later calls of that signature.

What is captured: loops of model calls and steps whose glue is tensor operations:
``DDIMPipeline``, ``DDPMPipeline``, and text-to-image pipelines that do
classifier-free guidance in their own code, with conditioning tensors passed to the
model (Stable Diffusion 1.x/2.x, SDXL, SD3, FLUX.1 with its true CFG, DiT, img2img, and
ControlNet pipelines: the ControlNet's calls are captured whole, like the denoiser's; a
new control image is an input of the graph, a new conditioning scale a new capture).

A new prompt or a new guidance scale needs no new capture. A float that the
pipeline's code only multiplies a floating-point loop tensor by (``guidance_scale *
(cond - uncond)``, a guidance rescale) is a parameter of the graph: the graph reads
it from device memory (in the op's own precision, so replays stay bitwise equal to
eager calls) and each replay writes the call's value there. A call whose signature
differs from a captured one only in float or string arguments (a scale, a prompt
string whose embeddings come in as graph inputs) first replays that capture with its
own values; if one of them reaches anything else (the step's ``eta``, a ``strength``
that changes the timesteps, guidance off at a scale of 1, a prompt whose embeddings
have another shape), the mismatch is found as the loop runs, and the call is
recorded and captured as a signature of its own (from the random state it started
from).

What falls back to eager (``.reason`` says which and why, a warning is given once):

* the scheduler is not a fastflow drop-in (diffusers' own steps sync with the host
  and keep their state in Python between calls), or it is one set to draw diffusers'
  noise from torch's global generator (``diffusers_noise``);
* the pipeline is not on a CUDA device, or the call passes per-step callbacks
  (they read intermediate latents on the host);
* the pipeline's code changes a loop tensor in place (``latents.mul_(...)``), makes
  more than ``_MAX_OPS_BETWEEN_CALLS`` operations between two loop calls, or steps
  with a tensor that is not made from the model's output;
* an input from outside the loop is refilled in place between loop calls (a graph reads
  one value of each input), or a replay passes two tensors where the recording passed
  one tensor twice (a warm-up call should pass distinct tensors where later calls do);
* the pipeline's code reads a loop tensor other than the last step's outputs after the
  loop (a trajectory, the last model output): only those outputs come out of a graph;
* the pipeline's code between loop calls, the model or the step syncs with the
  host (``.item()``, a data-dependent branch, per-step noise from a CPU
  ``torch.Generator`` at a stochastic step), or the capture itself fails;
* a per-step noise ``generator`` on a CUDA device (its state is host-side);
* a replay whose scheduler was reconfigured in place since the capture (``register_to_config``, its
  ``backend`` or ``compute_pred_original_sample`` set), or whose ``sigmas`` the pipeline edited after
  ``set_timesteps`` otherwise than at the capture (the same edit at every call, as Cosmos 2 pipelines make
  one, replays; an edited tensor is read once per call, as the eager step reads it): the graph steps with the
  coefficients of its capture. That signature then stays eager; ``fast.release()`` records it again.

A replay runs the steps inside the graph, none of the scheduler's Python: after it, the
scheduler's ``step_index`` is what ``set_timesteps`` left (None), not the loop's end as
after an eager call.

Stochastic drop-in steps without a generator draw fastflow's counter-based noise;
each replay writes into the seed buffer the seed the eager drop-in takes at its
loop's first step: a fresh one from torch's global CPU generator, so replays give
fresh samples and match an eager call made from the same global RNG state, or the
one the drop-in fixes (DPMSolverSDE's ``noise_sampler_seed``, the initial seed of the
generator CosineDPMSolverMultistep's step is given), so replays match eager calls too.

The networks are captured whole, kernels and weights' addresses included: a replay
runs the model as it was at capture. Weights changed in place (``load_state_dict``,
``param.copy_``) are read by replays; weights replaced by new tensors, and anything
that changes what ``forward`` runs (LoRA adapters loaded, fused or reweighted,
``enable_freeu``, new attention processors, a module replaced), are not, and the
signature check does not see them. Call ``fast.release()`` after such a change, so
the next call records the loop again.

Memory: one private pool per captured signature (about one eager loop's working
set), at most ``max_graphs`` signatures (least recently used released first).
"""

from .captured import CapturedPipeline, PipelineFallbackWarning, capture_pipeline

__all__ = ["CapturedPipeline", "PipelineFallbackWarning", "capture_pipeline"]
