"""The benchmark suite's output: figure records and the README table (the timings themselves are not tested)."""

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.__main__ import SUITES, _figure, main, markdown_table
from jowa_core.models.world_action import WorldActionModel
from tests.triton_interpreter import needs_triton


def test_figure_records_and_markdown_table():
    figs = [
        _figure("planner_beam_bw2_h2_envs16", 129.6049, "decisions/s", "jowa_150m", envs=16, cuda_graphs=True),
        _figure("train_stage2_mfu", 0.36331, "fraction", "jowa_150m", batch_size=512, flops_per_sample=1),
        _figure("collect_transitions_per_s", math.nan, "transitions/s", None, skipped="ale-py not installed"),
    ]
    assert figs[0] == {"name": "planner_beam_bw2_h2_envs16", "value": 129.6049, "unit": "decisions/s",
                       "preset": "jowa_150m", "envs": 16, "cuda_graphs": True}  # fmt: skip
    lines = markdown_table(figs).splitlines()
    assert lines[0] == "| figure | preset | value | unit | details |"
    assert lines[2] == "| planner_beam_bw2_h2_envs16 | jowa_150m | 130 | decisions/s | envs=16, cuda_graphs=True |"
    assert lines[3] == "| train_stage2_mfu | jowa_150m | 0.363 | fraction | batch_size=512 |"
    assert lines[4] == "| collect_transitions_per_s |  | n/a | transitions/s | skipped=ale-py not installed |"


def test_unknown_suite_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--suite", "nope"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    assert set(SUITES) == {"train", "planner", "tokenizer", "data"}


def test_profile_train_sorts_kernels_and_times_a_step():
    import torch
    import torch._inductor.config as inductor_config

    from benchmarks.profile_train import apply_inductor_settings, kernel_kind, run_variant
    from jowa_core.config import preset
    from jowa_core.games import action_masks
    from jowa_core.training import Batch

    # kernel names as an H100 profile printed them
    assert kernel_kind("nvjet_sm90_tst_192x192_64x3_2x1_v_bz_coopB_NNN") == "matmul"
    assert kernel_kind("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26") == "attention"
    assert kernel_kind("triton_poi_fused_gelu_view_16").startswith("triton")
    assert kernel_kind("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<Adam") == "optimizer"
    assert kernel_kind("dropout_add_layer_norm_bwd").endswith("(fused_ln)")
    before = inductor_config.aggressive_fusion
    try:
        assert apply_inductor_settings(["aggressive_fusion=1"]) == {"aggressive_fusion": True}
        assert inductor_config.aggressive_fusion is True
    finally:
        inductor_config.aggressive_fusion = before
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        apply_inductor_settings(["no_such_setting=1"])

    p = preset("tiny")
    B, L, tpb = 2, p.model.max_blocks, p.model.tokens_per_block
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, p.model.obs_vocab_size, (B, L, tpb), generator=g)
    tokens[..., -1] = torch.randint(0, 4, (B, L), generator=g)
    task = torch.tensor([1, 1])
    batch = Batch(tokens.reshape(B, -1), task, torch.zeros(B, L), torch.zeros(B, L, dtype=torch.long),
                  torch.ones(B, L, dtype=torch.bool), torch.as_tensor(action_masks())[task])  # fmt: skip
    out = run_variant("eager", p, [batch], torch.device("cpu"), steps=2, profile=False, peak=None)
    assert out["variant"] == "eager" and out["batch_size"] == B and out["ms_per_step"] > 0
    assert out["tokens_per_s"] == pytest.approx(B * L * tpb / out["ms_per_step"] * 1e3, rel=1e-3)
    assert "mfu" not in out  # no bf16 peak on a CPU
    assert out["dropout"] is True
    quiet = run_variant("eager_no_dropout", p, [batch], torch.device("cpu"), steps=1, profile=False, peak=None)
    assert quiet["variant"] == "eager_no_dropout" and quiet["dropout"] is False


def test_sdpa_backends_are_turned_off_by_name_and_unknown_ones_refused():
    import torch

    from benchmarks.profile_train import disable_sdpa_backends

    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        assert disable_sdpa_backends(["cudnn"]) == ["cudnn"]
        assert not torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cuda.flash_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
    with pytest.raises(SystemExit, match="choose from flash, cudnn"):
        disable_sdpa_backends(["cudnn_v2"])


