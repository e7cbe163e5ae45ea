"""Import the public DQN-Replay dataset (Dopamine replay-buffer logs) into our HDF5 format.

Layout on disk (Agarwal et al. 2020, ``gs://atari-replay-datasets/dqn``)::

    <root>/<Game>/<run>/replay_logs/$store$_observation_ckpt.<i>.gz   uint8   (capacity, 84, 84)
                                    $store$_action_ckpt.<i>.gz        int32   (capacity,)  minimal-set index
                                    $store$_reward_ckpt.<i>.gz        float32 (capacity,)  clipped to [-1, 1]
                                    $store$_terminal_ckpt.<i>.gz      uint8   (capacity,)
                                    add_count_ckpt.<i>.gz             int     ()
                                    invalid_range_ckpt.<i>.gz         int     (stack_size + update_horizon,)

Each file is a gzip stream holding one ``np.save`` array, as written by Dopamine's
``OutOfGraphReplayBuffer.save`` and batch_rl's ``OutOfGraphLoggedReplayBuffer._log_buffer``
(google/dopamine ``dopamine/replay_memory/circular_replay_buffer.py``; google-research/batch_rl
``batch_rl/baselines/replay_memory/logged_replay_buffer.py``). The semantics we rely on:

- ``add()`` writes ``stack_size - 1`` all-zero transitions (zero frame, action 0, reward 0, terminal 0;
  ``_add_zero_transition``) before a transition whenever ``is_empty()`` or the previously written
  transition was terminal (``self._store['terminal'][self.cursor() - 1] == 1``). They are not data.
- ``_add()`` writes at ``cursor() = add_count % capacity`` and increments ``add_count``, so once
  ``add_count > capacity`` the oldest surviving transition sits at the cursor.
- ``invalid_range = [(cursor - update_horizon + i) % capacity for i in range(stack_size + update_horizon)]``
  after every ``_add`` (``np.zeros(stack_size)`` before the first); we use it to check ``add_count``.
- batch_rl logs the buffer when ``add_count % capacity == capacity - 1`` (so consecutive files do not
  overlap and an episode can straddle two files), and ``log_final_buffer`` logs the last, partly
  refilled buffer with ``add_count`` replaced by the cursor. That last file looks "not yet wrapped" but
  its slot 0 continues an episode from the previous file; we detect this because slot 0 then is not
  zero padding, and treat its first episode as a tail.
- The alignment is (o_t, a_t, r_t, d_t), the same as our format. Dopamine also stores the step cap
  (27k agent steps) as terminal, so DQN-Replay cannot tell a time-out from a game over.

Episode rebuilding. Chronological order is ``cursor, cursor + 1, ...`` (wrapped) or ``0 .. add_count``
(not wrapped). The buffer splits after every terminal; the ``stack_size - 1`` padding transitions that
follow each terminal are removed. The first episode of a wrapped buffer is a tail whose beginning was
overwritten: it has no preceding terminal, so it is dropped by default (``keep_partial_first=True``
keeps it, trimming leading all-zero transitions that are padding). The last episode may be unfinished
(no terminal before the cursor): kept with ``truncations[-1] = True`` by default (``keep_unfinished``).
The official JOWA downsampler (spec 3.1, [Q18]) keeps file-start tails and drops unfinished episodes.

Subsampling (spec 3.1): choose ``num_runs`` of the available runs (seeded, without replacement), use all
checkpoints, ``n_ep = ceil(fraction * total_transitions / mean_episode_length)`` episodes drawn uniformly,
with replacement by default as the official ``downsample.py`` does (``with_replacement=False`` draws
distinct episodes). Only the drawn frames are kept in memory: the observation file (7 GB decompressed
for a 1M-transition checkpoint) is streamed and the needed rows are picked out.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from jowa_core import games
from jowa_core.config import FRAME_SIZE
from jowa_core.data.format import DatasetError, DatasetWriter

STORE_PREFIX = "$store$_"
STORE_NAMES = ("observation", "action", "reward", "terminal")
PLAIN_NAMES = ("add_count", "invalid_range")
FILE_PATTERN = "<root>/<Game>/<run>/replay_logs/{name}_ckpt.<i>.gz"
_STREAM_ROWS = 4096  # observation rows decompressed per read while streaming

Episode = dict[str, np.ndarray]


class DQNReplayError(DatasetError):
    """A DQN-Replay file is missing, corrupted or inconsistent; the message names the file and the fix."""


# --------------------------------------------------------------------------------------------- files


def replay_logs_dir(run_dir: str | os.PathLike) -> Path:
    """Accept ``<Game>/<run>`` or ``<Game>/<run>/replay_logs``; return the ``replay_logs`` folder."""
    run_dir = Path(run_dir)
    if run_dir.name == "replay_logs":
        return run_dir
    return run_dir / "replay_logs"


def checkpoint_file(run_dir: str | os.PathLike, name: str, index: int) -> Path:
    """Path of one checkpoint array; ``name`` is e.g. 'observation' or 'add_count'."""
    prefix = STORE_PREFIX if name in STORE_NAMES else ""
    return replay_logs_dir(run_dir) / f"{prefix}{name}_ckpt.{int(index)}.gz"


def checkpoint_indices(run_dir: str | os.PathLike) -> list[int]:
    """Checkpoint indices present in a run (those with a terminal file), sorted."""
    logs = replay_logs_dir(run_dir)
    found = []
    for p in logs.glob(f"{STORE_PREFIX}terminal_ckpt.*.gz"):
        suffix = p.name[len(f"{STORE_PREFIX}terminal_ckpt.") : -len(".gz")]
        if suffix.isdigit():
            found.append(int(suffix))
    return sorted(found)


def _check_files(run_dir: Path, index: int) -> None:
    missing = [
        checkpoint_file(run_dir, n, index)
        for n in STORE_NAMES + PLAIN_NAMES
        if not checkpoint_file(run_dir, n, index).exists()
    ]
    if missing:
        names = ", ".join(p.name for p in missing)
        raise DQNReplayError(
            f"DQN-Replay checkpoint {index} in {replay_logs_dir(run_dir)} is incomplete: missing {names}. "
            f"Each checkpoint needs six files named like {FILE_PATTERN.format(name='$store$_observation')} "
            f"(also $store$_action, $store$_reward, $store$_terminal, add_count, invalid_range). "
            f"Download the missing files again (gsutil -m cp -R gs://atari-replay-datasets/dqn/<Game>/<run> ...)."
        )


def _corrupt(path: Path, err: BaseException) -> DQNReplayError:
    return DQNReplayError(
        f"{path} cannot be read as a gzip-compressed .npy array ({type(err).__name__}: {err}). The file is "
        f"probably truncated or corrupted: delete it and download it again."
    )


def _load_array(path: Path) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            return np.load(f, allow_pickle=False)
    except (OSError, EOFError, ValueError, zlib.error) as e:
        raise _corrupt(path, e) from None


def _open_npy_stream(path: Path) -> tuple[gzip.GzipFile, tuple[int, ...], np.dtype]:
    """Open a gzip .npy for sequential reading: returns the file positioned at the data, shape, dtype."""
    f = gzip.open(path, "rb")  # noqa: SIM115 - returned open to the caller, who closes it
    try:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
    except (OSError, EOFError, ValueError, zlib.error) as e:
        f.close()
        raise _corrupt(path, e) from None
    if fortran and len(shape) > 1:
        f.close()
        raise DQNReplayError(f"{path} holds a Fortran-ordered array; Dopamine writes C order. Re-download it.")
    return f, tuple(shape), np.dtype(dtype)


def _check_observation_header(path: Path, shape: tuple[int, ...], dtype: np.dtype, capacity: int) -> None:
    if dtype != np.uint8 or shape != (capacity, FRAME_SIZE, FRAME_SIZE):
        raise DQNReplayError(
            f"{path} holds {dtype} {shape}; expected uint8 ({capacity}, {FRAME_SIZE}, {FRAME_SIZE}) to match the "
            f"other arrays of this checkpoint. Files from different checkpoints or runs may be mixed up."
        )


def _read_frames(path: Path, slots: np.ndarray, capacity: int) -> np.ndarray:
    """Frames at the sorted unique ``slots``, (K, 84, 84) uint8, streaming the file once.

    Only the requested rows are kept, so memory is O(K), not the 7 GB of a full DQN-Replay checkpoint.
    """
    f, shape, dtype = _open_npy_stream(path)
    row = FRAME_SIZE * FRAME_SIZE
    out = np.empty((len(slots), FRAME_SIZE, FRAME_SIZE), np.uint8)
    try:
        _check_observation_header(path, shape, dtype, capacity)
        last = int(slots[-1]) + 1 if len(slots) else 0
        done = 0
        for c0 in range(0, last, _STREAM_ROWS):
            n = min(_STREAM_ROWS, capacity - c0)
            buf = f.read(n * row)
            if len(buf) != n * row:
                raise EOFError(f"the array ends after {c0 + len(buf) // row} of {capacity} rows")
            i1 = int(np.searchsorted(slots, c0 + n))
            if i1 > done:
                block = np.frombuffer(buf, np.uint8).reshape(n, FRAME_SIZE, FRAME_SIZE)
                out[done:i1] = block[slots[done:i1] - c0]
                done = i1
    except (OSError, EOFError, zlib.error) as e:
        raise _corrupt(path, e) from None
    finally:
        f.close()
    return out


# ---------------------------------------------------------------------------------- checkpoint layout


@dataclass(frozen=True)
class _Checkpoint:
    """The small arrays of one checkpoint and where its episodes lie (frames are read separately)."""

    run_dir: Path
    index: int
    capacity: int
    order: np.ndarray  # (n,) buffer slot of each chronological position
    actions: np.ndarray  # (capacity,) minimal-set index, as stored
    rewards: np.ndarray  # (capacity,) float32
    terminals: np.ndarray  # (capacity,) bool
    spans: np.ndarray  # (E, 2) chronological [start, stop) of each kept episode, padding excluded
    truncated: np.ndarray  # (E,) bool: the unfinished last episode
    partial: np.ndarray  # (E,) bool: a tail whose beginning is not in this checkpoint

    @property
    def lengths(self) -> np.ndarray:
        return self.spans[:, 1] - self.spans[:, 0]


def _load_checkpoint(
    run_dir: Path, index: int, num_actions: int, stack_size: int, keep_partial_first: bool, keep_unfinished: bool
) -> _Checkpoint:
    _check_files(run_dir, index)
    path = {n: checkpoint_file(run_dir, n, index) for n in STORE_NAMES + PLAIN_NAMES}
    terminal = _load_array(path["terminal"])
    action = _load_array(path["action"])
    reward = _load_array(path["reward"])
    add_count_arr = _load_array(path["add_count"])
    invalid = _load_array(path["invalid_range"])

    if terminal.ndim != 1:
        raise DQNReplayError(f"{path['terminal']} has shape {terminal.shape}; expected (capacity,).")
    capacity = len(terminal)
    for name, arr, kinds, want in (
        ("terminal", terminal, "uib", "uint8"),
        ("action", action, "ui", "int32"),
        ("reward", reward, "f", "float32"),
    ):
        if arr.dtype.kind not in kinds:
            raise DQNReplayError(f"{path[name]} has dtype {arr.dtype}; Dopamine stores {name} as {want}.")
        if arr.shape != (capacity,):
            raise DQNReplayError(
                f"{path[name]} has shape {arr.shape} but {path['terminal'].name} has ({capacity},): the files of "
                f"checkpoint {index} do not belong together. Download this checkpoint again."
            )
    if add_count_arr.size != 1 or add_count_arr.dtype.kind not in "ui":
        raise DQNReplayError(
            f"{path['add_count']} holds {add_count_arr.dtype} {add_count_arr.shape}; expected a 0-d int."
        )
    add_count = int(add_count_arr.reshape(()))
    if add_count < 0:
        raise DQNReplayError(f"{path['add_count']} holds add_count={add_count} < 0.")
    cursor = add_count % capacity
    if add_count > 0:
        horizon = len(invalid) - stack_size
        expected = (cursor - horizon + np.arange(stack_size + horizon)) % capacity
        if horizon < 0 or invalid.dtype.kind not in "uif" or not np.array_equal(invalid.reshape(-1), expected):
            raise DQNReplayError(
                f"{path['invalid_range']} is {invalid.tolist()[:8]}, which does not match add_count={add_count} "
                f"(cursor {cursor}) with stack_size={stack_size}: the files of checkpoint {index} are inconsistent, "
                f"or stack_size is wrong (DQN-Replay uses 4)."
            )

    terminal = terminal.astype(bool)
    pad = stack_size - 1
    n = min(add_count, capacity)
    wrapped = add_count > capacity
    order = (cursor + np.arange(n)) % capacity if wrapped else np.arange(n)

    def is_zero(pos: np.ndarray) -> np.ndarray:  # Dopamine's _add_zero_transition, frames aside
        s = order[pos]
        return (action[s] == 0) & (reward[s] == 0) & ~terminal[s]

    # A buffer filled from empty starts with stack_size - 1 padding transitions. Frames are checked too,
    # because batch_rl's final log resets add_count to the cursor; then slot 0 continues an older episode.
    head = np.arange(min(n, pad))
    fresh = not wrapped and bool(is_zero(head).all())
    if fresh and len(head):
        fresh = not _read_frames(path["observation"], head, capacity).any()

    term_pos = np.flatnonzero(terminal[order])
    piece_start = np.concatenate([[0], term_pos + 1])
    piece_stop = np.concatenate([term_pos + 1, [n]])
    lead = np.full(len(piece_start), pad)
    lead[0] = pad if fresh else 0
    real_start = np.minimum(piece_start + lead, piece_stop)

    # The stack_size - 1 transitions after each terminal must be Dopamine's zero padding.
    after = (term_pos[:, None] + 1 + np.arange(pad)).reshape(-1)
    after = after[after < n]
    if len(after) and not is_zero(after).all():
        bad = int(order[after[~is_zero(after)][0]])
        raise DQNReplayError(
            f"Checkpoint {index} in {replay_logs_dir(run_dir)}: slot {bad} follows a terminal but is not a zero "
            f"padding transition. Is stack_size={stack_size} right? DQN-Replay uses 4."
        )

    keep = real_start < piece_stop
    partial = np.zeros(len(piece_start), bool)
    partial[0] = not fresh
    truncated = np.zeros(len(piece_start), bool)
    truncated[-1] = True  # the piece after the last terminal never ends in one
    if not keep_partial_first:
        keep &= ~partial | truncated  # a lone unfinished piece is handled by keep_unfinished
    if not keep_unfinished:
        keep &= ~truncated
    if len(piece_start) == 1 and not keep_partial_first and not fresh:
        keep[:] = False  # no terminal at all in a wrapped buffer: neither start nor end is known
    spans = np.stack([real_start, piece_stop], axis=1)[keep].astype(np.int64)

    real_slots = order[np.concatenate([np.arange(a, b) for a, b in spans])] if len(spans) else np.zeros(0, int)
    if len(real_slots) and (action[real_slots].min() < 0 or action[real_slots].max() >= num_actions):
        raise DQNReplayError(
            f"Checkpoint {index} in {replay_logs_dir(run_dir)} has actions in [{action[real_slots].min()}, "
            f"{action[real_slots].max()}] but the game has {num_actions} minimal-set actions: is this the right game?"
        )
    return _Checkpoint(
        run_dir=run_dir,
        index=index,
        capacity=capacity,
        order=order,
        actions=action,
        rewards=reward.astype(np.float32, copy=False),
        terminals=terminal,
        spans=spans,
        truncated=truncated[keep],
        partial=partial[keep],
    )


def _episodes(ck: _Checkpoint, which: np.ndarray, to_full: np.ndarray, stack_size: int) -> list[Episode]:
    """Materialise the episodes ``which`` (indices into ``ck.spans``, repeats allowed) in that order."""
    if len(which) == 0:
        return []
    slot_lists = [ck.order[a:b] for a, b in ck.spans[which]]
    needed = np.unique(np.concatenate(slot_lists))
    frames = _read_frames(checkpoint_file(ck.run_dir, "observation", ck.index), needed, ck.capacity)
    out = []
    for e, slots in zip(which, slot_lists):
        obs = frames[np.searchsorted(needed, slots)]
        act, rew, term = ck.actions[slots], ck.rewards[slots], ck.terminals[slots]
        if ck.partial[e]:  # leading all-zero transitions of a tail are padding (at most stack_size - 1)
            zero = (act == 0) & (rew == 0) & ~term & ~obs.reshape(len(obs), -1).any(axis=1)
            skip = min(int(np.argmin(np.append(zero, False))), stack_size - 1, len(slots) - 1)
            obs, act, rew, term = obs[skip:], act[skip:], rew[skip:], term[skip:]
        trunc = np.zeros(len(act), bool)
        trunc[-1] = bool(ck.truncated[e])
        out.append(
            {
                "observations": obs,
                "actions": to_full[act.astype(np.int64)],
                "rewards": rew.astype(np.float32),
                "terminals": term.copy(),
                "truncations": trunc,
            }
        )
    return out


def _infer_game(run_dir: Path, game: str | None) -> str:
    if game is not None:
        return games.canonical_name(game)
    folder = replay_logs_dir(run_dir).parent.parent.name
    try:
        return games.canonical_name(folder)
    except games.UnknownGameError:
        raise DQNReplayError(
            f"Cannot tell the game from {run_dir} (expected {FILE_PATTERN.format(name='...')}); pass game=..."
        ) from None


def read_replay_checkpoint(
    run_dir: str | os.PathLike,
    index: int,
    stack_size: int = 4,
    *,
    game: str | None = None,
    keep_partial_first: bool = False,
    keep_unfinished: bool = True,
) -> list[Episode]:
    """Rebuild the episodes of one DQN-Replay checkpoint, oldest first.

    Args:
        run_dir: ``<root>/<Game>/<run>`` (or its ``replay_logs`` folder).
        index: checkpoint number ``<i>`` in the file names.
        stack_size: Dopamine's frame stack (4 in DQN-Replay); sets the padding length.
        game: the game; by default the name of the folder above ``run_dir``.
        keep_partial_first: keep the first episode of a wrapped buffer, whose beginning was overwritten.
        keep_unfinished: keep the last episode when it has no terminal, marked truncated.

    Returns:
        A list of dicts with ``observations`` uint8 (T, 84, 84), ``actions`` int64 full-set indices,
        ``rewards`` float32, ``terminals`` bool, ``truncations`` bool, ready for
        ``DatasetWriter.add_episode(**episode)``. Loads all frames of the checkpoint (7 GB for 1M).
    """
    run_dir = Path(run_dir)
    name = _infer_game(run_dir, game)
    to_full = games.minimal_to_full(name)
    ck = _load_checkpoint(run_dir, index, len(to_full), stack_size, keep_partial_first, keep_unfinished)
    return _episodes(ck, np.arange(len(ck.spans)), to_full, stack_size)


# ----------------------------------------------------------------------------------- synthetic writer


def write_replay_checkpoint(
    run_dir: str | os.PathLike,
    index: int,
    episodes: Sequence[dict[str, Any]],
    capacity: int,
    stack_size: int = 4,
    *,
    update_horizon: int = 1,
    final_log: bool = False,
    compresslevel: int = 1,
) -> Path:
    """Write DQN-Replay files for ``episodes`` exactly as Dopamine's ``add()`` + ``save()`` would.

    Simulates ``add`` for every step: ``stack_size - 1`` zero transitions before a step when the buffer
    is empty or the previous stored transition was terminal (so an episode without a terminal runs into
    the next one, as in Dopamine), circular overwrite at ``add_count % capacity``, ``add_count`` and
    ``invalid_range``. Slots never written hold filler (Dopamine's ``np.empty``: any content is valid);
    we write 0xA5 frames and terminal 1 so a reader that looks at them fails tests. ``final_log``
    mimics batch_rl's ``log_final_buffer`` (``add_count`` saved as the cursor). Any gzip level decodes
    the same; level 1 keeps tests fast.

    Args:
        episodes: dicts with ``observations`` uint8 (T, 84, 84), ``actions`` minimal-set indices,
            ``rewards``, ``terminals`` (T,).
    Returns:
        The ``replay_logs`` folder.
    """
    if capacity < stack_size + update_horizon:
        raise ValueError(
            f"capacity={capacity} must be at least stack_size + update_horizon ({stack_size + update_horizon})."
        )
    obs_l, act_l, rew_l, term_l = [], [], [], []
    prev_terminal = True  # "is_empty()" behaves like a preceding terminal
    for i, ep in enumerate(episodes):
        obs = np.asarray(ep["observations"])
        t = len(obs)
        if obs.dtype != np.uint8 or obs.shape[1:] != (FRAME_SIZE, FRAME_SIZE):
            raise ValueError(f"episode {i}: observations must be uint8 (T, 84, 84); got {obs.dtype} {obs.shape}.")
        arrays = [np.asarray(ep[k]) for k in ("actions", "rewards", "terminals")]
        if any(a.shape != (t,) for a in arrays):
            raise ValueError(f"episode {i}: actions, rewards, terminals must have shape ({t},).")
        act, rew, term = arrays[0].astype(np.int32), arrays[1].astype(np.float32), arrays[2].astype(np.uint8)
        if t == 0:
            continue
        # A step gets padding before it iff the previously added transition was terminal (or none exists).
        before = np.concatenate([[prev_terminal], term[:-1] == 1])
        n_pad = before * (stack_size - 1)
        pos = np.arange(t) + np.cumsum(n_pad)  # position of each real step in this episode's stream
        total = t + int(n_pad.sum())
        o = np.zeros((total, FRAME_SIZE, FRAME_SIZE), np.uint8)
        a, r, d = np.zeros(total, np.int32), np.zeros(total, np.float32), np.zeros(total, np.uint8)
        o[pos], a[pos], r[pos], d[pos] = obs, act, rew, term
        obs_l.append(o), act_l.append(a), rew_l.append(r), term_l.append(d)
        prev_terminal = bool(term[-1] == 1)

    stream_len = sum(len(x) for x in act_l)
    store = {
        "observation": np.full((capacity, FRAME_SIZE, FRAME_SIZE), 0xA5, np.uint8),
        "action": np.zeros(capacity, np.int32),
        "reward": np.zeros(capacity, np.float32),
        "terminal": np.ones(capacity, np.uint8),
    }
    if stream_len:
        keep = min(stream_len, capacity)  # the last writer of each slot wins
        slots = np.arange(stream_len - keep, stream_len) % capacity
        for name, parts in zip(STORE_NAMES, (obs_l, act_l, rew_l, term_l)):
            store[name][slots] = np.concatenate(parts)[-keep:]
    cursor = stream_len % capacity
    if stream_len:
        invalid = np.array([(cursor - update_horizon + i) % capacity for i in range(stack_size + update_horizon)])
    else:
        invalid = np.zeros(stack_size)
    add_count = np.array(cursor if final_log else stream_len)

    logs = replay_logs_dir(run_dir)
    logs.mkdir(parents=True, exist_ok=True)
    for name, arr in {**store, "add_count": add_count, "invalid_range": invalid}.items():
        with gzip.open(checkpoint_file(run_dir, name, index), "wb", compresslevel=compresslevel) as f:
            np.save(f, arr, allow_pickle=False)
    return logs


# ---------------------------------------------------------------------------------------- importer


def available_runs(root: str | os.PathLike, game: str) -> tuple[Path, list[str]]:
    """The game folder under ``root`` and its run names (folders with ``replay_logs``), numerically sorted."""
    root = Path(root)
    name = games.canonical_name(game)
    game_dir = root / name
    if not game_dir.is_dir() and root.is_dir():
        match = [p for p in root.iterdir() if p.is_dir() and p.name.lower() == name.lower()]
        game_dir = match[0] if match else game_dir
    if not game_dir.is_dir():
        have = sorted(p.name for p in root.iterdir() if p.is_dir())[:10] if root.is_dir() else []
        raise DQNReplayError(
            f"No DQN-Replay folder for {name} under {root} (expected {FILE_PATTERN.format(name='$store$_observation')}; "
            f"found folders {have}). Download it with gsutil -m cp -R gs://atari-replay-datasets/dqn/{name} {root}/."
        )
    runs = [p.name for p in game_dir.iterdir() if (p / "replay_logs").is_dir()]
    runs.sort(key=lambda r: (not r.isdigit(), int(r) if r.isdigit() else 0, r))
    return game_dir, runs


def import_dqn_replay(
    root: str | os.PathLike,
    game: str,
    out_path: str | os.PathLike,
    runs: Sequence[str | int] | None = None,
    num_runs: int = 2,
    checkpoints: Sequence[int] | None = None,
    fraction: float = 0.1,
    seed: int = 0,
    progress: bool = True,
    *,
    with_replacement: bool = True,
    stack_size: int = 4,
    keep_partial_first: bool = False,
    keep_unfinished: bool = True,
) -> Path:
    """Subsample DQN-Replay for one game into our HDF5 format (spec 3.1).

    Args:
        root: folder holding ``<Game>/<run>/replay_logs``.
        game: game name in any spelling ``games.canonical_name`` accepts.
        out_path: the ``.h5`` file to write (atomically).
        runs: run folder names; by default ``num_runs`` of the available ones, chosen with ``seed``.
        checkpoints: checkpoint indices used in every run; by default all present in each run.
        fraction: share of the pool's transitions to keep (0.1 = the paper's 10%).
        seed: seeds the run choice and the episode draw (combined with the game's task id).
        with_replacement: draw episodes with replacement, as the official ``downsample.py``.
        stack_size, keep_partial_first, keep_unfinished: see ``read_replay_checkpoint``.

    Returns:
        ``out_path``. Root attributes record runs, checkpoints, fraction, seed and the pool statistics.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction={fraction} must be in (0, 1]; the paper uses 0.1.")
    name = games.canonical_name(game)
    to_full = games.minimal_to_full(name)
    rng = np.random.default_rng([seed, games.task_id(name)])
    game_dir, found = available_runs(root, name)
    if runs is None:
        if len(found) < num_runs:
            raise DQNReplayError(
                f"{game_dir} has {len(found)} runs ({found}) but num_runs={num_runs}; download more runs or lower num_runs."
            )
        picked = rng.choice(len(found), size=num_runs, replace=False)
        runs = [found[i] for i in sorted(picked)]
    runs = [str(r) for r in runs]
    for r in runs:
        if r not in found:
            raise DQNReplayError(f"Run {r!r} not found in {game_dir} (runs with replay_logs: {found}).")

    plan: list[tuple[str, int]] = []
    for r in runs:
        idx = list(checkpoints) if checkpoints is not None else checkpoint_indices(game_dir / r)
        if not idx:
            raise DQNReplayError(
                f"{replay_logs_dir(game_dir / r)} holds no {FILE_PATTERN.format(name='$store$_terminal')} files."
            )
        plan += [(r, int(i)) for i in idx]

    # Pass 1: episode boundaries from the small arrays only.
    spans, lengths = [], []
    for src, (r, i) in enumerate(tqdm(plan, desc=f"{name}: scan", disable=not progress)):
        ck = _load_checkpoint(game_dir / r, i, len(to_full), stack_size, keep_partial_first, keep_unfinished)
        spans.append(np.stack([np.full(len(ck.spans), src), np.arange(len(ck.spans))], axis=1))
        lengths.append(ck.lengths)
    pool = np.concatenate(spans) if spans else np.zeros((0, 2), int)
    pool_len = np.concatenate(lengths) if lengths else np.zeros(0, int)
    if len(pool) == 0:
        raise DQNReplayError(f"No episodes found for {name} in runs {runs}; are the files complete?")
    total = int(pool_len.sum())
    mean_len = total / len(pool)
    n_ep = math.ceil(fraction * total / mean_len - 1e-9)
    if with_replacement:
        drawn = np.sort(rng.integers(0, len(pool), size=n_ep))
    else:
        drawn = np.sort(rng.choice(len(pool), size=min(n_ep, len(pool)), replace=False))

    attrs = {
        "dqn_replay_runs": json.dumps(runs),
        "dqn_replay_checkpoints": json.dumps({r: [i for rr, i in plan if rr == r] for r in runs}),
        "fraction": float(fraction),
        "seed": int(seed),
        "with_replacement": bool(with_replacement),
        "stack_size": int(stack_size),
        "keep_partial_first": bool(keep_partial_first),
        "keep_unfinished": bool(keep_unfinished),
        "pool_episodes": len(pool),
        "pool_transitions": total,
        "drawn_episodes": len(drawn),
        "behaviour_policy": "DQN-Replay: Nature DQN (Dopamine) training-time epsilon-greedy, logged replay buffers",
        "frame_pipeline": "Dopamine AtariPreprocessing: frame skip 4, max-pool last 2, grayscale, 84x84 INTER_AREA, "
        "sticky actions 0.25, rewards clipped to [-1, 1]",
    }
    # Pass 2: stream frames of the drawn episodes, one checkpoint at a time, in draw order.
    with DatasetWriter(out_path, name, source="dqn_replay", attrs=attrs) as writer:
        sources = pool[drawn, 0]
        for src in tqdm(np.unique(sources), desc=f"{name}: copy", disable=not progress):
            r, i = plan[src]
            ck = _load_checkpoint(game_dir / r, i, len(to_full), stack_size, keep_partial_first, keep_unfinished)
            for ep in _episodes(ck, pool[drawn[sources == src], 1], to_full, stack_size):
                writer.add_episode(**ep)
    return Path(out_path)
