#!/usr/bin/env bash
# shellcheck disable=SC2317  # the phase functions run through `bash -c` under timeout
# One check of a fresh GPU machine, in one go: carried wheels, the C++/CUDA build,
# the GPU tests, the step benchmarks and the end-to-end benchmark.
#
#   OUT=/some/dir bash scripts/gpu_check.sh        (OUT defaults to ./gpu_out)
#
# Knobs: GPU_CHECK_BUDGET (seconds, default 440), BENCH_ARGS (default --quick --steps 30, the settings of the
# committed results),
# FASTFLOW_CUDA_ARCHS (default 90), CUDA_HOME (default /usr/local/cuda), PYTHON,
# GPU_TESTS (the pytest paths of the GPU test phase, default all of tests/),
# GPU_CHECK_E2E (1 runs the end-to-end phase, off by default: its figures change with the models, not with a
# step, and the host phase needs its time), GPU_CHECK_VARIANTS (0 skips the kernel variants),
# KERNEL_AB_BASE (another checkout whose CUDA kernels scripts/kernel_ab.sh times against
# this one's: kernel_ab.md), and AB_BASE: another checkout (e.g.
# `git archive OLD | tar -x -C .ab_base`, carried along) whose extension is built and
# whose fastflow step benchmarks run on this machine just before this tree's;
# bench/compare.md then has new / base per case.
#
# Run from a copy of the repository with the git-ignored .whl/ folder carried
# along (the machine has no network): diffusers' wheel, and transformers' with
# its tokenizers, regex and typer chain for the Stable Diffusion pipeline tests. Everything it writes
# lands under $OUT: summary.log (one line per phase: exit code and seconds),
# versions.txt, nvidia-smi.txt, wheels.log, noise_math.log, kernel_ab.md, build.log, gpu_tests.log, variants.md (the CUDA
# kernel's variant benchmark), bench.log, bench/ (results.json, results.md, bandwidth.png),
# host.log (host time per layer of a step call), profile_dropin.md (what a drop-in step calls), e2e.log, e2e/.
#
# Each phase has its own time limit and a failing phase never stops the next
# one. Limits shrink so the whole script ends within GPU_CHECK_BUDGET seconds
# (default 440: 7 min 20 s) even when every phase runs to its limit:
# noise math <= 60 s, kernel A/B <= 120 s, build <= 150 s, tests <= 170 s, kernel variants <= 90 s,
# benchmarks <= 150 s, host overhead <= 100 s, end to end <= 90 s.
set -u -o pipefail

cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-440}
T0=$(date +%s)
export PYTHONUNBUFFERED=1
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export FASTFLOW_CUDA_ARCHS=${FASTFLOW_CUDA_ARCHS:-90}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export ROOT OUT PY
[ -n "${BENCH_ARGS+x}" ] && export BENCH_ARGS

log() { echo "[gpu_check +$(($(date +%s) - T0))s] $*" | tee -a "$OUT/summary.log"; }

# Seconds a phase may take: its cap, but never eating the time reserved for the phases after it.
limit_for() {
    local cap=$1 reserve=$2 left
    left=$((T0 + BUDGET - $(date +%s) - reserve))
    ((left < cap)) && cap=$left
    echo "$cap"
}

# The --budget of a benchmark run: its phase's limit less a margin for writing results, at least 10 s (0 would mean
# no deadline to benchmarks/run.py, a negative one would skip every case).
bench_budget() {
    local b=$((PHASE_LIMIT - $1))
    ((b < 10)) && b=10
    echo "$b"
}
export -f bench_budget

# phase NAME CAP RESERVE COMMAND...: run COMMAND under its limit, teeing to $OUT/NAME.log.
phase() {
    local name=$1 cap=$2 reserve=$3 lim start rc
    shift 3
    lim=$(limit_for "$cap" "$reserve")
    if ((lim < 15)); then
        log "phase $name: skipped (only ${lim}s left of the ${BUDGET}s budget)"
        return 0
    fi
    log "phase $name: start (limit ${lim}s)"
    start=$(date +%s)
    # COMMAND is an exported shell function: run it in a child bash that timeout can kill as a group.
    PHASE_LIMIT=$lim timeout -k 5 "$lim" bash -c "$*" 2>&1 | tee "$OUT/$name.log"
    rc=$?
    local took=$(($(date +%s) - start))
    if ((rc == 124 || rc == 137)); then
        log "phase $name: TIMED OUT after ${took}s (rc $rc)"
    elif ((rc != 0)); then
        log "phase $name: FAILED rc $rc after ${took}s"
    else
        log "phase $name: ok in ${took}s"
    fi
    return 0
}

: >"$OUT/summary.log"
log "repository $ROOT, output $OUT, budget ${BUDGET}s, python $(command -v "$PY")"

