"""Dataset collection: exact counts, alignment of (o_t, a_t, r_t, d_t) by replay, policies, atomicity."""

import json

import numpy as np
import pytest

from jowa_core import games
from jowa_core.data.collect import (
    FIRE,
    LEFT,
    NOOP,
    RIGHT,
    BreakoutTracker,
    EpsilonGreedy,
    LazyPolicy,
    MixedPolicy,
    Policy,
    UniformRandom,
    collect,
    collect_many,
    make_policy,
    mixed_quality,
)
from jowa_core.data.format import episode_bounds, life_starts, open_dataset, read_episode
from jowa_core.envs import AtariVecEnv, EnvConfig

STICKY = EnvConfig.sticky()


@pytest.fixture(scope="module")
def breakout_file(tmp_path_factory):
    """601 random Breakout transitions (odd on purpose: 2 envs), sticky actions so seeds matter."""
    path = tmp_path_factory.mktemp("collect") / "Breakout.h5"
    collect("Breakout", 601, path, "random", num_envs=2, seed=11, config=STICKY, progress=False)
    return path


def test_file_is_valid_and_consistent(breakout_file):
    legal = games.legal_mask("Breakout")
    with open_dataset(breakout_file) as f:
        n = len(f["actions"])
        assert n == 601
        assert legal[f["actions"][:]].all()
        bounds = episode_bounds(f)
        rewards, terms, truncs = f["rewards"][:], f["terminals"][:], f["truncations"][:]
        np.testing.assert_allclose(f["episode_returns"][:], [rewards[a:b].sum() for a, b in bounds])
        ends = terms | truncs
        assert ends.sum() == len(bounds) and ends[bounds[:, 1] - 1].all()  # one end per episode, at its last step
        assert terms.sum() >= 2  # random Breakout games end within ~200 steps
        # the two envs' running episodes are written last, truncated
        assert truncs[bounds[-2:, 1] - 1].all() and truncs.sum() == 2
        assert sorted(f["episode_env"][-2:].tolist()) == [0, 1]
        assert json.loads(f.attrs["behaviour_policy"])["name"] == "random"
        assert EnvConfig.from_dict(json.loads(f.attrs["env_config"])) == STICKY
        assert json.loads(f.attrs["episode_policy_names"]) == ["random"]
        assert f["episode_policy"].shape == (len(bounds),) and not f["episode_policy"][:].any()
        assert json.loads(f.attrs["collection"])["seed"] == 11
        lives = f["lives"][:]
        assert (lives[bounds[:, 0]] == 5).all() and lives.min() >= 1  # Breakout starts with 5 lives
        starts = life_starts(lives, bounds[:, 0], n)
        lives_played = np.array([starts[a:b].sum() for a, b in bounds])
        assert (lives_played[terms[bounds[:, 1] - 1]] == 5).all()  # a finished game shows all 5 lives begin
        assert (np.diff(lives.astype(int))[~starts[1:]] == 0).all()  # and the counter moves only between lives


def test_replaying_recorded_actions_reproduces_frames(breakout_file):
    """Strong alignment check: a fresh env seeded like env 1 replays env 1's episodes frame for frame."""
    with open_dataset(breakout_file) as f:
        env_of = f["episode_env"][:]
        episodes = [read_episode(f, i) for i in np.flatnonzero(env_of == 1)]
    assert len(episodes) >= 2
    with AtariVecEnv("Breakout", 1, STICKY, seed=11 + 1) as env:
        obs = env.reset()
        for e, ep in enumerate(episodes):
            for t in range(len(ep["actions"])):
                np.testing.assert_array_equal(obs[0], ep["observations"][t], err_msg=f"episode {e} step {t}")
                assert ep["lives"][t] == env.lives[0], f"episode {e} step {t}"  # the counter of this frame
                obs, rew, term, trunc, _ = env.step(ep["actions"][t : t + 1].astype(np.int64))
                assert rew[0] == ep["rewards"][t] and term[0] == ep["terminals"][t], f"episode {e} step {t}"
                if t < len(ep["actions"]) - 1:
                    assert not (term[0] or trunc[0])