def test_fused_ln_sweep_reports_every_tile_and_writes_a_loadable_best(tmp_path, capsys):
    """The CPU smoke run (torch reference, eager): one line for inductor's pattern, one per tile, the best."""
    import json

    from benchmarks.fused_ln_sweep import main as sweep
    from jowa_core.models.fused_ln import KernelConfig, kernel_config

    before = kernel_config()
    sweep(["--device", "cpu", "--rows", "16", "--width", "8", "--reps", "1", "--best", str(tmp_path / "best.json")])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["impl"] for x in lines] == ["inductor"] + ["fused_ln"] * 65 + ["fused_ln_best"]
    tiles = [x for x in lines if x["impl"] == "fused_ln"]
    # backward = (forward + backward) - forward: at this size on a busy CPU the difference can be noise
    assert all(x["fwd_ms"] > 0 and isinstance(x["bwd_ms"], float) and "error" not in x for x in tiles)
    assert len({json.dumps(x["config"], sort_keys=True) for x in tiles}) == 64  # the default is in both grids
    assert sum(x["config"]["packed_rng"] for x in tiles[:24]) == 12  # half the forward's 24 tiles, packed
    assert all(x["config"]["packed_rng"] == before.packed_rng for x in tiles[24:])  # the backward's: the default's
    best = KernelConfig(**json.loads((tmp_path / "best.json").read_text()))
    assert best == KernelConfig(**lines[-1]["config"])
    assert kernel_config() == before  # the sweep puts the process's tiles back
    assert all(x["h_bias"] for x in lines)  # the branch's bias, as the training loop passes it on CUDA
    stages = [k for k in (1, 2, 3, 4) if k != KernelConfig().bwd_stages][:3]  # the row loop's stages but the default
    assert [x["config"]["bwd_stages"] for x in tiles[-9:-6]] == stages
    assert [x["config"]["bwd_split"] for x in tiles[-7:]] == [False] + [True] * 6  # rows as two tiles
    # --grids bwd: the backward's 41 configs alone; the best keeps the default's forward
    sweep(["--device", "cpu", "--rows", "16", "--width", "8", "--reps", "1", "--grids", "bwd", "--no-h-bias"])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["impl"] for x in lines] == ["inductor"] + ["fused_ln"] * 41 + ["fused_ln_best"]
    assert not any(x["h_bias"] for x in lines)
    assert all(x["config"]["fwd_rows"] == before.fwd_rows and x["config"]["packed_rng"] == before.packed_rng
               for x in lines[1:])  # fmt: skip
    assert kernel_config() == before


def test_attention_sweep_reports_every_tile_and_writes_a_loadable_best(tmp_path, capsys):
    """The CPU smoke run (torch reference): one line per forward and backward tile, then the best of each together,
    written as a KernelConfig the loop's ``--fused-attention-config`` reads; the process's config is put back."""
    import json

    from benchmarks.attention_sweep import BWD_TILES, FWD_TILES
    from benchmarks.attention_sweep import main as sweep
    from jowa_core.models.fused_attention import KernelConfig, kernel_config

    before = kernel_config()
    assert len(FWD_TILES) == 18 and len(BWD_TILES) == 20
    argv = ["--device", "cpu", "--batch", "1", "--heads", "2", "--tokens", "20", "--head-size", "16", "--reps", "1"]
    sweep([*argv, "--best", str(tmp_path / "best.json")])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["part"] for x in lines] == ["fwd"] * len(FWD_TILES) + ["bwd"] * len(BWD_TILES) + ["best"]
    assert all(x["ms"] > 0 and "error" not in x for x in lines[:-1])
    best = KernelConfig.from_json(str(tmp_path / "best.json"))
    assert best == KernelConfig(**lines[-1]["config"])
    for part, tiles in (("fwd", FWD_TILES), ("bwd", BWD_TILES)):  # each half from one of its part's fastest tiles
        ms = min(x["ms"] for x in lines if x["part"] == part)
        assert lines[-1][f"{part}_ms"] == ms
        fastest = [x["config"] for x in lines if x["part"] == part and x["ms"] == ms]
        assert any(all(getattr(best, k) == c[k] for k in tiles[0]) for c in fastest)
    assert kernel_config() == before


def test_train_suite_runs_the_tiny_preset_on_cpu(capsys):
    """The tiny preset samples life starts; the suite's synthetic caches have no lives, so it turns that off."""
    import json

    assert main(["--suite", "train", "--preset", "tiny", "--steps", "1"]) in (None, 0)
    figs = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    names = {f["name"] for f in figs}
    assert {"train_stage2_tokens_per_s", "train_stage2_samples_per_s"} <= names
    assert all(f["fused_ln"] is False and f["compile"] is False for f in figs if f["name"].startswith("train_"))
    assert all(f["fused_qkv"] is False and "inductor" not in f for f in figs if f["name"].startswith("train_"))
    assert all(f["fused_bias_gelu"] is False is f["fused_branch_bias"] for f in figs if f["name"].startswith("train_"))


