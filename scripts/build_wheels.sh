#!/usr/bin/env bash
# Build fastflow's wheels into dist/ (see docs/wheels.md).
#
#   scripts/build_wheels.sh                     pure wheel + binary wheel for the current python's torch
#   scripts/build_wheels.sh --pure              only fastflow-<ver>-py3-none-any.whl (no extension)
#   scripts/build_wheels.sh --binary            only the binary wheel for the current python's torch
#   scripts/build_wheels.sh --cuda 13.0         binary wheel in a throwaway venv with a CUDA 13.0 torch
#   scripts/build_wheels.sh --cuda 13.0 --nvcc-from-pip    same, nvcc from PyPI instead of /usr/local/cuda
#   TORCH_SPEC=... TORCH_INDEX_URL=... CUDA_HOME=/usr/local/cuda-12.8 scripts/build_wheels.sh --cuda 12.8
#
# Options: --out DIR (default dist/), --archs "9.0;8.0" (CUDA archs, default 9.0), --python PY
# (the interpreter for --binary, default python3 on PATH), --venv DIR (throwaway venv for --cuda,
# default build/venv-cuXY; reused when its torch already fits).
# Environment: TORCH_SPEC (torch requirement for --cuda; default torch==2.14.1 for 13.0, none for 12.x),
# TORCH_INDEX_URL (extra index for that torch, e.g. the PyTorch cu128 index), CUDA_HOME (toolkit,
# default /usr/local/cuda), FASTFLOW_SKIP_CUDA_BUILD=1 (binary wheel with the CPU kernel only),
# FASTFLOW_LOCAL_VERSION (replaces the local version label setup.py gives the binary wheel, such as
# cpu.torch2.13; none: no label), FASTFLOW_DEBUG=1 (keep debug info in the extension),
# MAX_JOBS (parallel compile jobs, default nproc).
#
# Every build runs on a copy of the sources (tracked and untracked, not ignored files), so the
# checkout's own extension build and fastflow/_build_info.py are never overwritten and no stray
# build output can end up inside a wheel.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/dist"
PY="${PYTHON:-python3}"
ARCHS="${FASTFLOW_CUDA_ARCHS:-9.0}"
CUDA_VER=""
VENV=""
NVCC_FROM_PIP=0
DO_PURE=0
DO_BINARY=0

# The header comment above, as help text.
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }

while (($#)); do
  case "$1" in
    --pure) DO_PURE=1 ;;
    --binary) DO_BINARY=1 ;;
    --cuda) CUDA_VER="$2"; shift ;;
    --archs) ARCHS="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    --python) PY="$2"; shift ;;
    --venv) VENV="$2"; shift ;;
    --nvcc-from-pip) NVCC_FROM_PIP=1 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "build_wheels: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
# No selection: the two wheels every release has.
if ((DO_PURE == 0 && DO_BINARY == 0)) && [ -z "$CUDA_VER" ]; then
  DO_PURE=1
  DO_BINARY=1
fi

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

say() { echo "build_wheels: $*" >&2; }
die() { say "error: $*"; exit 1; }

# A fresh copy of the sources under $TMP/src-NAME; prints its path.
stage_source() {
  local dst="$TMP/src-$1"
  mkdir -p "$dst"
  if git -C "$ROOT" rev-parse --is-inside-work-tree > /dev/null 2>&1; then
    (cd "$ROOT" && git ls-files -z -co --exclude-standard | while IFS= read -r -d '' f; do
      # Files deleted in the work tree but still tracked are skipped.
      [ -e "$f" ] && printf '%s\0' "$f"
    done | xargs -0 cp --parents -t "$dst")
  else
    (cd "$ROOT" && tar --exclude=.git --exclude=.venv --exclude=build --exclude=dist \
      --exclude='*.so' --exclude=fastflow/_build_info.py -cf - .) | tar -C "$dst" -xf -
  fi
  echo "$dst"
}

