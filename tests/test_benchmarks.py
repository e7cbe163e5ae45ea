"""The benchmark suite's output: figure records and the README table (the timings themselves are not tested)."""

import math

import pytest

from benchmarks.__main__ import SUITES, _figure, main, markdown_table


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