def test_train_suite_applies_and_records_process_wide_settings(capsys, tmp_path):
    """``--inductor``, ``--sdpa-off`` and the fused ops' ``--fused-*-config`` (the loop-level A/B of profile_train's
    switches) take effect for the process and are written beside every training figure; ``--fused-qkv`` overrides
    the device default, and ``--fused-bias-gelu`` reaches the loop."""
    import json

    import torch
    import torch._inductor.config as inductor_config

    from jowa_core.models import fused_attention, fused_gelu, fused_ln

    cfg = tmp_path / "packed.json"
    cfg.write_text('{"packed_rng": true}')
    attn = tmp_path / "attention.json"
    attn.write_text('{"fwd_m": 128, "bwd_stages": 3}')
    gelu = tmp_path / "gelu.json"
    gelu.write_text('{"rows": 16, "warps": 8, "bwd_programs_per_sm": 2}')
    before = inductor_config.aggressive_fusion, torch.backends.cuda.cudnn_sdp_enabled(), fused_ln.kernel_config()
    attn_before, gelu_before = fused_attention.kernel_config(), fused_gelu.kernel_config()
    try:
        argv = ["--suite", "train", "--preset", "tiny", "--steps", "1", "--fused-qkv", "--fused-ln-config", str(cfg),
                "--fused-attention-config", str(attn), "--fused-gelu-config", str(gelu)]  # fmt: skip
        seen = []
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(WorldActionModel, "use_fused_bias_gelu", lambda m, on=True: seen.append(on) or m)
            argv += [
                "--fused-bias-gelu",
                "--fused-branch-bias",
                "--inductor",
                "aggressive_fusion=1",
                "--sdpa-off",
                "cudnn",
            ]
            assert main(argv) in (None, 0)
        assert seen == [True]
        assert inductor_config.aggressive_fusion is True and not torch.backends.cuda.cudnn_sdp_enabled()
        assert fused_ln.kernel_config() == fused_ln.KernelConfig(packed_rng=True)
        assert fused_attention.kernel_config() == fused_attention.KernelConfig(fwd_m=128, bwd_stages=3)
        assert fused_gelu.kernel_config() == fused_gelu.KernelConfig(rows=16, warps=8, bwd_programs_per_sm=2)
    finally:
        fused_attention.set_kernel_config(attn_before)
        fused_gelu.set_kernel_config(gelu_before)
        inductor_config.aggressive_fusion = before[0]
        torch.backends.cuda.enable_cudnn_sdp(before[1])
        fused_ln.set_kernel_config(before[2])
    figs = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    train = [f for f in figs if f["name"].startswith("train_")]
    assert train and all(f["inductor"] == ["aggressive_fusion=1"] and f["sdpa_off"] == ["cudnn"] for f in train)
    assert all(f["fused_qkv"] is True and f["fused_ln_config"] == str(cfg) for f in train)
    assert all(f["fused_attention_config"] == str(attn) and f["fused_gelu_config"] == str(gelu) for f in train)
    assert f"fused_gelu_config={gelu}" in markdown_table(train)
    assert all(f["fused_bias_gelu"] is True and f["fused_branch_bias"] is True for f in train)
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        main(["--suite", "train", "--preset", "tiny", "--steps", "1", "--inductor", "no_such_setting=1"])
    cfg.write_text('{"packed": true}')
    with pytest.raises(SystemExit):
        main(["--suite", "train", "--preset", "tiny", "--steps", "1", "--fused-ln-config", str(cfg)])
    assert "unknown KernelConfig fields ['packed']" in capsys.readouterr().err
    assert fused_ln.kernel_config() == before[2]
    attn.write_text('{"fwd_m": 96}')
    with pytest.raises(SystemExit):
        main(["--suite", "train", "--preset", "tiny", "--steps", "1", "--fused-attention-config", str(attn)])
    assert (
        "--fused-attention-config: fused_attention KernelConfig.fwd_m must be a power of two" in capsys.readouterr().err
    )
    gelu.write_text('{"warps": 3}')
    with pytest.raises(SystemExit) as exc:
        main(["--suite", "train", "--preset", "tiny", "--steps", "1", "--fused-gelu-config", str(gelu)])
    assert exc.value.code == 2
    assert "--fused-gelu-config: bias_gelu KernelConfig.warps must be a power of two" in capsys.readouterr().err
    assert fused_gelu.kernel_config() == gelu_before


