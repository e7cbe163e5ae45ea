"""Agent: token-history bookkeeping against a hand-built sequence, greedy choice against a direct
forward, per-env legal masks across games, epsilon per env vs shared, control agents, MTBC."""

import numpy as np
import pytest
import torch

from jowa_core import agent as agent_mod
from jowa_core import games
from jowa_core.agent import Agent, ConstantAgent, MTBCAgent, RandomAgent
from jowa_core.config import preset
from jowa_core.models import Tokenizer, WorldActionModel

TPB = 37
RIGHTFIRE, DOWNLEFTFIRE = games.FULL_ACTION_SET.index("RIGHTFIRE"), games.FULL_ACTION_SET.index("DOWNLEFTFIRE")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    p = preset("tiny", model={"num_layers": 1, "embed_dim": 32, "num_heads": 2, "q_mlp_dim": 32})
    return Tokenizer(p.tokenizer).eval(), WorldActionModel(p.model).eval()


@pytest.fixture(scope="module")
def bc_nets():
    torch.manual_seed(1)
    p = preset("tiny", model={"num_layers": 1, "embed_dim": 32, "num_heads": 2, "q_mlp_dim": 32, "bc_head": True})
    return Tokenizer(p.tokenizer).eval(), WorldActionModel(p.model).eval()


def _frames(rng, n):
    return rng.integers(0, 256, size=(n, 84, 84), dtype=np.uint8)


@pytest.fixture
def spy(monkeypatch):
    """Record what the agent hands to the planner."""
    calls = []
    original = agent_mod.planning.beam_search

    def wrapped(model, history, task_ids, legal_mask, beam_width, horizon, gamma=0.99, **kw):
        calls.append({"history": history.clone(), "steps": kw["history_steps"].clone(), "task_ids": task_ids.clone(),
                      "legal": legal_mask.clone(), "beam_width": beam_width, "horizon": horizon,
                      "use_mean": kw["use_mean"], "anchor_q": kw["anchor_q"]})  # fmt: skip
        return original(model, history, task_ids, legal_mask, beam_width, horizon, gamma, **kw)

    monkeypatch.setattr(agent_mod.planning, "beam_search", wrapped)
    return calls


def _direct_greedy(model, context, game):
    """argmax over legal actions of the expected Q at the last token, one env, no planner."""
    out = model(context[None], torch.tensor([games.task_id(game)]))
    q = model.q_values(out.q_logits[:, :, -1], torch.as_tensor(games.legal_mask(game))[None])
    return int(q.argmax(-1))


def test_history_bookkeeping_against_hand_sequence(nets, spy):
    tok, model = nets
    agent = Agent(tok, model, history_steps=3, epsilon=0.0)
    agent.bind(["Pong", "Pong"])
    rng = np.random.default_rng(0)
    held = {0: [], 1: []}  # hand-kept list of (obs tokens, action) per env, oldest first
    for t in range(6):
        frames = _frames(rng, 2)
        if t == 3:  # env 1's episode ended before this step
            agent.reset([1])
            held[1] = []
            assert agent.history_length().tolist() == [3, 0]
            assert agent.history_tokens(1).numel() == 0
        acts = agent.act(frames)
        hist, steps = spy[-1]["history"], spy[-1]["steps"]
        for e in (0, 1):
            cur = tok.encode(torch.from_numpy(frames[e : e + 1]))[0]
            past = held[e][-2:]  # cap 3 steps: the two previous ones and the current frame
            expected = torch.cat([torch.cat([o, torch.tensor([a])]) for o, a in past] + [cur])
            k = len(past) + 1
            assert int(steps[e]) == k and expected.numel() == k * TPB - 1
            assert torch.equal(hist[e, hist.shape[1] - expected.numel() :], expected), (t, e)
            assert acts[e] == _direct_greedy(model, expected, "Pong")
            held[e].append((cur, int(acts[e])))
        if t == 1:  # the env executed FIRE instead for env 0 (e.g. fire_on_life_loss)
            agent.observe_actions([1, int(acts[1])])
            held[0][-1] = (held[0][-1][0], 1)
        for e in (0, 1):
            blocks = [torch.cat([o, torch.tensor([a])]) for o, a in held[e][-3:]]
            assert torch.equal(agent.history_tokens(e), torch.cat(blocks))
    assert [len(c["history"]) for c in spy] == [2] * 6
    assert agent.history_length().tolist() == [3, 3]

    # acting for a subset of slots leaves the others untouched
    before = agent.history_tokens(0)
    agent.act(_frames(rng, 1), [1])
    assert torch.equal(agent.history_tokens(0), before)


