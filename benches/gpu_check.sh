#!/usr/bin/env bash
# The one command a GPU machine (H100/H200) runs, from the repository root:
#   bash benches/gpu_check.sh
# It needs torch, triton, transformers and pytest installed and no network. It
# runs the test suite on CUDA (the kernels for real, no interpreter), the
# ahead-of-time kernel check, and the GPU benchmarks, then judges the GPU
# targets. Logs and JSON go to $OUT (default ./bench-results). Under 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./bench-results}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
export TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET FASTFT_BACKEND

# fastft without installing it: a folder where kernels/ and csrc/ sit inside the package
if ! "$PY" -c "import fastft.kernels" 2>/dev/null; then
  SHADOW="$(mktemp -d)"
  mkdir "$SHADOW/fastft"
  for f in fastft/*; do ln -s "$PWD/$f" "$SHADOW/fastft/"; done
  ln -s "$PWD/kernels" "$SHADOW/fastft/kernels"
  ln -s "$PWD/csrc" "$SHADOW/fastft/csrc"
  export PYTHONPATH="$SHADOW${PYTHONPATH:+:$PYTHONPATH}"
fi

declare -A RC SECS
step() {  # step NAME TIMEOUT_S CMD...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  RC[$name]=$?
  SECS[$name]=$((SECONDS - t0))
  tail -n 25 "$OUT/$name.log"
  echo "== $name: exit ${RC[$name]} in ${SECS[$name]}s"
}

nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
# Budget, 8 minutes in all: tests 165 s, benchmarks 205 s (the kernel suites 135 s, the
# whole-step suite 70 s: two Llama-3-8B-wide layers; each case is stored as soon as it is
# measured, so a cut-short run keeps its rows), the profile against max_memory_allocated
# 20 s, the compile check 60 s.
step info 20 "$PY" -m fastft.cli info
step tests 165 env FASTFT_TEST_DEVICE=cuda "$PY" -m pytest -q -m "not slow" tests \
  --junitxml="$OUT/tests.xml"
step bench 135 "$PY" -m fastft.cli bench --suite losses,lora,quant,sparse --device cuda \
  --out "$OUT/bench"
step bench-step 70 "$PY" -m fastft.cli bench --suite step --device cuda --out "$OUT/bench"
step profile 20 "$PY" benches/profile_check.py --device cuda --out "$OUT/profile"
step targets 10 "$PY" benches/gpu_targets.py "$OUT/bench/results.json" "$OUT/targets.json"
step check-kernels 60 "$PY" -m fastft.cli check-kernels --arch sm_90,sm_80

{
  echo "{"
  first=1
  for k in info tests bench bench-step profile targets check-kernels; do
    [ $first -eq 1 ] || echo ","
    first=0
    printf '  "%s": {"exit": %s, "seconds": %s}' "$k" "${RC[$k]:-null}" "${SECS[$k]:-null}"
  done
  echo
  echo "}"
} >"$OUT/summary.json"
cat "$OUT/summary.json"
for k in tests check-kernels bench bench-step; do [ "${RC[$k]}" = 0 ] || exit 1; done
exit 0
