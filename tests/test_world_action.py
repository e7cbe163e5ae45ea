"""World-action model: layout of embeddings and heads, KV cache, Q ensemble, official names and sizes."""

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from jowa_core.checkpoints import (
    official_model_buffers,
    official_model_state_dict_to_ours,
    ours_to_official,
)
from jowa_core.config import WorldActionConfig, preset
from jowa_core.models.world_action import KVCache, QEnsemble, WorldActionModel
from tests.op_log import OpLog

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
MANIFEST = REFERENCE / "official_jowa_state_dict_manifest.json"
TPB = 37


def small_cfg(**kw) -> WorldActionConfig:
    base = {"num_layers": 2, "num_heads": 2, "embed_dim": 32, "max_blocks": 3, "obs_vocab_size": 24, "q_mlp_dim": 16}
    no_dropout = {"embed_pdrop": 0.0, "resid_pdrop": 0.0, "attn_pdrop": 0.0, "q_dropout": 0.0}
    return WorldActionConfig(**{**base, "num_q": 2, **no_dropout, **kw})


def make_model(seed: int = 0, **kw) -> WorldActionModel:
    torch.manual_seed(seed)
    model = WorldActionModel(small_cfg(**kw)).eval()
    with torch.no_grad():  # break symmetry of zero-initialised biases / identical tables
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.update_target()
    return model


