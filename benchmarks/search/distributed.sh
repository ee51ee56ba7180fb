#!/usr/bin/env bash
# Issue 6: one small search three ways on SmolLM2-135M, ≤ 3.2 bits/weight, proxy level (6 grid points):
#   1. uninterrupted, one worker;
#   2. two worker processes sharing one SQLite study, the whole run SIGKILLed after 3 finished trials,
#      then resumed with the same command;
#   3. through Ray on a local cluster (2 tasks in flight);
# and checks that the three Pareto fronts are the same.
#   bash benchmarks/search/distributed.sh [OUT_ROOT]      (needs LMCOMPOSE_DATA_DIR; ~20 min on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=${1:-runs/search-distributed}
SPACE=benchmarks/search/small-space.yaml
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
search() { lmcompose search --model smollm2-135m --bits-per-weight 3.2 --space $SPACE --trials 100 --calib-n 128 \
           --level proxy --finalists 0 "$@"; }
rm -rf "$ROOT"; mkdir -p "$ROOT"
search --out "$ROOT/uninterrupted" > "$ROOT/uninterrupted.log" 2>&1

setsid lmcompose search --model smollm2-135m --bits-per-weight 3.2 --space $SPACE --trials 100 --calib-n 128 \
    --level proxy --finalists 0 --workers 2 --out "$ROOT/killed" > "$ROOT/killed.run1.log" 2>&1 &
PG=$!
python - "$ROOT/killed/study.db" <<'PY'
import os, sys, time
import optuna
db = sys.argv[1]
while True:
    time.sleep(5)
    try:
        study = optuna.load_study(study_name="lmcompose", storage=f"sqlite:///{db}")
    except Exception:  # not created yet
        continue
    done = sum(t.state.name == "COMPLETE" for t in study.trials)
    if done >= 3:
        print(f"killing with {done} trials complete and {sum(t.state.name == 'RUNNING' for t in study.trials)} running")
        break
PY
kill -9 -- -"$PG" || true
sleep 3
search --workers 2 --out "$ROOT/killed" > "$ROOT/killed.run2.log" 2>&1

search --workers 2 --backend ray --out "$ROOT/ray" > "$ROOT/ray.log" 2>&1

python - "$ROOT" <<'PY'
import json, sys
root = sys.argv[1]
key = lambda r: (r["chain"], round(r["size"], 6), round(r["score"], 6))
fronts = {k: sorted(map(key, json.load(open(f"{root}/{k}/front.json")))) for k in ("uninterrupted", "killed", "ray")}
for k, v in fronts.items():
    print(f"{k:>13}: {v}")
same = fronts["uninterrupted"] == fronts["killed"] == fronts["ray"]
print("the three fronts are the same" if same else "THE FRONTS DIFFER")
sys.exit(0 if same else 1)
PY
