#!/usr/bin/env bash
# The training-loop A/B behind issue 8's 40 % MFU target (jowa_150m stage 2, batch 512, bf16, forward and loss
# compiled): the fused LayerNorm op with three query/key/value products and with one (the default since
# session 17), alternated twice so that a drift of the machine shows, inductor's LayerNorm kernels once, the GPU
# tests, then (if time is left) the step alone with its kernels for both products. About 7 minutes on one H200
# (433 s in session 17); inductor's cache makes the repeats cheap.
#   bash benchmarks/gpu_loop_ab.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/nvidia_smi.txt"
loop() {  # loop LIMIT ARGS...: one training-loop run, its figures appended to loop.jsonl
    local limit=$1 t0=$SECONDS
    shift
    timeout "$limit" python3 -m benchmarks --device cuda --suite train --preset jowa_150m --steps 20 --batch-size 512 \
        "$@" --jsonl "$OUT/loop.jsonl" >/dev/null 2>>"$OUT/loop.err" || echo "loop $*: failed or timed out"
    echo "loop ${*:-(default)}: $((SECONDS - t0)) s, MFU $(grep train_stage2_mfu "$OUT/loop.jsonl" | tail -n 1 |
        grep -o '"value": [0-9.]*' | cut -d' ' -f2)"
}
loop 170 --no-fused-qkv
loop 170 --fused-qkv
loop 110 --no-fused-qkv
loop 110 --fused-qkv
loop 130 --no-fused-ln --no-fused-qkv
timeout 200 python3 -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py 2>&1 | tee "$OUT/test_gpu.log" | tail -n 8
left=$((530 - SECONDS))
if [ "$left" -gt 120 ]; then
    timeout "$left" python3 -m benchmarks.profile_train --preset jowa_150m --batch-size 512 --steps 10 --profile \
        --variants compile_loss_fused_ln compile_loss_fused_ln_qkv >"$OUT/profile.jsonl" 2>"$OUT/profile.err" ||
        echo "profile_train: failed or timed out after ${left} s"
    cut -c1-300 "$OUT/profile.jsonl"
fi
echo "total $SECONDS s"
