"""benchmarks/host_ab.py: its per-class list covers every drop-in, and each pipeline-shaped loop runs."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
host_ab = pytest.importorskip("benchmarks.host_ab")


def test_every_drop_in_is_benchmarked():
    import fastflow.diffusers as ffd

    assert sorted(host_ab.DROPINS) == ffd.supported()


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", sorted(host_ab.DROPIN_LOOPS))
def test_pipeline_loops_give_diffusers_samples(name):
    """Each loop shaped as its pipeline calls step gives diffusers' sample with the drop-in (which draws its noise
    from torch's global generator as diffusers does, ``diffusers_noise``), so the loop times the steps it should."""
    import fastflow.diffusers as ffd

    ref = getattr(diffusers, name)()
    ff = ffd.from_scheduler(ref, diffusers_noise=True)
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    o = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    outs = []
    for sched in (ref, ff):
        sched.set_timesteps(host_ab.LOOP_STEPS, **host_ab.SET_KWARGS.get(name, {}))
        torch.manual_seed(0)
        outs.append(host_ab.DROPIN_LOOPS[name](sched, z0, o))
    assert torch.isfinite(outs[0]).all()
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def test_classes_restrict_the_cases_to_their_loops():
    """``--classes``: only those drop-ins' loops, each beside diffusers' own (``--shape``: at that size)."""
    results = host_ab._cases(2, ("DDIMScheduler", "FlowMatchEulerDiscreteScheduler"), (2, 3, 4, 4))
    assert sorted(results) == sorted(
        f"{name} steps ({label})"
        for name in ("DDIMScheduler", "FlowMatchEulerDiscreteScheduler", "FlowMatchEulerDiscreteScheduler float16")
        for label in ("diffusers", "fastflow drop-in")
    )
    assert all(v > 0 for v in results.values())


@pytest.mark.parametrize(
    "args, message",
    [
        (["--classes", "DDIMScheduler,NoSuchScheduler"], "--classes: not drop-in classes: NoSuchScheduler"),
        (["--base", "{tmp}"], "--base {tmp}: not a fastflow checkout"),
    ],
)
def test_refuses_bad_arguments(capsys, tmp_path, args, message):
    """Said before any run (a bad class failed inside the child, which only said that it failed)."""
    with pytest.raises(SystemExit) as exc:
        host_ab.main([a.format(tmp=tmp_path) for a in args] + ["--rounds", "1", "--steps", "2"])
    assert exc.value.code == 2 and message.format(tmp=tmp_path) in capsys.readouterr().err


def test_a_failing_run_says_why(tmp_path):
    """The child's error reaches the caller (it was captured and dropped: only the child's exit status showed)."""
    (tmp_path / "fastflow").mkdir()
    (tmp_path / "fastflow" / "__init__.py").write_text('raise ImportError("this checkout does not import")\n')
    with pytest.raises(SystemExit, match="this checkout does not import") as exc:
        host_ab.main(["--base", str(tmp_path), "--classes", "DDIMScheduler", "--rounds", "1", "--steps", "2"])
    assert f"the run in {tmp_path}" in str(exc.value.code)
