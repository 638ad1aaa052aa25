"""Random fused-step inputs and comparisons against the torch reference, shared by the
kernel tests (``tests/kernels`` for Triton, ``tests/csrc`` for the C++/CUDA extension).

Imported as ``backends.step_cases`` (``tests/`` is on ``sys.path`` through its conftest).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import pytest
import torch

from fastflow.backends.reference import TorchBackend
from fastflow.plan import NUM_COEFS

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NOISE_MODES = ("none", "philox", "tensor")
# Next-model-input output: none, same dtype and batch, or bf16/fp16 with batch 2B
# (make_case also takes "model" and "dup-model": the model output's dtype, batch B or 2B).
MI_MODES = (None, "same", "dup-bf16", "dup-fp16")
REF = TorchBackend()

# (rtol, atol) per output dtype for the Triton kernel: both sides round the same
# float32 value once, so low-precision outputs differ by at most one unit in the last place.
TRITON_TOL = {
    torch.float32: (2e-5, 2e-5),
    torch.float64: (2e-5, 2e-5),
    torch.bfloat16: (1.6e-2, 1.6e-2),
    torch.float16: (2e-3, 2e-3),
}
# (rtol, atol) per output dtype for the extension's results that involve the noise
# transform (one float32 ulp on the normal can move a rounded low-precision output by one ulp).
EXTENSION_TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float64: (1e-12, 1e-12),
    torch.bfloat16: (1.6e-2, 1.6e-2),
    torch.float16: (2e-3, 2e-3),
}


@dataclass
class Case:
    """Inputs of one fused step, with the outputs it asks for."""

    z: torch.Tensor
    model_out: torch.Tensor
    uncond: torch.Tensor | None
    history: list[torch.Tensor]
    table: torch.Tensor
    step: int | torch.Tensor
    seeds: torch.Tensor | None
    noise: torch.Tensor | None
    use_noise: bool
    clip: float | None
    x_dtype: torch.dtype | None
    mi_dtype: torch.dtype | None
    mi_dup: bool

    def run(self, backend, in_place: bool = False, **kw) -> dict[str, torch.Tensor]:
        """Run the step on fresh NaN-filled outputs (so unwritten elements show); ``kw`` goes to ``fused_step``."""
        z = self.z.clone()
        out = z if in_place else torch.full_like(z, float("nan"))
        x = None if self.x_dtype is None else torch.full(z.shape, float("nan"), dtype=self.x_dtype, device=z.device)
        mi = None
        if self.mi_dtype is not None:
            b = z.shape[0] * (2 if self.mi_dup else 1)
            mi = torch.full((b, *z.shape[1:]), float("nan"), dtype=self.mi_dtype, device=z.device)
        self.call(backend, z, out, x_out=x, model_in_out=mi, **kw)
        res = {"out": out}
        if x is not None:
            res["x"] = x
        if mi is not None:
            res["mi"] = mi
        return res

    def call(self, backend, z: torch.Tensor, out: torch.Tensor, x_out=None, model_in_out=None, **kw) -> None:
        """``backend.fused_step`` on this case's other inputs, with the given state and outputs."""
        backend.fused_step(
            z,
            out,
            self.model_out,
            self.uncond,
            list(self.history),
            self.table,
            self.step,
            seeds=self.seeds,
            noise=self.noise,
            x_out=x_out,
            model_in_out=model_in_out,
            clip=self.clip,
            use_noise=self.use_noise,
            **kw,
        )


