"""Segment index, vectorised gathers against a per-step reference, balanced reproducible sampling."""

import pickle

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from jowa_core import games
from jowa_core.data.format import DatasetWriter
from jowa_core.data.segments import SegmentSampler, SegmentSource, segment_index


def random_columns(rng, lengths, frames=False):
    """Transition-major arrays; tokens[:, 0] holds the transition index and tokens[:, 1] the episode."""
    n = int(sum(lengths))
    episode = np.repeat(np.arange(len(lengths)), lengths)
    tokens = rng.integers(0, 2048, (n, 36)).astype(np.uint16)
    tokens[:, 0], tokens[:, 1] = np.arange(n), episode
    ends = np.cumsum(lengths) - 1
    terminals = np.zeros(n, bool)
    truncations = np.zeros(n, bool)
    done = rng.random(len(lengths)) < 0.7
    terminals[ends[done]] = True
    truncations[ends[~done]] = True
    cols = {
        "actions": rng.integers(0, 18, n).astype(np.uint8),
        "rewards": rng.normal(size=n).astype(np.float32),
        "terminals": terminals,
        "truncations": truncations,
        "episode_starts": np.r_[0, np.cumsum(lengths)[:-1]].astype(np.int64),
        "tokens": tokens,
    }
    if frames:
        cols["observations"] = rng.integers(1, 256, (n, 84, 84), dtype=np.uint8)
    return cols


def reference_segment(cols, starts, ends, episode, start, length, key):
    """One segment step by step: the spec's slice, clip and right-pad, written as a plain loop."""
    src = cols["tokens"] if key == "tokens" else cols["observations"]
    out = {
        key: np.zeros((length,) + src.shape[1:], np.int64 if key == "tokens" else np.uint8),
        "actions": np.zeros(length, np.int64),
        "rewards": np.zeros(length, np.float32),
        "ends": np.zeros(length, bool),
        "truncated": np.zeros(length, bool),
        "mask_padding": np.zeros(length, bool),
    }
    for step in range(length):
        i = starts[episode] + start + step
        if i < ends[episode]:
            out[key][step] = src[i]
            out["actions"][step] = cols["actions"][i]
            out["rewards"][step] = cols["rewards"][i]
            out["ends"][step] = cols["terminals"][i]
            out["truncated"][step] = cols["truncations"][i]
            out["mask_padding"][step] = True
    return out


def check_against_reference(source, cols, rows, batch, key):
    starts = cols["episode_starts"]
    ends = np.append(starts[1:], len(cols["actions"]))
    for b, row in enumerate(rows):
        episode, start, _ = source.segments[row]
        want = reference_segment(cols, starts, ends, episode, start, source.segment_length, key)
        for k, v in want.items():
            got = np.asarray(batch[k][b])
            assert got.dtype == v.dtype, k
            np.testing.assert_array_equal(got, v, err_msg=k)
        assert int(batch["task_id"][b]) == source.task_id


@pytest.mark.parametrize("length,stride", [(8, 4), (8, 1), (3, 5), (1, 1)])
def test_segment_index_matches_loop(length, stride):
    lengths = np.random.default_rng(0).integers(1, 30, 40)
    bounds = np.stack([np.r_[0, np.cumsum(lengths)[:-1]], np.cumsum(lengths)], axis=1)
    want = [(e, s, s + length) for e, t in enumerate(lengths) for s in range(0, t, stride)]
    got = segment_index(bounds, length, stride)
    assert got.dtype == np.int64 and got.tolist() == [list(r) for r in want]


def test_segment_index_rejects_bad_input():
    with pytest.raises(ValueError, match="stride"):
        segment_index(np.array([[0, 5]]), 8, 0)
    with pytest.raises(ValueError, match="empty"):
        segment_index(np.array([[0, 5], [5, 5]]), 8, 4)


@pytest.mark.parametrize("stride", [4, 1])
def test_fetch_matches_per_step_reference(stride):
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 20, 25)
    for frames in (False, True):
        cols = random_columns(rng, lengths, frames=frames)
        key = "obs" if frames else "tokens"
        data = {k: v for k, v in cols.items() if k != ("tokens" if frames else "observations")}
        source = SegmentSource.from_arrays("Breakout", stride=stride, **data)
        rows = np.r_[np.arange(source.num_segments), rng.integers(0, source.num_segments, 50)]
        batch = source.fetch(rows)
        check_against_reference(source, cols, rows, batch, key)
        assert batch["mask_padding"].sum() < batch["mask_padding"].size  # padding occurred and was checked
        assert source.task_id == games.task_id("Breakout")