class _Boom(Policy):
    name = "boom"

    def __init__(self, after):
        self.after, self.calls = after, 0

    def act(self, obs, ram, legal_mask, rng):
        self.calls += 1
        if self.calls > self.after:
            raise RuntimeError("policy crashed")
        return np.zeros(len(obs), np.int64)


def test_failed_collection_leaves_no_file(tmp_path):
    out = tmp_path / "Pong.h5"
    with pytest.raises(RuntimeError, match="policy crashed"):
        collect("Pong", 1000, out, _Boom(after=20), num_envs=2, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_mixed_policy_records_episode_policies(tmp_path):
    policy = MixedPolicy([BreakoutTracker(epsilon=0.05), UniformRandom()], weights=[0.5, 0.5])
    path = collect(
        "Breakout",
        500,
        tmp_path / "b.h5",
        policy,
        num_envs=3,
        seed=0,
        progress=False,
        config=EnvConfig(max_episode_steps=60),
    )
    with open_dataset(path) as f:
        labels = f["episode_policy"][:]
        assert json.loads(f.attrs["episode_policy_names"]) == ["tracker_eps0.05", "random"]
        assert json.loads(f.attrs["collection"])["backend"] == "python"  # the tracker reads RAM
        assert len(labels) == len(f["episode_starts"]) >= 9 and set(labels.tolist()) == {0, 1}
        assert games.legal_mask("Breakout")[f["actions"][:]].all()
    from jowa_core.data.prepare import dataset_summary

    summary = dataset_summary([path]).set_index("policy")  # one row per policy and one for all
    assert summary.loc["all", "episodes"] == len(labels)
    assert [summary.loc[n, "episodes"] for n in ("tracker_eps0.05", "random")] == np.bincount(labels).tolist()


def test_dataset_summary_against_the_recorded_episodes(breakout_file):
    from jowa_core.data.prepare import dataset_summary

    with open_dataset(breakout_file) as f:
        starts, rewards, terminals = f["episode_starts"][:], f["rewards"][:], f["terminals"][:]
        returns = f["episode_returns"][:]
    row = dataset_summary([breakout_file], max_steps=25).set_index("policy").loc["all"]
    bounds = list(zip(starts, list(starts[1:]) + [len(rewards)]))
    done = [(a, b) for a, b in bounds if terminals[b - 1]]  # complete episodes only
    assert done and row.complete == len(done) and row.episodes == len(bounds)
    assert row.mean_return == pytest.approx(np.mean([rewards[a:b].sum() for a, b in done]))
    assert row.mean_return_capped == pytest.approx(np.mean([rewards[a : min(b, a + 25)].sum() for a, b in done]))
    assert np.allclose(returns, [rewards[a:b].sum() for a, b in bounds])


def test_breakout_tracker_follows_the_ball():
    ram = np.zeros((4, 128), np.uint8)
    ram[:, 101] = [0, 120, 120, 120]  # no ball in play in row 0
    ram[:, 99] = [80, 150, 60, 100]  # ball x
    ram[:, 72] = [80, 100, 100, 90]  # paddle x; aim = ball x - 10
    obs = np.zeros((4, 84, 84), np.uint8)
    rng = np.random.default_rng(0)
    acts = BreakoutTracker().act(obs, ram, games.legal_mask("Breakout"), rng)
    assert acts.tolist() == [FIRE, RIGHT, LEFT, NOOP]
    shifted = BreakoutTracker(offset=-40).act(obs, ram, games.legal_mask("Breakout"), rng)
    assert shifted.tolist() == [FIRE, NOOP, LEFT, LEFT]
    with pytest.raises(ValueError, match="cannot play"):
        BreakoutTracker().check_game("Pong")
    launcher = BreakoutTracker(hold="RIGHT")  # a lazy player that still launches the ball
    assert launcher.act(obs, ram, games.legal_mask("Breakout"), rng).tolist() == [FIRE, RIGHT, RIGHT, RIGHT]
    assert launcher.name == "launch_hold_right_eps0" and launcher.describe()["hold"] == "RIGHT"
    with pytest.raises(ValueError, match="legal Breakout action"):
        BreakoutTracker(hold="UP")


def test_simple_policies():
    rng = np.random.default_rng(0)
    mask = games.legal_mask("Pong")
    obs = np.zeros((4000, 84, 84), np.uint8)
    acts = UniformRandom().act(obs, None, mask, rng)
    counts = np.bincount(acts, minlength=18)
    assert (counts[~mask] == 0).all() and counts[mask].min() > 4000 / 6 * 0.85
    agent = EpsilonGreedy(lambda o: np.full(len(o), 11), epsilon=0.0)
    assert (agent.act(obs[:10], None, mask, rng) == 11).all()
    explore = EpsilonGreedy(lambda o: np.full(len(o), 11), epsilon=1.0).act(obs, None, mask, rng)
    assert mask[explore].all() and (explore != 11).mean() > 0.7
    lazy = LazyPolicy("LEFT", epsilon=0.0)
    assert (lazy.act(obs[:5], None, mask, rng) == LEFT).all()
    with pytest.raises(ValueError, match="not legal in Pong"):
        LazyPolicy("UP").check_game("Pong")
    with pytest.raises(ValueError, match="Unknown policy"):
        make_policy("greedy", "Pong")
    assert len(mixed_quality("Breakout").policies) == 7
    assert json.loads(json.dumps(mixed_quality("Pong").describe()))["type"] == "MixedPolicy"


def test_collect_many_uses_canonical_names(tmp_path):
    paths = collect_many(["pong", "ALE/SpaceInvaders-v5"], 40, tmp_path, "lazy", num_envs=2, progress=False)
    assert [p.name for p in paths] == ["Pong.h5", "SpaceInvaders.h5"]
    with open_dataset(paths[0]) as f:
        assert len(f["actions"]) == 40 and f.attrs["game"] == "Pong"
    with pytest.raises(games.UnknownGameError):
        collect_many(["Pongg"], 10, tmp_path)


def test_backends_write_identical_files(tmp_path):
    """The RAM-capable python backend and the native one produce the same dataset for the same seed."""
    paths = [
        collect("Breakout", 300, tmp_path / f"{b}.h5", "random", num_envs=2, seed=4, backend=b, progress=False)
        for b in ("native", "python")
    ]
    with open_dataset(paths[0]) as a, open_dataset(paths[1]) as b:
        for name in ("observations", "actions", "rewards", "terminals", "truncations", "episode_starts"):
            np.testing.assert_array_equal(a[name][:], b[name][:], err_msg=name)


def test_prepare_collects_with_sticky_actions_and_keeps_older_recipes(tmp_path):
    """``repeat_action_probability`` reaches the emulator (recorded in the file) and the recipe; a spec
    without sticky actions writes the recipe it wrote before the field existed, so old files are reused."""
    from dataclasses import replace

    from jowa_core.data.prepare import _matches, _recipe, dataset_spec, prepare_datasets

    spec = dataset_spec(str(tmp_path), ["Pong"], 300, "random", 2, 0, repeat_action_probability=0.25)
    [path] = prepare_datasets(spec, progress=False)
    with open_dataset(path) as f:
        assert json.loads(f.attrs["env_config"])["repeat_action_probability"] == 0.25
    plain = replace(spec, repeat_action_probability=0.0)
    assert json.loads(_recipe(plain)) == {"policy": "random", "transitions": 300, "num_envs": 2, "seed": 0,
                                          "dqn_replay_root": None, "fraction": 0.1}  # fmt: skip
    assert _matches(path, spec) and not _matches(path, plain)  # a sticky file is not reused without them
    with pytest.raises(ValueError, match="repeat_action_probability must be in"):
        replace(spec, repeat_action_probability=1.0)
