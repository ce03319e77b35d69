#!/bin/bash
# The GPU device check (benchmarks/device_check.py) as one command, with what it carries.
#
#   bash benchmarks/device_check.sh prepare   # here, once: .device_check/ gets the wheel of
#                                             # ml-collections (the one package the GPU machine
#                                             # lacks) and Fashion-MNIST's four files (30 MB)
#   bash benchmarks/device_check.sh [ARGS]    # on the GPU machine (the folder carried there):
#                                             # installs the wheel into /tmp, runs the check
#                                             # (at most 8 minutes), results in $OUT
#
# On this workplace's device tool: run(command="bash benchmarks/device_check.sh",
# carry=[".device_check"], timeout_s=540). ARGS go to benchmarks/device_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=.device_check
if [[ ${1:-} == prepare ]]; then
  mkdir -p "$CARRY/wheels" "$CARRY/fashion-mnist"
  exclude=.git/info/exclude
  if [[ -f $exclude ]] && ! grep -qx "/$CARRY/" "$exclude"; then echo "/$CARRY/" >> "$exclude"; fi
  cp "${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"/*-ubyte.gz "$CARRY/fashion-mnist/"
  "${PYTHON:-python3}" -m pip download --quiet --no-deps --only-binary=:all: \
    -d "$CARRY/wheels" ml-collections==1.1.0
  du -sh "$CARRY"
  exit 0
fi
OUT=${OUT:-$CARRY/out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
SITE=/tmp/device_check_site
if ! "$PY" -c "import ml_collections" 2>/dev/null; then
  "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$CARRY"/wheels/*.whl
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
timeout --signal=TERM 470 "$PY" -m benchmarks.device_check \
  --data_dir="$CARRY/fashion-mnist" --output="$OUT" "$@" 2>&1 | tee "$OUT/device_check.log"
