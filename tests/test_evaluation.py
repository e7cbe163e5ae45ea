"""Evaluation: normalised scores and IQM against hand computation, the stratified bootstrap against an
exactly enumerated case, episode accounting on a scripted fake env, real ALE rollouts against a manual
loop, controls, the score table's round trip, video capture."""

import itertools
import sys
import warnings
from typing import ClassVar

import numpy as np
import pytest
import torch
from scipy import stats

from jowa_core import evaluation as ev
from jowa_core import games
from jowa_core.agent import BaseAgent, ConstantAgent, PolicyAgent, RandomAgent
from jowa_core.envs import AtariVecEnv, EnvConfig
from jowa_core.evaluation import (
    ScoreTable,
    aggregate_scores,
    bootstrap_ci,
    control_scores,
    dqn_normalized,
    evaluate,
    human_normalized,
    iqm,
    stratified_bootstrap,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- normalised scores and aggregates ---------------------------------------------------------------------


def test_normalised_scores_by_hand():
    # Assault: random 222.4, human 742.0 (spec 10); halfway = 482.2
    assert human_normalized(482.2, "Assault") == pytest.approx(0.5)
    assert human_normalized(742.0, "assault") == pytest.approx(1.0)
    assert human_normalized(np.array([222.4, 1261.6]), "Assault") == pytest.approx([0.0, 2.0])
    # Pong: random -20.7, DQN 16.6 (results file) or 19.5 (paper Table 18)
    assert dqn_normalized(-2.05, "Pong") == pytest.approx(0.5)
    assert dqn_normalized(19.5, "Pong", "paper_table18") == pytest.approx(1.0)
    with pytest.raises(games.UnknownGameError):
        human_normalized(10.0, "Asterix")  # not one of the paper's 20 games (nor Breakout)
    assert human_normalized(30.5, "Breakout") == pytest.approx(1.0)  # Mnih et al. 2015: random 1.7, human 30.5


def test_iqm_of_15_games_drops_3_and_3():
    x = np.array([1000.0, -50, 3, 4, 5, 6, 7, 8, 9, 10, 11, 500, -7, 12, 2])
    middle = [3, 4, 5, 6, 7, 8, 9, 10, 11]  # sorted: drop -50 -7 2 and 12 500 1000
    assert iqm(x) == pytest.approx(sum(middle) / 9) == pytest.approx(stats.trim_mean(x, 0.25))
    per_game = {g: np.array([v]) for g, v in zip(games.PRETRAINING_GAMES, x)}
    agg = aggregate_scores(per_game, metric="raw", stat="iqm", reps=50)
    assert agg.value == pytest.approx(7.0) and len(agg.games) == 15
    assert aggregate_scores(per_game, metric="raw", stat="median", reps=50).value == pytest.approx(7.0)
    assert aggregate_scores(per_game, metric="raw", stat="mean", reps=50).value == pytest.approx(x.mean())
    # HNS aggregate = stat of the per-game HNS of the means
    hns = np.array([human_normalized(v, g) for g, v in zip(games.PRETRAINING_GAMES, x)])
    assert aggregate_scores(per_game, "hns", "iqm", reps=50).value == pytest.approx(stats.trim_mean(hns, 0.25))


def test_stratified_bootstrap_matches_exact_enumeration():
    a, b = np.array([0.0, 1.0]), np.array([0.0, 10.0])
    # every resample of 2 episodes per game is equally likely: 4 x 4 ordered outcomes
    exact = {}
    for ra in itertools.product(a, repeat=2):
        for rb in itertools.product(b, repeat=2):
            v = (np.mean(ra) + np.mean(rb)) / 2
            exact[v] = exact.get(v, 0) + 1 / 16
    reps = 40_000
    dist = stratified_bootstrap([a, b], lambda m: m.mean(-1), reps=reps, seed=0)
    for v, p in exact.items():
        freq = np.mean(np.isclose(dist, v))
        assert abs(freq - p) < 4 * np.sqrt(p * (1 - p) / reps), (v, freq, p)
    assert set(np.round(np.unique(dist), 9)) == set(np.round(list(exact), 9))
    # P(min) = P(max) = 1/16 > 2.5%: the 95% interval is exactly [0, 5.5]
    assert bootstrap_ci(dist, 0.95) == (0.0, 5.5)
    agg = aggregate_scores({"Pong": a, "Assault": b}, metric="raw", stat="mean", reps=reps)
    assert (agg.value, agg.low, agg.high) == (2.75, 0.0, 5.5)


def test_bootstrap_ci_properties():
    base = np.array([0.0, 3, 7, 1, 9, 4, 4, 8, 2, 6])
    small = {"Pong": base, "Assault": base * 10}
    large = {g: np.tile(r, 16) for g, r in small.items()}
    s1 = aggregate_scores(small, "hns", "mean", seed=3)
    s2 = aggregate_scores(small, "hns", "mean", seed=3)
    s3 = aggregate_scores(small, "hns", "mean", seed=4)
    assert s1 == s2 and (s1.low, s1.high) != (s3.low, s3.high)  # reproducible from the seed
    big = aggregate_scores(large, "hns", "mean", seed=3)
    for agg in (s1, big):
        assert agg.low <= agg.value <= agg.high
    assert big.value == pytest.approx(s1.value)
    ratio = (big.high - big.low) / (s1.high - s1.low)
    assert 0.15 < ratio < 0.4  # 16x the episodes: about 1/4 the width
    wide = aggregate_scores(small, "hns", "mean", seed=3, confidence=0.99)
    assert wide.low <= s1.low and wide.high >= s1.high


# --- score table ---------------------------------------------------------------------------------------


def _table():
    return ScoreTable(
        returns={"a": {"Pong": [-21.0, -19.0], "Asterix": [2.0, 4.0, 3.0]}, "b": {"Pong": [-20.0, -20.0]}},
        lengths={"a": {"Pong": [800, 900], "Asterix": [100, 200, 150]}, "b": {"Pong": [810, 820]}},
        meta={"a": {"seed": 0}, "b": {"seed": 1}},
    )


def test_score_table_frame_markdown_round_trip(tmp_path):
    t = _table()
    df = t.to_frame()
    row = df[(df.agent == "a") & (df.game == "Pong")].iloc[0]
    assert row.episodes == 2 and row["mean"] == -20.0 and row.mean_length == 850
    assert row.hns == pytest.approx((-20.0 + 20.7) / (14.6 + 20.7))  # Pong human 14.6
    assert row.ci_low == -21.0 and row.ci_high == -19.0
    assert np.isnan(df[(df.agent == "a") & (df.game == "Asterix")].iloc[0].hns)
    md = t.to_markdown()
    assert "| a | Asterix | 3 | 3.0 [" in md and "| b | iqm |" in md
    path = t.save(tmp_path / "scores.json")
    back = ScoreTable.load(path)
    assert back.returns == t.returns and back.lengths == t.lengths and back.meta == t.meta
    assert t.best() == {"Pong": ("a", -20.0), "Asterix": ("a", 3.0)}
    with pytest.raises(ValueError, match="agent="):
        t.aggregate("hns")
    with pytest.raises(ValueError, match="Asterix"):
        t.aggregate("hns", agent="a")
    assert t.aggregate("hns", "mean", agent="b").value == pytest.approx(row.hns)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a score table"):
        ScoreTable.load(tmp_path / "bad.json")
    merged = ScoreTable(returns={"c": {"Pong": [1.0]}}).merge(t)
    assert merged.agents == ["c", "a", "b"]
    with pytest.raises(ValueError, match="two tables"):
        t.merge(t)


# --- episode accounting on a scripted env -------------------------------------------------------------------

TERMINAL_REWARD = 10.0


class FakeEnv:
    """Env j's k-th episode lasts 2 + j + k steps, rewards 1 per step and 10 on the game-over step;
    obs pixels hold the step count; SAME_STEP autoreset and a step cap like ``AtariVecEnv``."""

    log: ClassVar[list] = []

    def __init__(self, game, num_envs, config, seed=0, *, backend="native"):
        self.game, self.n, self.cap = game, num_envs, config.max_episode_steps
        self.k = np.zeros(num_envs, int)
        self.t = np.zeros(num_envs, int)
        FakeEnv.log.append(self)
        self.actions = []

    def _obs(self):
        return np.repeat(self.t.astype(np.uint8)[:, None, None], 84, 1).repeat(84, 2)

    def reset(self):
        return self._obs()

    def step(self, actions):
        self.actions.append(np.array(actions))
        self.t += 1
        length = 2 + np.arange(self.n) + self.k
        term = self.t >= length
        trunc = (self.t >= self.cap) & ~term
        rew = np.where(term, TERMINAL_REWARD, 1.0).astype(np.float32)
        final = self._obs()
        done = term | trunc
        self.t[done] = 0
        self.k[done] += 1
        return self._obs(), rew, term, trunc, {"final_obs": final, "actions": np.array(actions)}

    def close(self):
        pass


class RecordingAgent(BaseAgent):
    name = "recorder"

    def __init__(self):
        super().__init__()
        self.calls, self.resets = [], []

    def act(self, obs, env_indices=None):
        self.calls.append(np.array(env_indices))
        return np.full(len(env_indices), 3)  # RIGHT: legal in Pong and Breakout

    def reset(self, env_indices=None):
        if env_indices is not None:
            self.resets.append(list(np.asarray(env_indices)))


@pytest.mark.parametrize("count_terminal", [True, False])
def test_episode_accounting_with_fewer_envs_than_episodes(monkeypatch, count_terminal):
    monkeypatch.setattr(ev, "AtariVecEnv", FakeEnv)
    FakeEnv.log = []
    agent = RecordingAgent()
    t = evaluate(agent, ["Pong", "Breakout"], 4, num_envs=2, max_steps=100, progress=False,
                 count_terminal_reward=count_terminal)  # fmt: skip
    # by hand: env 0 runs episodes 0 (2 steps) and 2 (3 steps); env 1 runs 1 (3 steps) and 3 (4 steps)
    lengths = [2, 3, 3, 4]
    bonus = TERMINAL_REWARD if count_terminal else 0.0
    for g in ("Pong", "Breakout"):
        assert t.lengths["recorder"][g] == lengths
        assert t.returns["recorder"][g] == [L - 1 + bonus for L in lengths]
    assert agent.games == ("Pong", "Pong", "Breakout", "Breakout")
    # slots 0 and 2 finish at step 5, slots 1 and 3 at step 7: only live slots are asked to act
    assert [c.tolist() for c in agent.calls] == [[0, 1, 2, 3]] * 5 + [[1, 3]] * 2
    assert agent.resets == [[0, 2], [1, 3], [0, 2], [1, 3]]
    pong_env = FakeEnv.log[0]
    assert [a.tolist() for a in pong_env.actions[5:]] == [[0, 3], [0, 3]]  # done env gets NOOP


def test_step_cap_truncates_and_keeps_last_reward(monkeypatch):
    monkeypatch.setattr(ev, "AtariVecEnv", FakeEnv)
    t = evaluate(RecordingAgent(), "Pong", 4, num_envs=2, max_steps=3, progress=False, count_terminal_reward=False)
    assert t.lengths["recorder"]["Pong"] == [2, 3, 3, 3]
    assert t.returns["recorder"]["Pong"] == [1.0, 2.0, 2.0, 3.0]  # the truncated 4th keeps its 3 rewards


def test_video_capture_and_clean_skip(monkeypatch, tmp_path):
    monkeypatch.setattr(ev, "AtariVecEnv", FakeEnv)
    monkeypatch.setitem(sys.modules, "imageio", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "imageio.v2", None)
    with pytest.warns(UserWarning, match="skipped.*imageio"):
        evaluate(RecordingAgent(), "Pong", 2, max_steps=10, progress=False, video_dir=tmp_path, video_format="gif")
    assert not list(tmp_path.glob("*.gif"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate(RecordingAgent(), "Pong", 2, max_steps=10, progress=False, video_dir=tmp_path)  # OpenCV mp4
    video = tmp_path / "recorder_Pong.mp4"
    assert video.is_file() and video.stat().st_size > 0
    import cv2

    cap = cv2.VideoCapture(str(video))
    n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    cap.release()
    assert n == 3  # reset frame + 2 steps of episode 0


# --- real ALE rollouts ------------------------------------------------------------------------------------


class ScriptedAgent(BaseAgent):
    """A deterministic function of the frame, from each game's legal actions (for a manual replay)."""

    name = "scripted"

    @staticmethod
    def choose(frame, game):
        legal = np.flatnonzero(games.legal_mask(game))
        return int(legal[(int(frame[30:80].sum()) // 97) % len(legal)])

    def act(self, obs, env_indices=None):
        return np.array([self.choose(o, self.games[s]) for o, s in zip(obs, env_indices)])


def _manual(game, n, cfg, choose):
    env = AtariVecEnv(game, n, cfg, seed=0)
    obs = env.reset()
    ret, length, done = np.zeros(n), np.zeros(n, int), np.zeros(n, bool)
    while not done.all():
        obs, r, te, tr, _ = env.step(np.array([choose(o) for o in obs]))
        ret += np.where(done, 0, r)
        length += ~done
        done |= te | tr
    env.close()
    return ret.tolist(), length.tolist()


def test_evaluate_matches_a_manual_rollout():
    cfg = EnvConfig(max_episode_steps=150)
    t = evaluate(ScriptedAgent(), ["Breakout", "Pong"], 2, max_steps=150, progress=False)
    for g in ("Breakout", "Pong"):
        rets, lens = _manual(g, 2, cfg, lambda o, g=g: ScriptedAgent.choose(o, g))
        assert t.returns["scripted"][g] == rets and t.lengths["scripted"][g] == lens
    assert any(r != 0 for g in ("Breakout", "Pong") for r in t.returns["scripted"][g])
    assert t.meta["scripted"]["env_config"]["max_episode_steps"] == 150


def test_random_and_constant_agents_on_pong_and_controls():
    t = evaluate(ConstantAgent("FIRE"), "Pong", 2, max_steps=120, progress=False)
    rets, lens = _manual("Pong", 2, EnvConfig(max_episode_steps=120), lambda o: 1)
    assert t.returns["constant_FIRE"]["Pong"] == rets and t.lengths["constant_FIRE"]["Pong"] == lens
    r = evaluate(RandomAgent(), "Pong", 3, max_steps=60, progress=False)
    assert len(r.returns["random"]["Pong"]) == 3 and r.lengths["random"]["Pong"] == [60] * 3

    kw = {"max_steps": 40, "progress": False}
    ctl = control_scores("Pong", 2, actions=[0, 1, 2], **kw)  # UP (2) is not legal in Pong
    assert ctl.agents == ["random", "constant_NOOP", "constant_FIRE"]
    assert ctl.meta["constant_NOOP"]["replicated"] is True
    full = control_scores("Pong", 2, actions=[0], include_random=False, replicate_deterministic=False, **kw)
    assert full.returns["constant_NOOP"] == ctl.returns["constant_NOOP"]  # replicating changed nothing
    assert len(ctl.returns["random"]["Pong"]) == 2


def test_evaluate_the_jowa_agent_end_to_end():
    """A tiny random JOWA agent (factory form) on two games, fewer envs than episodes."""
    from jowa_core.agent import Agent
    from jowa_core.config import preset
    from jowa_core.models import Tokenizer, WorldActionModel

    torch.manual_seed(0)
    p = preset("tiny", model={"num_layers": 1, "embed_dim": 32, "num_heads": 2, "q_mlp_dim": 32})
    built = []

    def factory():
        built.append(Agent(Tokenizer(p.tokenizer), WorldActionModel(p.model), history_steps=3, epsilon=0.1))
        return built[-1]

    t = evaluate(factory, ["Pong", "Breakout"], 2, num_envs=1, max_steps=12, progress=False)
    (agent,) = built
    assert t.agents == ["jowa"] and t.lengths["jowa"] == {"Pong": [12, 12], "Breakout": [12, 12]}
    assert agent.history_length().tolist() == [0, 0]  # every finished episode reset its slot
    assert t.meta["jowa"]["agent"]["history_steps"] == 3


# --- the walkthrough's results table ---------------------------------------------------------------


def test_results_frame_markdown_and_targets():
    import pandas as pd

    from jowa_core.runs import results_frame, results_markdown, target_checks

    t = ScoreTable(
        returns={"jowa_greedy": {"Breakout": [20.0, 22.0, 24.0]}, "jowa_beam": {"Breakout": [18.0, 18.0, 18.0]},
                 "mtbc": {"Breakout": [10.0, 12.0, 14.0]}, "random": {"Breakout": [1.0, 2.0, 0.0]},
                 "constant_best": {"Breakout": [5.0, 5.0, 5.0]}, "constant_NOOP": {"Breakout": [0.0, 0.0, 0.0]},
                 "jowa_greedy@sticky": {"Breakout": [2.0, 3.0, 4.0]}, "mtbc@sticky": {"Breakout": [9.0, 9.0, 9.0]},
                 "jowa_greedy@fire": {"Breakout": [11.0, 11.0, 11.0]}},
    )  # fmt: skip
    data = pd.DataFrame([
        {"game": "Breakout", "policy": "all", "complete": 10, "mean_return": 15.0},
        {"game": "Breakout", "policy": "tracker_eps0.05", "complete": 4, "mean_return": 38.0},
    ])  # fmt: skip
    f = results_frame(t, data, reps=200)
    row = f[(f.row == "jowa_greedy") & (f.game == "Breakout") & (f.protocol == "official")].iloc[0]
    assert row["mean"] == 22.0 and row.ci_low >= 20.0 and row.ci_high <= 24.0 and row.episodes == 3
    iqm = f[(f.row == "jowa_greedy") & (f.game == "IQM HNS") & (f.protocol == "official")].iloc[0]
    assert iqm["mean"] == pytest.approx((22.0 - 1.7) / (30.5 - 1.7))  # one game: its HNS
    assert set(f[f.protocol == "sticky"].row) == {"jowa_greedy", "mtbc"}
    assert f[f.row == "data: tracker_eps0.05"].iloc[0]["mean"] == 38.0

    md = results_markdown(f)
    lines = md.splitlines()
    assert lines[0] == ("|  | Breakout (official) | Breakout (sticky) | Breakout (fire) | IQM HNS (official) | "
                        "IQM HNS (sticky) | IQM HNS (fire) |")  # protocols in the order evaluated
    labels = [ln.split(" | ")[0][2:] for ln in lines[2:]]
    assert labels == ["data: all policies", "data: tracker_eps0.05", "random", "constant_NOOP", "constant_best",
                      "mtbc", "jowa_greedy", "jowa_beam"]  # fmt: skip
    assert "| data: all policies | 15.0 | 15.0 | 15.0 |" in md and "| jowa_greedy | 22.0 [" in md

    checks = target_checks(f, "official").set_index(["target", "game"]).passed
    assert checks[("jowa_greedy > data mean", "Breakout")] and checks[("jowa_beam > data mean", "Breakout")]  # 22, 18 > 15
    assert checks[("jowa_greedy > constant_NOOP", "Breakout")] and checks[("jowa_beam > random", "Breakout")]
    assert checks[("jowa_greedy IQM HNS CI above mtbc's", "IQM HNS")]  # [20, 24] vs [10, 14]
    assert not checks[("jowa_beam >= jowa_greedy", "Breakout")]  # 18 < 22: a missed target is reported as missed
    sticky = target_checks(f, "sticky").set_index(["target", "game"]).passed
    assert not sticky[("jowa_greedy > data mean", "Breakout")]  # 3 < 15
    assert not sticky[("jowa_greedy IQM HNS CI above mtbc's", "IQM HNS")]


def test_agents_that_read_the_ram_get_it_on_the_python_backend():
    """``PolicyAgent("tracker")`` (the data's RAM-reading player) is scored like any agent: evaluate picks the
    python backend and hands it the RAM before each act; the scripted tracker outscores random play."""
    kw = {"max_steps": 300, "seed": 2, "progress": False}
    tracker = ev.evaluate(PolicyAgent("tracker"), "Breakout", 2, **kw)
    assert tracker.meta["behaviour"]["backend"] == "python"
    assert tracker.returns == ev.evaluate(PolicyAgent("tracker"), "Breakout", 2, **kw).returns  # reproducible
    rand = ev.evaluate(RandomAgent(), "Breakout", 2, **kw)
    assert tracker.mean("Breakout", "behaviour") > rand.mean("Breakout", "random") + 2
    with pytest.raises(ValueError, match="reads the console RAM"):
        ev.evaluate(PolicyAgent("tracker"), "Breakout", 1, backend="native", **kw)
