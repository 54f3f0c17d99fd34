#!/usr/bin/env bash
# Fetches into .whl/ the wheels that bench/gpu_check.sh installs on the GPU machine, whose
# image (Python 3.12, no package registry) lacks them: pytorch-metric-learning (its drop-in
# tests, python -m fastmargin's side-by-side) and the GPU sweep's comparisons
# cut-cross-entropy and liger-kernel. Each needs only what the image has (torch, triton,
# numpy, scikit-learn, tqdm): the Requires-Dist lines printed below say so.
#
#   bash bench/gpu_wheels.sh [NAME==VERSION ...]     # default: the three pinned below
#
# .whl/ is git-ignored, so the device run names it: run(command="bash bench/gpu_check.sh
# $OUT", carry=[".whl"]). One version of each: two stop the whole install there.
set -euo pipefail
cd "$(dirname "$0")/.."
(( $# )) || set -- pytorch-metric-learning==2.9.0 cut-cross-entropy==25.1.1 liger-kernel==0.8.5
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "$@"
python3 - .whl/*.whl <<'PY'
import collections, sys, zipfile

names = collections.Counter()
for path in sys.argv[1:]:
    name = path.rsplit("/", 1)[-1].split("-")[0].lower()
    names[name] += 1
    with zipfile.ZipFile(path) as wheel:
        meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
        needs = [line.split(":", 1)[1].strip() for line in wheel.read(meta).decode().splitlines()
                 if line.startswith("Requires-Dist:") and "extra ==" not in line]
    print(f"{path}: needs {', '.join(needs) or 'nothing'}")
twice = sorted(n for n, k in names.items() if k > 1)
if twice:
    sys.exit(f"more than one version in .whl/ of {twice}: delete the older")
PY
