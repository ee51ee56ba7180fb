#!/usr/bin/env bash
# Issue 21's speed comparison with llm-compressor on SmolLM2-135M: GPTQ w4 g64 (act-order, static groups,
# asymmetric) and SparseGPT 50% unstructured, ours then theirs, one run after the other on the same machine,
# the same 128 x 512 C4 windows (seed 0), the same quick protocol. Each run appends one JSON line:
#   ours:   `lmcompose compress` (compute dtype $DTYPE, default auto), wall and peak RSS from its report.json
#   theirs: run_peer.py in the scratch environment (/tmp/peers), `oneshot` wall time and the process peak RSS
#
#   MODEL_DIR=~/.cache/lmcompose/gguf/SmolLM2-135M-Instruct.Q4_1-<hash> THREADS=2 DTYPE=auto \
#       bash benchmarks/peers/side_by_side.sh /tmp/sbs benchmarks/results/sbs.jsonl
# MODEL_DIR: the directory lmcompose dequantized the GGUF into (make_windows.py prints it), so that both
# tools start from the same fp32 weights.
set -euo pipefail
OUT=${1:?usage: side_by_side.sh WORK_DIR OUT_JSONL}
JSONL=${2:?usage: side_by_side.sh WORK_DIR OUT_JSONL}
THREADS=${THREADS:-2}
DTYPE=${DTYPE:-auto}
PEERS=${PEERS:-/tmp/peers/bin/python}
ONLY=${ONLY:-gptq sparsegpt}
SIDES=${SIDES:-ours theirs}  # e.g. SIDES=ours to rerun only our side after a change
MODEL_DIR=${MODEL_DIR:?set MODEL_DIR to the dequantized model directory make_windows.py printed}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$OUT"
export OMP_NUM_THREADS=$THREADS LMCOMPOSE_DATA_DIR=${LMCOMPOSE_DATA_DIR:-/work/shared/data}

ours() {  # name, steps YAML
  [[ " $SIDES " == *" ours "* ]] || return 0
  local name=$1 steps=$2
  printf 'calibration: {source: c4, n: 128, seqlen: 512, seed: 0, batch_size: 8}\nsteps:\n  - %s\n' "$steps" \
    > "$OUT/$name.yaml"
  lmcompose compress --model smollm2-135m --recipe "$OUT/$name.yaml" --compute-dtype "$DTYPE" --eval quick \
    --no-dense-eval --overwrite --out "$OUT/ours-$name" > "$OUT/ours-$name.log" 2>&1
  python - "$OUT/ours-$name/report.json" "$name" "$JSONL" "$THREADS" "$DTYPE" <<'EOF'
import datetime, json, sys
report, name, jsonl, threads, dtype = sys.argv[1:]
r = json.load(open(report))
row = {"tool": "lmcompose", "label": name, "threads": int(threads), "compute_dtype": r["environment"].get("compute_dtype"),
       "requested_dtype": dtype, "seconds": round(r["wall_seconds"], 1),
       "peak_rss_mib": round(r["peak_rss_bytes"] / 2**20, 1), "ppl_quick": (r.get("evaluation") or {}).get("ppl"),
       "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
open(jsonl, "a").write(json.dumps(row) + "\n")
print(row)
EOF
}

theirs() {  # name, run_peer.py arguments
  [[ " $SIDES " == *" theirs "* ]] || return 0
  local name=$1; shift
  "$PEERS" "$REPO/benchmarks/peers/run_peer.py" --label "$name" --out-jsonl "$OUT/peer-$name.jsonl" \
    --model-dir "$MODEL_DIR" --protocols quick "$@" > "$OUT/peer-$name.log" 2>&1
  python - "$OUT/peer-$name.jsonl" "$name" "$JSONL" "$THREADS" <<'EOF'
import json, sys
src, name, jsonl, threads = sys.argv[1:]
r = json.loads(open(src).read().splitlines()[-1])
row = {"tool": "llm-compressor " + r["versions"]["llmcompressor"], "label": name, "threads": int(threads),
       "seconds": r.get("quant_seconds"), "peak_rss_mib": r.get("peak_rss_mib_after_quant"),
       "ppl_quick": r.get("quick_ppl"), "error": r.get("error"), "date": r["date"]}
open(jsonl, "a").write(json.dumps(row) + "\n")
print(row)
EOF
}

for what in $ONLY; do
  case $what in
    gptq)
      ours gptq-w4g64 "gptq: {bits: 4, group_size: 64, act_order: true, static_groups: true}"
      theirs gptq-w4g64 --method gptq --bits 4 --group-size 64 ;;
    sparsegpt)
      ours sparsegpt-50 "sparsegpt: {sparsity: 0.5}"
      theirs sparsegpt-50 --method sparsegpt --sparsity 0.5 ;;
  esac
done
