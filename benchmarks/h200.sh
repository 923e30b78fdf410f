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
# the date, `nvidia-smi`'s GPU line and the commands below, and draw the figures here from the
# returned JSON files (the GPU machine need not have matplotlib), e.g.
#   python benchmarks/plot.py OUT/losses.json --out docs/figures/benchmark_losses_h200.png
#   python benchmarks/plot.py OUT/train_step_resnet18.json OUT/one_pass_resnet18.json \
#     --out docs/figures/benchmark_resnet18_h200.png
#   python benchmarks/plot.py OUT/sentence_step.json --out docs/figures/benchmark_sentence_h200.png
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
python3 -c "import jax; print(jax.__version__, jax.devices(), 'default matmul precision:',
            jax.config.jax_default_matmul_precision)" >> "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

run() {   # run NAME SECONDS SCRIPT ARGS...: one benchmark with its own time limit
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit} s): python3 $*" | tee "$OUT/$name.txt"
  timeout "$limit" python3 "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  # Every benchmark prints its rows as they are measured, so a time-out keeps the finished ones.
  grep -vE '^[IWE][0-9]{4} ' "$OUT/$name.log" | tee -a "$OUT/$name.txt" | tail -n 25
  [ $rc -eq 0 ] || echo "!! $name exited with $rc" | tee -a "$OUT/$name.txt"
}
# Most important first: the targets of the open issues (images/s, sentences/s, the loss), then
# what decides a default (both views in one pass), then the rest. Plain baselines are skipped on
# the GPU: the same machine's plain-JAX figures are already recorded (docs/benchmarks.md anchors).
run train_step_resnet18 80 benchmarks/train_step.py --models resnet18 --skip-plain --json "$OUT/train_step_resnet18.json"
run train_step_resnet50 100 benchmarks/train_step.py --models resnet50 --skip-plain --json "$OUT/train_step_resnet50.json"
run sentence_step 110 benchmarks/sentence_step.py --batches 512,64 --dtypes bfloat16 --json "$OUT/sentence_step.json"
run losses 65 benchmarks/losses.py --block-size 2048 --json "$OUT/losses.json"
# The same step with both views in one forward pass (per-view BatchNorm statistics, the same
# numbers): whether fewer, larger kernels beat the reference's pass per view decides the default.
run one_pass_resnet18 55 benchmarks/train_step.py --models resnet18 --views-in-one-pass --skip-plain --json "$OUT/one_pass_resnet18.json"
run one_pass_resnet50 70 benchmarks/train_step.py --models resnet50 --views-in-one-pass --skip-plain --json "$OUT/one_pass_resnet50.json"
run graph_step 35 benchmarks/graph_step.py
run scaling 35 benchmarks/scaling.py --devices 1 --batch 512 --width 64 --dtype bfloat16 --steps 20 --json "$OUT/scaling.json"
