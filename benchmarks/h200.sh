#!/usr/bin/env bash
# Every GPU measurement docs/benchmarks.md still lacks, in one device call (about 9 minutes:
# the time limits below add up to 550 s, under the device tool's 600 s per command, leaving the
# rest of a session's 15 device minutes for the machine's start-up).
#
# Prepare on the development machine, from the repository root:
#   bash ../shared/scripts/device-wheels.sh grakel      # wheels the H200 image lacks -> .whl/
# then run on the device machine (the `device` tool's `run`: carry [".whl"], timeout_s 600):
#   bash benchmarks/h200.sh
# Each benchmark prints its table and writes it to $OUT/<name>.txt; a benchmark that fails or
# runs past its time limit does not stop the others. Copy the tables into docs/benchmarks.md with
# the date, `nvidia-smi`'s GPU line and the commands below.
set -uo pipefail
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
OUT="${OUT:-benchmark_out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.txt"
python3 -c "import jax; print(jax.__version__, jax.devices())" >> "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

run() {   # run NAME SECONDS SCRIPT ARGS...: one benchmark with its own time limit
  local name=$1 limit=$2
  shift 2
  echo "== $name: python3 $*"
  timeout "$limit" python3 "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  grep -vE '^[IWE][0-9]{4} ' "$OUT/$name.log" | tee "$OUT/$name.txt" | tail -n 25
  [ $rc -eq 0 ] || echo "!! $name exited with $rc"
}
run losses 110 benchmarks/losses.py --block-size 2048
run train_step 165 benchmarks/train_step.py
run sentence_step 105 benchmarks/sentence_step.py --dtypes bfloat16,float32
# The same step with both views in one forward pass (per-view BatchNorm statistics, the same
# numbers): whether fewer, larger kernels beat the reference's pass per view decides the default.
run train_step_one_pass 75 benchmarks/train_step.py --views-in-one-pass --skip-plain
run graph_step 45 benchmarks/graph_step.py
run scaling 50 benchmarks/scaling.py --devices 1 --batch 512 --width 64 --dtype bfloat16 --steps 50