def make_case(
    shape: tuple[int, ...],
    zdt: torch.dtype,
    odt: torch.dtype,
    *,
    guided: bool = True,
    hist: int = 2,
    clip: bool = False,
    noise: str = "philox",
    x_dtype: torch.dtype | None = None,
    mi: str | None = None,
    step_kind: str = "int",
    seed: int = 0,
    device: str = "cpu",
    table_dtype: torch.dtype = torch.float32,
    table_draw_dtype: torch.dtype = torch.float32,
    hist_dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16),
    noise_dtype: torch.dtype | None = None,
) -> Case:
    """Fresh random inputs and a random coefficient table (5 rows; row 3 is used).

    The table is drawn in ``table_draw_dtype`` and then cast to ``table_dtype``; an
    explicit noise tensor (``noise="tensor"``) is in ``noise_dtype``, default ``odt``.
    """
    g = torch.Generator().manual_seed(seed)

    def rnd(dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(shape, generator=g) * scale).to(dtype).to(device)

    table = (torch.randn(5, NUM_COEFS, generator=g, dtype=table_draw_dtype) * 0.7).to(table_dtype).to(device)
    step_row = 3
    if step_kind == "int":
        step: int | torch.Tensor = step_row
    else:
        step = torch.tensor([step_row], dtype=torch.int32 if step_kind == "i32" else torch.int64, device=device)
    seeds = torch.randint(-(2**62), 2**62, (shape[0],), generator=g, dtype=torch.int64).to(device)
    mi_dtype = {
        None: None, "same": zdt, "model": odt, "dup-model": odt, "dup-bf16": torch.bfloat16, "dup-fp16": torch.float16
    }[mi]  # fmt: skip
    return Case(
        z=rnd(zdt, 2.0),
        model_out=rnd(odt),
        uncond=rnd(odt) if guided else None,
        history=[rnd(hist_dtypes[k % len(hist_dtypes)]) for k in range(hist)],
        table=table,
        step=step,
        seeds=seeds if noise == "philox" else None,
        noise=rnd(noise_dtype or odt) if noise == "tensor" else None,
        use_noise=noise != "none",
        clip=0.8 if clip else None,
        x_dtype=x_dtype,
        mi_dtype=mi_dtype,
        mi_dup=mi is not None and mi.startswith("dup"),
    )


def step_matrix(test):
    """Parametrize ``test`` over the full product of zdt x odt x guided x clip x hist x noise."""
    marks = (
        pytest.mark.parametrize("zdt", DTYPES, ids=lambda d: f"z_{str(d)[6:]}"),
        pytest.mark.parametrize("odt", DTYPES, ids=lambda d: f"o_{str(d)[6:]}"),
        pytest.mark.parametrize("guided", [False, True], ids=["cond", "cfg"]),
        pytest.mark.parametrize("clip", [False, True], ids=["noclip", "clip"]),
        pytest.mark.parametrize("hist", [0, 1, 2, 3]),
        pytest.mark.parametrize("noise", NOISE_MODES),
    )
    for mark in marks:  # innermost decorator first, as when stacked in the source
        test = mark(test)
    return test


def matrix_case(
    shape: tuple[int, ...],
    zdt: torch.dtype,
    odt: torch.dtype,
    guided: bool,
    clip: bool,
    hist: int,
    noise: str,
    **kw,
) -> Case:
    """One case of the dtype x guidance x clip x history x noise matrix.

    The secondary options (x_hat output and its dtype, model-input output with batch
    B or 2B, step as int or int32/int64 tensor) rotate with the primary ones so each
    meets every primary option without multiplying the product; the seed follows
    the primary options. ``kw`` goes to :func:`make_case` (device, table draw).
    """
    ni = NOISE_MODES.index(noise)
    return make_case(
        shape,
        zdt,
        odt,
        guided=guided,
        hist=hist,
        clip=clip,
        noise=noise,
        x_dtype=(zdt, None, torch.float32)[(hist + guided) % 3],
        mi=MI_MODES[(hist + ni + clip) % 4],
        step_kind=("int", "i64", "i32")[(ni + guided + 2 * clip) % 3],
        seed=zlib.crc32(repr((zdt, odt, guided, clip, hist, noise)).encode()),
        **kw,
    )


def assert_matches(
    got: dict[str, torch.Tensor],
    want: dict[str, torch.Tensor],
    *,
    tol: dict[torch.dtype, tuple[float, float]],
    exact: bool = False,
) -> None:
    """Same keys, dtypes and shapes, every element written; bit-equal when ``exact``, else within ``tol``."""
    assert got.keys() == want.keys()
    for key, w in want.items():
        a = got[key]
        assert a.dtype == w.dtype and a.shape == w.shape, key
        assert not torch.isnan(a).any(), f"{key}: elements left unwritten"
        if exact:
            diff = (a.double() - w.double()).abs().max().item()
            assert torch.equal(a, w), f"{key}: not bit-identical to the reference (max abs diff {diff:.3g})"
        else:
            rtol, atol = tol[w.dtype]
            torch.testing.assert_close(a.double(), w.double(), rtol=rtol, atol=atol, msg=lambda m, k=key: f"{k}: {m}")