@needs_triton
def test_fused_ln_isa_counts_the_forward_kernels_machine_code(capsys):
    """Compiled for sm_90 on the CPU: the packed mask needs fewer instructions and integer multiplies per thread
    (an eighth of the Philox calls), and the issue time follows from the count. Compiled as the launch specializes
    the kernel (aligned rows), the residual stream loads as 16-byte vectors; without those facts it loads scalars
    and needs more instructions."""
    import json

    from benchmarks.fused_ln_isa import CLOCK_HZ, SCHEDULERS, SMS
    from benchmarks.fused_ln_isa import main as isa

    isa(["--rows", "4096", "--width", "768", "--kernels", "fwd"])
    plain, packed, recomputed = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert {x["kernel"] for x in (plain, packed, recomputed)} == {"fwd"} and plain["aligned"]
    assert (plain["config"]["packed_rng"], packed["config"]["packed_rng"]) == (False, True)
    assert recomputed["config"]["recompute_mask"] and recomputed["sass_per_thread"] < packed["sass_per_thread"]
    assert recomputed["bandwidth_ms_h200"] == pytest.approx(4096 * 768 * 12 / 1e9 / 4.3, abs=1e-3)
    assert packed["sass_per_thread"] < 0.75 * plain["sass_per_thread"]
    assert packed["integer_multiplies"] < 0.5 * plain["integer_multiplies"]
    assert packed["vector_loads"] > 0
    cfg = plain["config"]
    warp_instr = math.ceil(4096 / cfg["fwd_rows"]) * cfg["fwd_warps"] * plain["sass_per_thread"]
    assert plain["issue_ms"] == pytest.approx(warp_instr / (SMS * SCHEDULERS * CLOCK_HZ) * 1e3, abs=1e-3)
    assert plain["bandwidth_ms_h200"] == pytest.approx(4096 * 768 * 13 / 1e9 / 4.3, abs=1e-3)
    isa(["--rows", "4096", "--width", "768", "--kernels", "fwd", "--unaligned"])
    scalar = json.loads(capsys.readouterr().out.splitlines()[1])
    assert not scalar["aligned"] and scalar["vector_loads"] == 0
    assert scalar["sass_per_thread"] > 1.2 * packed["sass_per_thread"]


@needs_triton
def test_fused_ln_isa_counts_the_backward_loop_and_the_idle_warps(capsys):
    """The backward's persistent loop body, with the mask read and redrawn (Philox again: more instructions, one
    byte less an element), and the warps that a row of 768 in a block of 1024 columns leaves idle: with the default
    tile (one row on 4 warps, 8 columns a thread) the fourth warp holds columns 768 to 1023 only, and none with
    the row split into tiles of 512 and 256 (``bwd_split``); at width 1024 none is idle."""
    import json

    from benchmarks.fused_ln_isa import BWD_BYTES_PER_ELEMENT, programs_per_sm
    from benchmarks.fused_ln_isa import main as isa
    from jowa_core.models.fused_ln import KernelConfig

    assert KernelConfig().bwd_rows == 1 and KernelConfig().bwd_warps == 4  # the case the idle count below is for
    isa(["--rows", "4096", "--width", "768", "--kernels", "bwd"])
    stored, redrawn, pipelined, split = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert {x["kernel"] for x in (stored, redrawn, pipelined, split)} == {"bwd"}
    # bwd_stages=3: the row loop's loads become asynchronous copies to shared memory
    assert pipelined["config"]["bwd_stages"] == 3 and stored["config"]["bwd_stages"] == 1
    assert pipelined["async_copies"] > 0 and stored["async_copies"] == 0
    assert not stored["config"]["recompute_mask"] and redrawn["config"]["recompute_mask"]
    assert 100 < stored["sass_per_thread"] < redrawn["sass_per_thread"]
    assert stored["bandwidth_ms_h100"] == pytest.approx(4096 * 768 * BWD_BYTES_PER_ELEMENT / 1e9 / 3.0, abs=1e-3)
    assert redrawn["bandwidth_ms_h100"] == pytest.approx(4096 * 768 * 16 / 1e9 / 3.0, abs=1e-3)
    assert stored["programs_per_sm"] == programs_per_sm(stored["registers"], 4)
    assert stored["idle_warps"] == 1 and stored["warps"] == 4
    # bwd_split: 768 as tiles of 512 and 256, every warp holding columns below the width
    assert split["config"]["bwd_split"] and split["idle_warps"] == 0 and split["warps"] == 4
    isa(["--rows", "4096", "--width", "1024", "--kernels", "bwd"])  # a power of two: one tile, split or not
    assert [json.loads(x)["idle_warps"] for x in capsys.readouterr().out.splitlines()] == [0, 0, 0, 0]
    with pytest.raises(SystemExit):
        isa(["--kernels", "both"])


