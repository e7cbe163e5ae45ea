import multiprocessing as mp
import os
import signal
import time

import h5py
import numpy as np
import pytest

from jowa_core.data.format import (
    DatasetError,
    DatasetWriter,
    dataset_info,
    episode_bounds,
    life_starts,
    open_dataset,
    read_episode,
)


def _episode(rng, t, terminal=True):
    return dict(
        observations=rng.integers(0, 256, (t, 84, 84), dtype=np.uint8),
        actions=rng.integers(0, 4, t),
        rewards=rng.choice([-1.0, 0.0, 1.0], t).astype(np.float32),
        terminals=np.r_[np.zeros(t - 1, bool), terminal],
        truncations=np.r_[np.zeros(t - 1, bool), not terminal],
    )


def _write(path, episodes):
    with DatasetWriter(path, "Breakout", source="collected", attrs={"behaviour_policy": "test"}) as w:
        for ep in episodes:
            w.add_episode(**ep)
    return path


def test_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    eps = [_episode(rng, t) for t in (3, 10, 1)] + [_episode(rng, 4, terminal=False)]
    path = _write(tmp_path / "Breakout.h5", eps)
    info = dataset_info(path)
    assert (info.game, info.task_id, info.num_transitions, info.num_episodes) == ("Breakout", 13, 18, 4)
    assert info.attrs["behaviour_policy"] == "test"
    with open_dataset(path) as f:
        assert episode_bounds(f).tolist() == [[0, 3], [3, 13], [13, 14], [14, 18]]
        for i, ep in enumerate(eps):
            got = read_episode(f, i)
            for k, v in ep.items():
                np.testing.assert_array_equal(got[k], np.asarray(v).astype(got[k].dtype))
        np.testing.assert_allclose(f["episode_returns"][:], [ep["rewards"].sum() for ep in eps])
        assert f["observations"].chunks[0] > 1 and f["observations"].compression == "gzip"


def test_writer_rejects_bad_episodes(tmp_path):
    rng = np.random.default_rng(0)
    with pytest.raises(DatasetError, match="uint8"):
        with DatasetWriter(tmp_path / "Pong.h5", "Pong", source="collected") as w:
            w.add_episode(np.zeros((2, 84, 84), np.float32), [0, 0], [0, 0], [0, 1])
    with pytest.raises(DatasetError, match="only at its last step"):
        with DatasetWriter(tmp_path / "Pong.h5", "Pong", source="collected") as w:
            ep = _episode(rng, 3)
            ep["terminals"] = np.array([True, False, True])
            w.add_episode(**ep)
    assert not (tmp_path / "Pong.h5").exists()
    assert list(tmp_path.iterdir()) == []  # failed writers leave nothing behind


def _killed_writer(path, ready):
    rng = np.random.default_rng(0)
    w = DatasetWriter(path, "Pong", source="collected")
    w.add_episode(**_episode(rng, 50))
    ready.set()
    time.sleep(60)


def test_killed_writer_leaves_no_valid_looking_file(tmp_path):
    path = tmp_path / "Pong.h5"
    ready = mp.get_context("fork").Event()
    proc = mp.get_context("fork").Process(target=_killed_writer, args=(path, ready))
    proc.start()
    assert ready.wait(30)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert not path.exists()
    with pytest.raises(DatasetError, match="partial"):
        open_dataset(path)


def test_truncated_file_gives_clear_error(tmp_path):
    rng = np.random.default_rng(0)
    path = _write(tmp_path / "Breakout.h5", [_episode(rng, 40)])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="truncated or corrupted"):
        open_dataset(path)
    path.write_bytes(b"not hdf5 at all")
    with pytest.raises(DatasetError, match="not a readable HDF5"):
        open_dataset(path)


def test_wrong_schema_gives_clear_error(tmp_path):
    rng = np.random.default_rng(0)
    path = _write(tmp_path / "Breakout.h5", [_episode(rng, 5)])
    with h5py.File(path, "a") as f:
        del f["rewards"]
        f["rewards"] = np.zeros(5, np.float64)
    with pytest.raises(DatasetError, match="'rewards' is float64"):
        open_dataset(path)
    other = tmp_path / "foreign.h5"
    with h5py.File(other, "w") as f:
        f["observations"] = np.zeros((2, 84, 84), np.uint8)
    with pytest.raises(DatasetError, match="no root attribute 'format_version'"):
        open_dataset(other)


def test_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        open_dataset(tmp_path / "Nope.h5")


def test_lives_column_round_trip_and_life_starts(tmp_path):
    rng = np.random.default_rng(1)
    eps = [_episode(rng, t) for t in (6, 4)]
    eps[0]["lives"] = [3, 3, 2, 2, 2, 1]  # lives lost before steps 2 and 5
    eps[1]["lives"] = [3, 3, 3, 2]
    path = _write(tmp_path / "Breakout.h5", eps)
    with open_dataset(path) as f:
        assert f["lives"].dtype == np.uint8
        np.testing.assert_array_equal(read_episode(f, 1)["lives"], [3, 3, 3, 2])
        got = life_starts(f["lives"][:], f["episode_starts"][:], len(f["actions"]))
    # by hand: each episode's first step and each step right after a lost life
    np.testing.assert_array_equal(np.flatnonzero(got), [0, 2, 5, 6, 9])
    # without a lives counter only the episode starts are known
    np.testing.assert_array_equal(np.flatnonzero(life_starts(None, [0, 6], 10)), [0, 6])


def test_lives_must_be_given_for_all_episodes_or_none(tmp_path):
    rng = np.random.default_rng(2)
    with pytest.raises(DatasetError, match="lives for every episode or for none"):
        with DatasetWriter(tmp_path / "a.h5", "Breakout", source="collected") as w:
            w.add_episode(**_episode(rng, 3), lives=[5, 5, 4])
            w.add_episode(**_episode(rng, 3))
    with pytest.raises(DatasetError, match="lives for every episode or for none"):
        with DatasetWriter(tmp_path / "b.h5", "Breakout", source="collected") as w:
            w.add_episode(**_episode(rng, 3))
            w.add_episode(**_episode(rng, 3), lives=[5, 5, 4])
    with pytest.raises(DatasetError, match="differ in length"):
        with DatasetWriter(tmp_path / "c.h5", "Breakout", source="collected") as w:
            w.add_episode(**_episode(rng, 3), lives=[5, 5])
    assert not list(tmp_path.glob("*.h5"))


def test_malformed_lives_column_is_explained(tmp_path):
    rng = np.random.default_rng(3)
    path = _write(tmp_path / "Breakout.h5", [_episode(rng, 5)])
    with h5py.File(path, "a") as f:
        f.create_dataset("lives", data=np.ones(4, np.uint8))
    with pytest.raises(DatasetError, match="'lives' is uint8 \\(4,\\), expected uint8 \\(5,\\)"):
        open_dataset(path)