def random_tokens(cfg: WorldActionConfig, B: int, T: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(0, cfg.obs_vocab_size, (B, T), generator=g)
    act = torch.arange(T) % cfg.tokens_per_block == cfg.tokens_per_block - 1
    tok[:, act] = torch.randint(0, cfg.num_actions, (B, int(act.sum())), generator=g)
    return tok


def positions(start: int, T: int, keep) -> list[int]:
    """Absolute positions p in [start, start + T) whose j = p % 37 satisfies keep(j), as offsets."""
    return [p - start for p in range(start, start + T) if keep(p % TPB)]


# --- embeddings and head positions -------------------------------------------------------------


@pytest.mark.parametrize("T", [2 * TPB + 5, 2 * TPB])  # indexed positions; whole blocks, looked up as slices
def test_input_embedding_matches_a_per_position_loop(T):
    model = make_model()
    cfg = model.cfg
    B = 2
    tokens, tasks = random_tokens(cfg, B, T), torch.tensor([3, 59])
    seen = {}
    model.transformer.drop.register_forward_hook(lambda m, inp, out: seen.setdefault("x", inp[0]))
    with torch.no_grad():
        model(tokens, tasks)
    act_t, obs_t = model.embedder.embedding_tables
    task_act, task_obs = model.task_emb.embedding_tables
    for b in range(B):
        for p in range(T):
            is_act = p % TPB == 36
            e = (act_t if is_act else obs_t).weight[tokens[b, p]] + model.pos_emb.weight[p]
            e = e + (task_act if is_act else task_obs).weight[tasks[b]]
            torch.testing.assert_close(seen["x"][b, p], e)


def test_no_task_embedding_when_disabled():
    model = make_model(use_task_embed=False)
    assert not hasattr(model, "task_emb")
    tokens = random_tokens(model.cfg, 2, 40)
    with torch.no_grad():
        a, b = model(tokens, torch.tensor([0, 1])), model(tokens, torch.tensor([5, 7]))
    torch.testing.assert_close(a.hidden, b.hidden)


@pytest.mark.parametrize("start,T", [(0, 3 * TPB), (0, 2 * TPB - 1), (35, 3), (36, 1), (10, 60), (73, 1)])
def test_heads_read_the_official_positions(start, T):
    model = make_model()
    cfg = model.cfg
    tokens, tasks = random_tokens(cfg, 2, start + T), torch.tensor([1, 2])
    cache = model.empty_cache(2)
    with torch.no_grad():
        if start:
            model(tokens[:, :start], tasks, cache)
        out = model(tokens[:, start:], tasks, cache)
        h = out.hidden
        obs = positions(start, T, lambda j: j != 35)
        act = positions(start, T, lambda j: j == 36)
        q = positions(start, T, lambda j: j == 35)
        torch.testing.assert_close(out.obs_logits, model.head_observations(h[:, obs]))
        torch.testing.assert_close(out.reward_logits, model.head_rewards(h[:, act]))
        torch.testing.assert_close(out.end_logits, model.head_ends(h[:, act]))
        ref_q = model.head_q(h[:, q]).view(cfg.num_q, 2, len(q), 18, 51)
        torch.testing.assert_close(out.q_logits, ref_q)
        torch.testing.assert_close(out.q_hidden, h[:, q])
    assert out.start == start and cache.length == start + T


@pytest.mark.parametrize("start,T", [(0, 3 * TPB), (0, TPB), (TPB, 2 * TPB)])
def test_whole_blocks_take_slices_with_the_indexed_paths_values_and_gradients(start, T):
    """A window of whole blocks takes its embeddings and head rows as slices of a (B, L, 37, ...) view: the same
    outputs and parameter gradients as the indexed path, and no index or index_put op in the forward or the
    backward (an index's backward is a zero fill and a scatter per head)."""
    from unittest import mock

    model = make_model()
    tokens, tasks = random_tokens(model.cfg, 2, start + T), torch.tensor([1, 2])
    runs = []
    for whole in (True, False):
        model.zero_grad()
        with mock.patch.object(
            WorldActionModel, "_whole_blocks", lambda self, s, n, w=whole: w and s % TPB == n % TPB == 0
        ):
            cache = model.empty_cache(2) if start else None
            if start:
                with torch.no_grad():
                    model(tokens[:, :start], tasks, cache)
            with OpLog() as ops:
                out = model(tokens[:, start:], tasks, cache)
                loss = out.obs_logits.logsumexp(-1).mean() + out.q_logits.square().mean() + out.reward_logits.mean()
                (loss + out.end_logits.mean()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        runs.append((out, grads, [name for name, _ in ops.seen]))
    (a, ga, names), (b, gb, indexed) = runs
    for field in ("hidden", "obs_logits", "reward_logits", "end_logits", "q_logits", "q_hidden"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=0, atol=0, msg=field)
    assert ga.keys() == gb.keys() and "embedder.embedding_tables.0.weight" in ga
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-6, atol=1e-7, msg=n)
    assert any("index" in n for n in indexed)  # the check can fail: the indexed path has them
    assert not [n for n in names if "aten.index" in n], names


@pytest.mark.parametrize("start,T", [(0, 3 * TPB - 1), (0, 5), (36, 1), (40, 70)])
def test_forward_q_is_forwards_q_logits_bit_for_bit(start, T):
    """Acting reads Q through ``forward_q`` (no world heads): the same logits and the same cache as ``forward``."""
    model = make_model()
    tokens, tasks = random_tokens(model.cfg, 2, start + T), torch.tensor([1, 2])
    with torch.no_grad():
        a, b = model.empty_cache(2), model.empty_cache(2)
        if start:
            model(tokens[:, :start], tasks, a)
            model(tokens[:, :start], tasks, b)
        ref = model(tokens[:, start:], tasks, a).q_logits
        got = model.forward_q(tokens[:, start:], tasks, b)
    assert got.shape == ref.shape and torch.equal(got, ref)
    assert a.length == b.length == start + T
    for x, y in zip(a.keys + a.values, b.keys + b.values):
        assert torch.equal(x[:, :, : a.length], y[:, :, : b.length])
    with pytest.raises(ValueError, match="exceed the model's window"):
        model.forward_q(random_tokens(model.cfg, 1, model.cfg.max_tokens + 1), torch.tensor([1]))


def test_full_segment_output_shapes():
    model = make_model()
    L = model.cfg.max_blocks
    out = model(random_tokens(model.cfg, 2, L * TPB), torch.tensor([0, 1]))
    assert out.obs_logits.shape == (2, 36 * L, 24)
    assert out.reward_logits.shape == (2, L, 3) and out.end_logits.shape == (2, L, 2)
    assert out.q_logits.shape == (2, 2, L, 18, 51) and out.bc_logits is None
    planner = model(random_tokens(model.cfg, 2, 2 * TPB - 1), torch.tensor([0, 1]))
    assert planner.q_logits.shape[2] == 2 and planner.reward_logits.shape[1] == 1


# --- KV cache ------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunks", [[1] * 40, [5, 37, 1, 36, 32], [36, 1, 74], [110, 1]])
def test_incremental_decoding_equals_full_forward(chunks):
    model = make_model()
    cfg = model.cfg
    T = min(sum(chunks), cfg.max_tokens)
    tokens, tasks = random_tokens(cfg, 3, T), torch.tensor([4, 9, 14])
    with torch.no_grad():
        full = model(tokens, tasks)
        cache = model.empty_cache(3)
        parts, s = [], 0
        for c in chunks:
            c = min(c, T - s)
            if c <= 0:
                break
            parts.append(model(tokens[:, s : s + c], tasks, cache))
            s += c
    assert cache.length == T
    for name in ("hidden", "obs_logits", "reward_logits", "end_logits"):
        got = torch.cat([getattr(p, name) for p in parts], dim=1)
        torch.testing.assert_close(got, getattr(full, name), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([p.q_logits for p in parts], 2), full.q_logits, atol=1e-5, rtol=1e-5)


def test_cache_index_select_repeat_clone_cat():
    model = make_model()
    cfg = model.cfg
    tokens, tasks = random_tokens(cfg, 4, 90), torch.tensor([0, 1, 2, 3])
    rows = torch.tensor([2, 0, 2])
    with torch.no_grad():
        cache = model.empty_cache(4)
        model(tokens[:, :50], tasks, cache)
        sel = cache.index_select(rows)
        got = model(tokens[rows, 50:], tasks[rows], sel).obs_logits
        alone = model(tokens[rows], tasks[rows]).obs_logits[:, -got.shape[1] :]
        torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)
        assert cache.length == 50 and sel.length == 90  # the original is untouched

        rep = cache.repeat_interleave(2)
        assert rep.batch_size == 8
        got = model(tokens.repeat_interleave(2, 0)[:, 50:], tasks.repeat_interleave(2), rep).reward_logits
        ref = model(tokens, tasks).reward_logits[:, -got.shape[1] :].repeat_interleave(2, 0)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)

        clone = cache.clone()
        model(tokens[:, 50:60], tasks, clone)
        assert cache.length == 50 and clone.length == 60
        torch.testing.assert_close(cache.keys[0][:, :, 50:60], torch.zeros_like(cache.keys[0][:, :, 50:60]))

        both = KVCache.cat([cache.index_select(torch.tensor([1])), cache.index_select(torch.tensor([3]))])
        got = model(tokens[[1, 3], 50:], tasks[[1, 3]], both).end_logits
        ref = model(tokens[[1, 3]], tasks[[1, 3]]).end_logits[:, -got.shape[1] :]
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_cache_crop_rolls_back():
    model = make_model()
    tokens, tasks = random_tokens(model.cfg, 2, 60), torch.tensor([0, 1])
    with torch.no_grad():
        cache = model.empty_cache(2)
        model(tokens[:, :40], tasks, cache)
        model(random_tokens(model.cfg, 2, 10, seed=7), tasks, cache)  # an imagined branch
        cache.crop(40)
        got = model(tokens[:, 40:], tasks, cache).hidden
        torch.testing.assert_close(got, model(tokens, tasks).hidden[:, 40:], atol=1e-5, rtol=1e-5)


