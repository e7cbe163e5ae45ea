"""Planning: beam search against exhaustive search on a hand-made world model whose rewards and Q values
are known, batched vs single-env vs a per-node reference on random tiny models, legal masking, MCTS."""

import importlib.util
import itertools
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from jowa_core import games
from jowa_core.config import WorldActionConfig
from jowa_core.models.world_action import KVCache, StepOutput, WorldActionModel
from jowa_core.planning import (
    PlanTrace,
    beam_search,
    decode_trace_frames,
    greedy,
    mcts,
    shares_history,
    state_value,
)

TPB, A = 37, 18
IMAGINED = 100  # the table model stores imagined actions as 100 + a, history actions as a


def _load_benchmark():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "planner_throughput.py"
    spec = importlib.util.spec_from_file_location("planner_throughput", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


reference_beam_search = _load_benchmark().reference_beam_search


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- a hand-made world model: rewards and Q are tables of (task, current obs, imagined actions) --------------


class TableModel(nn.Module):
    """The planner's model API over a KV-cache-like store of raw tokens.

    The cache keeps the tokens themselves (1 layer, 1 head, head_dim 1); a row's state is the task,
    the last real observation token and the imagined actions written by ``step``. ``reward_fn(task,
    obs, seq, a)`` in {-1, 0, 1} and ``q_fn(task, obs, seq)`` -> 18 values define the world, so the
    planner's use of cache rows, parents and scores can be checked against exhaustive search.
    """

    def __init__(self, reward_fn, q_fn, max_blocks: int = 8) -> None:
        super().__init__()
        self.cfg = WorldActionConfig(num_layers=1, num_heads=1, embed_dim=8, max_blocks=max_blocks, td_loss="mse")
        self.reward_fn, self.q_fn = reward_fn, q_fn
        self.register_buffer("anchor", torch.zeros(()))
        self.steps = self.step_calls = 0  # imagined rows and step calls (cost counters)

    def empty_cache(self, batch_size, max_tokens=None, dtype=None):
        return KVCache.empty(1, batch_size, 1, max_tokens or self.cfg.max_tokens, 1)

    @staticmethod
    def _write(cache: KVCache, tokens: torch.Tensor) -> None:
        n = cache.length
        if n + tokens.shape[1] > cache.max_tokens:
            raise ValueError("table model: cache overflow")
        cache.keys[0][:, 0, n : n + tokens.shape[1], 0] = tokens.float()
        cache.advance(tokens.shape[1])

    @staticmethod
    def _state(cache: KVCache) -> list[tuple[int, tuple[int, ...]]]:
        """Per row: (last real obs token, imagined actions)."""
        toks = cache.keys[0][:, 0, : cache.length, 0].long().tolist()
        out = []
        for row in toks:
            first = next((i for i, t in enumerate(row) if t >= IMAGINED), len(row))
            seq = tuple(row[p] - IMAGINED for p in range(first, len(row), TPB))
            out.append((row[first - 1], seq))
        return out

    def _q(self, tasks, states) -> torch.Tensor:
        return torch.tensor([self.q_fn(t, o, s) for t, (o, s) in zip(tasks, states)], dtype=torch.float32)

    def forward(self, tokens, task_ids, kv_cache=None):
        cache = kv_cache if kv_cache is not None else self.empty_cache(tokens.shape[0])
        self._write(cache, tokens)
        q = self._q(task_ids.tolist(), self._state(cache))
        return SimpleNamespace(q_logits=q[None, :, None, :], kv_cache=kv_cache)  # (num_q=1, B, 1, 18)

    def step(self, kv_cache, actions, task_ids, *, sample=False, temperature=1.0, generator=None):
        if kv_cache.length % TPB != TPB - 1:
            raise ValueError("table model: step must follow an observation")
        tasks, before = task_ids.tolist(), self._state(kv_cache)
        rewards = [self.reward_fn(t, o, s, a) for t, (o, s), a in zip(tasks, before, actions.tolist())]
        obs = torch.tensor([[len(s) + 2 * a + 1] * (TPB - 1) for (_, s), a in zip(before, actions.tolist())])
        self._write(kv_cache, torch.cat([actions.view(-1, 1) + IMAGINED, obs], 1))
        self.steps += len(tasks)
        self.step_calls += 1
        reward_logits = 10.0 * nn.functional.one_hot(torch.tensor(rewards) + 1, 3).float()
        q = self._q(tasks, self._state(kv_cache))
        return StepOutput(obs, reward_logits, torch.zeros(len(tasks), 2), q[None], kv_cache)

    def q_values(self, q_logits, legal_mask=None):
        q = q_logits.mean(0)
        if legal_mask is not None:
            q = q.masked_fill(~legal_mask.view(legal_mask.shape[0], *([1] * (q.ndim - 2)), -1), float("-inf"))
        return q


def _uniform(seed: int, key: tuple) -> random.Random:
    return random.Random(hash((seed, *key)))


def random_table_model(seed: int) -> TableModel:
    def reward_fn(task, obs, seq, a):
        return _uniform(seed, (1, task, obs, *seq, a)).choice([-1, 0, 0, 1])

    def q_fn(task, obs, seq):
        rng = _uniform(seed, (2, task, obs, *seq))
        return [rng.gauss(0.0, 1.0) for _ in range(A)]

    return TableModel(reward_fn, q_fn)


def exhaustive_action(
    model: TableModel, task: int, obs: int, legal: list[int], horizon: int, gamma: float, use_mean: bool = False
):
    """Best first action over all legal sequences of length ``horizon``: sum_d gamma^(d-1) r_d + gamma^H V,
    V = max of Q over the legal actions, or their mean."""
    best = None
    for seq in itertools.product(legal, repeat=horizon):
        ret = sum(gamma**d * model.reward_fn(task, obs, seq[:d], seq[d]) for d in range(horizon))
        q = model.q_fn(task, obs, seq)
        leaf = [q[a] for a in legal]
        score = ret + gamma**horizon * (sum(leaf) / len(leaf) if use_mean else max(leaf))
        if best is None or score > best[0]:
            best = (score, seq[0])
    return best[1], best[0]


def random_history(B: int, steps: int, vocab: int, seed: int, tpb: int = TPB) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    T = steps * tpb - 1
    h = torch.randint(0, vocab, (B, T), generator=g)
    act = torch.arange(T) % tpb == tpb - 1
    h[:, act] = torch.randint(0, A, (B, int(act.sum())), generator=g)
    return h


def legal_of(*action_lists) -> torch.Tensor:
    mask = torch.zeros(len(action_lists), A, dtype=torch.bool)
    for i, acts in enumerate(action_lists):
        mask[i, list(acts)] = True
    return mask


# --- beam search on the hand-made model ---------------------------------------------------------


@pytest.mark.parametrize("use_mean", [False, True])
@pytest.mark.parametrize("horizon", [1, 2, 3])
def test_wide_beam_equals_exhaustive_search(horizon, use_mean):
    gamma = 0.9
    legal_sets = [[0, 3, 5], [1, 2, 4, 17], [6, 7], [2, 11, 12]]
    model = random_table_model(seed=horizon)
    history = random_history(len(legal_sets), 3, 50, seed=horizon)
    tasks = torch.tensor([4, 9, 4, 33])
    bw = max(max(len(s) ** (horizon - 1), len(s)) for s in legal_sets)  # nothing is ever pruned
    actions, trace = beam_search(
        model, history, tasks, legal_of(*legal_sets), bw, horizon, gamma, trace=True, use_mean=use_mean
    )
    assert trace.use_mean is use_mean
    for b, legal in enumerate(legal_sets):
        want, score = exhaustive_action(model, int(tasks[b]), int(history[b, -1]), legal, horizon, gamma, use_mean)
        assert int(actions[b]) == want
        assert float(trace.score[trace.best_leaf[b]]) == pytest.approx(score, abs=1e-5)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("beam_width", [1, 2, 3])
def test_narrow_beam_matches_per_node_reference_on_table_model(seed, beam_width):
    model = random_table_model(seed)
    legal = legal_of([0, 1, 2, 3], [4, 5, 6], [7, 8, 9, 10, 11])
    history, tasks = random_history(3, 2, 50, seed), torch.tensor([1, 2, 3])
    ours, trace = beam_search(model, history, tasks, legal, beam_width, 3, 0.95, trace=True)
    ref, ref_scores = reference_beam_search(model, history, tasks, legal, beam_width, 3, 0.95)
    assert torch.equal(ours, ref)
    torch.testing.assert_close(trace.score[trace.best_leaf], torch.tensor(ref_scores), rtol=0, atol=1e-5)


def crafted_model() -> TableModel:
    """Legal {0, 1, 2}. Greedy Q prefers 0 > 1 > 2. The only reward is +1 for any action after action 2,
    and after 2 the critic looks worst, so bw 2 prunes it at depth 1 and only a 3-wide beam finds it."""
    c0 = {0: 3.0, 1: 2.0, 2: 1.0}

    def q_fn(task, obs, seq):
        if not seq:
            return [c0.get(a, 0.0) for a in range(A)]
        if len(seq) == 1:
            return [{0: 1.0, 1: 1.0, 2: 0.5}[seq[0]]] * A
        return [0.0] * A

    def reward_fn(task, obs, seq, a):
        return 1 if len(seq) == 1 and seq[0] == 2 else 0

    return TableModel(reward_fn, q_fn)


def test_greedy_narrow_and_wide_beams_disagree_as_designed():
    model, legal = crafted_model(), legal_of([0, 1, 2])
    history, tasks = random_history(1, 2, 50, 0), torch.tensor([0])
    assert int(greedy(model, history, tasks, legal)) == 0
    assert int(beam_search(model, history, tasks, legal, 1, 2)[0]) == 0  # bw 1 follows the greedy path
    assert int(beam_search(model, history, tasks, legal, 2, 2)[0]) == 0  # action 2 pruned at depth 1
    assert int(beam_search(model, history, tasks, legal, 3, 2)[0]) == 2  # exhaustive finds the reward
    assert exhaustive_action(model, 0, int(history[0, -1]), [0, 1, 2], 2, 0.99)[0] == 2


def test_mean_value_prefers_the_state_whose_actions_are_all_good():
    """After action 0 one action looks very good and the others bad (what CQL does where the data always took
    one action); after action 1 every action is fairly good. Max prefers 0, the mean prefers 1."""

    def q_fn(task, obs, seq):
        if not seq:
            return [1.0] * A
        return [5.0 if a == 0 else 0.0 for a in range(A)] if seq[0] == 0 else [3.0] * A

    model, legal = TableModel(lambda *args: 0, q_fn), legal_of([0, 1, 2])
    history, tasks = random_history(1, 1, 50, 0), torch.tensor([3])
    assert int(beam_search(model, history, tasks, legal, 2, 1)[0]) == 0  # 0.99 * 5 > 0.99 * 3
    _, trace = beam_search(model, history, tasks, legal, 2, 1, use_mean=True, trace=True)
    assert int(trace.actions[0]) == 1  # 0.99 * 3 > 0.99 * 5 / 3
    child_of_0 = int(torch.nonzero((trace.depth == 1) & (trace.action == 0)).flatten()[0])
    assert float(trace.score[child_of_0]) == pytest.approx(0.99 * 5.0 / 3)


def test_state_value_is_max_or_legal_mean():
    q = torch.tensor([[1.0, -2.0, float("-inf"), 4.0], [0.5, float("-inf"), float("-inf"), 1.5]])
    legal = torch.tensor([[True, True, False, True], [True, False, False, True]])
    assert state_value(q, legal).tolist() == [4.0, 1.5]
    assert state_value(q, legal, use_mean=True).tolist() == [1.0, 1.0]
    assert float(state_value(q[0], legal[0], use_mean=True)) == 1.0  # one state, as MCTS reads it


def test_one_step_lookahead_beats_greedy_when_reward_is_known():
    def q_fn(task, obs, seq):
        return [{1: 5.0, 2: 4.0}.get(a, 0.0) for a in range(A)] if not seq else [4.9 if seq[0] == 1 else 4.5] * A

    def reward_fn(task, obs, seq, a):
        return {1: -1, 2: 1}.get(a, 0)

    model, legal = TableModel(reward_fn, q_fn), legal_of([0, 1, 2])
    history, tasks = random_history(1, 1, 50, 0), torch.tensor([3])
    assert int(greedy(model, history, tasks, legal)) == 1
    assert int(beam_search(model, history, tasks, legal, 2, 1)[0]) == 2  # -1 + .99*4.9 < 1 + .99*4.5


def exhaustive_anchored_action(model: TableModel, task: int, obs: int, legal: list[int], horizon: int, gamma: float):
    """Best first action by Q(s, a0) + S_H - S_1 over all legal sequences (``beam_search(anchor_q=True)``), with
    S_d = sum_{e<d} gamma^e r_e + gamma^d max_legal Q after d imagined steps."""

    def S(seq):
        ret = sum(gamma**e * model.reward_fn(task, obs, seq[:e], seq[e]) for e in range(len(seq)))
        return ret + gamma ** len(seq) * max(model.q_fn(task, obs, tuple(seq))[a] for a in legal)

    q0 = model.q_fn(task, obs, ())
    best = None
    for seq in itertools.product(legal, repeat=horizon):
        score = q0[seq[0]] + S(seq) - S(seq[:1])
        if best is None or score > best[0]:
            best = (score, seq[0])
    return best[1], best[0]


@pytest.mark.parametrize("horizon", [1, 2, 3])
def test_anchored_beam_equals_exhaustive_anchored_search_and_is_greedy_at_horizon_one(horizon):
    gamma = 0.9
    legal_sets = [[0, 3, 5], [1, 2, 4, 17], [6, 7], [2, 11, 12]]
    model = random_table_model(seed=10 + horizon)
    history = random_history(len(legal_sets), 3, 50, seed=horizon)
    tasks, legal = torch.tensor([4, 9, 4, 33]), legal_of(*legal_sets)
    bw = max(max(len(s) ** (horizon - 1), len(s)) for s in legal_sets)  # nothing is ever pruned
    actions, trace = beam_search(model, history, tasks, legal, bw, horizon, gamma, trace=True, anchor_q=True)
    for b, legal_b in enumerate(legal_sets):
        want, score = exhaustive_anchored_action(model, int(tasks[b]), int(history[b, -1]), legal_b, horizon, gamma)
        assert int(actions[b]) == want
        assert float(trace.score[trace.best_leaf[b]]) == pytest.approx(score, abs=1e-5)
    if horizon == 1:
        assert torch.equal(actions, greedy(model, history, tasks, legal))


def test_anchored_beam_keeps_the_critics_choice_when_imagination_is_flat():
    """Q prefers 1 by a wide margin (the data's action, as CQL leaves it); every imagined next frame looks the same,
    except for a tiny difference that favours 0. The official score follows the tiny difference; the anchored one
    keeps 1, and a real imagined reward after the first step still moves it."""

    def q_fn(task, obs, seq):
        if not seq:
            return [{0: 1.0, 1: 3.0}.get(a, 0.0) for a in range(A)]
        return [2.0 + (0.01 if seq[0] == 0 else 0.0)] * A

    flat = TableModel(lambda *args: 0, q_fn)
    history, tasks, legal = random_history(1, 2, 50, 0), torch.tensor([3]), legal_of([0, 1])
    assert int(beam_search(flat, history, tasks, legal, 2, 2)[0]) == 0
    assert int(beam_search(flat, history, tasks, legal, 2, 2, anchor_q=True)[0]) == 1

    def q_close(task, obs, seq):  # Q prefers 1 by 0.5 only; imagined frames all alike
        return [{0: 1.0, 1: 1.5}.get(a, 0.0) for a in range(A)] if not seq else [2.0] * A

    # a reward one step after action 0 (worth gamma * 1 = 0.99 > 0.5) is what the imagination adds to Q
    rewarded = TableModel(lambda task, obs, seq, a: 1 if len(seq) == 1 and seq[0] == 0 else 0, q_close)
    assert int(beam_search(rewarded, history, tasks, legal, 2, 2, anchor_q=True)[0]) == 0
    assert int(beam_search(TableModel(lambda *args: 0, q_close), history, tasks, legal, 2, 2, anchor_q=True)[0]) == 1


def test_trace_records_every_node_with_consistent_scores():
    gamma, horizon, bw = 0.9, 2, 2
    model = random_table_model(7)
    legal_sets = [[0, 1, 2], [3]]
    history, tasks = random_history(2, 3, 50, 7), torch.tensor([5, 6])
    actions, tr = beam_search(model, history, tasks, legal_of(*legal_sets), bw, horizon, gamma, trace=True)
    assert isinstance(tr, PlanTrace) and torch.equal(tr.actions, actions)
    # env 0: 1 root + 2 children + 2 kept x 2 = 7 nodes; env 1 (one legal action): 1 + 1 + 1 = 3.
    assert tr.num_nodes == 10 and tr.env.tolist().count(0) == 7
    assert tr.depth.tolist() == sorted(tr.depth.tolist()) and tr.env[:2].tolist() == [0, 1]
    for n in range(tr.num_nodes):
        env = int(tr.env[n])
        seq, node = [], n
        while int(tr.parent[node]) >= 0:
            seq.insert(0, int(tr.action[node]))
            node = int(tr.parent[node])
        assert node == env and len(seq) == int(tr.depth[n])
        obs = int(history[env, -1])
        ret = sum(gamma**d * model.reward_fn(int(tasks[env]), obs, tuple(seq[:d]), seq[d]) for d in range(len(seq)))
        q = model.q_fn(int(tasks[env]), obs, tuple(seq))
        best_q = max(q[a] for a in legal_sets[env])
        assert float(tr.return_to_date[n]) == pytest.approx(ret, abs=1e-5)
        assert float(tr.score[n]) == pytest.approx(ret + gamma ** len(seq) * best_q, abs=1e-5)
        if seq:
            assert float(tr.reward[n]) == model.reward_fn(int(tasks[env]), obs, tuple(seq[:-1]), seq[-1])
            assert tr.obs_tokens[n].tolist() == [len(seq) - 1 + 2 * seq[-1] + 1] * 36
    for env in range(2):
        path = tr.path(env)
        assert path[0] == env and int(tr.action[path[1]]) == int(actions[env]) and len(path) == horizon + 1
        leaves = (tr.env == env) & (tr.depth == horizon)
        assert float(tr.score[tr.best_leaf[env]]) == float(tr.score[leaves].max())
        for d in range(1, horizon + 1):
            assert int((tr.kept & (tr.env == env) & (tr.depth == d)).sum()) == min(
                bw, int(((tr.env == env) & (tr.depth == d)).sum())
            )
    frames = decode_trace_frames(tr, SimpleNamespace(decode=lambda t: t.float().view(-1, 1, 6, 6)), path)
    assert frames.shape == (horizon + 1, 1, 6, 6) and frames[1, 0, 0, 0] == tr.obs_tokens[path[1], 0]


def test_planner_uses_one_batched_step_per_depth_and_nothing_more():
    model = random_table_model(3)
    legal = legal_of(range(5), range(5), range(2), range(5))
    history, tasks = random_history(4, 2, 50, 3), torch.arange(4)
    beam_search(model, history, tasks, legal, 3, 3)
    # k = min(#legal, 3) = (3, 3, 2, 3). Depth 1: 3+3+2+3 children, of which all are kept (<= 3 per env);
    # depth 2: 9+9+4+9 children, 3 kept per env; depth 3: 9+9+6+9.
    assert model.step_calls == 3
    assert model.steps == 11 + 31 + 33


# --- random tiny WorldActionModel ---------------------------------------------------------------
# Blocks of 4 observation tokens + 1 action (the planner reads the layout from the config) keep an
# imagined step at 5 forwards instead of 37, so that these tests stay fast on 2 busy cores.
TINY_TPB = 5


def tiny_history(B: int, steps: int, seed: int) -> torch.Tensor:
    return random_history(B, steps, 24, seed, TINY_TPB)


def tiny_model(seed: int = 0, **kw) -> WorldActionModel:
    cfg = {"num_layers": 2, "num_heads": 2, "embed_dim": 32, "obs_vocab_size": 24, "q_mlp_dim": 16, "num_q": 2}
    cfg["tokens_per_block"] = TINY_TPB
    no_dropout = {"embed_pdrop": 0.0, "resid_pdrop": 0.0, "attn_pdrop": 0.0, "q_dropout": 0.0}
    torch.manual_seed(seed)
    model = WorldActionModel(WorldActionConfig(**{**cfg, **no_dropout, **kw})).eval()
    with torch.no_grad():  # make rewards, tokens and Q depend on the input
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def game_batch(names):
    tasks = torch.tensor([games.task_id(n) for n in names])
    return tasks, torch.from_numpy(games.action_masks())[tasks]


def left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(r.shape[0] for r in rows)
    out = torch.full((len(rows), T), 7, dtype=torch.long)  # padding value is arbitrary
    for i, r in enumerate(rows):
        out[i, T - r.shape[0] :] = r
    return out, torch.tensor([(r.shape[0] + 1) // TINY_TPB for r in rows])


@pytest.mark.parametrize("beam_width,horizon", [(2, 2), (3, 1), (2, 3)])
def test_batched_plan_equals_single_env_plans(beam_width, horizon):
    model = tiny_model(1)
    names = ["Pong", "Breakout", "MsPacman", "Assault", "Pong"]
    tasks, legal = game_batch(names)
    steps = [8, 3, 1, 8, 5]
    rows = [tiny_history(1, s, seed=10 + i)[0] for i, s in enumerate(steps)]
    history, history_steps = left_padded(rows)
    actions, tr = beam_search(
        model, history, tasks, legal, beam_width, horizon, trace=True, history_steps=history_steps
    )
    for b in range(len(names)):
        one, tr1 = beam_search(
            model, rows[b][None], tasks[b : b + 1], legal[b : b + 1], beam_width, horizon, trace=True
        )
        assert int(actions[b]) == int(one[0])
        mine = tr.env == b
        assert int(mine.sum()) == tr1.num_nodes
        for key in ("depth", "action", "kept", "obs_tokens", "reward"):
            assert torch.equal(getattr(tr, key)[mine], getattr(tr1, key)), key
        torch.testing.assert_close(tr.score[mine], tr1.score, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tr.q[mine], tr1.q, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_batched_planner_matches_per_node_reference(seed):
    model = tiny_model(seed)
    tasks, legal = game_batch(["Pong", "SpaceInvaders", "Qbert", "Seaquest"])
    rows = [tiny_history(1, s, seed=seed * 7 + i)[0] for i, s in enumerate([8, 2, 6, 4])]
    history, steps = left_padded(rows)
    for bw, horizon in [(2, 2), (3, 2), (1, 3), (2, 0)]:
        ours, trace = beam_search(model, history, tasks, legal, bw, horizon, trace=True, history_steps=steps)
        ref, ref_scores = reference_beam_search(model, history, tasks, legal, bw, horizon, history_steps=steps)
        assert torch.equal(ours, ref), (bw, horizon)
        torch.testing.assert_close(trace.score[trace.best_leaf], torch.tensor(ref_scores), rtol=1e-5, atol=1e-5)


def test_batched_planner_matches_per_node_reference_with_the_official_37_token_layout():
    model = tiny_model(9, tokens_per_block=TPB)
    tasks, legal = game_batch(["Pong", "Breakout"])
    rows = [random_history(1, s, 24, seed=40 + i)[0] for i, s in enumerate([3, 2])]
    T = max(r.shape[0] for r in rows)
    history = torch.stack([torch.cat([torch.zeros(T - r.shape[0], dtype=torch.long), r]) for r in rows])
    steps = torch.tensor([3, 2])
    ours, trace = beam_search(model, history, tasks, legal, 2, 2, trace=True, history_steps=steps)
    ref, ref_scores = reference_beam_search(model, history, tasks, legal, 2, 2, history_steps=steps)
    assert torch.equal(ours, ref)
    torch.testing.assert_close(trace.score[trace.best_leaf], torch.tensor(ref_scores), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("anchor_q", [False, True])
def test_shared_history_cache_plans_like_a_copy_per_beam(anchor_q):
    """On CPU beams read their env's history from one shared cache (``KVCache.branch``); the search must
    be the same as with a copy per beam: every node, action and kept flag, and scores to rounding."""
    model = tiny_model(4)
    tasks, legal = game_batch(["Pong", "Breakout", "MsPacman", "Qbert"])
    rows = [tiny_history(1, s, seed=60 + i)[0] for i, s in enumerate([8, 3, 6, 6])]
    history, steps = left_padded(rows)
    for bw, horizon in [(2, 2), (4, 2), (3, 3)]:
        kw = {"trace": True, "history_steps": steps, "anchor_q": anchor_q}
        a_shared, shared = beam_search(model, history, tasks, legal, bw, horizon, share_prefix=True, **kw)
        a_copied, copied = beam_search(model, history, tasks, legal, bw, horizon, share_prefix=False, **kw)
        assert torch.equal(a_shared, a_copied)
        for key in ("env", "depth", "parent", "action", "kept", "obs_tokens", "reward", "best_leaf"):
            assert torch.equal(getattr(shared, key), getattr(copied, key)), key
        torch.testing.assert_close(shared.score, copied.score, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(shared.q, copied.q, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="share_prefix needs a WorldActionModel"):
        beam_search(random_table_model(0), tiny_history(1, 2, 0), tasks[:1], legal[:1], 2, 2, share_prefix=True)
    # the default shares where it measured faster: wide enough groups of a WorldActionModel off CUDA
    assert not shares_history(model, 7, "cpu") and shares_history(model, 8, "cpu")  # width 32: 8 x 32 = 256
    assert not shares_history(model, 64, "cuda") and not shares_history(random_table_model(0), 64, "cpu")
    # a model in train mode with attention dropout plans with copies by default (shared attention draws none)
    dropping = tiny_model(4, attn_pdrop=0.1).train()
    assert not shares_history(dropping, 64, "cpu")
    history16 = tiny_history(16, 3, 9)
    tasks16, legal16 = game_batch(["Pong"] * 16)
    assert bool(legal16[torch.arange(16), beam_search(dropping, history16, tasks16, legal16, 2, 2)[0]].all())


def test_greedy_is_masked_argmax_of_the_last_q():
    model = tiny_model(2)
    tasks, legal = game_batch(["Pong", "Breakout", "Asterix"])
    history = tiny_history(3, 8, 2)
    out = model(history, tasks)
    q = model.q_values(out.q_logits[:, :, -1], legal)
    assert torch.equal(greedy(model, history, tasks, legal), q.argmax(-1))
    assert torch.equal(beam_search(model, history, tasks, legal, 4, 0)[0], q.argmax(-1))


# --- legal masking ------------------------------------------------------------------------------


def test_illegal_actions_are_never_chosen_or_expanded():
    model = tiny_model(4)
    tasks = torch.tensor([0, 1, 2])
    history = tiny_history(3, 4, 4)
    q = model.q_values(model(history, tasks).q_logits[:, :, -1])
    # Forbid each env's best unmasked actions and leave few legal ones.
    order = q.argsort(-1, descending=True)
    legal = torch.zeros(3, A, dtype=torch.bool)
    for b, n_legal in enumerate([1, 2, 3]):
        legal[b, order[b, 5 : 5 + n_legal]] = True
    for bw, horizon in [(1, 0), (4, 1), (4, 2), (2, 3)]:
        actions, tr = beam_search(model, history, tasks, legal, bw, horizon, trace=True)
        assert bool(legal[torch.arange(3), actions].all())
        child = tr.depth > 0
        assert bool(legal[tr.env[child], tr.action[child]].all())
        for n in torch.nonzero(tr.kept & (tr.depth < horizon)).flatten().tolist():
            n_children = int((tr.parent == n).sum())
            assert n_children == min(int(legal[tr.env[n]].sum()), bw)
    assert bool(legal[torch.arange(3), mcts(model, history, tasks, legal, horizon=3, num_simulations=10)].all())


def test_bad_inputs_raise_clear_errors():
    model = tiny_model(0)
    tasks, legal = game_batch(["Pong"])
    good = tiny_history(1, 2, 0)
    with pytest.raises(ValueError, match="k\\*5-1"):
        beam_search(model, good[:, :-1], tasks, legal, 2, 2)
    with pytest.raises(ValueError, match="horizon"):
        beam_search(model, good, tasks, legal, 2, 8)
    with pytest.raises(ValueError, match="legal_mask"):
        beam_search(model, good, tasks, legal.long(), 2, 2)
    with pytest.raises(ValueError, match="at least one legal"):
        beam_search(model, good, tasks, torch.zeros(1, A, dtype=torch.bool), 2, 2)
    with pytest.raises(ValueError, match="history_steps"):
        beam_search(model, good, tasks, legal, 2, 2, history_steps=torch.tensor([3]))
    with pytest.raises(ValueError, match="beam_width"):
        beam_search(model, good, tasks, legal, 0, 2)


# --- sampling -----------------------------------------------------------------------------------


def test_sampling_uses_the_generator():
    model = tiny_model(5)
    tasks, legal = game_batch(["Pong", "Breakout"])
    history = tiny_history(2, 3, 5)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return beam_search(model, history, tasks, legal, 2, 2, sample=True, generator=g, trace=True)[1]

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a.obs_tokens, b.obs_tokens) and torch.equal(a.score, b.score)
    assert not torch.equal(a.obs_tokens[a.depth > 0], c.obs_tokens[c.depth > 0])
    greedy_trace = beam_search(model, history, tasks, legal, 2, 2, trace=True)[1]
    assert not torch.equal(a.obs_tokens[a.depth > 0], greedy_trace.obs_tokens[greedy_trace.depth > 0])


# --- MCTS ---------------------------------------------------------------------------------------


def test_mcts_finds_the_obviously_best_action_against_a_misleading_prior():
    """Root Q prefers 0, but only after action 2 is the world worth anything (Q 5 vs 0.5)."""

    def q_fn(task, obs, seq):
        if not seq:
            return [{0: 2.0, 1: 1.5, 2: 1.0}.get(a, 0.0) for a in range(A)]
        return [5.0 if seq[0] == 2 else 0.5] * A

    model, legal = TableModel(lambda *a: 0, q_fn), legal_of([0, 1, 2], [0, 1, 2, 3])
    history, tasks = random_history(2, 2, 50, 0), torch.tensor([0, 1])
    assert greedy(model, history, tasks, legal).tolist() == [0, 0]
    for horizon in (2, 4):
        for use_mean, use_count in [(False, False), (True, False), (False, True)]:
            got = mcts(model, history, tasks, legal, horizon=horizon, use_mean=use_mean, use_count=use_count)
            assert got.tolist() == [2, 2], (horizon, use_mean, use_count)


def test_mcts_batched_equals_one_env_at_a_time_and_is_legal():
    model = tiny_model(6)
    tasks, legal = game_batch(["Pong", "Breakout", "MsPacman"])
    rows = [tiny_history(1, s, seed=20 + i)[0] for i, s in enumerate([8, 1, 4])]
    history, steps = left_padded(rows)
    together = mcts(model, history, tasks, legal, horizon=4, num_simulations=12, history_steps=steps)
    assert bool(legal[torch.arange(3), together].all())
    for b in range(3):
        alone = mcts(model, rows[b][None], tasks[b : b + 1], legal[b : b + 1], horizon=4, num_simulations=12)
        assert int(alone[0]) == int(together[b])


def test_mcts_without_simulations_is_greedy():
    model = tiny_model(8)
    tasks, legal = game_batch(["Pong", "Qbert"])
    history = tiny_history(2, 2, 8)  # 2 steps: both keep the whole window (mcts cuts to 8 - 6)
    assert torch.equal(mcts(model, history, tasks, legal, num_simulations=0), greedy(model, history, tasks, legal))


def test_anchored_beam_reads_the_root_q_with_greedys_whole_context():
    """Horizon 1 anchored is greedy even when the history fills the model's window: the anchor reads all 8
    steps, while the imagination keeps 7. The official horizon-1 beam ranks by its 7-step imagination."""
    model = tiny_model(3, max_blocks=8)
    B = 16
    history = tiny_history(B, 8, 5)
    tasks, legal = (
        torch.randint(0, 60, (B,), generator=torch.Generator().manual_seed(1)),
        torch.ones(B, A, dtype=torch.bool),
    )
    anchored = beam_search(model, history, tasks, legal, 2, 1, anchor_q=True)[0]
    assert torch.equal(anchored, greedy(model, history, tasks, legal))
    # the 7-step root Q (what the planner's own window reads) would not give greedy's choice everywhere
    short = greedy(model, history[:, TINY_TPB:], tasks, legal)
    assert not torch.equal(short, greedy(model, history, tasks, legal))
