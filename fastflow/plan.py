"""Step plans: the per-step scalar coefficients every backend evaluates.

One model evaluation ("stage") ``i`` of any solver is, per element::

    o      = o_uncond + W * (o_cond - o_uncond)        # when guided, else o = o_cond
    x_hat  = AZ * z + AO * o                           # output conversion
    x_hat  = clamp(x_hat, -clip, clip)                 # optional, the one nonlinearity
    z_next = CZ * z + CX * x_hat + H0 * h0 + H1 * h1 + H2 * h2 + CN * xi
    model_in_next = CIN * z_next  (cast to the model's dtype)

``h0..h2`` are stored tensors of earlier stages (a data prediction ``x_hat``, a
state ``z``, or a raw model output ``o`` kept by reference), ``xi`` is the noise of
:mod:`fastflow.noise` for this stage (or a tensor the caller passes). Solvers only
produce these coefficients; kernels only evaluate them. This module is the single
source of truth for the table layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .devices import to_device
from .predictions import to_x_eps
from .solvers.base import NOISE, Stage, UndefinedStepError, check_real

# Column layout of a coefficient table row. Kernels index rows by these numbers.
W, AZ, AO, CZ, CX, H0, H1, H2, CN, CIN = range(10)
NUM_COEFS = 10
MAX_HISTORY = 3
COLUMN_NAMES = ("W", "AZ", "AO", "CZ", "CX", "H0", "H1", "H2", "CN", "CIN")


@dataclass(frozen=True)
class HistoryRef:
    """A tensor of an earlier stage: ``kind`` is ``"x"`` (its x_hat), ``"z"`` (its input state) or ``"o"`` (the
    unguided model output it was given, kept by reference rather than written again: for the drop-ins of
    schedulers that keep the model output tensors themselves, as diffusers' PNDM does, so that a buffer the caller
    reuses changes both alike)."""

    kind: str
    stage: int


@dataclass(frozen=True)
class StepPlan:
    """Everything a backend needs to run every stage of a sampling loop.

    ``coefs`` is float64 ``[stages, NUM_COEFS]``; ``history[i]`` lists the tensors
    bound to slots ``h0, h1, ...`` at stage ``i``; ``write_x[i]``, ``keep_z[i]`` and
    ``keep_o[i]`` say whether a later stage reads stage ``i``'s x_hat, input state or
    model output (``keep_o`` empty: none does); ``noise[i]`` whether stage ``i`` draws
    noise (``CN != 0``).
    """

    coefs: np.ndarray
    history: tuple[tuple[HistoryRef, ...], ...]
    write_x: tuple[bool, ...]
    keep_z: tuple[bool, ...]
    noise: tuple[bool, ...]
    clip: float | None = None
    keep_o: tuple[bool, ...] = ()

    def __post_init__(self) -> None:
        n = self.coefs.shape[0]
        if self.coefs.shape != (n, NUM_COEFS):
            raise ValueError(f"coefficient table must be [stages, {NUM_COEFS}], got {self.coefs.shape}")
        if not np.all(np.isfinite(self.coefs)):
            bad = np.argwhere(~np.isfinite(self.coefs))[0]
            raise ValueError(f"non-finite plan coefficient {COLUMN_NAMES[bad[1]]} at stage {bad[0]}")
        object.__setattr__(self, "max_coef", float(np.abs(self.coefs).max(initial=0.0)))  # see table
        for i, refs in enumerate(self.history):
            if len(refs) > MAX_HISTORY:
                raise ValueError(f"stage {i} needs {len(refs)} stored tensors; at most {MAX_HISTORY} are supported")

    @property
    def stages(self) -> int:
        return self.coefs.shape[0]

    def with_guidance(self, scale: float | None) -> StepPlan:
        """The same plan with guidance scale ``scale`` in every stage (None: unguided)."""
        coefs = self.coefs.copy()
        coefs[:, W] = 1.0 if scale is None else float(scale)
        return StepPlan(coefs, self.history, self.write_x, self.keep_z, self.noise, self.clip, self.keep_o)

    def table(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The coefficient table on ``device`` (copied without a host sync where the device allows). A coefficient
        past ``dtype``'s range (a guidance scale of 1e39 in a float32 table) raises: it would step to inf or NaN."""
        if self.max_coef > torch.finfo(dtype).max:  # host numbers, so a traced table build reads no tensor
            stage, col = np.argwhere(np.abs(self.coefs) > torch.finfo(dtype).max)[0].tolist()
            raise ValueError(
                f"plan coefficient {COLUMN_NAMES[col]} at stage {stage} is {self.coefs[stage, col]:g}, past the range "
                f"of a {dtype} table (steps with it would give inf or NaN): bring the option behind it "
                "(guidance_scale, the schedule's range, input_scale) within that range"
            )
        return to_device(torch.from_numpy(self.coefs).to(dtype), device)