# --- KV cache branches that share a prefix ---------------------------------------------------------


def _branch_and_copy(model, tokens, tasks, rows, prefix_len):
    """A branch of a prefix cache and, beside it, plain caches holding a copy of each row's prefix."""
    prefix = model.empty_cache(tokens.shape[0], max_tokens=prefix_len)
    model(tokens[:, :prefix_len], tasks, prefix)
    plain = model.empty_cache(tokens.shape[0])
    model(tokens[:, :prefix_len], tasks, plain)
    return KVCache.branch(prefix, rows, model.cfg.max_tokens - prefix_len), plain.index_select(rows), prefix


@pytest.mark.parametrize("rows", [[2, 0, 2, 1, 2, 0], [0, 0, 1, 1, 2, 2], [1, 1, 0, 0, 2, 2]])
@pytest.mark.parametrize("chunks", [[1] * 12, [5, 37, 1], [36, 1]])
def test_shared_prefix_branch_equals_a_copy_per_row(chunks, rows):
    """Rows that continue the same prefix row read its keys once (``shared_prefix_attention``); what they
    compute must equal rows that each hold a copy, for single tokens and for causal chunks, with uneven and
    unsorted rows per prefix row, beam search's regular layout, and equal counts out of order."""
    model = make_model()
    tokens, tasks = random_tokens(model.cfg, 3, 40 + sum(chunks)), torch.tensor([4, 9, 14])
    rows = torch.tensor(rows)
    own = random_tokens(model.cfg, 6, 40 + sum(chunks), seed=5)  # each branch row continues differently
    with torch.no_grad():
        branch, copy, prefix = _branch_and_copy(model, tokens, tasks, rows, 40)
        before = [t[:, :, :40].clone() for t in prefix.keys + prefix.values]
        s = 40
        for c in chunks:
            a = model(own[:, s : s + c], tasks[rows], branch)
            b = model(own[:, s : s + c], tasks[rows], copy)
            for name in ("hidden", "obs_logits", "reward_logits", "end_logits", "q_logits"):
                torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-5, rtol=1e-5)
            s += c
    assert branch.length == copy.length == s and branch.max_tokens == model.cfg.max_tokens
    assert branch.keys[0].shape[2] == model.cfg.max_tokens - 40  # the branch stores only its own tokens
    for t, ref in zip(prefix.keys + prefix.values, before):
        assert torch.equal(t[:, :, :40], ref)  # the prefix is read, never written


