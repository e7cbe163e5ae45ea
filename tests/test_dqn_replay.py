"""DQN-Replay import: Dopamine-format round trips (plain, wrapped, unfinished), subsampling, errors."""

import gzip
import json
import math

import numpy as np
import pytest

from jowa_core.data.dqn_replay import (
    DQNReplayError,
    checkpoint_file,
    import_dqn_replay,
    read_replay_checkpoint,
    write_replay_checkpoint,
)
from jowa_core.data.format import dataset_info, episode_bounds, open_dataset, read_episode

# ALE's minimal action set for Pong is NOOP, FIRE, RIGHT, LEFT, RIGHTFIRE, LEFTFIRE; their full-set indices:
PONG_MINIMAL_TO_FULL = np.array([0, 1, 3, 4, 11, 12])
STACK = 4


def make_episode(rng, t, terminal=True):
    """Frames are never all zero, so no real step can look like Dopamine's padding."""
    return {
        "observations": rng.integers(1, 256, (t, 84, 84), dtype=np.uint8),
        "actions": rng.integers(0, 6, t).astype(np.int32),
        "rewards": rng.choice([-1.0, 0.0, 1.0], t).astype(np.float32),
        "terminals": np.r_[np.zeros(t - 1, np.uint8), np.uint8(terminal)],
    }


class ReferenceBuffer:
    """A line-by-line transcription of Dopamine's OutOfGraphReplayBuffer.add/_add (stack_size, horizon 1)."""

    def __init__(self, capacity, stack_size=STACK):
        self.cap, self.k = capacity, stack_size
        self.obs = np.full((capacity, 84, 84), 0xA5, np.uint8)
        self.act = np.zeros(capacity, np.int32)
        self.rew = np.zeros(capacity, np.float32)
        self.term = np.ones(capacity, np.uint8)
        self.add_count = 0
        self.invalid_range = np.zeros(stack_size)

    def add(self, o, a, r, d):
        if self.add_count == 0 or self.term[self.add_count % self.cap - 1] == 1:
            for _ in range(self.k - 1):
                self._add(np.zeros((84, 84), np.uint8), 0, 0.0, 0)
        self._add(o, a, r, d)

    def _add(self, o, a, r, d):
        c = self.add_count % self.cap
        self.obs[c], self.act[c], self.rew[c], self.term[c] = o, a, r, d
        self.add_count += 1
        c = self.add_count % self.cap
        self.invalid_range = np.array([(c - 1 + i) % self.cap for i in range(self.k + 1)])


def load(run_dir, name, index=0):
    with gzip.open(checkpoint_file(run_dir, name, index), "rb") as f:
        return np.load(f)


def expected_full(ep, start=0, truncated=False):
    out = {
        "observations": ep["observations"][start:],
        "actions": PONG_MINIMAL_TO_FULL[ep["actions"][start:]],
        "rewards": ep["rewards"][start:],
        "terminals": ep["terminals"][start:].astype(bool),
        "truncations": np.zeros(len(ep["actions"]) - start, bool),
    }
    out["truncations"][-1] = truncated
    return out


