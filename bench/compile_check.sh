#!/usr/bin/env bash
# Compiles the Triton kernels for sm_90 and sm_80 with another Triton, without a GPU:
# tests/test_triton.py's test_compiles_with_tensor_cores (every case, slow ones included)
# under triton==VERSION in a scratch venv that sees this Python's torch. The GPU machine's
# image has triton 3.6, the project pins another; this says whether the kernels build there.
#
#   bash bench/compile_check.sh [VERSION]     # default 3.6.0; VENV=DIR keeps the venv elsewhere
#
# It runs on a copy of this tree's fastmargin/, kernels/ (as fastmargin.kernels) and tests/,
# so nothing is installed into the tree or the main environment.
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-3.6.0}
venv=${VENV:-${TMPDIR:-/tmp}/fastmargin-triton-$version}
[[ -x $venv/bin/python ]] || python3 -m venv --system-site-packages "$venv"
"$venv/bin/python" -c "import triton, sys; sys.exit(triton.__version__ != '$version')" 2>/dev/null ||
  "$venv/bin/python" -m pip install -q --no-deps "triton==$version"
copy=$(mktemp -d)
trap 'rm -rf "$copy"' EXIT
cp -r fastmargin tests pyproject.toml "$copy"
cp -r kernels "$copy/fastmargin/kernels"
find "$copy" \( -name '*.so' -o -name __pycache__ \) -prune -exec rm -rf {} +
cd "$copy"
"$venv/bin/python" -m pytest -q -s -p no:cacheprovider -m "slow or not slow" tests/test_triton.py \
  -k test_compiles_with_tensor_cores