def _no_data_prediction(prediction: str, stage: Stage, i: int) -> str:
    """Why stage ``i``'s model output gives no data prediction, and what to change."""
    p = stage.point
    if p.alpha[0] == 0 and prediction in ("eps", "score"):
        return (
            f"prediction {prediction!r} gives no data prediction where alpha = 0 (stage {i}, t = {p.t[0]:g}: pure "
            "noise, as at t = 1 of FlowMatching): x_hat divides by alpha; use a grid that starts below it "
            "(t_max < 1) or a model that predicts 'flow', 'v' or 'x0'"
        )
    return (
        f"prediction {prediction!r} gives no finite data prediction at stage {i} (t = {p.t[0]:g}, "
        f"alpha = {p.alpha[0]:g}, sigma = {p.sigma[0]:g}); use another prediction type"
    )


def compile_plan(
    stages: list[Stage],
    prediction: str,
    guidance_scale: float | None = None,
    clip: float | None = None,
    input_scale: np.ndarray | None = None,
) -> StepPlan:
    """Turn a solver's stages into a table: prediction conversion, guidance, history slots.

    ``input_scale[i]`` multiplies the state to form stage ``i``'s model input (default 1);
    column CIN of stage ``i`` holds the next stage's scale.
    """
    n = len(stages)
    if n == 0:
        raise ValueError("a plan needs at least one stage")
    if clip is not None:
        check_real("clip", clip)
        if not (clip > 0 and np.isfinite(clip)):
            raise ValueError(f"clip must be a positive finite number, got {clip}")
    if guidance_scale is not None:
        check_real("guidance_scale", guidance_scale)
        if not np.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be finite, got {guidance_scale}")
    scale = np.ones(n) if input_scale is None else np.asarray(input_scale, dtype=np.float64)
    coefs = np.zeros((n, NUM_COEFS))
    coefs[:, W] = 1.0 if guidance_scale is None else float(guidance_scale)
    history: list[tuple[HistoryRef, ...]] = []
    write_x = [False] * n
    keep_z = [False] * n
    keep_o = [False] * n
    kept = {"x": write_x, "z": keep_z, "o": keep_o}
    uses_noise = [False] * n
    for i, stage in enumerate(stages):
        p = stage.point
        (xz, xo), _ = to_x_eps(prediction, p.alpha[0], p.sigma[0], p.d_alpha[0], p.d_sigma[0])
        if not (np.isfinite(xz) and np.isfinite(xo)):
            raise UndefinedStepError(_no_data_prediction(prediction, stage, i))
        coefs[i, AZ], coefs[i, AO] = xz, xo
        refs: list[tuple[HistoryRef, float]] = []
        for (kind, j), c in stage.update:
            if c == 0.0:
                continue
            if (kind, j) == ("z", i):
                coefs[i, CZ] += c
            elif (kind, j) == ("x", i):
                coefs[i, CX] += c
            elif (kind, j) == NOISE:
                coefs[i, CN] += c
                uses_noise[i] = True
            elif kind in kept and 0 <= j < i:
                refs.append((HistoryRef(kind, j), c))
            else:
                raise ValueError(f"stage {i} refers to {kind}{j}, which is not available")
        refs.sort(key=lambda rc: (-rc[0].stage, rc[0].kind))
        if len(refs) > MAX_HISTORY:
            raise ValueError(f"stage {i} needs {len(refs)} stored tensors; at most {MAX_HISTORY} are supported")
        for slot, (ref, c) in enumerate(refs):
            coefs[i, H0 + slot] = c
            kept[ref.kind][ref.stage] = True
        history.append(tuple(ref for ref, _ in refs))
        coefs[i, CIN] = scale[i + 1] if i + 1 < n else 1.0
    return StepPlan(coefs, tuple(history), tuple(write_x), tuple(keep_z), tuple(uses_noise), clip,
                    tuple(keep_o) if any(keep_o) else ())
