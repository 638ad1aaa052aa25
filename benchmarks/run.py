"""The benchmark driver: every case, every implementation, every measure, written as it goes.

Results are rewritten after each case, so a run stopped by a time limit still
leaves every figure measured so far.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import importlib.util
import json
import os
import platform
import re
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from fastflow.cli import positive_int

from . import report, timing
from .cases import FAMILIES, QUICK_CPU_SIZES, SIZES, Case, parse_size, step_bytes_per_element
from .check import naive_agreement
from .impls import BASELINES, FASTFLOW_BACKENDS, IMPL_NAMES, Impl, make_impl

__all__ = ["main", "parse_args", "run"]

# torch.compile costs seconds per family; in quick mode only these are compiled.
QUICK_COMPILE = ("ddim", "ddpm", "cfg-ddim")
QUICK_COMPILE_CPU = ("ddim",)
PRIORITY = ((4, 16, 21, 90, 160), (1, 16, 128, 128), (1, 16, 21, 90, 160), (4, 16, 128, 128), (1, 4, 64, 64))


def _impl_name(token: str) -> str:
    token = token.strip().lower()
    if token in FASTFLOW_BACKENDS:
        return f"fastflow-{token}"
    if token not in IMPL_NAMES:
        raise argparse.ArgumentTypeError(f"unknown implementation {token!r}; valid: {', '.join(IMPL_NAMES)}")
    return token


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="fastflow step benchmarks against naive torch, torch.compile and diffusers.",
    )
    p.add_argument("--quick", action="store_true", help="fewer repetitions and compiles (fits a few minutes)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results/<card>-<date>)")
    p.add_argument("--sizes", nargs="+", type=parse_size, default=None, help="latent shapes, e.g. 1x16x128x128")
    p.add_argument("--backends", nargs="+", type=_impl_name, default=None,
                   help=f"implementations to run: {', '.join(IMPL_NAMES)} (torch/triton/cuda mean fastflow's)")
    p.add_argument("--families", nargs="+", choices=sorted(FAMILIES), default=None)
    p.add_argument("--compile-families", nargs="*", choices=sorted(FAMILIES), default=None,
                   help="families whose naive step is also run under torch.compile (default: all; quick: a few)")
    p.add_argument("--steps", type=positive_int, default=None, help="steps per loop (default 30; quick 10)")
    p.add_argument("--budget", type=float, default=None, help="seconds; cases left when it runs out are skipped")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--no-fp16", action="store_true", help="skip the float16 model-output run")
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end benchmark")
    args = p.parse_args(argv)
    if args.device is not None:
        why = _device_reason(args.device)
        if why is not None:
            p.error(f"--device {args.device}: {why}")
    return args


def _device_reason(name: str) -> str | None:
    """Why the benchmarks cannot run on device ``name``, or None."""
    try:
        device = torch.device(name)
    except RuntimeError:
        return "expected cpu or cuda"
    if device.type not in ("cpu", "cuda"):
        return "expected cpu or cuda"
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device" if torch.version.cuda else "no CUDA device (torch is a CPU-only build)"
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        return f"there are {torch.cuda.device_count()} CUDA devices"
    return None


# ----------------------------------------------------------------------------- machine info
def _version(module: str) -> str | None:
    try:
        return importlib.import_module(module).__version__
    except Exception:
        return None


def _git_commit() -> str | None:
    """HEAD of this checkout, marked when its tracked files differ from it.

    A checkout without git metadata of its own (an exported tree inside another
    repository) gives None rather than the outer repository's commit.
    """
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel") or "/nonexistent").resolve() != root:
            return None
        head = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no").splitlines()
    except Exception:
        return None
    if not head:
        return None
    return f"{head} + {len(changed)} changed files" if changed else head


def machine_info(device: torch.device) -> dict:
    """Host, card and versions: everything needed to read a figure later."""
    info: dict = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "diffusers": _version("diffusers"),
        "numpy": _version("numpy"),
        "git_commit": _git_commit(),
        "device": str(device),
        "card": "cpu",
    }
    try:
        import fastflow

        info["fastflow"] = fastflow.__version__
        info["backends"] = fastflow.backend_report()
    except Exception as exc:
        info["fastflow"] = f"import failed: {exc}"
    try:
        from fastflow import _build_info

        info["fastflow_build"] = _build_info.BUILD_INFO
    except Exception:
        info["fastflow_build"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            card=props.name,
            card_memory_gib=round(props.total_memory / 2**30, 1),
            sm_count=props.multi_processor_count,
            capability=f"{props.major}.{props.minor}",
        )
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20,
            )
            info["nvidia_smi"] = smi.stdout.strip()
        except Exception:
            info["nvidia_smi"] = None
    return info


def default_out(card: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", card.replace("NVIDIA", "")).strip("-") or "device"
    return Path(__file__).resolve().parent / "results" / f"{slug}-{dt.date.today().isoformat()}"


# ----------------------------------------------------------------------------- measuring one case
def _err(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.double(), b.double()
    return float((a64 - b64).abs().max() / b64.abs().max().clamp_min(1e-30))


def measure_impl(impl: Impl, case: Case, settings: dict, bytes_per_elem: int, copy_gbs: float) -> dict:
    """Every measure of one implementation on one case; a failing measure records its error and the rest go on."""
    dev = case.device
    row: dict = {"setup_s": round(impl.setup_s or 0.0, 4)}
    if impl.reason is not None:
        row["skipped"] = impl.reason
        return row
    try:
        impl.prepare()
        steps = getattr(impl, "loop_steps", case.steps)
        t0 = time.perf_counter()
        impl.run()  # warm-up: compiles kernels and torch.compile graphs
        timing.sync(dev)
        row["first_loop_s"] = round(time.perf_counter() - t0, 4)
        row["loop_steps"] = steps
    except Exception as exc:
        row["skipped"] = f"loop failed: {_err(exc)}"
        return row
    # device time of one step
    step = None
    try:
        step = impl.one_step()
    except Exception as exc:
        row["device_us_error"] = _err(exc)
    if step is None:
        row.setdefault("device_us_error", impl.step_reason or "no single-step form")
    else:
        try:
            us = timing.device_time_us(
                step, dev, budget_s=settings["device_budget_s"], min_reps=settings["min_reps"],
                max_reps=settings["max_reps"],
            )
            row["device_us"] = us
            row["gbs"] = bytes_per_elem * case.elements / (us * 1e-6) / 1e9
            row["copy_share"] = row["gbs"] / copy_gbs if copy_gbs else None
        except Exception as exc:
            row["device_us_error"] = _err(exc)
    # host-inclusive loop
    try:
        row["host_us"] = timing.host_loop_us(
            impl.prepare, impl.run, steps, dev, reps=settings["loop_reps"], budget_s=settings["loop_budget_s"]
        )
    except Exception as exc:
        row["host_us_error"] = _err(exc)
    if hasattr(impl, "run_steps"):  # schedulers: their step alone, without the pipeline's work between steps
        try:
            row["step_us"] = timing.host_loop_us(
                impl.prepare, impl.run_steps, steps, dev, reps=settings["loop_reps"],
                budget_s=settings["loop_budget_s"],
            )  # fmt: skip
        except Exception as exc:
            row["step_us_error"] = _err(exc)
    # host syncs in a loop, then the loop in a CUDA graph
    if dev.type == "cuda":
        try:
            row["syncs"], sources = timing.count_syncs(impl.prepare, impl.run, dev)
            if sources:
                row["sync_sources"] = sources
        except Exception as exc:
            row["syncs_error"] = _err(exc)
        if impl.graph_reason is not None:
            row["graph_us_error"] = impl.graph_reason
        else:
            try:
                row["graph_us"] = timing.graph_loop_us(impl.prepare, impl.run, steps, dev, replays=settings["replays"])
            except Exception as exc:
                row["graph_us_error"] = f"capture failed: {_err(exc)}"
                try:
                    torch.cuda.synchronize(dev)
                except Exception as sync_exc:  # a broken capture can leave an error behind; record it too
                    row["graph_us_error"] += f"; then {_err(sync_exc)}"

    else:
        row["graph_us_error"] = "CUDA graphs need a CUDA device"
    # the final state of a plain loop, for the agreement check
    try:
        impl.prepare()
        impl.run()
    except Exception:
        impl.final = None
    return row


RATIO_MEASURES = ("device_us", "host_us", "graph_us")


def add_ratios(record: dict) -> None:
    """Speed-ups of every fastflow backend over every baseline, per measure, from figures of this one run."""
    impls = record["impls"]
    ratios: dict = {}
    for f in (n for n in impls if n.startswith("fastflow-")):
        for b in BASELINES:
            for m in RATIO_MEASURES:
                fv, bv = impls[f].get(m), impls.get(b, {}).get(m)
                if fv and bv:
                    ratios.setdefault(f, {}).setdefault(b, {})[m] = bv / fv
    record["ratios"] = ratios


def measure_case(case: Case, impl_names: list[str], compile_ok: bool, settings: dict, copy_gbs: float,
                 deadline: float) -> dict:
    sampler = case.family.sampler(case.steps, "torch")
    bpe = step_bytes_per_element(sampler, case.stage, case.state_dtype, case.model_dtype)
    floor_us = bpe * case.elements / (copy_gbs * 1e9) * 1e6 if copy_gbs else None
    record: dict = {
        "family": case.family.name, "kind": case.family.kind, "shape": list(case.shape), "size": case.label,
        "elements": case.elements, "state_dtype": str(case.state_dtype).removeprefix("torch."),
        "model_dtype": str(case.model_dtype).removeprefix("torch."), "steps": case.steps, "stage": case.stage,
        "bytes_per_element": bpe, "floor_us": floor_us, "impls": {},
    }
    finals: dict[str, torch.Tensor] = {}
    for name in impl_names:
        if time.monotonic() > deadline:
            record["impls"][name] = {"skipped": "time budget spent"}
            continue
        if name == "compile" and not compile_ok:
            record["impls"][name] = {"skipped": "not compiled in this run (see --compile-families)"}
            continue
        try:
            impl = make_impl(name, case)
            record["impls"][name] = measure_impl(impl, case, settings, bpe, copy_gbs)
            if impl.final is not None:
                finals[name] = impl.final
            del impl
        except Exception as exc:
            record["impls"][name] = {"skipped": f"failed: {_err(exc)}"}
            traceback.print_exc()
        if case.device.type == "cuda":
            torch.cuda.empty_cache()
    # agreement with fastflow's torch reference (same grid): deterministic families only
    ref = finals.get("fastflow-torch")
    if ref is not None and not case.family.stochastic:
        for name, z in finals.items():
            if name not in ("fastflow-torch", "diffusers", "fastflow-dropin") and z.shape == ref.shape:
                record["impls"][name]["rel_err_vs_torch"] = _rel_err(z, ref)
    add_ratios(record)
    return record


# ----------------------------------------------------------------------------- the run
def run(args: argparse.Namespace) -> dict:
    start = time.monotonic()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if cuda and device.index is None:  # tensors report cuda:N; keep every cache keyed the same way
        device = torch.device("cuda", torch.cuda.current_device())
    quick = args.quick
    sizes = args.sizes or (list(SIZES) if cuda else list(QUICK_CPU_SIZES if quick else SIZES[:2]))
    families = args.families or list(FAMILIES)
    impl_names = args.backends or list(IMPL_NAMES)
    if args.compile_families is not None:
        compile_families = set(args.compile_families)
    elif quick:
        compile_families = set(QUICK_COMPILE if cuda else QUICK_COMPILE_CPU)
    else:
        compile_families = set(FAMILIES)
    steps = args.steps or (10 if quick else 30)
    settings = {
        "quick": quick,
        "steps": steps,
        "device_budget_s": 0.02 if quick else 0.2,
        "min_reps": 10 if quick else 50,
        "max_reps": 100 if quick else 500,
        "loop_reps": 3 if quick else 10,
        "loop_budget_s": 0.02 if quick else 0.1,  # more loops while they take less (fast loops jitter most)
        "replays": 3 if quick else 10,
        "budget_s": args.budget,
    }
    deadline = start + args.budget if args.budget else float("inf")
    info = machine_info(device)
    out = args.out or default_out(info["card"])
    out.mkdir(parents=True, exist_ok=True)
    naive_check = naive_agreement()
    copy_gbs, copy_bytes = timing.copy_bandwidth_gbs(device)
    print(f"benchmarks: {info['card']} ({device}), copy bandwidth {copy_gbs:.0f} GB/s; writing {out}", flush=True)
    results: dict = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": info,
        "settings": settings,
        "copy": {"gbs": copy_gbs, "buffer_bytes": copy_bytes},
        "naive_check": naive_check,
        "cases": [],
        "skipped": [],
    }
    # The anchor sizes first, so a run cut short by its budget still has them.
    ranked = sorted(sizes, key=lambda s: PRIORITY.index(s) if s in PRIORITY else len(PRIORITY))
    work: list[tuple[tuple[int, ...], str, torch.dtype]] = [
        (s, f, torch.bfloat16) for s in ranked for f in families
    ]
    if not args.no_fp16:
        largest = max(sizes, key=lambda s: torch.Size(s).numel())
        fp16_families = ["ddim"] if quick else families
        work += [(largest, f, torch.float16) for f in fp16_families if f in families]
    for shape, fam, mdt in work:
        label = f"{fam} {'x'.join(map(str, shape))} {str(mdt).removeprefix('torch.')}"
        if time.monotonic() > deadline:
            results["skipped"].append({"case": label, "reason": "time budget spent"})
            continue
        t0 = time.monotonic()
        try:
            case = Case(FAMILIES[fam], shape, torch.float32, mdt, device, steps)
            record = measure_case(case, impl_names, fam in compile_families, settings, copy_gbs, deadline)
            record["wall_s"] = round(time.monotonic() - t0, 2)
            results["cases"].append(record)
            del case
        except Exception as exc:
            results["skipped"].append({"case": label, "reason": _err(exc)})
            traceback.print_exc()
        print(f"  {label}: {time.monotonic() - t0:.1f} s", flush=True)
        report.write_all(results, out, plot=False)
    if not args.no_e2e:
        results["e2e"] = run_e2e(out / "e2e")
    results["wall_s"] = round(time.monotonic() - start, 1)
    report.write_all(results, out, plot=True)
    print(f"benchmarks: done in {results['wall_s']} s; {out / 'results.md'}", flush=True)
    return results


def run_e2e(out: Path) -> dict:
    """The end-to-end loop benchmark of ``benchmarks.e2e_graph`` when it exists, else the reason it was skipped."""
    if importlib.util.find_spec("benchmarks.e2e_graph") is None:
        return {"skipped": "benchmarks.e2e_graph is not present"}
    try:
        module = importlib.import_module("benchmarks.e2e_graph")
        main_fn = getattr(module, "main", None)
        if main_fn is None:
            return {"skipped": "benchmarks.e2e_graph has no main(out_dir)"}
        out.mkdir(parents=True, exist_ok=True)
        result = main_fn(out)
        return {"out": str(out), "result": result if _jsonable(result) else repr(result)}
    except SystemExit as exc:  # it exits, saying why, when it cannot run (no GPU, no diffusers)
        return {"skipped": f"e2e skipped: {exc}"}
    except Exception as exc:
        traceback.print_exc()
        return {"skipped": f"e2e failed: {_err(exc)}"}


def _jsonable(x: object) -> bool:
    try:
        json.dumps(x)
        return True
    except (TypeError, ValueError):
        return False


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0
