#!/usr/bin/env bash
# Wheels that bench/gpu_checks.sh's sentence-transformers step needs on the GPU machine (Python 3.12,
# x86-64, no network): SentenceTransformerTrainer needs `datasets`, which is not installed there,
# nor are its dill and multiprocess. Its other requirements are (pyarrow, pandas, xxhash, fsspec,
# huggingface-hub, filelock, numpy, packaging, pyyaml, tqdm). Pinned to the versions this project's
# environment runs with sentence-transformers (datasets 5.2 takes dill < 0.4.2, multiprocess < 0.70.20).
# Run here, from anywhere, where pip reaches the package index:
#     bash bench/gpu_wheels.sh         ->  .whl/*.whl in the project root, about 0.9 MiB
# then carry ".whl" with the device call that runs `bash bench/gpu_checks.sh bench` (its header
# says how); .whl/ is kept out of git (.gitignore).
set -euo pipefail

cd "$(dirname "$0")/.."
WHEELS=(datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)
PIP=${PYTHON:-python3}
rm -rf .whl
mkdir -p .whl
"$PIP" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${WHEELS[@]}"
# One wheel per name: two versions of one package stop the install there.
names=$(for w in .whl/*.whl; do basename "$w" | cut -d- -f1; done | sort)
if [ "$(echo "$names" | uniq -d)" ] || [ "$(echo "$names" | wc -l)" -ne ${#WHEELS[@]} ]; then
  echo "expected one wheel each of ${WHEELS[*]} in .whl/, found: $(ls .whl)" >&2
  exit 1
fi
ls -l .whl
echo "$(du -cb .whl/*.whl | tail -n 1 | cut -f1) bytes in .whl/:" \
     "carry \".whl\" with the call that runs bench/gpu_checks.sh bench"