# 0. machine and versions (cheap; first, so they exist whatever happens later)
{
    timeout 30 nvidia-smi || echo "nvidia-smi failed"
    timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit \
        --format=csv || true
} >"$OUT/nvidia-smi.txt" 2>&1
versions() {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(hostname)  cores: $(nproc)"
    # Tracked files that differ from HEAD: nonzero when the copy's git metadata is older than its files.
    echo "commit: $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)" \
        "($(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null | wc -l) tracked files differ from it)"
    "$PY" --version
    "$CUDA_HOME/bin/nvcc" --version 2>/dev/null | tail -n 2 || echo "nvcc: not found under $CUDA_HOME"
    "$PY" - <<'EOF'
import importlib
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
for name in ("triton", "diffusers", "transformers", "numpy", "pytest", "pytest_benchmark", "pytest_timeout", "matplotlib",
             "huggingface_hub", "safetensors"):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "__version__", "?"), getattr(m, "__file__", ""))
    except Exception as exc:
        print(name, "MISSING", type(exc).__name__, exc)
EOF
}

# 1. carried wheels (pure Python, e.g. diffusers) into /tmp/site, first on the path
install_wheels() {
    shopt -s nullglob
    local wheels=("$ROOT"/.whl/*.whl)
    if ((${#wheels[@]} == 0)); then
        echo "no wheels under .whl/: nothing to install"
        return 0
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}"
}
export -f install_wheels
phase wheels 60 0 install_wheels
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site:$PYTHONPATH
export -f versions
timeout -k 5 60 bash -c versions >"$OUT/versions.txt" 2>&1 || echo "versions: rc $?" >>"$OUT/versions.txt"
cat "$OUT/versions.txt"

# 3a's standalone benchmark compiles in the background from here on (nvcc takes about a minute for it,
# which the variants phase would otherwise spend of its own time limit).
compile_variants() {
    "$CUDA_HOME/bin/nvcc" -O3 -std=c++17 -arch=sm_90 -Icsrc benchmarks/cuda_step_variants.cu -o /tmp/variants \
        >"$OUT/variants_build.log" 2>&1
    echo $? >/tmp/variants.rc
}
rm -f /tmp/variants.rc
compile_variants &

# 1a. the noise transform's radius functions against the CUDA math library, every input (standalone)
noise_math() {
    "$CUDA_HOME/bin/nvcc" -O3 -std=c++17 -arch=sm_90 -Icsrc scripts/check_noise_math.cu -o /tmp/check_noise_math &&
        /tmp/check_noise_math
}
export -f noise_math
phase noise_math 60 300 noise_math

# 1b. optional kernel A/B: KERNEL_AB_BASE, another checkout (e.g. `git archive OLD | tar -x -C .ab_base`,
# carried along), against this one's CUDA step kernels, side by side (scripts/kernel_ab.sh)
kernel_ab() {
    bash scripts/kernel_ab.sh "base=$KERNEL_AB_BASE" "new=$ROOT" | tee "$OUT/kernel_ab.md"
    return "${PIPESTATUS[0]}"
}
export -f kernel_ab
if [ -n "${KERNEL_AB_BASE:-}" ] && [ -d "$KERNEL_AB_BASE/csrc" ]; then
    export KERNEL_AB_BASE
    phase kernel_ab 120 250 kernel_ab
fi

# 2. the extension, built in place (fastflow/_C*.so), for sm_90 (H100 and H200)
build() {
    local s
    s=$(date +%s)
    "$PY" setup.py build_ext --inplace || return $?
    echo "build time: $(($(date +%s) - s)) s"
    "$PY" -c "import fastflow, json; print('backends:', json.dumps(fastflow.backend_report()))"
}
export -f build
phase build 150 190 build

# 3. the GPU tests (per-test timeout when pytest-timeout is there)
gpu_tests() {
    local extra=()
    if "$PY" -c "import pytest_timeout" 2>/dev/null; then extra+=(--timeout=90); fi
    # No -x: one failing file must not hide the others' results. Kernels first, then the rest.
    local paths=(tests/kernels tests/csrc tests/backends tests/test_graph.py tests/graph_pipeline
        tests/diffusers tests)
    # shellcheck disable=SC2206  # GPU_TESTS is a list of words
    [ -n "${GPU_TESTS:-}" ] && paths=($GPU_TESTS)
    local rc=0
    "$PY" -m pytest -q -m gpu "${paths[@]}" -p no:cacheprovider -rfEs --maxfail=40 --durations=15 \
        --junitxml="$OUT/gpu_tests.xml" "${extra[@]}" || rc=$?
    # Not marked gpu (it also runs in the interpreter): the Triton angle evaluation on the device, every angle.
    "$PY" -m pytest -q tests/kernels/test_triton_step.py::test_angle_part_bit_exact_over_every_angle \
        -p no:cacheprovider -rfEs || rc=$?
    return "$rc"
}
export -f gpu_tests
phase gpu_tests 170 130 gpu_tests

# 3a. the CUDA step kernel's body under other launch shapes and specializations (standalone, no torch)
variants() {
    while [ ! -f /tmp/variants.rc ]; do sleep 1; done  # the background compile started before the build
    if [ "$(cat /tmp/variants.rc)" != 0 ]; then
        cat "$OUT/variants_build.log"
        return 1
    fi
    /tmp/variants | tee "$OUT/variants.md"
    return "${PIPESTATUS[0]}"
}
export -f variants
if [ "${GPU_CHECK_VARIANTS:-1}" = 0 ]; then
    log "phase variants: skipped (GPU_CHECK_VARIANTS=0)"
else
    phase variants 90 100 variants
fi

# 3b. optional A/B baseline: the other checkout's fastflow columns, same settings and machine
base_bench() {
    (cd "$AB_BASE" && "$PY" setup.py build_ext --inplace >"$OUT/base_build.log" 2>&1) || {
        echo "the base checkout's build failed: see base_build.log"
        return 1
    }
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of words
    (cd "$AB_BASE" && PYTHONPATH=${SITE:+$SITE:}$AB_BASE "$PY" -m benchmarks ${BENCH_ARGS---quick --steps 30} \
        --no-e2e --backends fastflow-triton fastflow-cuda fastflow-dropin --out "$OUT/bench_base" \
        --budget "$(bench_budget 60)")
}
if [ -n "${AB_BASE:-}" ] && [ -d "$AB_BASE" ]; then
    AB_BASE=$(cd "$AB_BASE" && pwd)
    SITE=$([ -d /tmp/site ] && echo /tmp/site)
    export AB_BASE SITE
    export -f base_bench
    phase base_bench 150 200 base_bench
fi

# 4. the step benchmarks (quick settings; they write results after every case)
# BENCH_ARGS replaces the default --quick --steps 30 (e.g. BENCH_ARGS="" for the full settings, given the time).
bench() {
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of words
    "$PY" -m benchmarks ${BENCH_ARGS---quick --steps 30} --no-e2e --out "$OUT/bench" --budget "$(bench_budget 20)"
}
export -f bench
# The host phase took 57-80 s in the committed runs, the end-to-end one 52-79 s: what the bench phase leaves them.
E2E_RESERVE=$([ "${GPU_CHECK_E2E:-0}" = 1 ] && echo 85 || echo 0)
phase bench 150 $((85 + E2E_RESERVE)) bench
if [ -f "$OUT/bench_base/results.json" ] && [ -f "$OUT/bench/results.json" ]; then
    "$PY" benchmarks/compare.py "$OUT/bench_base/results.json" "$OUT/bench/results.json" \
        --out "$OUT/bench/compare.md" >/dev/null 2>&1 || log "compare: failed"
fi

# 4b. the host time of each layer of a step call on CUDA tensors (benchmarks/test_host_overhead.py):
# where the per-step host time goes; and the 30-step Sampler loop at (1,16,128,128) over many rounds
host() {
    FASTFLOW_HOST_BENCH_DEVICE=cuda "$PY" -m pytest benchmarks/test_host_overhead.py --benchmark-only -q \
        -p no:cacheprovider -k "entry or sampler_step or dropin or sd_latent" --benchmark-max-time=0.25 \
        --benchmark-columns=median,iqr,rounds
    # What a drop-in step calls on CUDA tensors, and how often (Python's profiler; its times are inflated).
    "$PY" benchmarks/profile_dropin.py --device cuda --loops 100 DDIMScheduler DDPMScheduler \
        EulerDiscreteScheduler EulerAncestralDiscreteScheduler LCMScheduler TCDScheduler \
        >"$OUT/profile_dropin.md" || echo "profile_dropin: rc $?"
}
export -f host
phase host 100 "$E2E_RESERVE" host

# 5. end to end: a small model's whole sampling loop, diffusers vs fastflow eager vs captured
e2e() {
    "$PY" -c "import sys, benchmarks.e2e_graph as m; m.main(sys.argv[1])" "$OUT/e2e"
}
if [ "${GPU_CHECK_E2E:-0}" != 1 ]; then
    log "phase e2e: skipped (GPU_CHECK_E2E=1 runs it)"
elif [ -f "$ROOT/benchmarks/e2e_graph.py" ]; then
    mkdir -p "$OUT/e2e"
    export -f e2e
    phase e2e 90 5 e2e
else
    log "phase e2e: skipped (benchmarks/e2e_graph.py is not present)"
fi

log "done in $(($(date +%s) - T0))s"
exit 0
