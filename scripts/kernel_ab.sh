#!/usr/bin/env bash
# Compare versions of the CUDA step kernels on one GPU, side by side in one run:
#
#   bash scripts/kernel_ab.sh base=/path/to/old/checkout new=.
#
# Each LABEL=DIR names a checkout whose csrc/ the driver benchmarks/cuda_kernel_ab.cu
# (this checkout's) is compiled against, all in parallel; then the drivers run in
# turn, ROUNDS times (default 2, the order reversed every other round). Prints a
# markdown table: per case, each version's median device times (us, one per round)
# and whether every version's outputs hashed the same (the kernels' bits agree).
# Needs nvcc (CUDA_HOME, default /usr/local/cuda) and a GPU; ARCH defaults to 90.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
ROUNDS="${ROUNDS:-2}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
(($# >= 1)) || { echo "usage: $0 LABEL=DIR [LABEL=DIR ...]" >&2; exit 2; }

labels=()
for spec in "$@"; do
  label="${spec%%=*}"
  dir="${spec#*=}"
  [ -d "$dir/csrc" ] || { echo "kernel_ab: $dir has no csrc/" >&2; exit 2; }
  labels+=("$label")
  "$NVCC" -O3 -std=c++17 -arch="sm_${ARCH:-90}" -I"$dir/csrc" "$ROOT/benchmarks/cuda_kernel_ab.cu" \
    -o "$TMP/ab_$label" > "$TMP/nvcc_$label.log" 2>&1 &
done
for label in "${labels[@]}"; do
  wait -n || { cat "$TMP"/nvcc_*.log >&2; exit 1; }
done

for ((r = 0; r < ROUNDS; ++r)); do
  order=("${labels[@]}")
  if ((r % 2)); then
    order=()
    for ((i = ${#labels[@]} - 1; i >= 0; --i)); do order+=("${labels[i]}"); done
  fi
  for label in "${order[@]}"; do "$TMP/ab_$label" "$label" >> "$TMP/rows.tsv"; done
done

python3 - "$TMP/rows.tsv" "${labels[@]}" <<'PY'
import sys
from collections import defaultdict

rows, labels = sys.argv[1], sys.argv[2:]
times, hashes, cases = defaultdict(list), defaultdict(set), []
for line in open(rows):
    label, case, us, digest = line.rstrip("\n").split("\t")
    if case not in cases:
        cases.append(case)
    times[(label, case)].append(float(us))
    hashes[case].add(digest)
print("| case | " + " | ".join(labels) + " | same outputs |")
print("|---" * (len(labels) + 2) + "|")
for case in cases:
    cells = [" / ".join(f"{t:.1f}" for t in times[(label, case)]) for label in labels]
    print(f"| {case} | " + " | ".join(cells) + f" | {'yes' if len(hashes[case]) == 1 else 'NO'} |")
PY