def test_no_segment_crosses_an_episode():
    rng = np.random.default_rng(2)
    cols = random_columns(rng, rng.integers(1, 15, 60))
    source = SegmentSource.from_arrays("Pong", **cols)
    batch = source.fetch(np.arange(source.num_segments))
    tok, mask = batch["tokens"], batch["mask_padding"]
    assert mask[:, 0].all()  # a segment starts on a real step
    assert (mask[:, :-1] >= mask[:, 1:]).all()  # padding only on the right
    episode = np.where(mask, tok[:, :, 1], tok[:, :1, 1])
    assert (episode == episode[:, :1]).all()
    index = tok[:, :, 0]
    consecutive = index[:, 1:] == index[:, :-1] + 1
    assert (consecutive | ~mask[:, 1:]).all()
    last = np.where(mask, np.arange(8), -1).argmax(axis=1)  # a segment ends early only at its episode's end
    ended = batch["ends"][np.arange(len(last)), last] | batch["truncated"][np.arange(len(last)), last]
    assert ended[~mask[:, -1]].all()


def make_sources(rng, sizes=(5, 40, 200)):
    names = ("Pong", "Breakout", "Seaquest")
    out = []
    for name, e in zip(names, sizes):
        cols = random_columns(rng, rng.integers(1, 12, e))
        out.append((SegmentSource.from_arrays(name, **cols), cols))
    return out


def test_balanced_games_and_uniform_segments():
    rng = np.random.default_rng(3)
    pairs = make_sources(rng)
    sources = [s for s, _ in pairs]
    ids = np.array([s.task_id for s in sources])
    for weights, share in ((None, [1 / 3] * 3), ([2, 1, 1], [0.5, 0.25, 0.25])):
        sampler = SegmentSampler(sources, batch_size=32, seed=0, weights=weights)
        counts = np.array([[(sampler.batch(i)["task_id"] == t).sum().item() for t in ids] for i in range(200)])
        assert (np.abs(counts - 32 * np.array(share)) < 1 + 1e-9).all()  # every batch balanced to within one
    # Segments uniform within a game: the small game (5 episodes) has few segments, each drawn equally.
    sampler = SegmentSampler(sources, batch_size=60, seed=1, weights=[1, 0, 0])
    small, cols = pairs[0]
    starts = np.concatenate([sampler.batch(i)["tokens"][:, 0, 0].numpy() for i in range(300)])
    seg_of_start = {int(cols["episode_starts"][e] + s): k for k, (e, s, _) in enumerate(small.segments)}
    freq = np.bincount([seg_of_start[x] for x in starts], minlength=small.num_segments)
    expected = len(starts) / small.num_segments
    assert (np.abs(freq - expected) < 5 * np.sqrt(expected)).all()


def test_stream_is_reproducible_and_ranks_differ():
    rng = np.random.default_rng(4)
    sources = [s for s, _ in make_sources(rng)]

    def take(sampler, n):
        return [b for _, b in zip(range(n), iter(sampler))]

    a = take(SegmentSampler(sources, 16, seed=7), 4)
    b = take(SegmentSampler(sources, 16, seed=7), 4)
    c = take(SegmentSampler(sources, 16, seed=8), 4)
    r1 = take(SegmentSampler(sources, 16, seed=7, rank=1, world_size=2), 4)
    for x, y in zip(a, b):
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert not torch.equal(a[0]["tokens"], c[0]["tokens"])
    assert not any(torch.equal(x["tokens"], y["tokens"]) for x, y in zip(a, r1))
    assert [int(x["batch_index"]) for x in a] == [0, 1, 2, 3]
    assert a[0]["tokens"].dtype == torch.int64 and a[0]["actions"].dtype == torch.int64
    assert a[0]["rewards"].dtype == torch.float32 and a[0]["mask_padding"].dtype == torch.bool
    assert a[0]["tokens"].shape == (16, 8, 36) and a[0]["task_id"].shape == (16,)


