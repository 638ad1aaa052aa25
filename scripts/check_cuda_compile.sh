#!/usr/bin/env bash
# CI check: the CUDA sources of fastflow._C compile, without a GPU or a CUDA torch.
#
# 1. csrc/step_kernel.cu with plain nvcc for sm_90 (or the archs in
#    FASTFLOW_CUDA_ARCHS, e.g. "80;90"), warnings as errors, and no register spills
#    in the kernels.
# 2. benchmarks/cuda_step_variants.cu (the kernel variant benchmark) compiled.
# 3. csrc/step_cuda.cpp (the at::Tensor launcher) syntax-checked with the host
#    compiler against the installed torch's headers, when torch is importable (a
#    CPU torch wheel ships the c10/cuda headers but not one generated config
#    header, which is stubbed here).
# Skips (exit 0) with a message when nvcc is absent.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
[ -x "$NVCC" ] || NVCC="$(command -v nvcc || true)"
if [ -z "$NVCC" ]; then
  echo "check_cuda_compile: nvcc not found; skipping the CUDA compile check"
  exit 0
fi
CUDA_ROOT="$(cd "$(dirname "$NVCC")/.." && pwd)"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

ARCHS="${FASTFLOW_CUDA_ARCHS:-90}"
GENCODE=()
for a in ${ARCHS//[;,]/ }; do
  a="${a#sm_}"; a="${a//./}"
  GENCODE+=("-gencode=arch=compute_${a},code=sm_${a}")
done

echo "check_cuda_compile: $("$NVCC" --version | tail -1)"
echo "check_cuda_compile: nvcc ${GENCODE[*]} -c csrc/step_kernel.cu"
"$NVCC" "${GENCODE[@]}" -O3 -std=c++17 -Werror all-warnings -Xptxas -v \
  -c "$ROOT/csrc/step_kernel.cu" -o "$TMP/step_kernel.o" 2> "$TMP/ptxas.log" || {
  cat "$TMP/ptxas.log"
  exit 1
}
grep -E "registers|spill" "$TMP/ptxas.log" | sed 's/^/  /'
# At most 16 bytes of spills a kernel: ptxas gives the drawing plans that write the
# next model input in items of 8 (csrc/step_plans.h) 64 registers and a 12-byte
# spill, and those kernels measured faster than their spill-free 4-element form.
if grep -E "([2-9][0-9]|1[7-9]|[0-9]{3,}) bytes spill (stores|loads)" "$TMP/ptxas.log" > /dev/null; then
  echo "check_cuda_compile: a kernel spills more than 16 bytes of registers" >&2
  exit 1
fi

# Every step kernel keeps its vector loads and stores (NVVM once split the stores of
# the 8-element kernels into scalar ones, which halved their bandwidth): 16-byte
# float32 ones; in the plans whose state is 16-bit (DrawPlan or DtypePlan<kBFloat16
# or kFloat16, ...>), 8-byte ones (the drawing plans with x_hat: 4-element items) or
# 16-byte ones of 32-bit words (8-element items: the deterministic kernel's and the
# drawing plans without x_hat).
FIRST_ARCH="${GENCODE[0]#*arch=compute_}"; FIRST_ARCH="${FIRST_ARCH%%,*}"
"$NVCC" -arch="compute_${FIRST_ARCH}" -O3 -std=c++17 -ptx "$ROOT/csrc/step_kernel.cu" -o "$TMP/step_kernel.ptx"
KERNELS=0
while IFS= read -r entry; do
  body="$(awk -v e="$entry" '/\.entry / {f = index($0, e "(") > 0; next} f' "$TMP/step_kernel.ptx")"
  ops=("ld.global.v4.f32" "st.global.v4.f32")
  [[ $entry =~ DrawPlanILi[12]E ]] && ops=("ld.global.v2.u32" "st.global.v2.b32")
  [[ $entry =~ DrawPlanILi[12]ELi[12]ELin1E ]] && ops=("ld.global.v4.u32" "st.global.v4.b32")
  [[ $entry =~ DtypePlanILi[12]E ]] && ops=("ld.global.v4.u32" "st.global.v4.b32")
  for op in "${ops[@]}"; do
    if ! grep -q "$op" <<< "$body"; then
      echo "check_cuda_compile: $entry has no $op (vector accesses were split)" >&2
      exit 1
    fi
  done
  KERNELS=$((KERNELS + 1))
done < <(grep -oE "\.entry [A-Za-z0-9_]*fused_step_kernel[A-Za-z0-9_]*" "$TMP/step_kernel.ptx" | awk '{print $2}')
if ((KERNELS == 0)); then
  echo "check_cuda_compile: no fused_step_kernel entry in the PTX" >&2
  exit 1
fi
echo "check_cuda_compile: $KERNELS step kernels keep their vector loads and stores"

# The standalone GPU programs (run on GPU machines only) compile too, so an error there
# cannot cost a GPU run: the kernel variant and A/B benchmarks, the noise math check.
for program in benchmarks/cuda_step_variants.cu benchmarks/cuda_kernel_ab.cu scripts/check_noise_math.cu; do
  echo "check_cuda_compile: nvcc -c $program"
  "$NVCC" -arch="sm_${FIRST_ARCH}" -O3 -std=c++17 -I"$ROOT/csrc" -c "$ROOT/$program" -o "$TMP/program.o"
done

PYTHON="${PYTHON:-python}"
if INCLUDES="$("$PYTHON" -c 'import sysconfig, torch.utils.cpp_extension as c
print(" ".join("-I" + p for p in [*c.include_paths(), sysconfig.get_paths()["include"]]))' 2> /dev/null)"; then
  mkdir -p "$TMP/stub/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$TMP/stub/c10/cuda/impl/cuda_cmake_macros.h"
  echo "check_cuda_compile: syntax check of csrc/step_cuda.cpp against torch's headers"
  # shellcheck disable=SC2086
  "${CXX:-g++}" -std=c++20 -fsyntax-only -DFASTFLOW_WITH_CUDA -DTORCH_EXTENSION_NAME=_C $INCLUDES -idirafter "$TMP/stub" \
    -I"$CUDA_ROOT/include" -I"$ROOT/csrc" "$ROOT/csrc/step_cuda.cpp" "$ROOT/csrc/ops.cpp"
else
  echo "check_cuda_compile: torch not importable; skipping the launcher syntax check"
fi
echo "check_cuda_compile: OK"
