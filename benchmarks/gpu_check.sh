#!/usr/bin/env bash
# The device check of the CUDA fast path, as one script for a lent GPU machine (about 10 minutes on one
# H100/H200): GPU tests, then the benchmark suite, most important figures first. Every step has its own
# timeout so that one hang leaves the others' figures. Writes logs, JSON lines and tables under ${OUT:-gpu_out}.
#   bash benchmarks/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/nvidia_smi.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
bench() {  # bench NAME TIMEOUT ARGS...: one suite run, its figures appended to bench.jsonl, its table in NAME.md
    local name=$1 limit=$2
    shift 2
    timeout "$limit" python3 -m benchmarks --device cuda "$@" --jsonl "$OUT/bench.jsonl" --markdown "$OUT/$name.md" \
        2>"$OUT/$name.err" >/dev/null || echo "$name: failed or timed out, see $OUT/$name.err"
}
timeout 150 python3 -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py 2>&1 | tee "$OUT/test_gpu.log" | tail -5
bench train150 150 --suite train --preset jowa_150m --steps 10 --batch-size 512
bench train150_no_fused_ln 130 --suite train --preset jowa_150m --steps 10 --batch-size 512 --no-fused-ln
timeout 120 python3 -m benchmarks.fused_ln_sweep --best "$OUT/fused_ln_best.json" >"$OUT/fused_ln_sweep.jsonl" 2>"$OUT/fused_ln_sweep.err" ||
    echo "fused_ln_sweep: failed or timed out"
bench planner 150 --suite planner --preset jowa_150m tiny --quick
bench planner150_eager 60 --suite planner --preset jowa_150m --quick --no-cuda-graphs
bench train 150 --suite train --preset tiny jowa_40m jowa_70m --steps 10 --batch-size 128
bench train150_eager 60 --suite train --preset jowa_150m --steps 10 --batch-size 128 --no-compile
bench tokenizer 60 --suite tokenizer --quick
timeout 240 python3 -m benchmarks.profile_train --preset jowa_150m --batch-size 512 \
    --variants compile_loss compile_loss_no_dropout eager \
    --profile >"$OUT/profile_train.jsonl" 2>"$OUT/profile_train.err" || echo "profile_train: failed or timed out"
cat "$OUT"/*.md