def test_shared_prefix_branch_selects_repeats_clones_and_steps_like_a_plain_cache():
    model = make_model()
    B, tasks = 2, torch.tensor([5, 6])
    history = random_tokens(model.cfg, B, TPB + 36)
    with torch.no_grad():
        branch, copy, prefix = _branch_and_copy(model, history, tasks, torch.tensor([0, 1]), TPB + 36)
        for f in (lambda c: c.repeat_interleave(3), lambda c: c.index_select(torch.tensor([1, 1, 0]))):
            a, b = f(branch), f(copy)
            assert a.prefix is prefix and a.length == b.length
            n = a.batch_size
            acts = torch.arange(n) % 18
            ra, rb = model.step(a, acts, tasks[a.prefix_rows]), model.step(b, acts, tasks[a.prefix_rows])
            assert torch.equal(ra.obs_tokens, rb.obs_tokens)
            torch.testing.assert_close(ra.q_logits, rb.q_logits, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ra.reward_logits, rb.reward_logits, atol=1e-5, rtol=1e-5)
            # a second depth branches from the imagined step: only its 37 tokens are copied
            a2, b2 = a.index_select(torch.tensor([n - 1, 0])), b.index_select(torch.tensor([n - 1, 0]))
            assert torch.equal(a2.prefix_rows, a.prefix_rows[[n - 1, 0]])
            clone = a2.clone()
            both = KVCache.cat([a2, clone])
            x = model(torch.tensor([[3]] * 4), tasks[both.prefix_rows], both).hidden
            y = model(torch.tensor([[3]] * 4), tasks[both.prefix_rows], KVCache.cat([b2, b2.clone()])).hidden
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_shared_prefix_misuse_raises_clear_errors():
    model = make_model()
    tokens, tasks = random_tokens(model.cfg, 2, 40), torch.tensor([1, 2])
    with torch.no_grad():
        branch, copy, prefix = _branch_and_copy(model, tokens, tasks, torch.tensor([1, 0, 1]), 30)
        with pytest.raises(ValueError, match="rows must be 1-D indices"):
            KVCache.branch(prefix, torch.tensor([2]), 10)
        with pytest.raises(ValueError, match="plain KVCache"):
            KVCache.branch(branch, torch.tensor([0]), 10)
        with pytest.raises(ValueError, match="crop length"):
            branch.crop(29)
        other = KVCache.branch(prefix, torch.tensor([0, 0, 1]), model.cfg.max_tokens - 30)
        with pytest.raises(ValueError, match="same length, max_tokens, layers and prefix"):
            KVCache.cat([branch, copy])
        KVCache.cat([branch, other])  # same prefix: fine
        # the prefix grows after branching: the branch and its copies keep reading its first 30 tokens
        grown = model.empty_cache(2)
        model(tokens[:, :30], tasks, grown)
        early = KVCache.branch(grown, torch.tensor([1, 0]), 10)
        model(tokens[:, 30:33], tasks, grown)
        again = early.index_select(torch.tensor([1, 0, 1]))
        assert again.prefix_length == 30 and KVCache.cat([again, again.clone()]).prefix_length == 30
        got = model(tokens[[0, 1, 0], 30:31], tasks[[0, 1, 0]], again).hidden
        torch.testing.assert_close(
            got, model(tokens[[0, 1, 0], :31], tasks[[0, 1, 0]]).hidden[:, 30:], atol=1e-5, rtol=1e-5
        )
        model(tokens[[1, 0], 30:33], tasks[[1, 0]], early)
        late = KVCache.branch(grown, torch.tensor([0]), 7)  # length 33 and max_tokens 40, as early's now
        with pytest.raises(ValueError, match="same length, max_tokens, layers and prefix"):
            KVCache.cat([early, late])
        with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
            KVCache.branch(prefix, torch.tensor([0]), -1)
        with pytest.raises(ValueError, match="heads, head size, dtype and device"):
            KVCache([t[:, :1] for t in branch.keys], [t[:, :1] for t in branch.values], 30, prefix=prefix,
                    prefix_rows=torch.tensor([1, 0, 1]))  # fmt: skip
        rows = torch.tensor([1, 0, 1])
        mine = KVCache.branch(prefix, rows, 5)
        rows[0] = 0  # the caller's tensor is not the branch's
        assert mine.prefix_rows.tolist() == [1, 0, 1]
        # a prefix cropped after branching may have been rewritten: its branches refuse to attend
        cropped = model.empty_cache(2, max_tokens=30)
        model(tokens[:, :30], tasks, cropped)
        stale = KVCache.branch(cropped, torch.tensor([0, 1]), 5)
        cropped.crop(20)
        model(tokens[:, 20:30], tasks, cropped)
        with pytest.raises(ValueError, match="cropped after branching"):
            model(tokens[:, 30:31], tasks, stale)
        # a prefix cropped before branching is fine, even to nothing (an empty KVCache is falsy: len() == 0)
        cropped.crop(0)
        model(tokens[:, :30], tasks, cropped)
        fresh = KVCache.branch(cropped, torch.tensor([0, 1]), 5)
        torch.testing.assert_close(
            model(tokens[:, 30:31], tasks, fresh).hidden,
            model(tokens[:, :31], tasks).hidden[:, 30:],
            atol=1e-5,
            rtol=1e-5,
        )
        empty = model.empty_cache(2, max_tokens=30)
        empty.crop(0)
        assert KVCache.branch(empty, torch.tensor([0, 1]), 5).prefix_version == empty.crops == 1
        train = make_model(attn_pdrop=0.1).train()
        with pytest.raises(ValueError, match="eval mode"):
            train(tokens[[1, 0, 1], 30:31], tasks[[1, 0, 1]], KVCache.branch(prefix, torch.tensor([1, 0, 1]), 5))


