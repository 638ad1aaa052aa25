"""Writing results: ``results.json`` (every figure), ``results.md`` (tables), ``bandwidth.png`` (plot)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .cases import FAMILIES
from .impls import BASELINES, IMPL_NAMES

__all__ = ["markdown", "plot_bandwidth", "write_all"]

SHORT = {
    "naive": "naive",
    "compile": "compile",
    "diffusers": "diffusers",
    "fastflow-triton": "ff-triton",
    "fastflow-cuda": "ff-cuda",
    "fastflow-torch": "ff-torch",
    "fastflow-dropin": "ff-dropin",
}


def _fmt(v: float | None, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def _columns(cases: list[dict]) -> list[str]:
    seen = {n for c in cases for n in c["impls"]}
    return [n for n in IMPL_NAMES if n in seen]


def _case_label(c: dict) -> str:
    dtypes = "" if c["model_dtype"] == "bfloat16" else f" ({c['model_dtype']} out)"
    return f"{c['family']} | {c['size']}{dtypes}"


def _table(cases: list[dict], cols: list[str], cell, extra: tuple[str, ...] = ()) -> list[str]:
    head = ["family", "size", *extra, *(SHORT[c] for c in cols)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cases:
        extra_cells = [cell(c, e) for e in extra]
        lines.append("| " + " | ".join([_case_label(c), *extra_cells, *(cell(c, n) for n in cols)]) + " |")
    return lines


def _skip_reasons(cases: list[dict], cols: list[str]) -> list[str]:
    reasons: dict[str, set[str]] = {}
    for c in cases:
        for n in cols:
            r = c["impls"].get(n, {})
            for key in ("skipped", "device_us_error", "graph_us_error", "host_us_error", "step_us_error"):
                if key in r:
                    reasons.setdefault(n, set()).add(f"{key.replace('_error', '')}: {r[key]}")
    lines = []
    for n in cols:
        for r in sorted(reasons.get(n, ())):
            lines.append(f"- `{n}` {r}")
    return lines


def markdown(results: dict) -> str:
    """The tables of a run, every figure from that one run."""
    m = results["machine"]
    order = list(FAMILIES)
    cases = sorted(
        results["cases"],
        key=lambda c: (order.index(c["family"]) if c["family"] in order else len(order), c["model_dtype"] != "bfloat16",
                       c["elements"]),
    )
    cols = _columns(cases)
    s = results["settings"]
    out = [
        f"# fastflow step benchmarks: {m['card']}, {results['date'][:10]}",
        "",
        f"- card: {m['card']} ({m['device']}); torch {m['torch']} (CUDA {m['torch_cuda']}), "
        f"triton {m['triton']}, diffusers {m['diffusers']}, fastflow {m.get('fastflow')}, python {m['python']}",
        f"- device-to-device copy bandwidth in this run: **{results['copy']['gbs']:.0f} GB/s** "
        f"({results['copy']['buffer_bytes'] >> 20} MiB buffer, read + write counted)",
        f"- state float32, model output bfloat16 unless noted; loops of {s['steps']} steps; "
        f"{'quick' if s['quick'] else 'full'} settings; commit {m.get('git_commit') or 'unknown'}",
        "- columns: naive = eager torch step as a user writes it; compile = torch.compile of it; "
        "diffusers = the matching scheduler's step(); ff-* = fastflow backends; "
        "ff-dropin = fastflow.diffusers' drop-in for the same scheduler",
        "",
        "## Device time of one step (us, median; floor = bytes / copy bandwidth)",
        "",
    ]
    out += _table(cases, cols, lambda c, n: _fmt(c["floor_us"], 2) if n == "floor" else _fmt(
        c["impls"].get(n, {}).get("device_us")), extra=("floor",))
    out += ["", "## Achieved bandwidth (GB/s) and share of copy bandwidth", "",
            "Bytes per element are the step's least traffic (10 for a plain step: read z 4, read output 2, "
            "write 4; +2 for a guidance pair's second output; +4 per stored prediction read or written).", ""]

    def bw(c: dict, n: str) -> str:
        if n == "B/elem":
            return str(c["bytes_per_element"])
        r = c["impls"].get(n, {})
        if r.get("gbs") is None:
            return "-"
        return f"{r['gbs']:.0f} ({100 * r['copy_share']:.0f}%)"

    out += _table(cases, cols, bw, extra=("B/elem",))
    out += ["", "## Per-step time in a Python loop, host included (us; synchronized once per loop)", ""]
    out += _table(cases, cols, lambda c, n: _fmt(c["impls"].get(n, {}).get("host_us")))
    stepped = [n for n in cols if any("step_us" in c["impls"].get(n, {}) for c in cases)]
    if stepped:
        out += ["", "## Per-step time of the scheduler's `step` alone in a loop, host included (us)", ""]
        out += _table(cases, stepped, lambda c, n: _fmt(c["impls"].get(n, {}).get("step_us")))
    if any("graph_us" in r for c in cases for r in c["impls"].values()):
        out += ["", "## Per-step time of the loop captured in one CUDA graph (us)", ""]
        out += _table(cases, cols, lambda c, n: _fmt(c["impls"].get(n, {}).get("graph_us"), 2))
    if any(r.get("syncs") is not None for c in cases for r in c["impls"].values()):
        out += ["", "## Host syncs per loop (torch sync debug mode)", ""]
        out += _table(cases, cols, lambda c, n: str(c["impls"].get(n, {}).get("syncs", "-")))
        sources = [
            f"- {c['family']} {c['size']} {n}: {src}"
            for c in cases
            for n in cols
            for src in c["impls"].get(n, {}).get("sync_sources", [])
        ]
        if sources:
            out += ["", "Where each counted sync was made (the Python line the warning names):", "", *sources]
    ff = [n for n in cols if n.startswith("fastflow-")]
    base = [b for b in BASELINES if b in cols]
    if ff and base:
        out += ["", "## Speed-ups of fastflow (baseline time / fastflow time, same run)", ""]
        head = ["family", "size", "backend"]
        keys = []
        for b in base:
            for meas, tag in (("device_us", "dev"), ("host_us", "loop"), ("graph_us", "graph")):
                if any(meas in r.get(b, {}) for c in cases for r in c.get("ratios", {}).values()):
                    keys.append((b, meas))
                    head.append(f"vs {b} ({tag})")
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for c in cases:
            for f in ff:
                rat = c.get("ratios", {}).get(f)
                if not rat:
                    continue
                cells = [_fmt(rat.get(b, {}).get(m), 2) for b, m in keys]
                out.append("| " + " | ".join([_case_label(c), SHORT[f], *cells]) + " |")
    agree = [(c, n) for c in cases for n in cols if "rel_err_vs_torch" in c["impls"].get(n, {})]
    if agree:
        out += ["", "## Agreement (deterministic loops: max |z - z_ref| / max |z_ref| against fastflow's torch "
                "backend on the same grid)", ""]
        out += _table([c for c in cases if any(cc is c for cc, _ in agree)], cols,
                      lambda c, n: "ref" if n == "fastflow-torch" else (
                          f"{c['impls'][n]['rel_err_vs_torch']:.1e}" if "rel_err_vs_torch" in c["impls"].get(n, {})
                          else "-"))
    check = results.get("naive_check")
    if check:
        out += ["", "## The naive baselines compute fastflow's update", "",
                "float64, noise off on both sides, whole loop: max |z_naive - z_fastflow| / max |z_fastflow|", "",
                "| " + " | ".join(check) + " |", "|" + "---|" * len(check),
                "| " + " | ".join(f"{v:.1e}" if isinstance(v, float) else str(v) for v in check.values()) + " |"]
    reasons = _skip_reasons(cases, cols)
    if reasons or results.get("skipped"):
        out += ["", "## Not measured, and why", ""] + reasons
        out += [f"- case `{s['case']}`: {s['reason']}" for s in results.get("skipped", [])]
    e2e = results.get("e2e")
    if e2e is not None:
        out += ["", "## End to end", ""]
        if "skipped" in e2e:
            out.append(f"- skipped: {e2e['skipped']}")
        else:
            out.append(f"- written by `benchmarks.e2e_graph` under `{e2e['out']}`")
            out.append(f"- result: `{json.dumps(e2e['result'])[:2000]}`")
    out.append("")
    return "\n".join(out)


def plot_bandwidth(results: dict, path: Path) -> str | None:
    """Achieved bandwidth against latent size, one panel per family; None when written, else why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        return f"matplotlib unavailable: {exc}"
    cases = [c for c in results["cases"] if c["model_dtype"] == "bfloat16"]
    families = list(dict.fromkeys(c["family"] for c in cases))
    if not families:
        return "no cases to plot"
    cols = _columns(cases)
    ncol = min(4, len(families))
    nrow = math.ceil(len(families) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.4 * nrow), squeeze=False, sharey=True)
    copy = results["copy"]["gbs"]
    for ax, fam in zip(axes.flat, families, strict=False):
        fc = sorted((c for c in cases if c["family"] == fam), key=lambda c: c["elements"])
        for n in cols:
            pts = [(c["elements"], c["impls"][n]["gbs"]) for c in fc if c["impls"].get(n, {}).get("gbs")]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=SHORT[n])
        ax.axhline(copy, color="k", linestyle="--", linewidth=1, label="copy")
        ax.set_xscale("log")
        ax.set_title(fam)
        ax.set_xlabel("elements")
        ax.grid(True, alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("achieved GB/s")
    for ax in list(axes.flat)[len(families):]:
        ax.set_visible(False)
    legend: dict = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(lab, h)
    labels, handles = list(legend), list(legend.values())
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    fig.suptitle(f"fastflow step: achieved bandwidth, {results['machine']['card']}, {results['date'][:10]}")
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_all(results: dict, out: Path, plot: bool = True) -> None:
    """Rewrite the JSON and markdown (and the plot when ``plot``) under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    if plot:
        why = plot_bandwidth(results, out / "bandwidth.png")
        results["plot"] = "bandwidth.png" if why is None else f"not written: {why}"
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "results.md").write_text(markdown(results))
