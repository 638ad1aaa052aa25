"""benchmarks.report's tables, rendered from a committed GPU run's results."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from benchmarks import report

RUN = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "h200-2026-11-27-938929b" / "results.json"


def test_sync_sources_are_listed_under_the_sync_table():
    """A loop whose sync debug mode caught a sync names the line that made it; a run without any lists none."""
    results = json.loads(RUN.read_text())
    clean = copy.deepcopy(results)
    for case in clean["cases"]:
        for row in case["impls"].values():
            row.pop("sync_sources", None)
            if row.get("syncs"):
                row["syncs"] = 0
    assert "Where each counted sync was made" not in report.markdown(clean)
    case = next(c for c in clean["cases"] if "fastflow-triton" in c["impls"])
    case["impls"]["fastflow-triton"].update(syncs=1, sync_sources=["loop.py:7: called a synchronizing op"])
    text = report.markdown(clean)
    assert "## Host syncs per loop" in text
    assert f"- {case['family']} {case['size']} fastflow-triton: loop.py:7: called a synchronizing op" in text
