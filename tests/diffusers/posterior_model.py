"""A model stand-in that behaves like a trained denoiser: the exact posterior mean of simple data.

Per element, data ``x ~ 0.5 N(m, v) + 0.5 N(-m, v)`` (``m`` varies over the
elements). At noise ``z = a x + s eps`` the posterior mean is
``E[x | z] = a v z / V + m s^2 / V * tanh(a m z / V)`` with ``V = a^2 v + s^2``,
nonlinear in ``z`` and smooth in the timestep. Unlike an arbitrary function it
keeps ``x0`` and ``eps`` predictions consistent with the sample, so loops stay in
the data range and float32 round-off is not amplified by inconsistent outputs.
"""

from __future__ import annotations

import math

import torch


def posterior_model(scheduler, prediction: str | None = None, flow: bool | None = None):
    """``model(x, t)`` giving the scheduler's prediction type; ``(a, s)`` from the timestep like diffusers' tables."""
    cfg = scheduler.config
    prediction = prediction or cfg.prediction_type
    flow = bool(cfg.get("use_flow_sigmas", False)) if flow is None else flow
    ac = scheduler.alphas_cumprod.double()
    n_train = cfg.num_train_timesteps

    def model(x: torch.Tensor, t) -> torch.Tensor:
        tau = float(t)
        if flow:
            s = min(max(tau / n_train, 1e-4), 1 - 1e-4)
            a = 1.0 - s
        else:
            ab = float(ac[min(max(round(tau), 0), len(ac) - 1)])
            a, s = math.sqrt(ab), math.sqrt(1.0 - ab)
        z = x.double()
        m = 0.3 + 0.7 * torch.linspace(0, 1, z[0].numel(), dtype=torch.float64, device=z.device).reshape(z.shape[1:])
        v = 0.09
        big_v = a * a * v + s * s
        th = torch.tanh(a * m * z / big_v)
        x0 = a * v * z / big_v + m * s * s / big_v * th
        eps = s * z / big_v - a * m * s / big_v * th
        outs = {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0, "flow_prediction": eps - x0}
        return outs[prediction].to(x.dtype)

    return model


def tiny_unet():
    """A real diffusers network with small random weights (offline), for pipeline-style loops."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()


def unet_loop(scheduler, unet, steps: int, seed: int = 0, **step_kwargs) -> torch.Tensor:
    """diffusers' pipeline loop: initial noise times ``init_noise_sigma``, ``scale_model_input``, the network, step."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 8, 8, generator=g) * scheduler.init_noise_sigma
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        for t in scheduler.timesteps:
            o = unet(scheduler.scale_model_input(x, t), t).sample
            x = scheduler.step(o, t, x, **step_kwargs).prev_sample
    return x
