#!/usr/bin/env bash
# The device check of the CUDA fast path, as one script for a lent GPU machine (about 9 minutes on one
# H100/H200): GPU tests, then the benchmark suite, most important figures first. Every step has its own
# timeout so that one hang leaves the others' figures. Writes logs and JSON lines under ${OUT:-gpu_out}.
#   bash benchmarks/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/nvidia_smi.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
J="$OUT/bench.jsonl"
timeout 150 python3 -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py 2>&1 | tee "$OUT/test_gpu.log" | tail -5
timeout 150 python3 -m benchmarks --device cuda --suite train --preset jowa_150m --steps 10 --batch-size 256 --jsonl "$J" 2>"$OUT/train150.err"
timeout 120 python3 -m benchmarks --device cuda --suite planner --preset jowa_150m tiny --quick --jsonl "$J" 2>"$OUT/planner.err"
timeout 150 python3 -m benchmarks --device cuda --suite train --preset tiny jowa_40m jowa_70m --steps 10 --batch-size 128 --jsonl "$J" 2>"$OUT/train.err"
timeout 60 python3 -m benchmarks --device cuda --suite train --preset jowa_150m --steps 10 --batch-size 128 --no-compile --jsonl "$J" 2>"$OUT/train150_eager.err"
timeout 60 python3 -m benchmarks --device cuda --suite tokenizer --quick --jsonl "$J" 2>"$OUT/tokenizer.err"
python3 - "$J" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    f = json.loads(line)
    extra = {k: f[k] for k in ("envs", "batch_size", "compile", "actions_match") if k in f}
    print(f"{f['name']:45s} {f['preset'] or '':10s} {f['value']:>14.4g} {f['unit']:12s} {extra}")
PY
tail -3 "$OUT"/*.err
