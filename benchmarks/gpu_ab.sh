#!/usr/bin/env bash
# The next device session's A/B for issue 8's one open target: jowa_150m stage-2 training at 40 % MFU on an H100
# (synchronized step alone: 36.4 % on an H100 in session 13, 38.5 % on an H200 in session 17; the loop's figures
# before session 17 read high). Session 18 wrote three ops no GPU has run; most important first:
# 1. the default recipe (fused LayerNorm op, one QKV product): the first loop figure with the clock read after
#    a device sync;
# 2. the CUDA tests of the new kernels against their references (fused_attention in each config, fused_gelu,
#    fused_ln's packed and redrawn masks and its h_bias), before any loop trusts them: every later arm leaves out
#    the kernels whose tests did not pass;
# 3. attention alone at the training shape: each SDPA backend and the Triton flash-attention op, with its
#    untimed config changes (benchmarks/attention_backends.py: jowa_triton; jowa_triton_onepass, the one-kernel
#    backward; jowa_triton_fwd168, the forward at 168 registers), forward and backward, with and without dropout;
# 4. the loop with --fused-attention under the faster of each change, if the op beat cuDNN there by 2 % (with
#    dropout; about 37 ms of an H100's step is attention and the copy of its three gradients into one, session 13
#    and 17 profiles);
# 5. the loop with the biases summed inside the fused ops' backwards: the bias + GELU op (--fused-bias-gelu) and
#    the branch biases in the fused LayerNorm op (--fused-branch-bias), together;
# 6. every arm that beat the default by 1 % or more, together;
# 7. the step alone with its kernels, with every new op on and without (profile_train);
# 8. on top of the winners, the fused LayerNorm op's packed dropout mask (packed_rng), then the mask left to the
#    backward to redraw (recompute_mask);
# 9. the default again, to show the machine's drift;
# 10. the compiled model's tests with each new switch;
# 11. the attention op's tiles (benchmarks/attention_sweep.py), if time is left.
# (Also waiting: attention on SDPA's flash kernel, --sdpa-off cudnn, if attention_backends shows it beat cuDNN;
# inductor's max-autotune MLP, benchmarks/mlp_autotune.py, a compile of minutes.) Starts nothing new after 480 s,
# so it fits one 600 s call.
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
mfus() { grep -c train_stage2_mfu "$OUT/loop.jsonl" 2>/dev/null || echo 0; }
last_mfu() { grep train_stage2_mfu "$OUT/loop.jsonl" | tail -n 1 | grep -o '"value": [0-9.]*' | cut -d' ' -f2; }
stack=()
wins=0  # arms in the stack (an arm's ARGS may be several words)
arm() {  # arm LIMIT ARGS...: a loop run with ARGS, whose ARGS join the stacked run if it beats the default by 1 %
    local n
    n=$(mfus)
    loop "$@"
    [ "$(mfus)" -gt "$n" ] && [ -n "${base:-}" ] &&
        python3 -c "import sys; sys.exit(float(sys.argv[1]) < 1.01 * float(sys.argv[2]))" "$(last_mfu)" "$base" &&
        stack+=("${@:2}") && wins=$((wins + 1)) && echo "  joins the stack: ${*:2}"
}
loop 150
base=$(last_mfu)
# the kernels' first GPU check against their references (the interpreter tests ran on CPU only); the compiled
# model with each new switch (a compile each) comes last, while time is left
# Each arm below runs only with the kernels whose tests passed here (a test that did not run counts as failed).
tests=$(mktemp)
fits 90 "the CUDA tests of the new kernels" && timeout 90 python3 -m pytest -v -p no:cacheprovider \
    tests/test_gpu.py -k "triton_matches or recomputed_mask" >"$tests" 2>&1
grep -E "(PASSED|FAILED|ERROR)" "$tests" | sed -E 's/^tests\/test_gpu.py:://; s/ +\[ *[0-9]+%\]//' | tr '\n' ' '
tail -n 1 "$tests"
ok() {  # ok TEST...: whether each of these test ids passed
    local t
    for t in "$@"; do grep -qF "test_gpu.py::$t PASSED" "$tests" || return 1; done
}
attn_test=test_fused_attention_triton_matches_the_reference
rows=cudnn,flash  # cuDNN (the step's backend) and flash (its fallback); math and memory-efficient left out for time
ok "$attn_test[0.0-default]" "$attn_test[0.1-default]" && rows+=,jowa_triton
ok "$attn_test[0.0-onepass]" "$attn_test[0.1-onepass]" && rows+=,jowa_triton_onepass
ok "$attn_test[0.0-fwd168]" "$attn_test[0.1-fwd168]" && rows+=,jowa_triton_fwd168
# attention alone (eager, seconds): SDPA's backends and the Triton op in each config that passed its test
if fits 60 "attention_backends"; then
    timeout 60 python3 -m benchmarks.attention_backends --device cuda --backends "$rows" >>"$OUT/micro.jsonl" \
        2>>"$OUT/loop.err" || echo "attention_backends: failed or timed out"
    grep '"backend"' "$OUT/micro.jsonl" | cut -c1-160
