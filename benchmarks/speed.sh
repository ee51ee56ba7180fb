#!/usr/bin/env bash
# Issue 5: prefill and decode speed and memory, dense vs compressed, on this machine's CPU (both cores).
#   [DTYPES="bf16 fp32"] bash benchmarks/speed.sh RUN_ROOT      RUN_ROOT holds the checkpoints bench.py saved
# Writes benchmarks/speed/<run>_<dtype>.json; rows of BENCHMARKS.md "Inference speed" come from them.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-/tmp/lmcompose-bench}
for dtype in ${DTYPES:-bf16 fp32}; do
  for run in techniques-gptq_w4_g64 techniques-svdllm_-30pct_bytes joint-sslc_50pct_bytes techniques-sparsegpt_50pct; do
    [ -d "$ROOT/$run" ] || { echo "skip $run (not found)"; continue; }
    lmcompose bench-speed --model "$ROOT/$run" --dense smollm2-135m --policy auto dense --prompt-len 256 \
        --new-tokens 64 --repeats 3 --dtype $dtype --json "benchmarks/speed/${run}_${dtype}.json"
  done
done