def test_resume_continues_the_stream():
    rng = np.random.default_rng(5)
    sources = [s for s, _ in make_sources(rng)]
    full = SegmentSampler(sources, 8, seed=3)
    it = iter(full)
    first = [next(it) for _ in range(3)]
    state = full.state_dict()
    assert state["next_batch"] == 3
    rest = [next(it) for _ in range(3)]
    resumed = SegmentSampler(sources, 8, seed=3)
    resumed.load_state_dict(state)
    for x, y in zip(rest, iter(resumed)):
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert not torch.equal(first[0]["tokens"], rest[0]["tokens"])
    with pytest.raises(ValueError, match="seed=3"):
        SegmentSampler(sources, 8, seed=4).load_state_dict(state)


def write_h5(tmp_path, rng, game="Breakout", lengths=(5, 17, 1, 9, 12, 3)):
    cols = random_columns(rng, np.array(lengths), frames=True)
    path = tmp_path / f"{game}.h5"
    with DatasetWriter(path, game, source="collected") as w:
        for a, b in zip(cols["episode_starts"], np.append(cols["episode_starts"][1:], len(cols["actions"]))):
            w.add_episode(
                cols["observations"][a:b],
                cols["actions"][a:b],
                cols["rewards"][a:b],
                cols["terminals"][a:b],
                cols["truncations"][a:b],
            )
    tok_path = tmp_path / f"{game}.tokens.h5"
    with h5py.File(tok_path, "w") as f:  # the layout of data.token_cache: tokens plus the dataset's columns
        f.attrs["game"] = game
        for k in ("tokens", "actions", "rewards", "terminals", "truncations", "episode_starts"):
            f.create_dataset(k, data=cols[k])
    return path, tok_path, cols


def test_h5_sources_frames_and_tokens(tmp_path):
    rng = np.random.default_rng(6)
    path, tok_path, cols = write_h5(tmp_path, rng)
    for source, key in (
        (SegmentSource(path), "obs"),
        (SegmentSource(path, in_memory=True), "obs"),
        (SegmentSource(path, tok_path), "tokens"),
        (SegmentSource(path, tok_path, in_memory=False, stride=1), "tokens"),
        (SegmentSource(None, tok_path), "tokens"),
    ):
        rows = np.r_[np.arange(source.num_segments), rng.integers(0, source.num_segments, 20)]
        check_against_reference(source, cols, rows, source.fetch(rows), key)
        clone = pickle.loads(pickle.dumps(source))  # what a spawn worker receives: no open handles
        assert clone._cols is None
        check_against_reference(clone, cols, rows[:5], clone.fetch(rows[:5]), key)
        source.close()
    bad = tmp_path / "bad.tokens.h5"
    with h5py.File(bad, "w") as f:
        f.create_dataset("tokens", data=cols["tokens"][:-1])
    with pytest.raises(ValueError, match="Rebuild the token cache"):
        SegmentSource(path, bad)
    with pytest.raises(ValueError, match="cannot be used alone"):
        SegmentSource(None, bad)


def test_dataloader_with_two_workers(tmp_path):
    rng = np.random.default_rng(7)
    path_a, _, cols_a = write_h5(tmp_path, rng, "Breakout")
    path_b, _, cols_b = write_h5(tmp_path, rng, "Pong", lengths=(9, 2, 14))
    sources = [SegmentSource(path_a), SegmentSource(path_b)]
    sampler = SegmentSampler(sources, batch_size=6, seed=11, num_batches=7)
    batches = list(DataLoader(sampler, batch_size=None, num_workers=2))
    assert [int(b["batch_index"]) for b in batches] == list(range(7))
    for i, b in enumerate(batches):  # same stream as in-process, whatever the number of workers
        want = sampler.batch(i)
        assert all(torch.equal(b[k], want[k]) for k in want)
        assert b["obs"].shape == (6, 8, 84, 84) and b["obs"].dtype == torch.uint8
    # The frames themselves are right: each row matches the per-step reference of its game.
    by_task = {s.task_id: (s, c) for s, c in zip(sources, (cols_a, cols_b))}
    for b in batches:
        for row in range(6):
            source, cols = by_task[int(b["task_id"][row])]
            first = b["obs"][row, 0].numpy()
            hits = [
                k
                for k, (e, s, _) in enumerate(source.segments)
                if np.array_equal(cols["observations"][cols["episode_starts"][e] + s], first)
            ]
            assert len(hits) == 1
            check_against_reference(source, cols, hits, {k: v[row : row + 1] for k, v in b.items() if v.ndim}, "obs")
    sampler.mark_consumed(batches[3])
    assert sampler.state_dict()["next_batch"] == 4
    resumed = list(DataLoader(sampler, batch_size=None, num_workers=2))
    assert [int(b["batch_index"]) for b in resumed] == [4, 5, 6]
    assert torch.equal(resumed[0]["obs"], batches[4]["obs"])