def test_fused_qkv_projection_is_the_same_function_with_the_same_gradients():
    """``use_fused_qkv``: one product over the concatenated query, key and value weights. Same outputs for a
    window and for cached decoding, the same parameter gradients, the same state dict."""
    model = make_model()
    tokens, tasks = random_tokens(model.cfg, 3, 2 * TPB + 10), torch.tensor([4, 9, 14])
    runs = []
    for fused in (False, True):
        seen = []
        hook = model.transformer.blocks[0].attn.query.register_forward_hook(lambda *_, seen=seen: seen.append(1))
        model.use_fused_qkv(fused).zero_grad()
        out = model(tokens, tasks)
        (out.obs_logits.logsumexp(-1).mean() + out.q_logits.mean()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        with torch.no_grad():
            cache = model.empty_cache(3)
            model(tokens[:, : TPB + 36], tasks, cache)
            step = model.step(cache, torch.tensor([1, 2, 3]), tasks)
        hook.remove()
        calls = len(seen)
        runs.append((out, grads, step, calls))
    (a, ga, sa, ca), (b, gb, sb, cb) = runs
    assert ca > 0 and cb == 0  # the fused path does not call the query projection module
    for name in ("hidden", "obs_logits", "reward_logits", "q_logits"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), atol=1e-6, rtol=1e-5)
    assert ga.keys() == gb.keys() and any(".attn.query." in n for n in ga)
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], atol=1e-6, rtol=1e-5)
    assert torch.equal(sb.obs_tokens, sa.obs_tokens)
    torch.testing.assert_close(sb.q_logits, sa.q_logits, atol=1e-6, rtol=1e-5)
    assert not any(".qkv" in k for k in model.state_dict())


