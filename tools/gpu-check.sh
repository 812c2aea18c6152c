#!/usr/bin/env bash
# The GPU check, run on the GPU machine from the repository root with carry/ from
# tools/build-gpu-carry.sh (the GPU machine has no cargo):
#   1. the hardware self-test: every emulated wrapper (mma, ldmatrix, cp.async, warp
#      operations, f16) on the GPU and under emulation; bit-exact on integer inputs
#   2. every kernel test with REEL_TEST_DEVICE=cuda
#   3. component parity on cuda (once the cuda runtime has components)
#   4. benchmarks: `reel bench`, and torch's SDPA and cuBLAS measured in the same run
# and writes bench/results/<date>-<gpu>.md (commit it). Exit status: non-zero if a test failed.
set -uo pipefail
cd "$(dirname "$0")/.."
CARRY=${CARRY:-carry}
[ -x "$CARRY/cpu-tests" ] && [ -x "$CARRY/reel" ] || {
  echo "gpu-check: $CARRY/reel and $CARRY/cpu-tests missing: run tools/build-gpu-carry.sh on the development machine" >&2
  exit 2
}
date_=$(date -u +%Y-%m-%d)
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
gpu=${gpu:-unknown-gpu}
slug=$(echo "$gpu" | tr 'A-Z' 'a-z' | sed -E 's/nvidia //; s/[^a-z0-9]+/-/g; s/^-|-$//g')
mkdir -p bench/results
report=bench/results/$date_-$slug.md
status=0
section() { printf '\n## %s\n\n' "$1" >>"$report"; }
run() { # title, command...
  local title=$1; shift
  section "$title"
  printf '```\n$ %s\n' "$*" >>"$report"
  local out rc
  out=$("$@" 2>&1); rc=$?
  printf '%s\n' "$out" | tail -n 80 >>"$report"
  printf '(exit %d)\n```\n' "$rc" >>"$report"
  echo "== $title: exit $rc"
  [ $rc -eq 0 ] || status=1
}
{
  echo "# GPU check $date_: $gpu"
  echo
  echo "- commit: $(cat "$CARRY/COMMIT" 2>/dev/null || echo unknown)"
  echo "- driver: $(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)"
  echo "- host: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB"
} >"$report"
run "Hardware self-test (GPU vs emulator)" env REEL_TEST_DEVICE=cuda "$CARRY/cpu-tests" hw_selftest --nocapture --test-threads=1
run "Kernel tests on cuda" env REEL_TEST_DEVICE=cuda "$CARRY/cpu-tests" kernels:: --test-threads=1
run "Kernel tests on emu (same binary, for comparison of wall time)" "$CARRY/cpu-tests" kernels:: --test-threads=1
section "Component parity on cuda"
echo "Not yet: the cuda device runs single kernels; DiT/VAE components on cuda arrive with their kernels." >>"$report"
run "reel bench (cpu device, embedded model)" "$CARRY/reel" bench --json -
if python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
  run "torch baselines (SDPA, cuBLAS bf16 GEMM)" python3 tools/torch_baseline.py
  if python3 -c 'import diffusers' 2>/dev/null; then
    run "diffusers vs reel step (compare_torch.py)" python3 tools/compare_torch.py --model tests/data/pipeline_tiny \
      --size 256x256 --frames 17 --reel "$CARRY/reel"
  else
    section "diffusers vs reel step (compare_torch.py)"
    echo "skipped: diffusers is not installed on this machine" >>"$report"
  fi
else
  section "torch baselines"
  echo "skipped: no torch with CUDA on this machine" >>"$report"
fi
echo "wrote $report"
exit $status
