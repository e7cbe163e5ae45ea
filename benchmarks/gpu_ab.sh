#!/usr/bin/env bash
# The next device session's A/B for issue 8's one open target: jowa_150m stage-2 training at 40 % MFU on an H100
# (synchronized step alone: 36.4 % on an H100 in session 13, 38.5 % on an H200 in session 17; the loop's figures
# before session 17 read high). The training loop first, since the target is measured on it:
# 1. the default recipe (fused LayerNorm op, one QKV product): the first loop figure with the clock read after
#    a device sync;
# 2. the op drawing its dropout mask with one Philox call per 8 elements (KernelConfig.packed_rng), and the
#    fused_ln CUDA tests (the packed and recomputed masks' first GPU check);
# 3. inductor's matrix-product templates, which can take fc1's GELU into the product's epilogue and the GELU
#    backward into the input-gradient product's (max_autotune_gemm: the largest possible gain, about 20 ms of
#    GELU passes a step, and a compile of minutes): first on the MLP alone (benchmarks/mlp_autotune.py), then,
#    if it wins there, in the loop with up to 300 s;
# 4. the mask left to the backward to redraw (recompute_mask: 3 GB less memory, 2 bytes less per element);
# 5. attention on the flash kernel instead of cuDNN's (--sdpa-off cudnn): first each SDPA backend alone at the
#    training shape (benchmarks/attention_backends.py), then the loop if flash wins there;
# 6. the default again, to show the machine's drift;
# then, while time is left, the step alone with its kernels and Nsight Compute on the fused LayerNorm kernels.
# Starts nothing new after 480 s, so the whole script fits one 600 s call.
#   bash benchmarks/gpu_ab.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/nvidia_smi.txt"
# clocks and power every 5 s, to tell a throttled machine from a slow recipe (session 17's H100 ran the session-13
# recipe at 37.8 % MFU where session 13's gave 39.1 %)
nvidia-smi dmon -s pc -d 5 >"$OUT/dmon.txt" 2>&1 &
dmon=$!
fits() {  # fits SECONDS: whether a step that may take that long still ends by 480 s
    [ $((SECONDS + $1)) -le 480 ] || { echo "skipped (${SECONDS} s gone): ${*:2}"; return 1; }
}
loop() {  # loop LIMIT ARGS...: one training-loop run, its figures appended to loop.jsonl
    local limit=$1 t0=$SECONDS
    shift
    fits "$limit" "loop $*" || return 0
    timeout "$limit" python3 -m benchmarks --device cuda --suite train --preset jowa_150m --steps 20 --batch-size 512 \
        "$@" --jsonl "$OUT/loop.jsonl" >/dev/null 2>>"$OUT/loop.err" || echo "loop $*: failed or timed out"
    echo "loop ${*:-(default)}: $((SECONDS - t0)) s, MFU $(grep train_stage2_mfu "$OUT/loop.jsonl" | tail -n 1 |
        grep -o '"value": [0-9.]*' | cut -d' ' -f2)"
}
pt() {  # pt LIMIT ARGS...: one profile_train process (the step alone), its JSON lines appended to step.jsonl
    local limit=$1
    shift
    fits "$limit" "profile_train $*" || return 0
    timeout "$limit" python3 -m benchmarks.profile_train --device cuda --preset jowa_150m --batch-size 512 \
        --steps 10 "$@" >>"$OUT/step.jsonl" 2>>"$OUT/step.err" || echo "profile_train $*: failed or timed out"
    tail -n 1 "$OUT/step.jsonl" | cut -c1-300
}
cfg=$(mktemp -d)  # kernel configs outside $OUT, which brings back 8 files at most
echo '{"packed_rng": true}' >"$cfg/packed_rng.json"
echo '{"packed_rng": true, "recompute_mask": true}' >"$cfg/recompute_mask.json"
faster() {  # faster KEY A B: 1 when micro.jsonl's line KEY=B runs at least 2 % faster than KEY=A (dropout on)
    python3 -c "import json, sys
key, a, b = sys.argv[2:]
rows = [r for r in map(json.loads, open(sys.argv[1])) if key in r and 'ms_fwd_bwd' in r and r.get('dropout', 1)]
ms = {r[key]: r['ms_fwd_bwd'] for r in rows}
print(int(ms[a] / ms[b] >= 1.02))" "$OUT/micro.jsonl" "$@" 2>/dev/null || echo 0
}
loop 150
loop 90 --fused-ln-config "$cfg/packed_rng.json"
# the packed and recomputed masks against the reference on CUDA (the interpreter tests ran on CPU only)
fits 60 "the fused_ln CUDA tests" && timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py \
    -k "fused_layer_norm_triton or recomputed_mask" 2>&1 | tail -n 3