@needs_triton
def test_bias_gelu_isa_counts_both_kernels_against_inductors(capsys):
    """Compiled for sm_90 on the CPU: fused_gelu's kernels need fewer instructions per element than the inductor
    kernels they replace (its erf and reciprocal are cheaper), and each figure's issue time and bytes follow
    from the counts and the shape."""
    import json

    from benchmarks.bias_gelu_isa import main as isa
    from benchmarks.fused_ln_isa import CLOCK_HZ, SCHEDULERS, SMS

    isa(["--rows", "4096", "--width", "3072", "--layers", "12"])
    ind_fwd, ind_bwd, fwd, bwd = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert fwd["sass_per_element"] < 0.8 * ind_fwd["sass_per_element"]
    assert bwd["sass_per_element"] < 0.8 * ind_bwd["sass_per_element"]
    n = 4096 * 3072 * 12
    assert ind_fwd["bandwidth_ms_h100"] == fwd["bandwidth_ms_h100"] == pytest.approx(n * 4 / 1e9 / 3.0, abs=1e-3)
    assert bwd["bandwidth_ms_h200"] == pytest.approx(n * 6 / 1e9 / 4.3, abs=1e-3)
    warp_instr = n / 1024 * 4 * ind_fwd["sass_per_thread"]  # 1,024-element blocks of 4 warps
    assert ind_fwd["issue_ms"] == pytest.approx(warp_instr / (SMS * SCHEDULERS * CLOCK_HZ) * 1e3, abs=1e-3)
    assert fwd["issue_ms"] == pytest.approx(fwd["sass_per_element"] * n / 32 / (SMS * SCHEDULERS * CLOCK_HZ) * 1e3,
                                            rel=1e-2)  # fmt: skip