def test_two_games_one_call_uses_each_envs_mask_and_task(nets, spy):
    tok, model = nets
    q = model.head_q.head_module.params[9]  # last bias (num_q, 18 * 51), action-major
    saved = q.detach().clone()
    with torch.no_grad():  # make an illegal action best everywhere (a point mass at 30), RIGHTFIRE (Pong only) second (26)
        for a, atom in ((DOWNLEFTFIRE, 50), (RIGHTFIRE, 45)):
            q[:, a * 51 : (a + 1) * 51] = -50.0
            q[:, a * 51 + atom] = 30.0
    try:
        out = model(torch.zeros(1, TPB - 1, dtype=torch.long), torch.tensor([0]))
        assert int(model.q_values(out.q_logits[:, :, -1]).argmax()) == DOWNLEFTFIRE  # unmasked would be illegal
        rng = np.random.default_rng(1)
        for horizon in (0, 1):
            agent = Agent(tok, model, epsilon=0.0, beam_width=2, horizon=horizon, history_steps=2)
            agent.bind(["Pong", "Breakout", "Pong"])
            for _ in range(3):
                acts = agent.act(_frames(rng, 3))
                if horizon == 0:  # greedy: the best legal action of each env's own game
                    assert acts[0] == RIGHTFIRE and acts[2] == RIGHTFIRE
                assert games.legal_mask("Pong")[acts[[0, 2]]].all() and games.legal_mask("Breakout")[acts[1]]
            call = spy[-1]
            assert call["task_ids"].tolist() == [games.task_id(g) for g in ("Pong", "Breakout", "Pong")]
            assert np.array_equal(
                call["legal"].cpu().numpy(), np.stack([games.legal_mask(g) for g in ("Pong", "Breakout", "Pong")])
            )
            assert call["horizon"] == horizon
    finally:
        with torch.no_grad():
            q.copy_(saved)


def test_mixed_history_lengths_and_per_game_settings(nets, spy):
    tok, model = nets
    agent = Agent(tok, model, epsilon=0.0, history_steps={"Pong": 2, "Breakout": 4})
    agent.bind(["pong", "Breakout"])
    assert agent.slot_settings(0)["history_steps"] == 2 and agent.slot_settings(1)["history_steps"] == 4
    rng = np.random.default_rng(2)
    for _ in range(5):
        agent.act(_frames(rng, 2))
    assert spy[-1]["steps"].tolist() == [2, 4]
    assert spy[-1]["history"].shape == (2, 4 * TPB - 1)
    assert spy[-1]["use_mean"] is False  # the official leaf value unless asked

    mean_agent = Agent(tok, model, epsilon=0.0, beam_width=2, horizon=1, use_mean=True)
    mean_agent.bind(["Breakout"])
    mean_agent.act(_frames(rng, 1))
    assert spy[-1]["use_mean"] is True and spy[-1]["horizon"] == 1 and mean_agent.describe()["use_mean"] is True
    assert spy[-1]["anchor_q"] is False  # the official beam score unless asked
    anchored = Agent(tok, model, epsilon=0.0, beam_width=2, horizon=1, anchor_q=True)
    anchored.bind(["Breakout"])
    anchored.act(_frames(rng, 1))
    assert spy[-1]["anchor_q"] is True and anchored.describe()["anchor_q"] is True

    off = Agent.official(tok, model, "150M")
    off.bind(["Assault", "Seaquest"])
    assert off.slot_settings(0) == {"history_steps": 4, "beam_width": 2, "horizon": 2, "task_id": 3}
    assert off.slot_settings(1)["beam_width"] == 4 and off.slot_settings(1)["history_steps"] == 6