def test_step_equals_greedy_decoding_with_full_forwards():
    model = make_model()
    cfg = model.cfg
    B, tasks = 2, torch.tensor([5, 6])
    history = random_tokens(cfg, B, TPB + 36)  # one past step + the current observation
    actions = torch.tensor([3, 17])
    with torch.no_grad():
        cache = model.empty_cache(B)
        model(history, tasks, cache)
        res = model.step(cache, actions, tasks)
        seq = torch.cat([history, actions.view(B, 1)], 1)
        first = model(seq, tasks)
        for k in range(36):  # greedy, one full forward per generated token
            nxt = model(seq, tasks).obs_logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
        final = model(seq, tasks)
    torch.testing.assert_close(res.obs_tokens, seq[:, -36:])
    torch.testing.assert_close(res.reward_logits, first.reward_logits[:, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res.end_logits, first.end_logits[:, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res.q_logits, final.q_logits[:, :, -1], atol=1e-5, rtol=1e-5)
    assert cache.length == seq.shape[1]
    with pytest.raises(ValueError, match="no room"):
        model.step(cache, actions, tasks)


@pytest.mark.parametrize("use_task_embed", [True, False])
def test_imagination_token_path_is_forward_bit_for_bit(use_task_embed):
    """``step`` feeds observation tokens through a lean path; planning results must not move by a bit."""
    model = make_model(use_task_embed=use_task_embed)
    B, tasks = 3, torch.tensor([5, 6, 7])
    history = random_tokens(model.cfg, B, TPB)  # one past step: the cache ends after its action token
    tok = torch.tensor([[1], [2], [3]])
    with torch.no_grad():
        a, b = model.empty_cache(B), model.empty_cache(B)
        model(history, tasks, a)
        model(history, tasks, b)
        ref = model(tok, tasks, a).hidden
        got = model._decode_obs_token(tok, model._task_obs_embedding(tasks), b)
    assert torch.equal(got, ref)
    assert a.length == b.length
    for x, y in zip(a.keys + a.values, b.keys + b.values):
        assert torch.equal(x[:, :, : a.length], y[:, :, : b.length])


@pytest.mark.parametrize("use_task_embed", [True, False])
def test_static_decode_equals_eager_step(use_task_embed):
    """The fixed-shape decode that CUDA graphs capture computes what the eager ``step`` loop computes.

    In float64: the two sum in different orders, and in float32 a near-tied argmax of this random
    model can flip between thread counts (seen), after which the rollouts diverge."""
    model = make_model(use_task_embed=use_task_embed).double()
    B, tasks = 3, torch.tensor([5, 6, 7])
    history = random_tokens(model.cfg, B, TPB + 36)
    actions = torch.tensor([3, 17, 0])
    with torch.no_grad():
        eager_cache = model.empty_cache(B)
        model(history, tasks, eager_cache)
        static_cache = eager_cache.clone()
        for t in static_cache.keys + static_cache.values:  # the contract: finite after the prefix
            t[:, :, static_cache.length :] = 1e3  # clone() leaves it uninitialised (NaN at times)
        ref = model.step(eager_cache, actions, tasks)
        out = model(actions.view(B, 1), tasks, static_cache)
        n = static_cache.length
        tokens, q_logits = model.decode_observation_static(
            out.obs_logits[:, -1].argmax(-1), torch.tensor([n]), tasks, static_cache.keys, static_cache.values
        )
    torch.testing.assert_close(tokens, ref.obs_tokens)
    torch.testing.assert_close(q_logits, ref.q_logits, atol=1e-5, rtol=1e-5)
    for a, b in zip(static_cache.keys + static_cache.values, eager_cache.keys + eager_cache.values):
        torch.testing.assert_close(a[:, :, : n + 36], b[:, :, : n + 36], atol=1e-6, rtol=1e-5)


def test_cache_takes_the_autocast_dtype():
    model = make_model()
    assert model.empty_cache(1).keys[0].dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.empty_cache(1).keys[0].dtype == torch.bfloat16


def test_clear_errors():
    model = make_model()
    tok = random_tokens(model.cfg, 2, 10)
    with pytest.raises(ValueError, match="task_ids"):
        model(tok, torch.tensor([1]))
    with pytest.raises(ValueError, match="exceed the model's window"):
        model(random_tokens(model.cfg, 1, model.cfg.max_tokens + 1), torch.tensor([1]))
    with pytest.raises(ValueError, match="index_select"):
        model(tok, torch.tensor([1, 2]), model.empty_cache(3))
    with pytest.raises(ValueError, match="ends after a full observation"):
        cache = model.empty_cache(2)
        model(tok, torch.tensor([1, 2]), cache)
        model.step(cache, torch.tensor([0, 0]), torch.tensor([1, 2]))


# --- Q heads -------------------------------------------------------------------------------------


def test_q_ensemble_equals_per_member_modules():
    torch.manual_seed(0)
    ens = QEnsemble(num_q=3, in_dim=8, mlp_dim=6, out_dim=5, dropout=0.0)
    x = torch.randn(2, 4, 8)
    p = ens.params
    for i in range(3):
        member = nn.Sequential(nn.Linear(8, 6), nn.LayerNorm(6), nn.Mish(), nn.Linear(6, 6), nn.LayerNorm(6), nn.Mish(),
                               nn.Linear(6, 5))  # fmt: skip
        tensors = [member[0].weight, member[0].bias, member[1].weight, member[1].bias, member[3].weight, member[3].bias,
                   member[4].weight, member[4].bias, member[6].weight, member[6].bias]  # fmt: skip
        with torch.no_grad():
            for dst, src in zip(tensors, p):
                dst.copy_(src[i])
        torch.testing.assert_close(ens(x)[i], member(x))


def test_q_ensemble_keeps_pytorch_default_init_and_dropout_differs_per_member():
    torch.manual_seed(0)
    ens = QEnsemble(num_q=2, in_dim=400, mlp_dim=300, out_dim=20, dropout=0.5)
    w0 = ens.params[0]
    bound = 1 / math.sqrt(400)
    assert w0.abs().max() <= bound and w0.std() > 0.9 * bound / math.sqrt(3)  # U(-1/sqrt(in), +), not N(0, .02)
    assert torch.equal(ens.params[2], torch.ones_like(ens.params[2]))
    with torch.no_grad():
        ens.params[0][1].copy_(ens.params[0][0])
        for k in range(1, 10):
            ens.params[k][1].copy_(ens.params[k][0])
    x = torch.randn(3, 400)
    ens.train()
    out = ens(x)
    assert not torch.allclose(out[0], out[1])
    ens.eval()
    out = ens(x)
    torch.testing.assert_close(out[0], out[1])


def test_transformer_init_is_normal_002():
    torch.manual_seed(0)
    model = WorldActionModel(preset("tiny").model)
    w = model.transformer.blocks[0].mlp[0].weight
    assert abs(w.std().item() - 0.02) < 0.002 and model.transformer.blocks[0].mlp[0].bias.abs().max() == 0
    assert abs(model.embedder.embedding_tables[1].weight.std().item() - 0.02) < 0.002


def test_q_values_mix_the_members_and_mask_illegal_actions():
    model = make_model()
    with torch.no_grad():
        out = model(random_tokens(model.cfg, 2, 2 * TPB), torch.tensor([0, 1]))
    legal = torch.zeros(2, 18, dtype=torch.bool)
    legal[0, [0, 1, 5]] = True
    legal[1, :] = True
    q = model.q_values(out.q_logits, legal)
    atoms = torch.linspace(-10, 30, 51)
    for b in range(2):
        for t in range(2):
            for a in range(18):
                probs = sum(out.q_logits[i, b, t, a].softmax(-1) for i in range(2)) / 2
                ref = float(probs @ atoms) if legal[b, a] else float("-inf")
                assert q[b, t, a].item() == pytest.approx(ref, rel=1e-5, abs=1e-5)


def test_target_head_frozen_eval_and_hard_update():
    model = make_model(q_dropout=0.5)
    model.train()
    assert not model.head_q_target.training and model.head_q.training
    assert all(not p.requires_grad for p in model.head_q_target.parameters())
    out = model(random_tokens(model.cfg, 2, TPB), torch.tensor([0, 1]))
    with torch.no_grad():
        model.head_q.head_module.params[9].add_(1.0)
    tgt = model.q_target_logits(out.q_hidden)
    assert not tgt.requires_grad
    model.update_target()
    model.eval()
    torch.testing.assert_close(model.q_target_logits(out.q_hidden), model._q_head(model.head_q, out.q_hidden))
    assert not torch.allclose(tgt, model.q_target_logits(out.q_hidden))


@pytest.mark.parametrize("backwards", [True, False])
def test_q_loss_backwards_wm_flag(backwards):
    model = make_model(q_loss_backwards_wm=backwards)
    out = model(random_tokens(model.cfg, 2, TPB), torch.tensor([0, 1]))
    out.q_logits.sum().backward()
    g = model.transformer.blocks[0].attn.query.weight.grad
    assert (g is not None and g.abs().sum() > 0) == backwards
    assert model.head_q.head_module.params[0].grad.abs().sum() > 0


def test_bc_head_and_mse_head_shapes():
    model = make_model(bc_head=True, td_loss="mse")
    out = model(random_tokens(model.cfg, 2, 2 * TPB), torch.tensor([0, 1]))
    assert out.bc_logits.shape == (2, 2, 18) and out.q_logits.shape == (2, 2, 2, 18)
    torch.testing.assert_close(model.q_values(out.q_logits), out.q_logits.mean(0))
    assert model.num_parameters() == model.cfg.num_parameters()


# --- official names, shapes, sizes and file format -------------------------------------------------


@pytest.mark.skipif(not MANIFEST.exists(), reason="shared/reference not beside the checkout")
@pytest.mark.parametrize("name,key", [("jowa_40m", "JOWA_40M"), ("jowa_70m", "JOWA_70M"), ("jowa_150m", "JOWA_150M")])
def test_every_official_entry_maps_to_a_tensor_of_the_same_shape(name, key):
    entry = json.loads(MANIFEST.read_text())[key]
    cfg = preset(name).model
    with torch.device("meta"):
        model = WorldActionModel(cfg)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    buffers = {k: list(v.shape) for k, v in official_model_buffers(cfg).items()}
    for k, shape in entry["state_dict"].items():
        assert ours.get(k, buffers.get(k)) == shape, k
    assert set(ours) | set(buffers) == set(entry["state_dict"])
    assert model.num_parameters() == entry["num_parameters_trainable"] == cfg.num_parameters()
    assert cfg.num_heads == entry["config_transformer"]["num_heads"]
    assert (cfg.q_mlp_dim, cfg.num_q) == (entry["config_critic_head"]["mlp_dim"], entry["config_critic_head"]["num_q"])


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "_orig_mod.module."])
def test_official_file_round_trip(tmp_path, prefix):
    model = make_model(num_layers=4, num_q=1)
    official = ours_to_official(model.state_dict(), model.cfg, prefix=prefix, include_attn_mask=True)
    if MANIFEST.exists():  # same names as the official 40M file (4 layers)
        names = set(json.loads(MANIFEST.read_text())["JOWA_40M"]["state_dict"])
        assert {k[len(prefix) :] for k in official} == names
    path = tmp_path / "JOWA_tiny.pt"
    torch.save(official, path)
    loaded = official_model_state_dict_to_ours(torch.load(path, weights_only=True), model.cfg)
    fresh = WorldActionModel(model.cfg).eval()
    fresh.load_state_dict(loaded, strict=True)
    tokens, tasks = random_tokens(model.cfg, 2, 80), torch.tensor([3, 7])
    a, b = model(tokens, tasks), fresh(tokens, tasks)
    for name in ("obs_logits", "reward_logits", "end_logits", "q_logits"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert torch.equal(model.q_target_logits(a.q_hidden), fresh.q_target_logits(b.q_hidden))
    bufs = official_model_buffers(model.cfg)
    assert bufs["head_rewards.indices"].tolist() == [36 + 37 * t for t in range(3)]
    assert bufs["head_q.indices"].tolist() == [35 + 37 * t for t in range(3)]
    assert bufs["head_observations.indices"].tolist() == [p for p in range(111) if p % 37 != 35]


def test_mismatched_size_gives_a_clear_error():
    cfg = preset("jowa_40m").model
    with torch.device("meta"):
        sd = WorldActionModel(preset("jowa_150m").model).state_dict()
    with pytest.raises(ValueError, match="official 150M model"):
        official_model_state_dict_to_ours(ours_to_official(sd, preset("jowa_150m").model), cfg)


def test_param_count_formula_matches_built_models():
    for kw in ({}, {"bc_head": True}, {"use_task_embed": False}, {"td_loss": "mse", "num_q": 3}):
        model = make_model(**kw)
        assert model.num_parameters() == model.cfg.num_parameters(), kw
        assert model.num_parameters(trainable_only=False) == model.cfg.num_parameters(trainable_only=False), kw


@pytest.mark.parametrize("mean", [0.0, 4.0])
def test_q_init_mean_starts_every_action_near_that_value(mean):
    """``q_init_mean``: a fresh C51 head's expected Q sits at the chosen value for every action and position
    (official init: near the support's middle, 10 for the tiny preset's [-10, 30]); the target head starts equal."""
    cfg = small_cfg(q_init_mean=mean, num_q=2)
    model = make_model(q_init_mean=mean, num_q=2).eval()
    tokens = random_tokens(cfg, 3, cfg.max_tokens)
    task = torch.tensor([12, 39, 3])
    with torch.no_grad():
        out = model(tokens, task)
        q = model.q_values(out.q_logits)
        qt = model.q_values(model.q_target_logits(out.q_hidden))
        plain = make_model().eval()
        q_official = plain.q_values(plain(tokens, task).q_logits)
    assert (q - mean).abs().max() < 0.5 and torch.equal(q, qt)
    assert (q_official - (cfg.v_min + cfg.v_max) / 2).abs().mean() < 1.5 and (q_official - mean).abs().min() > 2.0
    with pytest.raises(ValueError, match="q_init_mean"):
        small_cfg(q_init_mean=cfg.v_max + 1.0)
    with pytest.raises(ValueError, match="q_init_mean"):
        small_cfg(q_init_mean=0.0, td_loss="mse")