@needs_triton
def test_attention_isa_counts_each_kernels_loop(tmp_path, capsys):
    """Compiled for sm_90 on the CPU: each attention kernel's loop uses Hopper's asynchronous matrix products, the
    dropout's flags add instructions, and the passes and times follow from the shape and the counts."""
    import json

    from benchmarks.attention_isa import PEAK_FLOPS, causal_passes, programs_per_sm
    from benchmarks.attention_isa import main as isa
    from benchmarks.fused_ln_isa import CLOCK_HZ, SCHEDULERS, SMS

    assert causal_passes(296, 64, 64) == (5, 10) and causal_passes(296, 64, 64, "attn_bwd_dkdv") == (5, 10)
    assert causal_passes(64, 64, 64) == (1, 0) and causal_passes(100, 32, 64) == (4, 2)
    assert causal_passes(100, 32, 64, "attn_bwd_dkdv") == (4, 2)  # keys 0-63: 2 masked, 2 whole; keys 64-99: 2, 0
    (tmp_path / "regs.json").write_text('{"fwd_maxnreg": 0}')  # the compiler's registers: no spill anywhere
    isa(["--batch", "2", "--layers", "1", "--fused-attention-config", str(tmp_path / "regs.json")])
    recs = {(r["kernel"], r["dropout"]): r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert len(recs) == 6
    for name, products in (("attn_fwd", 2), ("attn_bwd_dkdv", 4), ("attn_bwd_dq", 3)):
        on, off = recs[(name, True)], recs[(name, False)]
        sass, passes = on["loop_sass_per_thread"], on["passes_per_step"]
        assert on["hgmma_per_pass"] > 0 and sass["masked"] > sass["whole"]
        if name != "attn_fwd":  # the backwards' 64 x 64 x 64 products take 4 HGMMA (k = 16) each
            assert on["hgmma_per_pass"] == 4 * products, name
        assert on["spill_sass"] == {"in_pass_loops": 0, "in_kernel": 0}, name
        assert sass["whole"] > off["loop_sass_per_thread"]["whole"]  # the dropout's flags
        bm, bn, warps = on["tiles"]
        masked, whole = (n * 2 * 12 for n in causal_passes(296, bm, bn, name))
        assert passes == {"masked": masked, "whole": whole}
        issue = (masked * sass["masked"] + whole * sass["whole"]) * warps / (SMS * SCHEDULERS * CLOCK_HZ) * 1e3
        assert on["issue_ms"] == pytest.approx(issue, abs=0.006)
        flops = (masked + whole) * products * 2 * bm * bn * 64
        assert on["tensor_ms"] == pytest.approx(flops / PEAK_FLOPS * 1e3, abs=0.006)
        assert 0 < on["registers"] <= 255 and on["programs_per_sm"] == programs_per_sm(on["registers"], warps)
    assert [programs_per_sm(r, w) for r, w in ((178, 4), (168, 4), (255, 4), (255, 8))] == [2, 3, 2, 1]
    # the default forward, held to 168 registers (KernelConfig.fwd_maxnreg): three programs an SM, no spill in
    # its loops (Triton 3.9 spills 4 instructions' worth outside them, 3.6 none)
    isa(["--batch", "2", "--layers", "1"])
    fwd = [r for r in map(json.loads, capsys.readouterr().out.splitlines()) if r["kernel"] == "attn_fwd"]
    assert all(r["registers"] <= 168 and r["programs_per_sm"] == 3 for r in fwd), fwd
    assert all(r["spill_sass"]["in_pass_loops"] == 0 for r in fwd), fwd


def test_mlp_autotune_times_variants_that_compute_the_same_gradients(capsys):
    """The CPU smoke run: eager and inductor's default compile of the MLP, timed, with gradients that agree (the
    A/B is only worth its timing if both variants compute the same thing)."""
    import json

    from benchmarks.mlp_autotune import main as mlp

    mlp(["--rows", "16", "--width", "32", "--reps", "1", "--device", "cpu"])
    eager, compiled = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert (eager["variant"], compiled["variant"]) == ("eager", "compile")
    assert eager["grad_rel_diff_vs_first"] == 0.0 and compiled["grad_rel_diff_vs_first"] < 1e-5
    assert eager["ms_fwd_bwd"] > 0 and compiled["ms_fwd_bwd"] > 0


def test_attention_backends_times_each_backend_that_takes_the_shape(capsys):
    """The CPU smoke run: cuDNN and memory-efficient attention are skipped with the reason, flash and the fused op
    (its torch reference here; no dropout) agree with math, and math runs with and without dropout."""
    import json

    from benchmarks.attention_backends import main as attention

    argv = ["--batch", "2", "--heads", "2", "--tokens", "37", "--head-size", "16", "--reps", "1", "--device", "cpu"]
    attention(argv)
    recs = {(r["backend"], r["dropout"]): r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert len(recs) == 12 and all("skipped" in recs[("cudnn", p)] for p in (0.0, 0.1))
    for op in ("jowa_triton", "jowa_triton_untuned"):  # the op in each KernelConfig variant
        assert recs[(op, 0.0)]["max_abs_diff_vs_math"] < 1e-5 and recs[(op, 0.1)]["ms_fwd_bwd"] > 0
    assert recs[("flash", 0.0)]["max_abs_diff_vs_math"] < 1e-5 and recs[("math", 0.0)]["max_abs_diff_vs_math"] == 0.0
    assert recs[("math", 0.1)]["ms_fwd_bwd"] > 0 and "max_abs_diff_vs_math" not in recs[("math", 0.1)]
    attention([*argv, "--backends", "flash,jowa_triton_untuned"])  # the rows asked for, and only those
    rows = {r["backend"] for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert rows == {"flash", "jowa_triton_untuned"}
    with pytest.raises(SystemExit):
        attention([*argv, "--backends", "flash,cudnnn"])
    assert "unknown ['cudnnn']" in capsys.readouterr().err


def test_bias_gelu_sweep_reports_every_tile_and_writes_a_loadable_best(tmp_path, capsys):
    """The CPU smoke run (torch reference, eager): one line for inductor's pattern, one per tile of 4 to 64 elements
    a thread and one per programs-per-SM count, then the best: the tile fastest forward + backward (both kernels
    use it) with the programs per SM fastest backward, written as a KernelConfig ``--fused-gelu-config`` reads."""
    import itertools
    import json

    from benchmarks.bias_gelu_sweep import main as sweep
    from jowa_core.models.fused_gelu import KernelConfig, kernel_config, set_kernel_config

    odd = KernelConfig(rows=2, cols=64, warps=1, bwd_programs_per_sm=3)  # not the default: the grids build on it
    before = set_kernel_config(odd)
    try:
        sweep(["--device", "cpu", "--rows", "16", "--width", "8", "--reps", "1", "--best", str(tmp_path / "best.json")])
        assert kernel_config() == odd  # the sweep puts the process's config back
    finally:
        set_kernel_config(before)
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    tiles = [(r, c, w) for r, c, w in itertools.product((4, 8, 16, 32), (128, 256, 512), (2, 4, 8))
             if 4 <= r * c / (32 * w) <= 64]  # fmt: skip
    assert len(tiles) == 31  # of 36, left out: 4 x 128 on 8 warps (2 elements a thread), 4 with 128 or 256
    assert [x["impl"] for x in lines] == ["inductor"] + ["bias_gelu"] * (len(tiles) + 6) + ["bias_gelu_best"]
    fused = lines[1:-1]
    assert all(x["fwd_ms"] > 0 and x["bwd_ms"] > 0 and "error" not in x for x in fused)
    assert all(x["fwd_gb"] == round(16 * 8 * 4 / 1e9, 3) and x["device_name"] == "cpu" for x in fused)
    tile_lines, programs_lines = fused[: len(tiles)], fused[len(tiles) :]
    assert {x["grid"] for x in tile_lines} == {"tile"} and {x["grid"] for x in programs_lines} == {"programs"}
    assert [(x["config"]["rows"], x["config"]["cols"], x["config"]["warps"]) for x in tile_lines] == tiles
    assert all(x["config"]["bwd_programs_per_sm"] == 3 for x in tile_lines)
    assert [x["config"] for x in programs_lines] == [
        {"rows": 2, "cols": 64, "warps": 1, "bwd_programs_per_sm": k} for k in (2, 4, 8, 16, 32, 64)
    ]
    best = KernelConfig.from_json(str(tmp_path / "best.json"))
    assert best == KernelConfig(**lines[-1]["config"])
    fastest_tile = min(tile_lines, key=lambda x: x["fwd_ms"] + x["bwd_ms"])  # to the printed 3 decimals
    fastest_pair = fastest_tile["fwd_ms"] + fastest_tile["bwd_ms"]
    assert any(
        (best.rows, best.cols, best.warps) == (x["config"]["rows"], x["config"]["cols"], x["config"]["warps"])
        for x in tile_lines
        if x["fwd_ms"] + x["bwd_ms"] <= fastest_pair + 2e-3
    )
    fastest_bwd = min(x["bwd_ms"] for x in programs_lines)
    assert best.bwd_programs_per_sm in {
        x["config"]["bwd_programs_per_sm"] for x in programs_lines if x["bwd_ms"] <= fastest_bwd + 1e-3
    }
    assert lines[-1]["programs_bwd_ms"] == fastest_bwd


def test_profile_train_applies_and_records_a_fused_gelu_config(tmp_path, capsys, monkeypatch):
    """``--fused-gelu-config``: a bias_gelu_sweep ``--best`` file sets the process's fused_gelu tiles and is written
    beside every variant's figures; a file that does not hold a KernelConfig is a usage error."""
    import json
    import sys

    from benchmarks import profile_train
    from jowa_core.models import fused_gelu

    cfg = tmp_path / "gelu.json"
    cfg.write_text('{"rows": 16, "cols": 128, "bwd_programs_per_sm": 4}')
    argv = ["profile_train", "--preset", "tiny", "--device", "cpu", "--steps", "1", "--variants", "eager",
            "--batch-size", "2", "--fused-gelu-config", str(cfg)]  # fmt: skip
    before = fused_gelu.kernel_config()
    try:
        monkeypatch.setattr(sys, "argv", argv)
        profile_train.main()
        applied = fused_gelu.KernelConfig(rows=16, cols=128, bwd_programs_per_sm=4)
        assert fused_gelu.kernel_config() == applied
        (out,) = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
        assert out["variant"] == "eager" and out["fused_gelu_config"] == vars(applied)
        fused_gelu.set_kernel_config(before)
        for bad, message in (('{"tile": 8}', "unknown bias_gelu KernelConfig fields ['tile']"),
                             ('{"cols": 96}', "KernelConfig.cols must be a power of two")):  # fmt: skip
            cfg.write_text(bad)
            with pytest.raises(SystemExit) as exc:
                profile_train.main()
            assert exc.value.code == 2
            err = capsys.readouterr().err
            assert "--fused-gelu-config: " in err and message in err
            assert fused_gelu.kernel_config() == before
        monkeypatch.setattr(sys, "argv", argv[:-2] + ["--fused-gelu-config", str(tmp_path / "missing.json")])
        with pytest.raises(SystemExit):
            profile_train.main()
        assert "No such file" in capsys.readouterr().err
    finally:
        fused_gelu.set_kernel_config(before)


def test_time_configs_reports_a_failing_config_and_puts_the_process_config_back():
    """A config whose timing raises is yielded with its error and the sweep goes on; the process's config is put back
    after the last one, and also when the caller stops early."""
    from benchmarks.fused_ln_sweep import time_configs
    from jowa_core.models import fused_gelu

    before = fused_gelu.kernel_config()
    configs = [fused_gelu.KernelConfig(rows=r) for r in (2, 4, 16)]

    def measure() -> int:
        if fused_gelu.kernel_config().rows == 4:
            raise RuntimeError("out of shared memory")
        return fused_gelu.kernel_config().rows

    got = [(cfg.rows, ms, None if e is None else str(e)) for cfg, ms, e in time_configs(fused_gelu, configs, measure)]
    assert got == [(2, 2, None), (4, None, "out of shared memory"), (16, 16, None)]
    assert fused_gelu.kernel_config() == before
    sweep = time_configs(fused_gelu, configs, measure)
    next(sweep)
    assert fused_gelu.kernel_config() == configs[0]
    sweep.close()
    assert fused_gelu.kernel_config() == before


@pytest.mark.parametrize("module", ["fused_ln_sweep", "bias_gelu_sweep"])
def test_a_sweep_cut_short_leaves_its_best_so_far(module, tmp_path, monkeypatch, capsys):
    """A device call's time limit can kill a sweep mid-grid: ``--best`` must then hold the fastest config among those
    timed (written whole after each one), not nothing, so the next step of the script can still use it."""
    import importlib
    import json

    sweep = importlib.import_module(f"benchmarks.{module}")
    real = sweep.time_configs

    def killed_after_four(*args, **kwargs):
        for i, row in enumerate(real(*args, **kwargs)):
            if i == 4:
                raise KeyboardInterrupt  # what the limit's signal does to the sweep
            yield row

    monkeypatch.setattr(sweep, "time_configs", killed_after_four)
    best = tmp_path / "best.json"
    with pytest.raises(KeyboardInterrupt):
        sweep.main(["--device", "cpu", "--rows", "16", "--width", "8", "--reps", "1", "--best", str(best)])
    timed = [json.loads(x) for x in capsys.readouterr().out.splitlines()][1:]
    assert len(timed) == 4 and not any(x["impl"].endswith("_best") for x in timed)
    written = json.loads(best.read_text())
    key = (lambda x: x["fwd_ms"]) if module == "fused_ln_sweep" else (lambda x: x["fwd_ms"] + x["bwd_ms"])
    fastest = min(key(x) for x in timed)
    # the forward's fastest tile (fused_ln: its first four configs are forward tiles) or the pair's fastest tile
    fields = ("fwd_rows", "fwd_warps", "packed_rng") if module == "fused_ln_sweep" else ("rows", "cols", "warps")
    assert any(all(written[f] == x["config"][f] for f in fields) for x in timed if key(x) <= fastest + 2e-3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.json"]  # no partial temporary left behind


def _gpu_ab_script() -> tuple[Path, str]:
    """The repository's root and ``benchmarks/gpu_ab.sh``'s text."""
    root = Path(__file__).resolve().parents[1]
    return root, (root / "benchmarks" / "gpu_ab.sh").read_text()


def test_gpu_ab_script_gates_its_arms_on_tests_it_runs():
    """``benchmarks/gpu_ab.sh`` runs an arm only if named CUDA tests passed in its test run; a renamed test, or one
    that its ``-k`` leaves out, would skip the arm on the GPU without a word. Every test id it gates on must be
    collected from tests/test_gpu.py by that ``-k`` (on CPU the tests are collected and skipped)."""
    root, script = _gpu_ab_script()
    variables = dict(re.findall(r"^(\w+)=(test_\w+)$", script, flags=re.MULTILINE))
    for name, value in variables.items():
        script = script.replace(f'"${name}[', f'"{value}[')
    names = set(re.findall(r'test_\w+(?:\[[^\]"]+\])?', script.replace("test_gpu.py", "")))  # but the file's
    gated = names - set(variables.values())  # the variables' values are prefixes of ids
    assert len(gated) >= 5, gated  # the recompute pair, the LayerNorm variants, the attention's 8-bit config
    selection = re.search(r'-k "([^"]+)"', script).group(1)
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py",
         "-k", selection],
        cwd=root, capture_output=True, text=True, check=False,
    ).stdout  # fmt: skip
    collected = {line.split("::", 1)[1] for line in out.splitlines() if line.startswith("tests/test_gpu.py::")}
    assert collected, out
    missing = sorted(t for t in gated if t not in collected)
    assert not missing, f"gpu_ab.sh gates on tests its run does not collect: {missing}"


def test_gpu_ab_script_passes_only_options_its_benchmarks_take():
    """Each ``python3 -m benchmarks...`` call of ``benchmarks/gpu_ab.sh`` with options that module's argparse knows
    (an unknown one fails the call on the GPU, where each minute is counted); the arms' configs reach the loop and
    the profile as ``--fused-ln-config`` / ``--fused-attention-config`` through "$@" and the winners."""
    root, script = _gpu_ab_script()
    script = script.replace("\\\n", " ")
    calls: dict[str, set[str]] = {}
    for module, args in re.findall(r"python3 -m (benchmarks[\w.]*)([^\n>|;]*)", script):
        calls.setdefault(module, set()).update(re.findall(r"(?<!\S)(--[a-z][\w-]*)", args))
    for module, extra in (("benchmarks", "--fused-ln-config --fused-attention-config"),
                          ("benchmarks.profile_train", "--fused-ln-config")):  # fmt: skip
        assert module in calls, sorted(calls)
        calls[module].update(extra.split())
    assert len(calls) >= 4, sorted(calls)
    for module, options in calls.items():
        out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=root, capture_output=True, text=True,
                             check=False)  # fmt: skip
        assert out.returncode == 0, (module, out.stderr[-500:])
        unknown = sorted(o for o in options if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", out.stdout))
        assert not unknown, f"gpu_ab.sh passes {module} options it does not take: {unknown}"