def test_epsilon_per_env_vs_shared(nets):
    tok, model = nets
    rng = np.random.default_rng(3)
    frames = _frames(rng, 16)
    seen = {}
    for shared in (False, True):
        agent = Agent(tok, model, epsilon=0.5, shared_epsilon=shared, seed=0, history_steps=1)
        agent.bind(["Breakout"] * 16)
        explored = []
        for _ in range(10):
            acts = agent.act(frames)
            assert games.legal_mask("Breakout")[acts].all()
            explored.append(agent.last_explored.copy())
        seen[shared] = np.stack(explored)
    per_env, shared = seen[False], seen[True]
    assert (per_env.any(1) & ~per_env.all(1)).any()  # some call mixes explore and plan across envs
    assert 0.35 < per_env.mean() < 0.65
    assert (shared.all(1) | ~shared.any(1)).all()  # official rule: all envs or none
    assert shared.all(1).any() and (~shared.any(1)).any()

    greedy = Agent(tok, model, epsilon=0.0)
    greedy.bind(["Breakout"] * 4)
    greedy.act(frames[:4])
    assert not greedy.last_explored.any()


def test_seeded_bind_reproduces_exploration(nets):
    tok, model = nets
    agent = Agent(tok, model, epsilon=0.5, history_steps=1)
    frames = _frames(np.random.default_rng(4), 8)
    runs = []
    for _ in range(2):
        agent.bind(["MsPacman"] * 8, seed=7)
        runs.append(np.concatenate([agent.act(frames) for _ in range(3)]))
    assert np.array_equal(runs[0], runs[1])


def test_control_agents():
    rnd = RandomAgent(seed=0)
    rnd.bind(["Pong", "Breakout"])
    obs = np.zeros((2, 84, 84), np.uint8)
    acts = np.stack([rnd.act(obs) for _ in range(600)])  # (600, 2)
    for e, g in enumerate(("Pong", "Breakout")):
        legal = np.flatnonzero(games.legal_mask(g))
        counts = np.array([(acts[:, e] == a).sum() for a in legal])
        assert set(np.unique(acts[:, e])) == set(legal)  # every legal action, nothing else
        assert counts.min() > 600 / len(legal) * 0.6
    left = ConstantAgent("LEFT")
    left.bind(["Pong", "Breakout"])
    assert left.name == "constant_LEFT" and left.act(obs).tolist() == [4, 4]
    with pytest.raises(ValueError, match="not legal in Breakout"):
        ConstantAgent(RIGHTFIRE).bind(["Pong", "Breakout"])


def test_mtbc_agent_acts_by_bc_head(bc_nets):
    tok, model = bc_nets
    agent = MTBCAgent(tok, model, epsilon=0.0, history_steps=2)
    agent.bind(["Pong", "Breakout"])
    rng = np.random.default_rng(5)
    for _ in range(2):
        frames = _frames(rng, 2)
        acts = agent.act(frames)
    for e, g in enumerate(("Pong", "Breakout")):
        ctx = agent.history_tokens(e)[:-1]
        logits = model(ctx[None], torch.tensor([games.task_id(g)])).bc_logits[0, -1]
        logits = logits.masked_fill(~torch.as_tensor(games.legal_mask(g)), float("-inf"))
        assert acts[e] == int(logits.argmax())
    with pytest.raises(ValueError, match="bc_head"):
        MTBCAgent(tok, WorldActionModel(preset("tiny", model={"num_layers": 1, "embed_dim": 32, "num_heads": 2}).model))


