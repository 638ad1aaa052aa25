"""benchmarks/run.py (``python -m benchmarks``): its arguments."""

from __future__ import annotations

import pytest
import torch

run = pytest.importorskip("benchmarks.run")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "0"], "--steps: must be at least 1, got 0"),
        (["--steps", "-3"], "--steps: must be at least 1, got -3"),
        (["--device", "gpu"], "--device gpu: expected cpu or cuda"),
    ],
)
def test_refuses_bad_arguments(capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        run.parse_args(args)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_refuses_cuda_without_a_device(capsys, monkeypatch):
    """Said before any case runs (torch's lazy CUDA init raised from the middle of the run)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        run.parse_args(["--device", "cuda"])
    assert exc.value.code == 2 and "--device cuda: no CUDA device" in capsys.readouterr().err


def test_takes_the_documented_arguments():
    args = run.parse_args(["--device", "cpu", "--steps", "3", "--quick", "--sizes", "1x4x8x8"])
    assert (args.device, args.steps, args.quick, args.sizes) == ("cpu", 3, True, [(1, 4, 8, 8)])
