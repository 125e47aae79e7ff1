#!/usr/bin/env bash
# The device check, from the repository root, on a machine with one NVIDIA GPU:
#   bash benches/gpu_check.sh            measures, in this order, what users buy fastft for
#   bash benches/gpu_check.sh --dry-run  every step on the CPU at a tiny size (a rehearsal:
#                                        tests/bench/test_gpu_check.py runs it)
# Needs torch, triton, transformers (peft, liger-kernel, trl where installed) and no network.
# Budget: at most ~7 minutes of command time, so that a rerun fits in a 15-minute lease:
#   versions + a background nvidia-smi sampler  5 s
#   step     the whole LoRA SFT step: fastft, transformers+PEFT, +Liger    100 s
#   losses   the loss head: CE, GRPO, OTR (head trained and frozen)       100 s
#   kernels  LoRA, Hadamard / fake-quant, SparseAdamW                     100 s
#   kprof    a kernel-profiler table of the loss head's cases             25 s
#   tests    only the test files of fixes no GPU has run yet (GPU_TESTS)  50 s
#   profile  fastft.profile's peak against torch.cuda.max_memory_allocated 30 s
#   targets  benches/gpu_targets.py over every result                     10 s
# Each step writes its JSON as it ends (the bench suites after every case), and
# summary.json is rewritten after every step: a run cut short keeps what it measured.
# No C++/CPU extension build and no ahead-of-time check here (CI does both); every input
# is generated on the device. Logs and JSON go to $OUT (default bench-results/gpu-check).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT="${OUT:-./bench-results/gpu-check}"
mkdir -p "$OUT"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if command -v python >/dev/null 2>&1; then PY=python; else PY=python3; fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET FASTFT_BACKEND
if [ $DRY = 1 ]; then
  DEVICE=cpu; QUICK=(--quick); SCALE=4  # the CPU is slower at the tiny size too
  export FASTFT_BENCH_REHEARSAL=1  # every case runs once in-process, 3 timed runs: no figures
else
  DEVICE=cuda; QUICK=(); SCALE=1
fi
GPU_TESTS="${GPU_TESTS:-tests/losses/test_otr.py tests/losses/test_half_dz.py tests/losses/test_grad_w_rows.py \
tests/losses/test_loss_scale.py tests/ops/test_hadamard.py tests/methods/test_roste.py \
tests/kernels/test_grad_scale.py tests/kernels/test_lora_matmul.py::test_dy_b_and_db_read_dy_once_and_match_two_gemms}"

# fastft from this checkout: an editable install maps kernels/ and csrc/ into the package
# (offline: no build isolation, no index); without setuptools, links inside the package
if ! "$PY" -c "import fastft.kernels" 2>/dev/null; then
  "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1 \
    || { echo "editable install failed:"; tail -n 20 "$OUT/install.log"; }
fi
if ! "$PY" -c "import fastft.kernels" 2>/dev/null; then
  ln -sfn ../kernels fastft/kernels
  ln -sfn ../csrc fastft/csrc
fi

STEPS=(versions step losses kernels kprof tests profile targets)
declare -A RC SECS
summary() {
  {
    echo "{"
    echo "  \"dry_run\": $([ $DRY = 1 ] && echo true || echo false),"
    local first=1 k
    for k in "${STEPS[@]}"; do
      [ $first -eq 1 ] || echo ","
      first=0
      printf '  "%s": {"exit": %s, "seconds": %s}' "$k" "${RC[$k]:-null}" "${SECS[$k]:-null}"
    done
    echo
    echo "}"
  } >"$OUT/summary.json"
}
step() {  # step NAME TIMEOUT_S CMD...
  local name=$1 limit=$(($2 * SCALE)); shift 2
  local t0=$SECONDS
  echo "== $name"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  RC[$name]=$?
  SECS[$name]=$((SECONDS - t0))
  tail -n 15 "$OUT/$name.log"
  echo "== $name: exit ${RC[$name]} in ${SECS[$name]}s"
  summary
}

versions() {
  "$PY" - "$OUT/versions.json" "$DEVICE" <<'EOF'
import importlib.metadata as md, json, platform, sys
import torch
out = {"python": platform.python_version(), "torch": torch.__version__,
       "cuda": torch.version.cuda, "device": sys.argv[2]}
for pkg in ("triton", "transformers", "peft", "liger-kernel", "trl", "fastft"):
    try:
        out[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
        out[pkg] = None
if sys.argv[2] == "cuda":
    out["gpu"] = torch.cuda.get_device_name()
    out["capability"] = list(torch.cuda.get_device_capability())
    out["memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
print(json.dumps(out, indent=1))
open(sys.argv[1], "w").write(json.dumps(out, indent=1))
EOF
}
export -f versions
export PY OUT DEVICE

SAMPLER=
if [ $DRY = 0 ] && command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used,power.draw,clocks.sm,temperature.gpu \
    --format=csv -lms 500 >"$OUT/nvidia-smi.csv" 2>/dev/null &
  SAMPLER=$!
fi
trap '[ -n "$SAMPLER" ] && kill "$SAMPLER" 2>/dev/null' EXIT

step versions 30 bash -c versions
step step 100 "$PY" -m fastft.cli bench --suite step --device "$DEVICE" "${QUICK[@]}" \
  --out "$OUT/bench"
step losses 100 "$PY" -m fastft.cli bench --suite losses --op cross_entropy,grpo,otr \
  --device "$DEVICE" "${QUICK[@]}" --out "$OUT/bench"
step kernels 100 "$PY" -m fastft.cli bench --suite lora,quant,sparse --device "$DEVICE" \
  "${QUICK[@]}" --out "$OUT/bench"
step kprof 25 "$PY" benches/kernel_profile.py --device "$DEVICE" "${QUICK[@]}" --out "$OUT/kprof"
if [ $DRY = 1 ]; then  # the files exist and import; the suite itself runs them on the CPU
  # shellcheck disable=SC2086
  step tests 50 "$PY" -m pytest -q --collect-only $GPU_TESTS
else
  # shellcheck disable=SC2086
  step tests 50 env FASTFT_TEST_DEVICE=cuda "$PY" -m pytest -q -m "not slow" $GPU_TESTS \
    --junitxml="$OUT/tests.xml"
fi
step profile 30 "$PY" benches/profile_check.py --device "$DEVICE" --out "$OUT/profile"
ANY=()
[ $DRY = 1 ] && ANY=(--any-device)  # the rehearsal judges its CPU rows too
step targets 10 "$PY" benches/gpu_targets.py "$OUT/bench/results.json" "$OUT/targets.json" \
  "${ANY[@]}"

cat "$OUT/summary.json"
for k in step losses kernels tests profile; do [ "${RC[$k]}" = 0 ] || exit 1; done
exit 0
