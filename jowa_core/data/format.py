"""The offline dataset format: one HDF5 file per game (DESIGN.md section 5).

Transition-major arrays over all episodes, aligned as Dopamine's (o_t, a_t, r_t, d_t): ``rewards[t]``
and ``terminals[t]`` result from taking ``actions[t]`` in ``observations[t]``. The observation after an
episode's last step is not stored. ``truncations[t]`` marks a last step that is not a game over (the
collection budget or the step cap ended it), so no bootstrapping target exists past it.

Writers write to a temporary name and rename when complete: a killed collection leaves at most a
``*.partial`` file, never a file that looks whole. Readers validate the schema and explain problems.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from jowa_core import games
from jowa_core.config import FRAME_SIZE
from jowa_core.runtime import atomic_path

FORMAT_VERSION = 1
FRAME_CHUNK = 32  # small chunks: a random 8-step segment read decompresses little (256 was 8x slower)

# name -> (dtype, trailing shape); the leading dimension is N transitions or E episodes
SCHEMA: dict[str, tuple[np.dtype, tuple[int, ...]]] = {
    "observations": (np.dtype(np.uint8), (FRAME_SIZE, FRAME_SIZE)),
    "actions": (np.dtype(np.uint8), ()),
    "rewards": (np.dtype(np.float32), ()),
    "terminals": (np.dtype(bool), ()),
    "truncations": (np.dtype(bool), ()),
}
# optional per-transition columns: present for every episode of a file or for none
OPTIONAL_SCHEMA: dict[str, tuple[np.dtype, tuple[int, ...]]] = {
    "lives": (np.dtype(np.uint8), ()),  # ALE lives left when observations[t] was seen (0: a game without lives)
}
EPISODE_SCHEMA: dict[str, np.dtype] = {
    "episode_starts": np.dtype(np.int64),
    "episode_returns": np.dtype(np.float32),
}
REQUIRED_ATTRS = ("format_version", "game", "task_id", "source")


class DatasetError(ValueError):
    """A dataset file is missing, truncated, or not in our format; the message names the fix."""


class DatasetWriter:
    """Append whole episodes to a new dataset file; the file appears only on ``close()``.

    >>> with DatasetWriter("data/default/Pong.h5", "Pong", source="collected") as w:
    ...     w.add_episode(obs, actions, rewards, terminals, truncations)
    """

    def __init__(self, path: str | os.PathLike, game: str, *, source: str, attrs: dict[str, Any] | None = None):
        self.path = Path(path)
        self.game = games.canonical_name(game)
        self._ctx = atomic_path(self.path)
        self._tmp = self._ctx.__enter__()
        self._f = h5py.File(self._tmp, "w")
        self._n = 0
        self._starts: list[int] = []
        self._returns: list[float] = []
        for name, (dtype, shape) in SCHEMA.items():
            chunks = (FRAME_CHUNK, *shape) if shape else (65536,)
            kw = dict(compression="gzip", compression_opts=1, shuffle=False) if shape else {}
            self._f.create_dataset(name, shape=(0, *shape), maxshape=(None, *shape), dtype=dtype, chunks=chunks, **kw)
        a = self._f.attrs
        a["format_version"] = FORMAT_VERSION
        a["game"] = self.game
        a["task_id"] = games.task_id(self.game)
        a["source"] = source
        for k, v in (attrs or {}).items():
            a[k] = v if not isinstance(v, dict) else str(v)
        self._closed = False

    @property
    def num_transitions(self) -> int:
        return self._n

    @property
    def num_episodes(self) -> int:
        return len(self._starts)

    def add_episode(self, observations, actions, rewards, terminals, truncations=None, lives=None) -> None:
        """Append one episode. ``lives`` (optional, T ints): ALE's lives counter at each observation; give
        it for every episode of a file or for none (``life_starts`` reads it)."""
        obs = np.asarray(observations)
        t = len(obs)
        if t == 0:
            return
        if obs.shape[1:] != (FRAME_SIZE, FRAME_SIZE) or obs.dtype != np.uint8:
            raise DatasetError(f"observations must be uint8 (T, 84, 84); got {obs.dtype} {obs.shape}.")
        act = np.asarray(actions)
        if act.min() < 0 or act.max() >= games.NUM_ACTIONS:
            raise DatasetError(f"actions must be full-set indices in [0, 18); got range [{act.min()}, {act.max()}].")
        cols = {
            "observations": obs,
            "actions": act.astype(np.uint8),
            "rewards": np.asarray(rewards, dtype=np.float32),
            "terminals": np.asarray(terminals, dtype=bool),
            "truncations": np.zeros(t, bool) if truncations is None else np.asarray(truncations, dtype=bool),
        }
        if self._n and (lives is not None) != ("lives" in self._f):
            have = "has" if "lives" in self._f else "has no"
            raise DatasetError(f"this file {have} a lives column; give lives for every episode or for none.")
        if lives is not None:
            lv = np.asarray(lives)
            if lv.size and (lv.min() < 0 or lv.max() > 255):
                raise DatasetError(f"lives must be counts in [0, 255]; got range [{lv.min()}, {lv.max()}].")
            cols["lives"] = lv.astype(np.uint8)
            if "lives" not in self._f:
                self._f.create_dataset("lives", shape=(0,), maxshape=(None,), dtype=np.uint8, chunks=(65536,))
        for name, arr in cols.items():
            if len(arr) != t:
                raise DatasetError(f"episode arrays differ in length: observations {t}, {name} {len(arr)}.")
        if cols["terminals"][:-1].any() or cols["truncations"][:-1].any():
            raise DatasetError("an episode may end (terminal or truncated) only at its last step; split it first.")
        for name, arr in cols.items():
            ds = self._f[name]
            ds.resize(self._n + t, axis=0)
            ds[self._n :] = arr
        self._starts.append(self._n)
        self._returns.append(float(cols["rewards"].sum(dtype=np.float64)))
        self._n += t

    def add_episode_field(self, name: str, values) -> None:
        """Store an extra per-episode (E,) array, e.g. which behaviour policy produced each episode."""
        values = np.asarray(values)
        if name in SCHEMA or name in OPTIONAL_SCHEMA or name in EPISODE_SCHEMA or name in self._f:
            raise DatasetError(f"per-episode field {name!r} exists already or is reserved; pick another name.")
        if values.shape != (self.num_episodes,):
            raise DatasetError(f"per-episode field {name!r} has shape {values.shape}; expected ({self.num_episodes},).")
        self._f.create_dataset(name, data=values)

    def close(self) -> Path:
        """Write the episode index and move the file into place."""
        if self._closed:
            return self.path
        self._f.create_dataset("episode_starts", data=np.asarray(self._starts, dtype=np.int64))
        self._f.create_dataset("episode_returns", data=np.asarray(self._returns, dtype=np.float32))
        self._f.attrs["num_transitions"] = self._n
        self._f.attrs["num_episodes"] = len(self._starts)
        self._f.close()
        self._closed = True
        self._ctx.__exit__(None, None, None)
        return self.path

    def abort(self) -> None:
        if not self._closed:
            self._f.close()
            self._closed = True
            try:
                self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)
            except RuntimeError:
                pass

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


@dataclass
class DatasetInfo:
    path: Path
    game: str
    task_id: int
    source: str
    num_transitions: int
    num_episodes: int
    attrs: dict[str, Any]


def _fail(path: Path, problem: str, fix: str = "") -> DatasetError:
    fix = fix or "Recreate it with `jowa collect` or `jowa import-dqn-replay`."
    return DatasetError(f"Dataset {path}: {problem} {fix}")


def open_dataset(path: str | os.PathLike) -> h5py.File:
    """Open a dataset read-only after validating its schema; raises DatasetError explaining what is wrong."""
    path = Path(path)
    if not path.exists():
        partial = list(path.parent.glob(path.name + ".*.partial")) if path.parent.exists() else []
        hint = " A *.partial file beside it means a writer was killed before finishing." if partial else ""
        raise _fail(path, f"no such file.{hint}")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise _fail(path, f"is not a readable HDF5 file (truncated or corrupted: {e}).") from None
    try:
        validate(f, path)
    except DatasetError:
        f.close()
        raise
    return f


def validate(f: h5py.File, path: Path) -> None:
    for key in REQUIRED_ATTRS:
        if key not in f.attrs:
            raise _fail(path, f"has no root attribute {key!r}, so it was not written by jowa_core (or was cut short).")
    version = int(f.attrs["format_version"])
    if version != FORMAT_VERSION:
        raise _fail(path, f"has format_version {version}, this code reads {FORMAT_VERSION}.")
    n = None
    for name, (dtype, shape) in SCHEMA.items():
        if name not in f:
            raise _fail(path, f"lacks the dataset {name!r}.")
        ds = f[name]
        if ds.dtype != dtype or ds.shape[1:] != shape:
            raise _fail(path, f"{name!r} is {ds.dtype} {ds.shape}, expected {dtype} (N, {', '.join(map(str, shape))}).")
        if n is None:
            n = ds.shape[0]
        elif ds.shape[0] != n:
            raise _fail(path, f"{name!r} has {ds.shape[0]} rows but observations has {n}.")
    for name, (dtype, shape) in OPTIONAL_SCHEMA.items():
        if name in f and (f[name].dtype != dtype or f[name].shape != (n, *shape)):
            raise _fail(path, f"{name!r} is {f[name].dtype} {f[name].shape}, expected {dtype} ({n},).")
    for name, dtype in EPISODE_SCHEMA.items():
        if name not in f:
            raise _fail(path, f"lacks {name!r}: the writer did not finish.")
        if f[name].dtype != dtype or f[name].ndim != 1:
            raise _fail(path, f"{name!r} is {f[name].dtype} {f[name].shape}, expected {dtype} (E,).")
    starts = f["episode_starts"][:]
    if len(starts) != len(f["episode_returns"]):
        raise _fail(path, "episode_starts and episode_returns differ in length.")
    if len(starts) and (starts[0] != 0 or np.any(np.diff(starts) <= 0) or starts[-1] >= n):
        raise _fail(path, "episode_starts is not an increasing index starting at 0 inside the file.")
    try:
        games.canonical_name(str(f.attrs["game"]))
    except games.UnknownGameError as e:
        raise _fail(path, str(e)) from None


def dataset_info(path: str | os.PathLike) -> DatasetInfo:
    path = Path(path)
    with open_dataset(path) as f:
        attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
        return DatasetInfo(
            path=path,
            game=str(f.attrs["game"]),
            task_id=int(f.attrs["task_id"]),
            source=str(f.attrs["source"]),
            num_transitions=int(f["actions"].shape[0]),
            num_episodes=int(f["episode_starts"].shape[0]),
            attrs=attrs,
        )


def bounds_from_starts(starts: np.ndarray, n: int) -> np.ndarray:
    """(E, 2) int64 [start, stop) of every episode of ``n`` transitions from its ``episode_starts``."""
    starts = np.asarray(starts, np.int64)
    stops = np.append(starts[1:], n) if len(starts) else starts
    return np.stack([starts, stops], axis=1)


def life_starts(lives: np.ndarray | None, starts: np.ndarray, n: int) -> np.ndarray:
    """(N,) bool: the first step of every life, that is each episode's first step and, with ``lives``, each
    step whose lives counter fell below the previous step's within the episode. These are the rare frames
    where, in games such as Breakout, the agent must act (FIRE) before play resumes."""
    out = np.zeros(n, bool)
    out[np.asarray(starts, np.int64)] = True
    if lives is not None:
        lv = np.asarray(lives, np.int64)
        out[1:] |= lv[1:] < lv[:-1]
    return out


def episode_bounds(f: h5py.File) -> np.ndarray:
    """(E, 2) int64 [start, stop) of every episode."""
    return bounds_from_starts(f["episode_starts"][:], f["actions"].shape[0])


def read_episode(f: h5py.File, index: int) -> dict[str, np.ndarray]:
    start, stop = episode_bounds(f)[index]
    return {name: f[name][start:stop] for name in (*SCHEMA, *OPTIONAL_SCHEMA) if name in f}


def dataset_path(root: str | os.PathLike, game: str) -> Path:
    return Path(root) / f"{games.canonical_name(game)}.h5"
