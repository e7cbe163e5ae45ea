#!/usr/bin/env bash
# The device A/B of the jowa_150m training step (batch 512) behind the README's "where dropout's cost lies":
# the loop's recipe (the fused LayerNorm op) with attention on cuDNN's kernel and on flash
# (--sdpa-off cudnn), then the recipe without the op against it, the step with and without dropout, with
# aten's random numbers (fallback_random) and with looped reductions, then Nsight Compute on inductor's
# fused LayerNorm/dropout backward kernels and on the hand-written ones. One process per inductor or SDPA
# setting (they are process-wide). About 9 minutes (estimated); the fused_ln lines use
# fused_ln.KernelConfig's tiles, as swept by benchmarks/fused_ln_sweep.py on an H100 in session 13.
#   bash benchmarks/gpu_ab.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/nvidia_smi.txt"
pt() {  # pt LIMIT ARGS...: one profile_train process, its JSON lines appended to ab.jsonl
    local limit=$1
    shift
    timeout "$limit" python3 -m benchmarks.profile_train --preset jowa_150m --batch-size 512 --steps 10 "$@" \
        >>"$OUT/ab.jsonl" 2>>"$OUT/ab.err" || echo "failed or timed out: $*" | tee -a "$OUT/ab.err"
    tail -n 1 "$OUT/ab.jsonl" | cut -c1-400
}
# attention on the flash kernel instead of cuDNN's, with the loop's recipe (the fused LayerNorm op)
pt 150 --variants compile_loss_fused_ln --profile
pt 150 --variants compile_loss_fused_ln --profile --sdpa-off cudnn
pt 220 --variants compile_loss compile_loss_fused_ln --profile
pt 110 --variants compile_loss_no_dropout --profile
pt 110 --variants compile_loss --profile --inductor fallback_random=1
pt 110 --variants compile_loss --inductor triton.persistent_reductions=0
python3 -c "import torch._inductor.config as c; print('align_random_eager' in dir(c))" | grep -q True &&
    pt 110 --variants compile_loss --inductor align_random_eager=1
timeout 100 ncu --nvtx --nvtx-include "timed_steps/" --kernel-name "regex:native_dropout_backward_native_layer_norm_backward" --launch-count 3 \
    --clock-control none --section SpeedOfLight --section Occupancy --section LaunchStats --section ComputeWorkloadAnalysis --section WarpStateStats \
    python3 -m benchmarks.profile_train --preset jowa_150m --batch-size 512 --steps 1 --variants compile_loss \
    >"$OUT/ncu.txt" 2>&1 || echo "ncu failed or timed out"
grep -E "triton_|Duration|Memory Throughput|DRAM Throughput|Compute \(SM\)|Achieved Occupancy|Registers Per|Block Size|Grid Size|Executed Ipc" "$OUT/ncu.txt" | head -60
# a step launches the forward kernel 25 times before the first backward one: 28 launches take both
timeout 150 ncu --nvtx --nvtx-include "timed_steps/" --kernel-name "regex:dropout_add_layer_norm_(fwd|bwd)" --launch-count 28 \
    --clock-control none --section SpeedOfLight --section Occupancy --section LaunchStats --section ComputeWorkloadAnalysis --section WarpStateStats \
    python3 -m benchmarks.profile_train --preset jowa_150m --batch-size 512 --steps 1 --variants compile_loss_fused_ln \
    >"$OUT/ncu_fused_ln.txt" 2>&1 || echo "ncu (fused_ln) failed or timed out"
grep -E "dropout_add_layer_norm|Duration|Memory Throughput|DRAM Throughput|Compute \(SM\)|Achieved Occupancy|Registers Per|Block Size|Grid Size|Executed Ipc" "$OUT/ncu_fused_ln.txt" | head -60
