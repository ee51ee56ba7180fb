#!/usr/bin/env bash
# The whole peer series, one job at a time on one thread (see README.md). Appends to
# benchmarks/results/peers-smollm2-135m.jsonl; logs under $LOGS. Start it detached:
#   nohup bash benchmarks/peers/run_all.sh > /tmp/peers_data/logs/series.log 2>&1 &
set -u
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
PY="${PEERS_PY:-/tmp/peers/bin/python}"
OUT="${OUT_JSONL:-$REPO/benchmarks/results/peers-smollm2-135m.jsonl}"
LOGS="${LOGS:-/tmp/peers_data/logs}"
WORK="${WORK:-/tmp/peers_data/work}"            # llm-compressor/AutoRound may write scratch files to the cwd
SNAP="${SNAP:-/tmp/peers_data/lmcompose_src}"   # frozen copy of lmcompose's src/ for the whole series
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${OMP_NUM_THREADS:-1}" TOKENIZERS_PARALLELISM=false
mkdir -p "$LOGS" "$WORK"
if [ ! -d "$SNAP/lmcompose" ]; then mkdir -p "$SNAP" && cp -r "$REPO/src/lmcompose" "$SNAP/"; fi
export LMCOMPOSE_SRC="$SNAP"
[ -f /tmp/peers_data/c4-n128-s512-seed0.safetensors ] || { echo "run make_windows.py first (lmcompose venv)"; exit 2; }

RUN="$REPO/benchmarks/peers/run_peer.py"
i=0
step() {  # step LABEL ARGS...
  local label="$1"; shift
  i=$((i + 1))
  local log; log="$LOGS/$(printf %02d $i)-$label.log"
  if [ -n "${ONLY:-}" ] && ! [[ " $ONLY " == *" $label "* ]]; then return; fi
  echo "[$(date -Is)] start $label: $*"
  ( cd "$WORK" && /usr/bin/time -v "$PY" "$RUN" --label "$label" --out-jsonl "$OUT" "$@" ) > "$log" 2>&1
  echo "[$(date -Is)] end $label rc=$? (log $log)"
}

step dense-bf16          --method dense --protocols quick full
step dense-fp32          --method dense --protocols quick --eval-dtype fp32
step gptq-w3-g64         --method gptq --bits 3 --group-size 64
step gptq-w3-g64-quip    --method gptq --bits 3 --group-size 64 --transform quip
step gptq-w3-g64-spin    --method gptq --bits 3 --group-size 64 --transform spinquant
step awq-w3-g64-nofix    --method awq --bits 3 --group-size 64
step awq-w3-g64          --method awq --bits 3 --group-size 64 --cpu-pin-workaround
step gptq-w2-g64         --method gptq --bits 2 --group-size 64
step gptq-w2-g64-quip    --method gptq --bits 2 --group-size 64 --transform quip
step gptq-w2-g64-spin    --method gptq --bits 2 --group-size 64 --transform spinquant
# AutoRound: 200 iters would take ~4 h per run here (measured ~36 s + 2.2 s/iter per block on 128 x 512,
# one contended thread); its own "light" recipe (iters 50, lr 5e-3) keeps a run near 75 min.
step autoround-w3-g64    --method autoround --bits 3 --group-size 64 --iters 50 --lr 5e-3
step autoround-w2-g64    --method autoround --bits 2 --group-size 64 --iters 50 --lr 5e-3
echo "[$(date -Is)] series done"
