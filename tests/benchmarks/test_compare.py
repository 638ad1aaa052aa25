"""benchmarks/compare.py: new / base per case and column, only where both runs measured it."""

import json

from benchmarks.compare import compare, differences, main


def _run(path, cases):
    path.write_text(json.dumps({"cases": cases}))
    return path


def _case(family, impls, size="1x4x8x8"):
    return {"family": family, "size": size, "model_dtype": "bfloat16", "impls": impls}


def test_ratios_of_shared_cases_only(tmp_path):
    base = _run(tmp_path / "base.json", [
        _case("ddim", {"fastflow-cuda": {"device_us": 10.0, "host_us": 40.0, "step_us": 8.0, "graph_us_error": "x"},
                       "naive": {"device_us": 99.0}}),
        _case("ddpm", {"fastflow-cuda": {"device_us": 5.0}}),
    ])
    new = _run(tmp_path / "new.json", [
        _case("ddim", {"fastflow-cuda": {"device_us": 5.0, "host_us": 60.0, "step_us": 2.0, "graph_us": 3.0}}),
        _case("unipc", {"fastflow-cuda": {"device_us": 1.0}}),
    ])
    rows = [line for line in compare(base, new).splitlines() if line.startswith("| ddim")]
    # device, loop and step times measured by both; graph only by the new run
    want = "| ddim | 1x4x8x8 | bfloat16 | fastflow-cuda | 10.0 | 5.0 | 0.50 | 40.0 | 60.0 | 1.50 | 8.0 | 2.0 | 0.25 |"
    want += " - | - | - |"
    assert rows == [want]
    table = compare(base, new)
    assert "ddpm" not in table and "unipc" not in table and "naive" not in table


def _with(path, machine, settings):
    path.write_text(json.dumps({"machine": machine, "settings": settings, "cases": [_case("ddim", {
        "fastflow-cuda": {"device_us": 10.0}})]}))
    return path


def test_runs_of_one_machine_and_method_compare_without_a_warning(tmp_path, capsys):
    machine = {"card": "NVIDIA H200", "torch": "2.11.0", "git_commit": "a" * 40, "fastflow_build": {"cuda": "13.0"}}
    base = _with(tmp_path / "base.json", machine, {"steps": 30})
    new = _with(tmp_path / "new.json", {**machine, "git_commit": "b" * 40, "fastflow_build": {"cuda": None}},
                {"steps": 30})
    assert differences(base, new) == []  # the trees and their builds differ by design
    assert "Warning" not in compare(base, new)
    main([str(base), str(new)])
    assert capsys.readouterr().err == ""


def test_another_card_or_settings_are_named_in_the_table_and_on_stderr(tmp_path, capsys):
    base = _with(tmp_path / "base.json", {"card": "NVIDIA H200", "torch": "2.11.0"}, {"steps": 30, "quick": True})
    new = _with(tmp_path / "new.json", {"card": "NVIDIA H100 80GB HBM3", "torch": "2.11.0"}, {"steps": 10})
    found = differences(base, new)
    assert found == [
        "machine.card: base 'NVIDIA H200', new 'NVIDIA H100 80GB HBM3'",
        "settings.quick: base True, new None",
        "settings.steps: base 30, new 10",
    ]
    table = compare(base, new)
    assert table.index("Warning") < table.index("| family")
    assert all(f"> - {d}" in table for d in found)
    main([str(base), str(new)])
    err = capsys.readouterr().err
    assert err.count("warning: the runs differ in") == 3 and "machine.card" in err


def test_main_reads_each_run_once(tmp_path, monkeypatch, capsys):
    """The warnings and the table come from one reading of each file (they were read three times each)."""
    from pathlib import Path

    base = _with(tmp_path / "base.json", {"card": "NVIDIA H200"}, {"steps": 30})
    new = _with(tmp_path / "new.json", {"card": "NVIDIA H100 80GB HBM3"}, {"steps": 30})
    reads: list[str] = []
    real = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: reads.append(self.name) or real(self, *a, **k))
    out = tmp_path / "table.md"
    main([str(base), str(new), "--out", str(out)])
    assert sorted(reads) == ["base.json", "new.json"]
    assert "machine.card" in capsys.readouterr().err and "| ddim |" in out.read_text()
