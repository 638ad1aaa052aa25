"""The command line: `fastflow info` and `fastflow demo`."""

import pytest

from fastflow import cli, demo


def test_info_lists_every_backend(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("torch", "triton", "cuda"):
        assert f"  {name}" in out
    assert "fastflow 0." in out
    assert "  torch   available (cpu: yes; cuda: yes)" in out  # an available backend says where it runs


def test_demo_writes_its_figure(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(demo, "RUNS", demo.RUNS[:4])
    rows = demo.run_demo(tmp_path / "demo.png", n=300, backend="torch")
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    assert [r["sampler"] for r in rows] == ["DDIM", "DDPM", "DDPM", "flow-matching Euler"]
    assert all(r["distance"] < 0.5 for r in rows)  # every sampler lands near the mixture
    assert "two true draws" in capsys.readouterr().out