def test_bad_inputs_are_explained(nets):
    tok, model = nets
    agent = Agent(tok, model)
    with pytest.raises(RuntimeError, match="bind"):
        agent.act(np.zeros((1, 84, 84), np.uint8))
    agent.bind(["Pong"])
    with pytest.raises(ValueError, match="uint8"):
        agent.act(np.zeros((1, 84, 84), np.float32))
    with pytest.raises(ValueError, match="rows given"):
        agent.act(np.zeros((2, 84, 84), np.uint8))
    with pytest.raises(ValueError, match="history_steps"):
        Agent(tok, model, history_steps=9)
    with pytest.raises(ValueError, match="beam_width"):
        Agent(tok, model, horizon=2, beam_width=0).bind(["Pong"])
    with pytest.raises(KeyError, match="no entry for Breakout"):
        Agent(tok, model, history_steps={"Pong": 2}).bind(["Breakout"])


# ---------------------------------------------------------------------------------------------
# PolicyAgent: the data's behaviour policies as agents


def test_policy_agent_gives_each_slot_its_policy_rows_and_ram():
    """``PolicyAgent("tracker")`` acts as ``BreakoutTracker`` on the RAM of each slot, also for a subset of slots
    (the rows a policy sees are all its game's slots, so per-row state and random draws stay aligned)."""
    from jowa_core.data.collect import BreakoutTracker

    rng = np.random.default_rng(0)
    ram = rng.integers(0, 256, (3, 128), dtype=np.uint8)
    ram[:, BreakoutTracker.BALL_Y] = [0, 50, 60]  # slot 0 has no ball in play: FIRE
    obs = np.zeros((3, 84, 84), np.uint8)
    agent = agent_mod.PolicyAgent("tracker", seed=4)
    agent.bind(["Breakout"] * 3)
    with pytest.raises(RuntimeError, match="call observe_ram"):
        agent.act(obs)
    agent.observe_ram(ram)
    want = BreakoutTracker(epsilon=0.05).act(obs, ram, games.legal_mask("Breakout"), np.random.default_rng(4))
    np.testing.assert_array_equal(agent.act(obs), want)
    assert want[0] == games.action_index("FIRE") and agent.needs_ram
    agent.bind(["Breakout"] * 3, seed=4)
    agent.observe_ram(ram[[2, 0]], [2, 0])
    agent.observe_ram(ram[[1]], [1])
    np.testing.assert_array_equal(agent.act(obs[[2, 0]], [2, 0]), want[[2, 0]])
    with pytest.raises(ValueError, match="cannot play"):
        agent.bind(["Pong"])
    with pytest.raises(ValueError, match="PolicyAgent policy must be one of"):
        agent_mod.PolicyAgent("dqn")


def test_policy_agent_draws_a_mixed_sub_policy_per_episode():
    agent = agent_mod.PolicyAgent("mixed", seed=1)
    agent.bind(["Pong", "Breakout", "Pong", "Breakout"])
    pong, breakout = agent._policies["Pong"], agent._policies["Breakout"]
    assert not pong.needs_ram and breakout.needs_ram  # Pong's mixture: random and lazy players
    assert len(breakout.policies) == 7 and len(agent._slots["Breakout"]) == 2
    before = [breakout.episode_label(0), breakout.episode_label(1)]
    draws = []
    for _ in range(20):  # a reset of slot 3 (Breakout's second slot) redraws that slot's sub-policy only
        agent.reset([3])
        assert breakout.episode_label(0) == before[0]
        draws.append(breakout.episode_label(1))
    assert len(set(draws)) > 2
    agent.observe_ram(np.zeros((4, 128), np.uint8))
    acts = agent.act(np.zeros((4, 84, 84), np.uint8))
    assert all(games.legal_mask(g)[a] for g, a in zip(agent.games, acts))