fi
# the op's config from attention alone: the faster backward (two kernels, jowa_triton, or one, jowa_triton_onepass)
# and the faster forward (the compiler's registers, or 168: jowa_triton_fwd168), each against jowa_triton
op=$(python3 -c "import json, sys
ms = {r['backend']: r['ms_fwd_bwd'] for r in map(json.loads, open(sys.argv[1]))
      if r.get('backend', '').startswith('jowa_triton') and 'ms_fwd_bwd' in r and r.get('dropout')}
if 'jowa_triton' in ms:
    cfg = {'bwd_onepass': ms.get('jowa_triton_onepass', 1e9) < ms['jowa_triton'],
           'fwd_maxnreg': 168 if ms.get('jowa_triton_fwd168', 1e9) < ms['jowa_triton'] else 0}
    json.dump(cfg, open(sys.argv[2], 'w'))
    best = ms['jowa_triton'] - sum(max(0.0, ms['jowa_triton'] - ms.get(k, 1e9)) for k in ms if k != 'jowa_triton')
    print(json.dumps(cfg).replace(' ', ''), round(best, 3))" "$OUT/micro.jsonl" "$cfg/attention.json" 2>/dev/null)
attn=(--fused-attention --fused-attention-config "$cfg/attention.json")
if [ -n "$op" ] && [ "$(python3 -c "import json, sys
rows = [r for r in map(json.loads, open(sys.argv[1])) if 'ms_fwd_bwd' in r and r.get('dropout')]
ms = {r['backend']: r['ms_fwd_bwd'] for r in rows}
base = next(ms[x] for x in ('cudnn', 'flash') if x in ms)
print(int(base / float(sys.argv[2]) >= 1.02))" "$OUT/micro.jsonl" "${op#* }" 2>/dev/null)" = 1 ]; then
    echo "attention op config ${op% *} (about ${op#* } ms forward + backward alone)"
    arm 90 "${attn[@]}"
else
    echo "skipped: loop --fused-attention (the op (${op:-not timed}) not 2 % faster than cuDNN alone, or no time)"
fi
biases=()
ok test_bias_gelu_triton_matches_the_reference && biases+=(--fused-bias-gelu)
ok test_fused_layer_norm_h_bias_triton_matches_the_reference && biases+=(--fused-branch-bias)
if [ "${#biases[@]}" -gt 0 ]; then arm 90 "${biases[@]}"; else echo "skipped: the bias arms (their tests failed)"; fi
if [ "$wins" -gt 1 ]; then
    loop 60 "${stack[@]}"
else
    echo "skipped: the stacked run (winners: ${stack[*]:-none})"
fi
att_cfg=()  # the attention op's config as attention_backends chose it
[ -s "$cfg/attention.json" ] && att_cfg=(--fused-attention-config "$cfg/attention.json")
variants=(compile_loss_fused_ln_qkv)  # and with every new op, if each passed its test
ok "$attn_test[0.1-default]" test_bias_gelu_triton_matches_the_reference \
    test_fused_layer_norm_h_bias_triton_matches_the_reference && variants+=(compile_loss_fused_ln_qkv_gelu_bias_attn)
pt 150 --variants "${variants[@]}" --profile "${att_cfg[@]}"
winners=("${stack[@]}")  # the LayerNorm mask arms run on top of the winners so far, each on its own
if ok "test_fused_layer_norm_triton_matches_the_reference[0.1-True]"; then
    loop 90 "${winners[@]}" --fused-ln-config "$cfg/packed_rng.json"
    ok test_fused_layer_norm_recomputed_mask_trains_as_the_stored_one &&
        loop 60 "${winners[@]}" --fused-ln-config "$cfg/recompute_mask.json"
else
    echo "skipped: the packed and redrawn LayerNorm masks (their tests failed)"
fi
loop 45
fits 90 "the compiled model with each new switch" && timeout 90 python3 -m pytest -q -p no:cacheprovider \
    tests/test_gpu.py -k "fused_switch and (attention or gelu or branch)" 2>&1 | tail -n 4
# the attention op's tiles (44 of them, a compile each), for the next call's --fused-attention-config
fits 120 "attention_sweep" && { timeout 120 python3 -m benchmarks.attention_sweep --best "$cfg/attention_best.json" \
    >>"$OUT/micro.jsonl" 2>>"$OUT/loop.err" || echo "attention_sweep: failed or timed out"; }
grep '"part": "best"' "$OUT/micro.jsonl" | cut -c1-300
kill "$dmon" 2>/dev/null
awk '$1 ~ /^[0-9]+$/ { n++; w += $2; sm += $NF }  # columns: gpu pwr gtemp mtemp mclk pclk
    END { if (n) printf "dmon: %d samples, mean power %.0f W, mean SM clock %.0f MHz\n", n, w / n, sm / n }' "$OUT/dmon.txt"
echo "total $SECONDS s"
