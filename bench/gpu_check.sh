#!/usr/bin/env bash
# On a machine with a CUDA GPU, in one call and under 8 minutes: every test (GPU ones
# included), then the GPU benchmark sweep; the CSV, this log and the PNGs go to $1.
#
#   bash bench/gpu_check.sh OUT_DIR
#
# Budget: tests at most 200 s; the sweep gets what is left of 390 s (cases past its
# deadline are recorded as 'skipped'), killed at its deadline + 60 s; plots last.
set -uo pipefail
out=${1:?usage: bash bench/gpu_check.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
start=$SECONDS

{
  echo "== gpu_check $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  timeout 90 python -m fastmargin  # environment, backends, and a side-by-side at B=4096 C=100k D=512

  echo "== tests: python -m pytest -q -m 'gpu or not slow' tests (limit 200 s)"
  timeout 200 python -m pytest -q -m "gpu or not slow" -p no:cacheprovider tests
  tests_rc=$?
  echo "== tests exit code: $tests_rc ($((SECONDS - start)) s so far)"

  deadline=$((390 - (SECONDS - start)))
  (( deadline < 60 )) && deadline=60
  echo "== GPU sweep: python -m bench.sweep --sweep gpu --out $out --deadline-s $deadline"
  timeout $((deadline + 60)) python -m bench.sweep --sweep gpu --out "$out" --no-readme --deadline-s "$deadline"
  sweep_rc=$?
  echo "== sweep exit code: $sweep_rc ($((SECONDS - start)) s so far)"

  # Plot again: a sweep killed by its timeout leaves its CSV rows but draws nothing.
  shopt -s nullglob
  csvs=("$out"/*.csv)
  if (( ${#csvs[@]} )); then python -m bench.plot "${csvs[@]}" --out "$out"; fi
  echo "== done in $((SECONDS - start)) s: tests $tests_rc, sweep $sweep_rc; files in $out"
  exit $(( tests_rc != 0 || sweep_rc != 0 ))
} 2>&1 | tee "$out/gpu_check.log"
