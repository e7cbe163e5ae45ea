#!/usr/bin/env bash
# Third device check: the GPU tests and the planner with CUDA-graph decoding (after the autocast-cache fix).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
J="$OUT/bench.jsonl"
timeout 120 python3 -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py 2>&1 | tee "$OUT/test_gpu.log" | tail -4
timeout 150 python3 -m benchmarks --device cuda --suite planner --preset jowa_150m tiny --quick --jsonl "$J" 2>"$OUT/planner.err"
python3 - "$J" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    f = json.loads(line)
    extra = {k: f[k] for k in ("envs", "cuda_graphs") if k in f}
    print(f"{f['name']:40s} {f['preset'] or '':10s} {f['value']:>12.4g} {f['unit']:12s} {extra}")
PY
grep -E "Error|failed" "$OUT/planner.err" | tail -3
