"""World-action training loop: learning signal, target-head schedule, metrics, exact resume (in process
and after SIGKILL), 2-process DDP against one process, parameter groups, clear errors.

Everything runs on CPU with a tiny model (2 layers, d 32, vocab 32, 4-step segments) on synthetic
token caches written in the ``<Game>.tokens.h5`` layout.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from jowa_core import checkpoints
from jowa_core.config import Preset, TrainConfig, WorldActionConfig
from jowa_core.data.format import DatasetError
from jowa_core.data.segments import SegmentSampler, SegmentSource
from jowa_core.models.world_action import WorldActionModel
from jowa_core.training import (
    GlobalBatchSlices,
    clip_and_step,
    load_agent_model,
    param_groups,
    read_metrics,
    rng_state,
    set_rng_state,
    set_stage,
    stage2_lr_factor,
    train_world_action,
)

VOCAB = 32
REPO = Path(__file__).resolve().parents[1]


def tiny(dropout: float = 0.1, **train) -> Preset:
    model = WorldActionConfig(
        num_layers=2, num_heads=2, embed_dim=32, q_mlp_dim=32, obs_vocab_size=VOCAB, max_blocks=4,
        embed_pdrop=dropout, resid_pdrop=dropout, attn_pdrop=0.0, q_dropout=dropout,
    )  # fmt: skip
    base = {"batch_size": 4, "lr_stage1": 3e-3, "lr_stage2": 1e-3, "critic_lr": 1e-3, "target_update_every": 3,
            "log_every": 4, "save_every": 1000, "seed": 0}  # fmt: skip
    return Preset("test", model=model, train=TrainConfig(**{**base, **train}))


RUN = {"device": "cpu", "progress": False, "num_threads": 1, "num_workers": 0}


@pytest.fixture(scope="module")
def caches(tmp_path_factory, write_token_cache) -> list[Path]:
    d = tmp_path_factory.mktemp("caches")
    return [write_token_cache(d / "Pong.tokens.h5", "Pong", seed=0, vocab=VOCAB),
            write_token_cache(d / "Breakout.tokens.h5", "Breakout", seed=1, vocab=VOCAB)]


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k, x in a.items():
        if atol == 0.0:
            assert torch.equal(x, b[k]), f"{k} differs (max {(x - b[k]).abs().max().item():.3g})"
        else:
            torch.testing.assert_close(x, b[k], atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def q_head(state: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


# ---------------------------------------------------------------------------------------------
# A short run: learning, metrics, target schedule


def test_short_run_learns_logs_and_updates_target_on_schedule(caches, tmp_path):
    run = tmp_path / "run"
    s1, s2 = 24, 7
    model = train_world_action(tiny(), caches, run, stage1_steps=s1, stage2_steps=s2, save_every=1, keep_last=None,
                               **RUN)  # fmt: skip
    assert not model.training

    recs = read_metrics(run)
    assert [r["step"] for r in recs] == [4, 8, 12, 16, 20, 24, 28, 31]
    assert [r["stage"] for r in recs] == [1] * 6 + [2] * 2
    stage1 = [r for r in recs if r["stage"] == 1]
    assert stage1[-1]["loss/world"] < 0.8 * stage1[0]["loss/world"], [r["loss/world"] for r in stage1]
    for r in stage1:
        assert r["loss/td"] == 0.0 and r["loss/cql"] == 0.0 and "lr/critic_decay" not in r
        assert r["lr/world_decay"] == 3e-3
    for r in recs[-2:]:
        assert np.isfinite(r["loss/td"]) and r["loss/td"] > 0 and np.isfinite(r["loss/cql"])
        assert r["lr/world_decay"] == 1e-3 and r["lr/critic_decay"] == 1e-3
        assert r["tokens_per_s"] == pytest.approx(r["samples_per_s"] * 4 * 37)
        expected_total = 0.1 * r["loss/world"] + r["loss/td"] + 0.1 * r["loss/cql"]
        assert r["loss/total"] == pytest.approx(expected_total, rel=1e-4)

    # target head: a hard copy of the online head at global steps 3, 6, 9, ... (stage 1 included)
    ckpts = {checkpoints.load(p).step: params(checkpoints.load(p).model) for p in checkpoints.list_checkpoints(run)}
    assert sorted(ckpts) == list(range(1, s1 + s2 + 1))
    online = {s: q_head(sd, "head_q.") for s, sd in ckpts.items()}
    target = {s: q_head(sd, "head_q_target.") for s, sd in ckpts.items()}
    for s in range(1, s1 + 1):  # the online head is frozen in stage 1
        assert_same(online[s], online[1])
    for s in range(s1 + 1, s1 + s2 + 1):
        assert not torch.equal(online[s]["head_module.params.0"], online[s - 1]["head_module.params.0"])
    for s in ckpts:
        source = online[3 * (s // 3)] if s >= 3 else online[1]
        assert_same(target[s], source)
    assert not torch.equal(target[s1 + s2]["head_module.params.8"], online[s1 + s2]["head_module.params.8"])

    loaded, preset = load_agent_model(run)
    # the resolved preset: keyword overrides folded into the train config
    assert preset == replace(tiny(), train=replace(tiny().train, stage1_steps=s1, stage2_steps=s2, save_every=1))
    assert_same(params(loaded), params(model))


def test_fused_layer_norm_switch_trains_as_the_default_without_dropout(caches, tmp_path):
    """``fused_layer_norm=True`` (on CPU: the op's torch reference) trains the same weights as the plain
    LayerNorm path when no dropout draws differ; the default on CPU leaves the switch off."""
    kw = {"stage1_steps": 3, "stage2_steps": 3, **RUN}
    plain = train_world_action(tiny(dropout=0.0), caches, tmp_path / "plain", **kw)
    fused = train_world_action(tiny(dropout=0.0), caches, tmp_path / "fused", fused_layer_norm=True, **kw)
    assert not plain.transformer.fused_layer_norm and fused.transformer.fused_layer_norm
    assert_same(params(fused), params(plain), atol=1e-5)
    # and the switch is not a no-op: with dropout the op draws its own masks, so the weights part
    dropped = train_world_action(tiny(), caches, tmp_path / "dropped", **kw)
    dropped_fused = train_world_action(tiny(), caches, tmp_path / "dropped_fused", fused_layer_norm=True, **kw)
    a, b = params(dropped), params(dropped_fused)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_fused_switches_default_on_for_cuda_only(monkeypatch):
    """None means: on for CUDA (the Triton ops only when triton imports, the branch biases only inside the fused
    LayerNorm op, the attention op only for a head size the kernels take), off on CPU; a given value wins."""
    from jowa_core.models import fused_ln
    from jowa_core.training import FusedSwitches, fused_switches

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.setattr(fused_ln, "triton_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fused_switches(cuda) == FusedSwitches(True, True, True, True, True)
    assert fused_switches(cuda, head_size=64) == fused_switches(cuda, head_size=16) == fused_switches(cuda)
    assert fused_switches(cpu) == FusedSwitches(False, False, False, False, False)
    assert fused_switches(cuda, False, False, False, False, False) == FusedSwitches(False, False, False, False, False)
    assert fused_switches(cpu, True, True, True, True, True) == FusedSwitches(True, True, True, True, True)
    assert fused_switches(cuda, fused_layer_norm=False) == FusedSwitches(False, True, True, False, True)
    assert fused_switches(cuda, head_size=48).attention is False
    assert fused_switches(cuda, head_size=8).attention is False
    assert fused_switches(cuda, fused_attention=True, head_size=48).attention is True
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # a T4: no bf16 MMA
    assert fused_switches(cuda) == FusedSwitches(True, True, True, True, False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(fused_ln, "triton_available", lambda: False)
    assert fused_switches(cuda) == FusedSwitches(False, True, False, False, False)


@pytest.mark.parametrize("scale", [30.0, 0.01])
def test_clip_and_step_gives_clip_grad_norm_then_step(scale):
    """A fused AdamW takes the clipping as its ``grad_scale``; the parameters, the moments and the (clipped)
    gradients after three steps must be those of ``clip_grad_norm_`` and a plain AdamW step, with the clipping
    active (scale 30) and idle (0.01). If torch stopped reading ``grad_scale``, the clipped case would train
    unclipped and differ here."""
    g = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (5,), (3, 4, 2)]
    start = [torch.randn(s, generator=g) for s in shapes]
    grads = [[scale * torch.randn(s, generator=g) for s in shapes] for _ in range(3)]
    runs = {}
    for name, kw, step in (("fused", {"fused": True}, "clip_and_step"), ("plain", {"foreach": False}, "apart"),
                           ("unclipped", {"fused": True}, "no_clip")):  # fmt: skip
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = torch.optim.AdamW([{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0}], lr=0.1, **kw)
        norms = []
        for gs in grads:
            for p_, gr in zip(params, gs):
                p_.grad = gr.clone()
            if step == "clip_and_step":
                norms.append(clip_and_step(opt, params, 1.0))
            elif step == "apart":
                norms.append(torch.nn.utils.clip_grad_norm_(params, 1.0))
                opt.step()
            else:
                opt.step()
        assert not hasattr(opt, "grad_scale")
        runs[name] = (params, opt, norms)
    (fp, fopt, fnorms), (pp, popt, pnorms) = runs["fused"], runs["plain"]
    for a, e in zip(fnorms, pnorms):
        torch.testing.assert_close(a, e)
    assert (min(n.item() for n in fnorms) > 1.0) == (scale > 1)  # the clipping is active where meant
    for a, e in zip(fp, pp):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.grad, e.grad, rtol=1e-5, atol=1e-7)  # the gradients as clipped
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(fopt.state[a][k], popt.state[e][k], rtol=1e-5, atol=1e-9)
    differs = any(not torch.allclose(a, e, rtol=1e-4) for a, e in zip(runs["unclipped"][0], pp))
    assert differs == (scale > 1)  # unclipped, the clipped case moves elsewhere: the check can fail


def test_fused_qkv_switch_trains_as_the_default(caches, tmp_path):
    """``fused_qkv=True`` (one product for queries, keys and values) trains the same weights as three products,
    dropout included (it draws nothing itself), up to Adam's amplification of the backward's summation order;
    the default leaves it off on CPU."""
    kw = {"stage1_steps": 3, "stage2_steps": 3, **RUN}
    plain = train_world_action(tiny(), caches, tmp_path / "plain", **kw)
    fused = train_world_action(tiny(), caches, tmp_path / "fused", fused_qkv=True, **kw)
    assert not any(b.attn.fused_qkv for b in plain.transformer.blocks)
    assert all(b.attn.fused_qkv for b in fused.transformer.blocks)
    seen = []  # and the switch is used: the fused path never calls the query projection module
    fused.transformer.blocks[0].attn.query.register_forward_hook(lambda *_: seen.append(1))
    fused(torch.zeros(1, 5, dtype=torch.long), torch.tensor([0]))
    assert not seen
    assert params(fused).keys() == params(plain).keys()
    assert_same(params(fused), params(plain), atol=1e-4)


# Each of session 18's switches trains the same weights as the recipe without it. On CPU the ops run their torch
# references; both runs draw the same dropout masks, except that attention's op draws its own flags (so no
# dropout there), and the branch biases ride on the fused LayerNorm op (so it is on in both runs).
SWITCH_RUNS = {
    "fused_bias_gelu": ({}, True, lambda block: block.fused_bias_gelu),
    "fused_branch_bias": ({"fused_layer_norm": True}, True, lambda block: block.fused_branch_bias),
    "fused_attention": ({}, False, lambda block: block.attn.fused_attention),
}


@pytest.mark.parametrize("switch", list(SWITCH_RUNS))
def test_fused_switch_trains_as_the_recipe_without_it(caches, tmp_path, switch):
    """``train_world_action(<switch>=True)`` trains the weights of the run without it; off by default."""
    extra, dropout, is_on = SWITCH_RUNS[switch]
    kw = {"stage1_steps": 2, "stage2_steps": 2, **extra, **RUN}
    preset = tiny() if dropout else tiny(dropout=0.0)
    plain = train_world_action(preset, caches, tmp_path / "plain", **kw)
    fused = train_world_action(preset, caches, tmp_path / "fused", **{switch: True}, **kw)
    assert not any(is_on(b) for b in plain.transformer.blocks)
    assert all(is_on(b) for b in fused.transformer.blocks)
    assert_same(params(fused), params(plain), atol=1e-4)


def test_every_switch_together_trains_as_none_without_dropout(caches, tmp_path):
    """The CUDA default since session 20, all five switches on at once (here their torch references), trains the
    weights of the run with all five off when no dropout draws differ: the ops compose (the branch biases inside the
    fused LayerNorm op, the attention op on the fused QKV product, the bias + GELU op between)."""
    kw = {"stage1_steps": 2, "stage2_steps": 2, **RUN}
    switches = ("fused_layer_norm", "fused_qkv", "fused_bias_gelu", "fused_branch_bias", "fused_attention")
    plain = train_world_action(tiny(dropout=0.0), caches, tmp_path / "plain", **dict.fromkeys(switches, False), **kw)
    fused = train_world_action(tiny(dropout=0.0), caches, tmp_path / "fused", **dict.fromkeys(switches, True), **kw)
    block = fused.transformer.blocks[0]
    assert fused.transformer.fused_layer_norm and block.attn.fused_qkv and block.attn.fused_attention
    assert block.fused_bias_gelu and block.fused_branch_bias
    assert_same(params(fused), params(plain), atol=1e-4)


def test_cosine_stage2_schedule_decays_both_learning_rates_to_zero_and_resumes_exactly(caches, tmp_path):
    """``lr_schedule_stage2="cosine"``: stage 1 keeps its rate; the step that starts with k of stage 2's n steps
    done runs at lr * (1 + cos(pi k / n)) / 2, for the world and the critic groups alike; stopping and resuming
    inside stage 2 repeats the uninterrupted run."""
    s1, s2 = 4, 8
    p = tiny(dropout=0.0, lr_schedule_stage2="cosine", log_every=1)
    kw = dict(stage1_steps=s1, stage2_steps=s2, **RUN)
    whole = params(train_world_action(p, caches, tmp_path / "whole", **kw))
    recs = read_metrics(tmp_path / "whole")
    assert [r["lr/world_decay"] for r in recs[:s1]] == [3e-3] * s1
    for r in recs[s1:]:
        k = r["step"] - 1 - s1  # stage-2 steps done before the logged step
        expected = 0.5 * (1 + np.cos(np.pi * k / s2))
        assert r["lr/world_decay"] == pytest.approx(1e-3 * expected)
        assert r["lr/critic_no_decay"] == pytest.approx(1e-3 * expected)
    assert recs[-1]["lr/world_decay"] < 0.05 * 1e-3
    assert stage2_lr_factor(s1 + s2, replace(p.train, stage1_steps=s1, stage2_steps=s2)) == pytest.approx(0.0)
    assert stage2_lr_factor(0, replace(p.train, lr_schedule_stage2="constant")) == 1.0

    train_world_action(p, caches, tmp_path / "pieces", stop_at_step=s1 + 3, **kw)
    assert_same(params(train_world_action(p, caches, tmp_path / "pieces", **kw)), whole)
    constant = params(train_world_action(tiny(dropout=0.0, log_every=1), caches, tmp_path / "constant", **kw))
    assert any(not torch.equal(constant[k], whole[k]) for k in whole)
    with pytest.raises(ValueError, match="lr_schedule_stage2 must be 'constant' or 'cosine'"):
        TrainConfig(lr_schedule_stage2="linear")


# ---------------------------------------------------------------------------------------------
# Resume


def _reference(caches, tmp_path_factory) -> dict:
    run = tmp_path_factory.mktemp("reference")
    return params(train_world_action(tiny(grad_accum=2), caches, run, stage1_steps=6, stage2_steps=10, **RUN))


@pytest.fixture(scope="module")
def reference(caches, tmp_path_factory) -> dict:
    """An uninterrupted run (dropout 0.1, grad accumulation 2) to compare resumed runs against."""
    return _reference(caches, tmp_path_factory)


def test_resume_in_pieces_equals_uninterrupted_run(caches, tmp_path, reference):
    run = tmp_path / "pieces"
    kw = dict(stage1_steps=6, stage2_steps=10, **RUN)
    p = tiny(grad_accum=2)
    first = params(train_world_action(p, caches, run, stop_at_step=3, **kw))  # inside stage 1
    assert checkpoints.latest_checkpoint(run).name == "step_000000003"
    assert not all(torch.equal(first[k], reference[k]) for k in first)
    train_world_action(p, caches, run, stop_at_step=6, **kw)  # exactly at the stage switch
    train_world_action(p, caches, run, stop_at_step=11, **kw)  # inside stage 2
    final = params(train_world_action(p, caches, run, **kw))
    assert_same(final, reference)
    assert [r["step"] for r in read_metrics(run)] == [3, 4, 6, 8, 11, 12, 16]

    # resuming a finished run returns it unchanged; resume=False starts over
    assert_same(params(train_world_action(p, caches, run, **kw)), reference)
    restarted = params(train_world_action(p, caches, run, resume=False, stop_at_step=2, **kw))
    assert checkpoints.latest_checkpoint(run).name == "step_000000002"
    assert len(checkpoints.list_checkpoints(run)) == 1 and not torch.equal(
        restarted["pos_emb.weight"], reference["pos_emb.weight"]
    )


def test_loader_workers_and_resume_give_the_same_run(caches, tmp_path, reference):
    """Batches reach the loop in the same order whatever the number of DataLoader workers."""
    run = tmp_path / "workers"
    kw = {**RUN, "stage1_steps": 6, "stage2_steps": 10, "num_workers": 2}
    train_world_action(tiny(grad_accum=2), caches, run, stop_at_step=5, **kw)
    assert_same(params(train_world_action(tiny(grad_accum=2), caches, run, **kw)), reference)


_CHILD = """
import json, sys
from jowa_core.checkpoints import preset_from_dict
from jowa_core.training import train_world_action
cfg = json.loads(open(sys.argv[1]).read())
train_world_action(preset_from_dict(cfg["preset"]), cfg["caches"], cfg["run_dir"], **cfg["kwargs"])
"""


def test_sigkill_after_checkpoint_then_resume_equals_uninterrupted_run(caches, tmp_path, reference):
    run = tmp_path / "killed"
    kw = dict(stage1_steps=6, stage2_steps=10, **RUN)
    p = tiny(grad_accum=2, save_every=2)
    spec = tmp_path / "child.json"
    spec.write_text(json.dumps({"preset": p.to_dict(), "caches": [str(c) for c in caches], "run_dir": str(run),
                                "kwargs": kw}))  # fmt: skip
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    child = subprocess.Popen([sys.executable, str(script), str(spec)], cwd=REPO)
    try:
        deadline = time.time() + 60
        while checkpoints.latest_checkpoint(run) is None:
            assert child.poll() is None, "the training subprocess ended before its first checkpoint"
            assert time.time() < deadline, "no checkpoint within 60 s"
            time.sleep(0.01)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    done = checkpoints.load(run).step
    assert 2 <= done < 16, "the run must be killed before its end for this test to mean anything"

    final = params(train_world_action(p, caches, run, **kw))
    assert_same(final, reference)


def test_truncated_checkpoint_gives_a_clear_error_on_resume(caches, tmp_path):
    run = tmp_path / "trunc"
    kw = dict(stage1_steps=2, stage2_steps=0, **RUN)
    train_world_action(tiny(), caches, run, stop_at_step=1, **kw)
    state = checkpoints.latest_checkpoint(run) / checkpoints.RUN_STATE_FILE
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(checkpoints.CheckpointError, match=r"training_state\.pt is truncated.*Delete the damaged"):
        train_world_action(tiny(), caches, run, **kw)


def test_resume_with_another_model_config_is_refused(caches, tmp_path):
    run = tmp_path / "other"
    train_world_action(tiny(), caches, run, stage1_steps=1, stage2_steps=0, **RUN)
    other = replace(tiny(), model=replace(tiny().model, embed_dim=64))
    with pytest.raises(ValueError, match="another model config"):
        train_world_action(other, caches, run, stage1_steps=2, stage2_steps=0, **RUN)


# ---------------------------------------------------------------------------------------------
# DDP: 2 processes (gloo) == 1 process fed the same global batch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process_with_the_same_global_batch(caches, tmp_path):
    p = tiny(dropout=0.0, batch_size=8)
    kw = dict(stage1_steps=3, stage2_steps=3, data_split="global", **RUN)
    spec = tmp_path / "ddp.json"
    spec.write_text(json.dumps({"preset": p.to_dict(), "caches": [str(c) for c in caches],
                                "run_dir": str(tmp_path / "ddp"), "kwargs": kw}))  # fmt: skip
    script = tmp_path / "ddp_child.py"
    script.write_text(_CHILD)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(script), str(spec)]  # fmt: skip
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    ddp = params(checkpoints.load(tmp_path / "ddp").model)

    # one process, the same global batch in 2 accumulation steps = the 2 ranks' halves
    single = params(train_world_action(tiny(dropout=0.0, batch_size=8, grad_accum=2), caches, tmp_path / "one", **kw))
    assert_same(ddp, single, atol=1e-5)
    torch.manual_seed(p.train.seed)  # the loop's initialisation: training moved far beyond the tolerance
    init = params(WorldActionModel(p.model))
    assert max((init[k] - ddp[k]).abs().max().item() for k in ddp) > 1e-3
    state = torch.load(checkpoints.latest_checkpoint(tmp_path / "ddp") / "training_state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2


def test_global_batch_slices_split_one_batch_across_ranks(caches):
    sources = [SegmentSource(None, tokens_path=c, segment_length=4) for c in caches]
    whole = SegmentSampler(sources, 8, seed=3).batch(5)
    parts = []
    for rank in range(2):
        sampler = SegmentSampler(sources, 8, seed=3)
        sampler.load_state_dict({**sampler.state_dict(), "next_batch": 5})
        parts.append(next(iter(GlobalBatchSlices(sampler, rank, 2))))
    for k in ("tokens", "actions", "rewards", "mask_padding", "task_id"):
        assert torch.equal(torch.cat([parts[0][k], parts[1][k]]), whole[k])


# ---------------------------------------------------------------------------------------------
# Parameter groups and RNG state


def test_param_groups_follow_the_official_rules_with_q7_fixed():
    model = WorldActionModel(tiny().model)
    tc = tiny().train
    set_stage(model, 1)
    g1 = {g["name"]: g for g in param_groups(model, 1, tc)}
    assert set(g1) == {"world_decay", "world_no_decay"}
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in g1["world_decay"]["params"]}
    no_decay = {names[id(p)] for p in g1["world_no_decay"]["params"]}
    assert decay == {n + ".weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert "pos_emb.weight" in no_decay and "transformer.ln_f.weight" in no_decay
    assert "transformer.blocks.0.attn.query.bias" in no_decay
    assert not any(n.startswith("head_q") for n in decay | no_decay)
    assert g1["world_decay"]["weight_decay"] == 0.01 and g1["world_no_decay"]["weight_decay"] == 0.0

    set_stage(model, 2)
    g2 = {g["name"]: g for g in param_groups(model, 2, tc)}
    critic = {names[id(p)] for p in g2["critic_decay"]["params"]}
    assert critic == {f"head_q.head_module.params.{i}" for i in (0, 4, 8)}
    assert len(g2["critic_no_decay"]["params"]) == 7 and g2["critic_no_decay"]["weight_decay"] == 0.0
    assert g2["world_decay"]["lr"] == tc.lr_stage2 and g2["critic_decay"]["lr"] == tc.critic_lr
    official = {g["name"]: g for g in param_groups(model, 2, tc, official_stage2_lr=True, official_q_weight_decay=True)}
    assert "critic_no_decay" not in official and len(official["critic_decay"]["params"]) == 10
    assert official["world_decay"]["lr"] == tc.lr_stage1
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in g2.values()) == n_trainable


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")
    draws = (np.random.rand(3), torch.rand(3), __import__("random").random())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (np.random.rand(3), torch.rand(3), __import__("random").random())
    assert np.array_equal(draws[0], again[0]) and torch.equal(draws[1], again[1]) and draws[2] == again[2]


def test_bad_inputs_are_explained(caches, tmp_path):
    with pytest.raises(ValueError, match="divisible by grad_accum"):
        train_world_action(tiny(batch_size=6, grad_accum=4), caches, tmp_path / "a", stage1_steps=1, **RUN)
    with pytest.raises(ValueError, match="data_split"):
        train_world_action(tiny(), caches, tmp_path / "b", data_split="nope", **RUN)
    with pytest.raises(ValueError, match="obs_vocab_size"):
        small = replace(tiny(), model=replace(tiny().model, obs_vocab_size=16))
        train_world_action(small, caches, tmp_path / "c", stage1_steps=1, **RUN)
    with pytest.raises(ValueError, match="at least one token cache"):
        train_world_action(tiny(), [], tmp_path / "d", **RUN)


# ---------------------------------------------------------------------------------------------
# The MTBC baseline beside JOWA


def test_mtbc_baseline_gets_the_same_budget_and_trains_only_its_bc_head(caches, tmp_path):
    from jowa_core.training import mtbc_preset, train_with_mtbc

    p = tiny(dropout=0.0, stage1_steps=3, stage2_steps=5)
    bc = mtbc_preset(p)
    assert bc.model.bc_head and not p.model.bc_head
    assert (bc.train.stage1_steps, bc.train.stage2_steps, bc.train.batch_size) == (8, 0, p.train.batch_size)
    assert bc.train.supervised_weight_stage1 == 0.0

    run = {k: v for k, v in RUN.items() if k != "num_threads"}
    jowa, mtbc = train_with_mtbc(p, caches, tmp_path / "jowa", tmp_path / "mtbc", parallel=True, **run)
    alone = train_world_action(p, caches, tmp_path / "alone", **RUN)
    assert_same(params(jowa), params(alone))  # training the baseline beside it changes nothing
    assert mtbc.head_bc is not None
    recs = read_metrics(tmp_path / "mtbc")
    assert recs[-1]["step"] == 8 and {r["stage"] for r in recs} == {1}
    for r in recs:  # the objective is the BC loss alone: world terms are logged but weigh nothing
        assert r["loss/total"] == pytest.approx(r["loss/bc"]) and r["loss/td"] == 0.0 and r["loss/obs"] > 0


def _assert_moves_only_the_td_loss(caches, tmp_path, option: str, **train) -> None:
    """Two runs, the boolean TrainConfig ``option`` off and on, same seed and data: stage 1 (no critic) logs the
    same world loss, and the first critic step the same world loss but another TD loss."""
    runs = {}
    for on in (False, True):
        run = tmp_path / f"run_{on}"
        train_world_action(tiny(dropout=0.0, log_every=1, **{option: on}, **train), caches, run, stage1_steps=2,
                           stage2_steps=2, **RUN)  # fmt: skip
        runs[on] = read_metrics(run)
    plain, changed = runs[False], runs[True]
    assert [r["loss/world"] for r in plain[:2]] == [r["loss/world"] for r in changed[:2]]  # stage 1: no critic
    assert plain[2]["loss/world"] == pytest.approx(changed[2]["loss/world"], rel=1e-6)
    assert plain[2]["loss/td"] != pytest.approx(changed[2]["loss/td"], rel=1e-3)


def test_mc_anchor_reaches_the_loss_through_the_loop(caches, tmp_path):
    """With ``mc_anchor`` the sampler carries each step's return-to-go and the C51 loss uses it: the same
    seed and data give another TD loss, and the world loss of the first critic step is untouched."""
    _assert_moves_only_the_td_loss(caches, tmp_path, "mc_anchor")


def test_td_max_over_n_reaches_the_loss_through_the_loop(caches, tmp_path):
    _assert_moves_only_the_td_loss(caches, tmp_path, "td_max_over_n", td_steps=3)


def test_life_loss_terminal_reaches_the_td_loss_and_needs_lives(caches, tmp_path, write_token_cache):
    """``life_loss_terminal``: with a lives counter in the caches the TD loss changes from the first critic step
    while the world loss does not; caches without one are refused with the fix named."""
    with pytest.raises(DatasetError, match="life_loss_terminal needs each game's lives counter"):
        train_world_action(tiny(life_loss_terminal=True), caches, tmp_path / "bare", stage1_steps=1, stage2_steps=1,
                           **RUN)  # fmt: skip
    lived = []
    for k, game in enumerate(("Pong", "Breakout")):
        path = write_token_cache(tmp_path / f"{game}.tokens.h5", game, seed=k, vocab=VOCAB)
        with h5py.File(path, "a") as f:  # 3 lives per episode, one lost every 4 steps
            starts, n = f["episode_starts"][:], f["actions"].shape[0]
            t = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
            f["lives"] = np.maximum(3 - t // 4, 1).astype(np.uint8)
        lived.append(path)
    _assert_moves_only_the_td_loss(lived, tmp_path, "life_loss_terminal")


def test_next_step_target_reads_the_window_one_step_later(caches, tmp_path):
    """``next_step_target``: batches hold L + 1 steps; the online window is the first L and the target head at
    step L comes from a gradient-free pass over steps 1..L (checked against that pass done by hand), and the
    loop trains with it."""
    from jowa_core.games import action_masks
    from jowa_core.losses import c51_td_loss
    from jowa_core.training import Batch, step_loss

    p = tiny(dropout=0.0, next_step_target=True, td_steps=2)
    torch.manual_seed(0)
    model = WorldActionModel(p.model).eval()
    g = torch.Generator().manual_seed(3)
    B, L, tpb = 3, p.model.max_blocks, p.model.tokens_per_block
    obs = torch.randint(0, VOCAB, (B, L + 1, tpb - 1), generator=g)
    actions = torch.randint(0, 4, (B, L + 1, 1), generator=g)
    tokens = torch.cat([obs, actions], -1).reshape(B, -1)
    tasks = torch.tensor([39, 12, 39])
    rewards = torch.randint(-1, 2, (B, L + 1), generator=g).float()
    ends = torch.zeros(B, L + 1, dtype=torch.long)
    mask = torch.ones(B, L + 1, dtype=torch.bool)
    mask[1, L] = False  # row 1's window is its episode's tail: no step after it
    legal = torch.as_tensor(action_masks())[tasks]
    batch = Batch(tokens=tokens, task_ids=tasks, rewards=rewards, ends=ends, mask=mask, legal=legal)
    with torch.no_grad():
        terms = step_loss(model, model, batch, stage=2, train_cfg=p.train)
        out = model(tokens[:, : L * tpb], tasks)
        later = model(tokens[:, tpb:], tasks)
        td = c51_td_loss(out.q_logits, model.q_target_logits(out.q_hidden), actions[:, :L, 0], rewards[:, :L], ends[:, :L],
                         mask[:, :L], legal, model.atoms, p.train.gamma, n_steps=2,
                         next_target_logits=model.q_target_logits(later.q_hidden)[:, :, -1], next_mask=mask[:, L])  # fmt: skip
        plain = step_loss(model, model, replace(batch, tokens=tokens[:, : L * tpb], rewards=rewards[:, :L],
                                                ends=ends[:, :L], mask=mask[:, :L]),
                          stage=2, train_cfg=replace(p.train, next_step_target=False))  # fmt: skip
    torch.testing.assert_close(terms.td, td)
    assert terms.obs.item() == pytest.approx(plain.obs.item(), rel=1e-6)  # the world loss sees the online window
    assert terms.td.item() != pytest.approx(plain.td.item(), rel=1e-5)  # rows 0 and 2 gain a TD row at step L - 1
    with pytest.raises(ValueError, match="segments of 5 steps"):
        step_loss(model, model, replace(batch, tokens=tokens[:, : L * tpb]), stage=2, train_cfg=p.train)

    run = tmp_path / "run"
    train_world_action(replace(p, train=replace(p.train, log_every=1)), caches, run, stage1_steps=1, stage2_steps=2, **RUN)
    recs = read_metrics(run)
    assert [r["stage"] for r in recs] == [1, 2, 2] and all(np.isfinite(r["loss/td"]) and r["loss/td"] > 0 for r in recs[1:])


def test_throughput_is_read_after_the_device_ran_the_interval(caches, tmp_path, clock_events):
    """samples_per_s: synchronize, then read the clock, then log. Read before the sync, a CUDA run counts the
    steps the host queued, not the ones the GPU ran (the loop's MFU read about 5 % high until session 17)."""
    from jowa_core import training

    events = clock_events(training, log_record="log")
    train_world_action(tiny(), caches, tmp_path / "run", stage1_steps=4, stage2_steps=4, **RUN)
    logs = [i for i, e in enumerate(events) if e == "log"]
    assert len(logs) == 2, events
    assert all(events[i - 2 : i] == ["sync", "clock"] for i in logs), events