def test_returns_to_go_by_hand_and_through_a_source():
    from jowa_core.data.segments import returns_to_go

    rewards = np.array([1.0, 0.0, 2.0, 0.0, 0.0, 1.0], np.float32)  # 2.0 is clamped to 1, as training does
    bounds = np.array([[0, 4], [4, 6]])
    got = returns_to_go(rewards, bounds, 0.5)
    np.testing.assert_allclose(got, [1.25, 0.5, 1.0, 0.0, 0.5, 1.0])
    src = SegmentSource.from_arrays(
        "Breakout", actions=np.zeros(6, np.int64), rewards=rewards, terminals=np.array([0, 0, 0, 1, 0, 1], bool),
        episode_starts=np.array([0, 4]), tokens=np.zeros((6, 36), np.int64), segment_length=3, stride=1,
        returns_gamma=0.5,
    )  # fmt: skip
    batch = src.fetch(np.arange(src.num_segments))
    starts = [tuple(s) for s in src.segments]
    for row, (ep, start, _stop) in enumerate(starts):
        for k in range(3):
            t = bounds[ep, 0] + start + k
            want = got[t] if t < bounds[ep, 1] else 0.0  # padding holds 0
            assert batch["returns_to_go"][row, k] == pytest.approx(want)
    assert "returns_to_go" not in SegmentSource.from_arrays(
        "Breakout", actions=np.zeros(6, np.int64), rewards=rewards, terminals=np.zeros(6, bool),
        episode_starts=np.array([0, 4]), tokens=np.zeros((6, 36), np.int64), segment_length=3,
    ).fetch(np.arange(1))  # fmt: skip
    with pytest.raises(ValueError, match="returns_gamma"):
        SegmentSource.from_arrays("Breakout", actions=np.zeros(6, np.int64), rewards=rewards,
                                  terminals=np.zeros(6, bool), episode_starts=np.array([0, 4]),
                                  tokens=np.zeros((6, 36), np.int64), returns_gamma=1.5)  # fmt: skip


def _lives_for(rng, lengths):
    """A lives counter per step: 3 at each episode start, dropping by one at a few random steps."""
    parts = []
    for t in lengths:
        drops = np.zeros(t, int)
        drops[rng.choice(np.arange(1, t), size=min(2, t - 1), replace=False)] = 1 if t > 1 else 0
        parts.append(3 - np.cumsum(drops))
    return np.concatenate(parts).astype(np.uint8)


def test_life_start_segments_match_a_loop():
    rng = np.random.default_rng(8)
    lengths = rng.integers(1, 40, 30)
    cols = random_columns(rng, lengths)
    cols["lives"] = _lives_for(rng, lengths)
    for length, stride in ((8, 4), (8, 1), (3, 5)):
        src = SegmentSource.from_arrays("Breakout", **cols, segment_length=length, stride=stride)
        starts = cols["episode_starts"]
        want = []
        for k, (e, s, _) in enumerate(src.segments):  # a segment counts when one of its real steps begins a life
            a = starts[e]
            for step in range(s, min(s + length, lengths[e])):
                if step == 0 or cols["lives"][a + step] < cols["lives"][a + step - 1]:
                    want.append(k)
                    break
        np.testing.assert_array_equal(src.life_start_segments, want)
    no_lives = {k: v for k, v in cols.items() if k != "lives"}
    assert SegmentSource.from_arrays("Breakout", **no_lives).life_start_segments is None