# the largest possible gain and the longest compile: first the MLP alone (a compile of seconds), then, if
# max-autotune wins there by 2 % or more, the loop with up to 300 s, before the smaller A/Bs below
if fits 150 "mlp_autotune"; then
    timeout 150 python3 -m benchmarks.mlp_autotune --device cuda --profile >>"$OUT/micro.jsonl" 2>>"$OUT/loop.err" ||
        echo "mlp_autotune: failed or timed out"
    grep '"variant"' "$OUT/micro.jsonl" | cut -c1-200
fi
gain=$(faster variant compile max_autotune)
autotune=$((450 - SECONDS))
[ "$autotune" -gt 300 ] && autotune=300
if [ "$gain" = 1 ] && [ "$autotune" -ge 120 ]; then
    loop "$autotune" --inductor max_autotune_gemm=1
else
    echo "skipped (${SECONDS} s gone, MLP gain ${gain}): loop --inductor max_autotune_gemm=1"
fi
loop 60 --fused-ln-config "$cfg/recompute_mask.json"
# attention alone on each SDPA backend (eager, seconds); the loop on flash only if flash wins there by 2 %, and
# without compile caches: a cached graph may hold the cuDNN attention op that the first compile chose
if fits 60 "attention_backends"; then
    timeout 60 python3 -m benchmarks.attention_backends --device cuda >>"$OUT/micro.jsonl" 2>>"$OUT/loop.err" ||
        echo "attention_backends: failed or timed out"
    grep '"backend"' "$OUT/micro.jsonl" | cut -c1-160
fi
if [ "$(faster backend cudnn flash)" = 1 ]; then
    TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 loop 90 --sdpa-off cudnn
else
    echo "skipped: loop --sdpa-off cudnn (flash attention not 2 % faster alone, or no time)"
fi
loop 45
pt 120 --variants compile_loss_fused_ln_qkv --profile --fused-ln-config "$cfg/packed_rng.json"
pt 120 --variants compile_loss_fused_ln_qkv compile_loss_no_dropout --profile
# a step launches the forward kernel 25 times before the first backward one: 28 launches take both
if fits 120 "ncu"; then
    timeout 120 ncu --nvtx --nvtx-include "timed_steps/" --kernel-name "regex:dropout_add_layer_norm_(fwd|bwd)" \
        --launch-count 28 --clock-control none --section SpeedOfLight --section Occupancy --section LaunchStats \
        --section ComputeWorkloadAnalysis --section WarpStateStats \
        python3 -m benchmarks.profile_train --preset jowa_150m --batch-size 512 --steps 1 \
        --variants compile_loss_fused_ln_qkv >"$OUT/ncu_fused_ln.txt" 2>&1 || echo "ncu failed or timed out"
    grep -E "dropout_add_layer_norm|Duration|Memory Throughput|DRAM Throughput|Compute \(SM\)|Achieved Occupancy" \
        "$OUT/ncu_fused_ln.txt" | head -40
fi
kill "$dmon" 2>/dev/null
awk '$1 ~ /^[0-9]+$/ { n++; w += $2; sm += $NF }  # columns: gpu pwr gtemp mtemp mclk pclk
    END { if (n) printf "dmon: %d samples, mean power %.0f W, mean SM clock %.0f MHz\n", n, w / n, sm / n }' "$OUT/dmon.txt"
echo "total $SECONDS s"
