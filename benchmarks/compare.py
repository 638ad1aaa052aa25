"""Device and host time of two benchmark runs side by side: ``new / base`` per case.

    python benchmarks/compare.py BASE/results.json NEW/results.json [--out compare.md]

Both runs should come from one machine in one session (``scripts/gpu_check.sh`` runs
a base checkout's benchmarks right before this tree's when ``AB_BASE`` is set);
ratios below 1 mean the new tree is faster. Cases and implementations found in only
one run are left out. Where the two runs differ in what their times depend on (the
card, its driver and clocks, the software versions, the benchmark settings), the table
opens with a warning naming each difference, and so does standard error: such ratios
compare machines or methods, not trees.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

METRICS = (("device_us", "device"), ("host_us", "loop"), ("step_us", "step"), ("graph_us", "graph"))
# Machine fields that differ between two runs of one A/B by design (the trees compared, and their builds).
_EXPECTED_TO_DIFFER = frozenset({"git_commit", "fastflow", "fastflow_build", "backends", "host"})


Run = Path | dict  # a results.json, or its contents already read


def _read(run: Run) -> dict:
    return run if isinstance(run, dict) else json.loads(Path(run).read_text())


def _cases(data: dict) -> dict[tuple[str, str, str], dict]:
    return {(c["family"], c["size"], c.get("model_dtype", "")): c["impls"] for c in data["cases"]}


def differences(base: Run, new: Run) -> list[str]:
    """What the two runs' times depend on and differ in: machine fields (not the trees' own) and settings."""
    old, cur = _read(base), _read(new)
    found = []
    for section in ("machine", "settings"):
        a, b = old.get(section) or {}, cur.get(section) or {}
        for key in sorted(a.keys() | b.keys()):
            if section == "machine" and key in _EXPECTED_TO_DIFFER:
                continue
            if a.get(key) != b.get(key):
                found.append(f"{section}.{key}: base {a.get(key)!r}, new {b.get(key)!r}")
    return found


def compare(base: Path, new: Path, base_run: dict | None = None, new_run: dict | None = None) -> str:
    """A markdown table of ``new / base`` for every metric both runs measured, after any :func:`differences`
    (``base_run`` / ``new_run``: the files' contents, where the caller has read them)."""
    base_run, new_run = _read(base if base_run is None else base_run), _read(new if new_run is None else new_run)
    old, cur = _cases(base_run), _cases(new_run)
    lines = [
        f"# `{new}` against `{base}` (new / base; below 1 is faster)",
        "",
    ]
    unlike = differences(base_run, new_run)
    if unlike:
        lines += [
            "> **Warning**: the runs differ in more than their trees, so these ratios do not compare the trees alone:",
            *(f"> - {d}" for d in unlike),
            "",
        ]
    lines += [
        "| family | size | model out | impl | "
        + " | ".join(f"{label} base us | {label} new us | {label} ratio" for _, label in METRICS)
        + " |",
        "|---|---|---|---|" + "---|---|---|" * len(METRICS),
    ]
    for key in sorted(old.keys() & cur.keys()):
        for impl in sorted(old[key].keys() & cur[key].keys()):
            a, b = old[key][impl], cur[key][impl]
            cells = []
            for metric, _ in METRICS:
                x, y = a.get(metric), b.get(metric)
                if isinstance(x, (int, float)) and isinstance(y, (int, float)) and x > 0:
                    cells += [f"{x:.1f}", f"{y:.1f}", f"{y / x:.2f}"]
                else:
                    cells += ["-", "-", "-"]
            if any(c != "-" for c in cells):
                lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {impl} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    base_run, new_run = _read(args.base), _read(args.new)
    for difference in differences(base_run, new_run):
        print(f"warning: the runs differ in {difference}", file=sys.stderr)
    table = compare(args.base, args.new, base_run, new_run)
    print(table)
    if args.out:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