def test_life_ends_mark_the_step_before_a_lost_life_inside_an_episode():
    rng = np.random.default_rng(9)
    lengths = rng.integers(1, 30, 25)
    cols = random_columns(rng, lengths)
    cols["lives"] = _lives_for(rng, lengths)
    src = SegmentSource.from_arrays("Breakout", **cols, segment_length=8, stride=3)
    want = np.zeros(len(cols["actions"]), bool)
    for a, t in zip(cols["episode_starts"], lengths):  # per episode: step k lost a life when k + 1 shows fewer
        for k in range(t - 1):
            want[a + k] = cols["lives"][a + k + 1] < cols["lives"][a + k]
    assert want.sum() > 10
    np.testing.assert_array_equal(src.life_ends, want)
    batch = src.fetch(np.arange(src.num_segments))
    steps = batch["mask_padding"]
    flat = np.concatenate([a + s + np.arange(8) for a, s in zip(cols["episode_starts"][src.segments[:, 0]],
                                                                src.segments[:, 1])]).reshape(-1, 8)  # fmt: skip
    np.testing.assert_array_equal(batch["life_ends"], np.where(steps, want[np.minimum(flat, len(want) - 1)], False))
    no_lives = {k: v for k, v in cols.items() if k != "lives"}
    bare = SegmentSource.from_arrays("Breakout", **no_lives)
    assert bare.life_ends is None and not bare.fetch(np.arange(4))["life_ends"].any()


def test_life_start_share_draws_that_share():
    rng = np.random.default_rng(9)
    lengths = rng.integers(20, 60, 40)
    cols = random_columns(rng, lengths)
    cols["lives"] = _lives_for(rng, lengths)
    src = SegmentSource.from_arrays("Breakout", **cols)
    focus = np.zeros(src.num_segments, bool)
    focus[src.life_start_segments] = True
    seg_of_start = {int(cols["episode_starts"][e] + s): k for k, (e, s, _) in enumerate(src.segments)}

    def focus_rate(share):
        sampler = SegmentSampler([src], batch_size=32, seed=2, life_start_share=share)
        rows = [seg_of_start[int(x)] for i in range(200) for x in sampler.batch(i)["tokens"][:, 0, 0]]
        return focus[rows].mean()

    base = focus.mean()  # about 0.15 here: the uniform stream's rate
    assert abs(focus_rate(0.0) - base) < 0.03
    assert focus_rate(1.0) == 1.0
    # share s from the life starts plus (1 - s) uniform rows, of which a fraction base are life starts too
    assert abs(focus_rate(0.4) - (0.4 + 0.6 * base)) < 0.03
    # share 0 is the plain stream, draw for draw
    plain, zero = SegmentSampler([src], 16, seed=5), SegmentSampler([src], 16, seed=5, life_start_share=0.0)
    assert all(torch.equal(plain.batch(3)[k], zero.batch(3)[k]) for k in plain.batch(3))


def test_life_start_share_needs_lives_and_a_valid_share(tmp_path):
    rng = np.random.default_rng(10)
    _, tok_path, cols = write_h5(tmp_path, rng)
    with pytest.raises(ValueError, match="Recollect the data with `jowa collect`"):
        SegmentSampler([SegmentSource(None, tok_path)], 8, life_start_share=0.2)
    with pytest.raises(ValueError, match="life_start_share must be in"):
        SegmentSampler([SegmentSource(None, tok_path)], 8, life_start_share=1.5)
    # a token cache and a dataset that carry the lives column give the same life-start segments
    lives = _lives_for(rng, np.diff(np.r_[cols["episode_starts"], len(cols["actions"])]))
    with h5py.File(tok_path, "a") as f:
        f.create_dataset("lives", data=lives)
    from_cache = SegmentSource(None, tok_path)
    no_frames = {k: v for k, v in cols.items() if k != "observations"}
    want = SegmentSource.from_arrays("Breakout", **no_frames, lives=lives).life_start_segments
    np.testing.assert_array_equal(from_cache.life_start_segments, want)
    assert SegmentSampler([from_cache], 8, life_start_share=0.5).batch(0)["tokens"].shape == (8, 8, 36)
