"""benchmarks/compare.py: new / base per case and column, only where both runs measured it."""

import json

from benchmarks.compare import compare


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