def assert_episodes_equal(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert set(g) == set(w)
        for k in w:
            assert g[k].shape == w[k].shape, k
            np.testing.assert_array_equal(g[k], w[k], err_msg=k)


def stream_positions(lengths):
    """Stream position where each episode's padding and data start (every episode ends in a terminal)."""
    pad_start, pos = [], 0
    for t in lengths:
        pad_start.append(pos)
        pos += STACK - 1 + t
    return np.array(pad_start), np.array(pad_start) + STACK - 1, pos


@pytest.mark.parametrize("capacity", [30, 41, 47, 53, 64, 500])
def test_writer_matches_dopamine_add(tmp_path, capacity):
    rng = np.random.default_rng(capacity)
    eps = [make_episode(rng, t) for t in (7, 12, 1, 9)] + [make_episode(rng, 5, terminal=False)]
    ref = ReferenceBuffer(capacity)
    for ep in eps:
        for o, a, r, d in zip(*ep.values()):
            ref.add(o, a, r, d)
    write_replay_checkpoint(tmp_path / "Pong" / "1", 0, eps, capacity)
    run = tmp_path / "Pong" / "1"
    np.testing.assert_array_equal(load(run, "observation"), ref.obs)
    np.testing.assert_array_equal(load(run, "action"), ref.act)
    np.testing.assert_array_equal(load(run, "reward"), ref.rew)
    np.testing.assert_array_equal(load(run, "terminal"), ref.term)
    assert int(load(run, "add_count")) == ref.add_count
    np.testing.assert_array_equal(load(run, "invalid_range"), ref.invalid_range)
    assert load(run, "action").dtype == np.int32 and load(run, "terminal").dtype == np.uint8


def test_unwrapped_buffer_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    eps = [make_episode(rng, t) for t in (5, 9, 1, 7)]
    write_replay_checkpoint(tmp_path / "Pong" / "3", 7, eps, capacity=200)
    got = read_replay_checkpoint(tmp_path / "Pong" / "3", 7)  # game inferred from the folder
    assert_episodes_equal(got, [expected_full(ep) for ep in eps])
    # The same buffer when exactly full (add_count == capacity: full, nothing overwritten).
    write_replay_checkpoint(tmp_path / "x", 0, eps, capacity=4 * 3 + 22)
    assert_episodes_equal(read_replay_checkpoint(tmp_path / "x", 0, game="pong"), [expected_full(ep) for ep in eps])


@pytest.mark.parametrize("capacity", [40, 44, 47, 50, 55])
def test_wrapped_buffer(tmp_path, capacity):
    """The oldest episode is partly overwritten: dropped by default, kept as a tail on request."""
    rng = np.random.default_rng(capacity)
    lengths = (10, 12, 8, 9, 6)
    eps = [make_episode(rng, t) for t in lengths]
    pad_start, data_start, total = stream_positions(lengths)
    cut = total - capacity  # stream positions before this were overwritten
    assert cut > 0
    write_replay_checkpoint(tmp_path / "Pong" / "2", 1, eps, capacity)
    first = int(np.searchsorted(pad_start, cut, side="right")) - 1  # the episode the cut falls into
    want = [expected_full(ep) for ep in eps[first + 1 :]]
    assert_episodes_equal(read_replay_checkpoint(tmp_path / "Pong" / "2", 1), want)
    tail = max(cut, data_start[first]) - data_start[first]  # a cut inside padding leaves the whole episode
    got = read_replay_checkpoint(tmp_path / "Pong" / "2", 1, keep_partial_first=True)
    assert_episodes_equal(got, [expected_full(eps[first], start=tail)] + want)


def test_unfinished_last_episode(tmp_path):
    rng = np.random.default_rng(2)
    eps = [make_episode(rng, 6), make_episode(rng, 11), make_episode(rng, 4, terminal=False)]
    for capacity in (100, 28):  # unwrapped, and wrapped (first episode dropped)
        write_replay_checkpoint(tmp_path / "Pong" / "1", 0, eps, capacity)
        skip = 0 if capacity == 100 else 1  # 30 transitions in all
        want = [expected_full(ep) for ep in eps[skip:2]]
        got = read_replay_checkpoint(tmp_path / "Pong" / "1", 0)
        assert_episodes_equal(got, want + [expected_full(eps[2], truncated=True)])
        got = read_replay_checkpoint(tmp_path / "Pong" / "1", 0, keep_unfinished=False)
        assert_episodes_equal(got, want)


@pytest.mark.parametrize("capacity,noop_at_cut", [(45, False), (45, True), (39, False)])
def test_final_log_buffer(tmp_path, capacity, noop_at_cut):
    """batch_rl's log_final_buffer saves add_count = cursor: slot 0 may continue an older episode (45), or
    start exactly at an episode's padding (39), which makes that episode whole. With noop_at_cut the
    continued steps have action 0 and reward 0, so only their frames tell them from padding."""
    rng = np.random.default_rng(3)
    lengths = (10, 12, 8, 9, 6)
    eps = [make_episode(rng, t) for t in lengths]
    pad_start, data_start, total = stream_positions(lengths)
    cursor = total % capacity
    cut = total - cursor
    first = int(np.searchsorted(pad_start, cut, side="right")) - 1
    if noop_at_cut:
        steps = slice(cut - data_start[first], cut - data_start[first] + STACK - 1)
        eps[first]["actions"][steps] = 0
        eps[first]["rewards"][steps] = 0
    write_replay_checkpoint(tmp_path / "Pong" / "1", 0, eps, capacity, final_log=True)
    assert int(load(tmp_path / "Pong" / "1", "add_count")) == cursor
    rest = [expected_full(ep) for ep in eps[first + 1 :]]
    if cut == pad_start[first]:
        assert_episodes_equal(read_replay_checkpoint(tmp_path / "Pong" / "1", 0), [expected_full(eps[first])] + rest)
        return
    assert data_start[first] < cut
    assert_episodes_equal(read_replay_checkpoint(tmp_path / "Pong" / "1", 0), rest)
    got = read_replay_checkpoint(tmp_path / "Pong" / "1", 0, keep_partial_first=True)
    assert_episodes_equal(got, [expected_full(eps[first], start=cut - data_start[first])] + rest)


def make_dataset(root, rng, runs=5, checkpoints=(0, 1)):
    """Unwrapped checkpoints of complete episodes; returns {first-frame bytes: (run, episode dict)}."""
    index = {}
    for run in range(1, runs + 1):
        for ck in checkpoints:
            eps = [make_episode(rng, int(t)) for t in rng.integers(1, 12, rng.integers(3, 7))]
            write_replay_checkpoint(root / "Pong" / str(run), ck, eps, capacity=120)
            index.update({ep["observations"][0].tobytes(): (str(run), ep) for ep in eps})
    return index


def first_frames(episodes):
    return [e["observations"][0].tobytes() for e in episodes]


def read_all(path):
    with open_dataset(path) as f:
        return [read_episode(f, i) for i in range(len(episode_bounds(f)))]


def test_import_subsamples_reproducibly(tmp_path):
    rng = np.random.default_rng(4)
    index = make_dataset(tmp_path / "replay", rng)
    out = import_dqn_replay(tmp_path / "replay", "Pong", tmp_path / "a.h5", fraction=0.5, seed=1, progress=False)
    info = dataset_info(out)
    assert info.source == "dqn_replay" and info.game == "Pong"
    runs = json.loads(info.attrs["dqn_replay_runs"])
    assert len(runs) == 2 and len(set(runs)) == 2 and set(runs) <= {"1", "2", "3", "4", "5"}
    pool = [ep for run, ep in index.values() if run in runs]
    assert info.attrs["pool_episodes"] == len(pool)
    assert info.attrs["pool_transitions"] == sum(len(ep["actions"]) for ep in pool)
    assert info.num_episodes == math.ceil(0.5 * len(pool))
    got = read_all(out)
    for g in got:  # every written episode is one of the chosen runs' episodes, exactly
        run, ep = index[g["observations"][0].tobytes()]
        assert run in runs
        w = expected_full(ep)
        w["actions"] = w["actions"].astype(np.uint8)
        assert_episodes_equal([g], [w])
    again = import_dqn_replay(tmp_path / "replay", "Pong", tmp_path / "b.h5", fraction=0.5, seed=1, progress=False)
    assert_episodes_equal(read_all(again), got)
    other = import_dqn_replay(tmp_path / "replay", "Pong", tmp_path / "c.h5", fraction=0.5, seed=2, progress=False)
    assert first_frames(read_all(other)) != first_frames(got)


def test_import_without_replacement_takes_each_episode_once(tmp_path):
    rng = np.random.default_rng(5)
    index = make_dataset(tmp_path / "replay", rng, runs=2, checkpoints=(3,))
    out = import_dqn_replay(
        tmp_path / "replay",
        "Pong",
        tmp_path / "a.h5",
        runs=[1, 2],
        fraction=1.0,
        with_replacement=False,
        progress=False,
    )
    assert sorted(first_frames(read_all(out))) == sorted(index)
    assert dataset_info(out).attrs["dqn_replay_checkpoints"] == '{"1": [3], "2": [3]}'


def test_clear_errors(tmp_path):
    rng = np.random.default_rng(6)
    run = tmp_path / "Pong" / "1"
    eps = [make_episode(rng, 5), make_episode(rng, 3)]
    write_replay_checkpoint(run, 0, eps, capacity=50)
    checkpoint_file(run, "reward", 0).unlink()
    with pytest.raises(DQNReplayError, match=r"missing \$store\$_reward_ckpt\.0\.gz.*_ckpt\.<i>\.gz"):
        read_replay_checkpoint(run, 0)
    with pytest.raises(DQNReplayError, match="incomplete"):
        read_replay_checkpoint(run, 9)

    write_replay_checkpoint(run, 0, eps, capacity=50)
    path = checkpoint_file(run, "observation", 0)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a cut-short download
    with pytest.raises(DQNReplayError, match="observation_ckpt.0.gz.*corrupted"):
        read_replay_checkpoint(run, 0)
    checkpoint_file(run, "terminal", 0).write_bytes(b"not a gzip file")
    with pytest.raises(DQNReplayError, match="terminal_ckpt.0.gz.*corrupted"):
        read_replay_checkpoint(run, 0)

    def rewrite(name, arr):
        write_replay_checkpoint(run, 0, eps, capacity=50)
        with gzip.open(checkpoint_file(run, name, 0), "wb") as f:
            np.save(f, arr)

    rewrite("action", np.zeros(50, np.float32))
    with pytest.raises(DQNReplayError, match="dtype float32.*int32"):
        read_replay_checkpoint(run, 0)
    rewrite("reward", np.zeros(49, np.float32))
    with pytest.raises(DQNReplayError, match=r"shape \(49,\).*do not belong together"):
        read_replay_checkpoint(run, 0)
    rewrite("observation", np.zeros((50, 84, 83), np.uint8))
    with pytest.raises(DQNReplayError, match=r"expected uint8 \(50, 84, 84\)"):
        read_replay_checkpoint(run, 0)
    rewrite("add_count", np.array(7))
    with pytest.raises(DQNReplayError, match="invalid_range.*does not match add_count=7"):
        read_replay_checkpoint(run, 0)
    write_replay_checkpoint(run, 0, eps, capacity=50)
    with pytest.raises(DQNReplayError, match="stack_size"):
        read_replay_checkpoint(run, 0, stack_size=3)
    write_replay_checkpoint(tmp_path / "Pong" / "2", 0, [dict(eps[0], actions=np.full(5, 7))], capacity=50)
    with pytest.raises(DQNReplayError, match="6 minimal-set actions"):
        read_replay_checkpoint(tmp_path / "Pong" / "2", 0)
    with pytest.raises(DQNReplayError, match="No DQN-Replay folder for Breakout"):
        import_dqn_replay(tmp_path, "Breakout", tmp_path / "o.h5", progress=False)
    with pytest.raises(DQNReplayError, match="has 2 runs"):
        import_dqn_replay(tmp_path, "Pong", tmp_path / "o.h5", num_runs=3, progress=False)
    assert not (tmp_path / "o.h5").exists()
