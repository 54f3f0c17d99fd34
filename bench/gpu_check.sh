#!/usr/bin/env bash
# On the GPU machine, in one call and under 9 minutes, the build included: install the
# wheels carried in .whl/ (bench/gpu_wheels.sh fetches them), build fastmargin there, show
# the environment and a side-by-side (python -m fastmargin), run the default test suite
# plus every test marked gpu, slow ones included:
#
#     python3 -m pytest -m "gpu or not slow" tests
#
# then the GPU benchmark sweep and its plots. gpu_check.log (all it printed), build.log,
# the CSV and the PNGs go to OUT_DIR; the exit status is non-zero if the wheels, the
# build, the tests or the sweep failed.
#
#   bash bench/gpu_check.sh OUT_DIR          # the device tool: run(command=..., carry=[".whl"])
#   GPU_CHECK_DRY=1 PYTHON=VENV/bin/python bash bench/gpu_check.sh OUT_DIR   # no GPU
#
# The machine's image brings its own Python, torch, triton and nvcc and reaches no package
# registry: the build uses them (pip --no-index --no-build-isolation --no-deps), and a test
# that needs a package neither the image nor .whl has skips, saying why (-rs lists them).
# Budget, of 530 s: build at most 240; python -m fastmargin 90; tests at most 200, fewer if
# the build ran long (then interrupted: pytest still prints its summary); the sweep what is
# left less 75 s as its deadline (later cases are recorded as 'skipped'), killed 60 s past
# it; the plots last.
#
# Dry mode (GPU_CHECK_DRY=1) proves the script on a machine without a GPU: the same wheel
# install and build, `python -m fastmargin --no-bench`, the test selection above collected
# but not run, tests/test_build.py run, the CPU smoke sweep in place of the GPU one, the
# plots. It installs fastmargin (editable) into PYTHON, so it refuses a Python outside a
# virtual environment: from a clone, first python3 -m venv --system-site-packages
# --without-pip VENV (without its own pip, the venv builds with this Python's setuptools).
set -uo pipefail
out=${1:?usage: [GPU_CHECK_DRY=1] bash bench/gpu_check.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
dry=${GPU_CHECK_DRY:-0}
total=530
start=$SECONDS
export PYTHONUNBUFFERED=1
shopt -s nullglob
left() { echo $((total - (SECONDS - start))); }
min() { echo $(($1 < $2 ? $1 : $2)); }

if [[ $dry == 1 ]] && ! "$py" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)'; then
  echo "GPU_CHECK_DRY=1 would install fastmargin into $py, which is not a virtual environment;" \
       "from a clone: python3 -m venv --system-site-packages VENV, then PYTHON=VENV/bin/python" >&2
  exit 2
fi

{
  echo "== gpu_check $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)," \
       "$("$py" -VV | head -n 1)$([[ $dry == 1 ]] && echo ', DRY: no GPU steps')"
  [[ $dry == 1 ]] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

  wheels_rc=0
  wheels=(.whl/*.whl)
  if (( ${#wheels[@]} )); then
    site=${TMPDIR:-/tmp}/fastmargin-gpu-check-site
    echo "== wheels from .whl/ into $site (PYTHONPATH): ${wheels[*]##*/}"
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${wheels[@]}"
    wheels_rc=$?
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "== no .whl/: packages the image lacks stay missing (bash bench/gpu_wheels.sh fetches them)"
  fi

  limit=$([[ $dry == 1 ]] && echo 600 || echo 240)
  echo "== build: pip install --no-index --no-build-isolation --no-deps -e . (limit $limit s, log build.log)"
  # setup.py's architectures, not a TORCH_CUDA_ARCH_LIST the image may set; nvcc compiles
  # the targets of one file in parallel.
  NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:-} --threads 0" timeout "$limit" env -u TORCH_CUDA_ARCH_LIST \
    "$py" -m pip install -v --no-index --no-build-isolation --no-deps -e . >"$out/build.log" 2>&1
  build_rc=$?
  grep -h '^ *fastmargin:' "$out/build.log" | sort -u
  (( build_rc )) && tail -n 40 "$out/build.log"
  echo "== build exit code: $build_rc ($((SECONDS - start)) s so far)"

  if [[ $dry == 1 ]]; then
    timeout 90 "$py" -m fastmargin --no-bench
  else
    timeout 90 "$py" -m fastmargin  # environment, backends, and a side-by-side at B=4096 C=100k D=512
  fi

  selection=(-m "gpu or not slow" -p no:cacheprovider tests)
  shown='-m "gpu or not slow" -p no:cacheprovider tests'
  if [[ $dry == 1 ]]; then
    echo "== tests, collected only: $py -m pytest --collect-only $shown"
    timeout 200 "$py" -m pytest --collect-only -qq "${selection[@]}"
    collect_rc=$?
    echo "== tests/test_build.py, run"
    timeout 200 "$py" -m pytest -q -rfEs -p no:cacheprovider tests/test_build.py
    build_tests_rc=$?
    tests_rc=$((collect_rc || build_tests_rc))
  else
    limit=$(min 200 $(($(left) - 90)))
    echo "== tests: $py -m pytest -q -rfEs --durations=15 $shown (limit $limit s)"
    # SIGINT at the limit: pytest stops and still prints what failed and what was skipped.
    timeout -s INT -k 30 "$limit" "$py" -m pytest -q -rfEs --durations=15 "${selection[@]}"
    tests_rc=$?
  fi
  echo "== tests exit code: $tests_rc ($((SECONDS - start)) s so far)"

  deadline=$(($(left) - 75))
  if [[ $dry == 1 ]]; then
    echo "== sweep, dry: $py -m bench.sweep --sweep smoke --out $out --no-readme (the CPU smoke sweep)"
    timeout 200 "$py" -m bench.sweep --sweep smoke --out "$out" --no-readme
    sweep_rc=$?
  elif (( deadline < 30 )); then
    echo "== GPU sweep left out: $(left) s of the budget left"
    sweep_rc=0
  else
    echo "== GPU sweep: $py -m bench.sweep --sweep gpu --out $out --no-readme --deadline-s $deadline"
    timeout $((deadline + 60)) "$py" -m bench.sweep --sweep gpu --out "$out" --no-readme --deadline-s "$deadline"
    sweep_rc=$?
  fi
  echo "== sweep exit code: $sweep_rc ($((SECONDS - start)) s so far)"

  # Plot again: a sweep killed by its timeout leaves its CSV rows but draws nothing.
  csvs=("$out"/*.csv)
  if (( ${#csvs[@]} )); then "$py" -m bench.plot "${csvs[@]}" --out "$out"; fi
  echo "== done in $((SECONDS - start)) s: wheels $wheels_rc, build $build_rc, tests $tests_rc, sweep $sweep_rc;" \
       "files in $out"
  exit $(( wheels_rc || build_rc || tests_rc || sweep_rc ))
} 2>&1 | tee "$out/gpu_check.log"