# The one wheel a build wrote into DIR (fails unless there is exactly one).
only_wheel() {
  local wheels=("$1"/*.whl)
  if [ "${#wheels[@]}" -ne 1 ] || [ ! -f "${wheels[0]}" ]; then
    die "expected one wheel in $1, found: ${wheels[*]}"
  fi
  echo "${wheels[0]}"
}

# Print the BUILD_INFO dict a wheel carries (fails when it has none).
wheel_build_info() {
  "$PY" - "$1" << 'EOF'
import ast, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    text = z.read("fastflow/_build_info.py").decode()
print(ast.literal_eval(text.split("BUILD_INFO = ", 1)[1].strip()))
EOF
}

wheel_has_so() { "$PY" -c 'import sys, zipfile; sys.exit(not any(n.endswith(".so") for n in zipfile.ZipFile(sys.argv[1]).namelist()))' "$1"; }

# Move a checked wheel to $OUT (replacing one of the same name) and report it.
publish() {
  local whl="$1" t0="$2"
  mv -f "$whl" "$OUT/"
  say "built $OUT/$(basename "$whl") ($(du -h "$OUT/$(basename "$whl")" | cut -f1), $(($(date +%s) - t0)) s)"
  echo "$OUT/$(basename "$whl")"
}

build_pure() {
  local t0 src dir whl info
  t0=$(date +%s)
  src="$(stage_source pure)"
  dir="$TMP/pure"
  say "pure wheel: isolated build (torch is not importable there, so no extension)"
  # Build isolation is the point: the build environment has setuptools and wheel only.
  env -u FASTFLOW_LOCAL_VERSION "$PY" -m pip wheel -q --no-deps --no-cache-dir -w "$dir" "$src" >&2
  whl="$(only_wheel "$dir")"
  case "$(basename "$whl")" in
    fastflow-*-py3-none-any.whl) ;;
    *) die "pure wheel has the wrong tag: $(basename "$whl")" ;;
  esac
  ! wheel_has_so "$whl" || die "pure wheel contains a compiled module"
  info="$(wheel_build_info "$whl")"
  [[ "$info" == *"'extension': False"* ]] || die "pure wheel's build info claims an extension: $info"
  say "pure wheel build info: $info"
  publish "$whl" "$t0"
}

# Binary wheel against the torch of interpreter $1. setup.py labels its version with what it is built for
# (cpu or cuXY, and the torch minor: +cpu.torch2.13, +cu130.torch2.14); this script only checks that label.
build_binary() {
  local py="$1" t0 src dir whl info meta torch_ver torch_cuda expect label
  t0=$(date +%s)
  meta="$("$py" -c 'import torch, setuptools; print(torch.__version__, torch.version.cuda or "none")')" ||
    die "$py cannot import torch and setuptools (the binary wheel is built against the installed torch)"
  read -r torch_ver torch_cuda <<< "$meta"
  local nvcc="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
  [ -x "$nvcc" ] || nvcc="$(command -v nvcc || true)"
  # What the wheel's kernels will need: cpu, or the CUDA major.minor of torch (cu130, cu128).
  if [ "$torch_cuda" = none ] || [ "${FASTFLOW_SKIP_CUDA_BUILD:-0}" != 0 ]; then
    expect=cpu
  elif [ -z "$nvcc" ]; then
    say "torch has CUDA $torch_cuda but nvcc is not found (set CUDA_HOME): building the CPU kernel only"
    expect=cpu
    export FASTFLOW_SKIP_CUDA_BUILD=1
  else
    expect="cu${torch_cuda//./}"
    local nvcc_ver
    nvcc_ver="$("$nvcc" --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')"
    # nvcc and torch must agree on the CUDA major (one libcudart in the process).
    [ "${nvcc_ver%%.*}" = "${torch_cuda%%.*}" ] ||
      die "nvcc $nvcc_ver ($nvcc) does not match torch's CUDA $torch_cuda: set CUDA_HOME"
    export CUDA_HOME="${CUDA_HOME:-$(cd "$(dirname "$nvcc")/.." && pwd)}"
    export FASTFLOW_CUDA_ARCHS="$ARCHS"
  fi
  src="$(stage_source "binary-$expect")"
  dir="$TMP/binary-$expect"
  say "binary wheel ($expect): torch $torch_ver (CUDA $torch_cuda), $py, archs ${FASTFLOW_CUDA_ARCHS:-none}"
  # No build isolation: the extension is compiled against this environment's torch.
  "$py" -m pip wheel -q --no-deps --no-build-isolation --no-cache-dir -w "$dir" "$src" >&2
  whl="$(only_wheel "$dir")"
  wheel_has_so "$whl" || die "binary wheel has no compiled extension"
  info="$(wheel_build_info "$whl")"
  [[ "$info" == *"'extension': True"* ]] || die "binary wheel's build info has no extension: $info"
  if [[ "$expect" == cu* ]] && [[ "$info" == *"'cuda': None"* ]]; then
    die "binary wheel for $expect was built without CUDA kernels: $info"
  fi
  label="$(basename "$whl" | sed -n 's/^fastflow-[^-+]*+\([^-]*\)-.*/\1/p')"
  # FASTFLOW_LOCAL_VERSION, when set, replaces setup.py's label (none: no label).
  if [ -z "${FASTFLOW_LOCAL_VERSION:-}" ] && [[ "$label" != "$expect".torch* ]]; then
    die "binary wheel $(basename "$whl") is not labelled +$expect.torchX.Y"
  fi
  say "binary wheel label: ${label:-none}; build info: $info"
  whl="$(repair "$whl" "$dir")"
  publish "$whl" "$t0"
}

# The libraries auditwheel must not copy into a binary wheel: torch's own, the OpenMP runtime torch's wheel
# brings (torch/lib/libgomp.so.1, which the extension's -fopenmp code must share: a grafted copy is a second
# OpenMP runtime in the process) and the CUDA runtime torch loads. tests/test_wheels.py reads this line.
REPAIR_EXCLUDES=('libtorch*.so' 'libc10*.so' 'libtorch_python.so' 'libgomp.so.*' 'libcudart.so.*')

# manylinux tag through auditwheel when it is installed; the libraries above are left out, since the
# wheel must use the ones torch loads.
repair() {
  local whl="$1" dir="$2" pattern excludes=()
  if ! command -v auditwheel > /dev/null; then
    say "auditwheel not found: keeping the linux_x86_64 platform tag"
    echo "$whl"
    return
  fi
  for pattern in "${REPAIR_EXCLUDES[@]}"; do excludes+=(--exclude "$pattern"); done
  mkdir -p "$dir/repaired"
  if auditwheel repair -w "$dir/repaired" "${excludes[@]}" "$whl" >&2; then
    only_wheel "$dir/repaired"
  else
    say "auditwheel repair failed: keeping the linux_x86_64 platform tag"
    echo "$whl"
  fi
}

# A CUDA toolkit directory (bin/, nvvm/, include/, lib64/) for CUDA_HOME, assembled in $2 from
# PyPI's CUDA 13 compiler packages installed into venv $1, which all unpack under nvidia/cu13/:
# for machines without a system toolkit. (PyPI's CUDA 12 package nvidia-cuda-nvcc-cu12 holds
# ptxas only, no nvcc driver or cudafe++, so CUDA 12 builds need a system toolkit.)
pip_cuda_home() {
  local vpy="$1" home="$2" major="${CUDA_VER%%.*}" site
  ((major >= 13)) || die "--nvcc-from-pip needs CUDA 13+: nvidia-cuda-nvcc-cu12 has no nvcc; set CUDA_HOME to a CUDA $CUDA_VER toolkit"
  "$vpy" -m pip install -q "nvidia-cuda-nvcc==$CUDA_VER.*" "nvidia-nvvm==$CUDA_VER.*" "nvidia-cuda-crt==$CUDA_VER.*" \
    "nvidia-cuda-cccl==$CUDA_VER.*" "nvidia-cuda-runtime==$CUDA_VER.*" >&2
  site="$("$vpy" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nvidia/cu$major"
  [ -x "$site/bin/nvcc" ] || die "no nvcc in $site/bin after installing nvidia-cuda-nvcc"
  rm -rf "$home"
  mkdir -p "$home/lib64"
  ln -s "$site/bin" "$home/bin"
  ln -s "$site/nvvm" "$home/nvvm"
  ln -s "$site/include" "$home/include"
  # torch links with -L$CUDA_HOME/lib64 -lcudart: the wheels have lib/ and only the versioned name.
  local f
  for f in "$site"/lib/*; do ln -s "$f" "$home/lib64/"; done
  [ -e "$home/lib64/libcudart.so" ] || ln -s "$site/lib/libcudart.so.$major" "$home/lib64/libcudart.so"
  echo "$home"
}

build_cuda() {
  local tag="cu${CUDA_VER//./}" t0 spec vpy
  t0=$(date +%s)
  VENV="${VENV:-$ROOT/build/venv-$tag}"
  spec="${TORCH_SPEC:-}"
  if [ -z "$spec" ]; then
    [ "$CUDA_VER" = 13.0 ] || die "set TORCH_SPEC (and TORCH_INDEX_URL) to a torch built for CUDA $CUDA_VER"
    spec="torch==2.14.1"
  fi
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  vpy="$VENV/bin/python"
  if ! "$vpy" -c "import sys, torch; sys.exit(torch.version.cuda != '$CUDA_VER')" 2> /dev/null; then
    say "installing $spec into $VENV"
    local extra=()
    [ -n "${TORCH_INDEX_URL:-}" ] && extra=(--extra-index-url "$TORCH_INDEX_URL")
    "$vpy" -m pip install -q "${extra[@]}" "setuptools>=77" wheel ninja numpy "$spec" >&2
  fi
  local have
  have="$("$vpy" -c 'import torch; print(torch.__version__, torch.version.cuda)')"
  say "venv torch: $have ($(($(date +%s) - t0)) s so far)"
  [ "${have#* }" = "$CUDA_VER" ] || die "torch in $VENV has CUDA ${have#* }, not $CUDA_VER"
  if ((NVCC_FROM_PIP)); then
    export CUDA_HOME
    CUDA_HOME="$(pip_cuda_home "$vpy" "$ROOT/build/cuda-$CUDA_VER")"
  else
    export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
  fi
  PATH="$VENV/bin:$PATH" build_binary "$vpy"
}

# Subshells: each build's exported settings (CUDA_HOME, FASTFLOW_SKIP_CUDA_BUILD) stay its own.
if ((DO_PURE)); then (build_pure); fi
if ((DO_BINARY)); then (build_binary "$PY"); fi
if [ -n "$CUDA_VER" ]; then (build_cuda); fi
say "done; wheels in $OUT:"
ls -l "$OUT"/*.whl >&2
