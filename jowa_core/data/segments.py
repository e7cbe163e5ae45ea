"""Segment sampling for training: fixed-length windows inside one episode, right-padded.

The official convention (spec 3.1/3.2, ``<Game>_right_padding.csv``): in an episode of T steps the
segments start at 0, stride, 2*stride, ... < T and end at start + L, which may pass T; the missing steps
are padding (zero frame or tokens, action 0, reward 0, end 0, ``mask_padding`` False). Padding only
ever follows real steps, so under causal attention it cannot change a real step's outputs. Stride 4 for
pretraining, 1 for fine-tuning.

``SegmentSource`` gathers batches of segments from one game with vectorised fancy indexing (no per-step
Python loop); ``SegmentSampler`` mixes games and is a torch ``IterableDataset`` for ``DataLoader``.
Files are opened lazily in the process that reads them, so sources survive fork and spawn workers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from jowa_core import games
from jowa_core.config import FRAME_SIZE, OBS_TOKENS
from jowa_core.data.format import DatasetError, bounds_from_starts, life_starts, open_dataset

_CHUNK_CACHE_BYTES = 64 << 20  # h5py's default 1 MiB holds less than one 256-frame chunk
_COLUMNS = ("actions", "rewards", "terminals", "truncations")


def segment_index(episode_bounds: np.ndarray, length: int = 8, stride: int = 4) -> np.ndarray:
    """All right-padded segments of every episode.

    Args:
        episode_bounds: (E, 2) int [start, stop) of each episode (only the lengths matter).
        length: steps per segment (L).
        stride: distance between segment starts (tau).

    Returns:
        (S, 3) int64 rows [episode, start, stop) in episode-local steps; ``stop = start + length`` may
        exceed the episode's length T; starts are 0, stride, ... < T.
    """
    if length < 1 or stride < 1:
        raise ValueError(f"segment length ({length}) and stride ({stride}) must be >= 1.")
    bounds = np.asarray(episode_bounds, dtype=np.int64).reshape(-1, 2)
    t = bounds[:, 1] - bounds[:, 0]
    if (t < 1).any():
        raise ValueError(f"episode {int(np.argmax(t < 1))} is empty; every episode needs at least one step.")
    per_ep = -(-t // stride)  # ceil(T / stride) starts per episode
    episode = np.repeat(np.arange(len(t)), per_ep)
    first = np.repeat(np.cumsum(per_ep) - per_ep, per_ep)  # row of each episode's first segment
    start = (np.arange(len(episode)) - first) * stride
    return np.stack([episode, start, start + length], axis=1).astype(np.int64)


def _read_ranges(ds: h5py.Dataset, first: np.ndarray, count: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``ds[rows]`` for rows lying in the ranges [first, first + count), read as merged contiguous slices.

    h5py's point selection (``ds[index_array]``) was 4x slower than one slice per segment on a
    gzip-chunked frame file in a measurement, so overlapping or adjacent ranges are merged and each
    merged range is read once; the loop is over ranges (at most one per segment), never over steps.
    """
    order = np.argsort(first, kind="stable")
    lo, hi = first[order], first[order] + count[order]
    run_hi = np.maximum.accumulate(hi)
    new = np.r_[True, lo[1:] > run_hi[:-1]]  # a gap before this range starts a new block
    block_lo = lo[new]
    block_hi = run_hi[np.r_[np.flatnonzero(new)[1:] - 1, len(lo) - 1]]
    buf = np.concatenate([ds[a:b] for a, b in zip(block_lo.tolist(), block_hi.tolist())])
    offset = np.r_[0, np.cumsum(block_hi - block_lo)[:-1]]
    k = np.searchsorted(block_lo, rows, side="right") - 1
    return buf[offset[k] + rows - block_lo[k]]


def returns_to_go(rewards: np.ndarray, bounds: np.ndarray, gamma: float, *, clip: bool = True) -> np.ndarray:
    """Discounted return-to-go (float64) of every step inside its episode (``bounds`` (E, 2) row ranges),
    rewards clamped to [-1, 1] as training clamps them when ``clip``. What the behaviour policy collected
    from (s_t, a_t) on: a Monte Carlo sample of Q_behaviour, which the critic's MC anchor
    (``TrainConfig.mc_anchor``) and ``diagnostics`` use. A truncated episode's last steps see only the
    rewards the file holds."""
    r = np.asarray(rewards, np.float64)
    if clip:
        r = np.clip(r, -1.0, 1.0)
    g = np.zeros_like(r)
    ends, lengths = bounds[:, 1], bounds[:, 1] - bounds[:, 0]
    acc = np.zeros(len(bounds))
    for k in range(int(lengths.max(initial=0))):  # all episodes at once, k steps before their ends
        live = lengths > k
        idx = ends[live] - 1 - k
        acc[live] = r[idx] + gamma * acc[live]
        g[idx] = acc[live]
    return g


class SegmentSource:
    """Segments of one game: frames or tokens plus actions, rewards, ends, from HDF5 or memory.

    Build with ``SegmentSource(dataset_path)`` (frames from our dataset file),
    ``SegmentSource(dataset_path, tokens_path=...)`` (tokens from a token cache with a ``tokens``
    (N, 36) dataset in the same transition order; everything else from the dataset),
    ``SegmentSource(None, tokens_path=...)`` (a self-sufficient token cache that also holds
    ``actions``, ``rewards``, ``terminals``, ``truncations``, ``episode_starts`` and a ``game``
    attribute, as ``data.token_cache`` writes), or ``SegmentSource.from_arrays(...)``. ``__init__`` only
    reads the episode index and closes the files; the columns are read on the first ``fetch`` in each
    process.

    Args:
        dataset_path: our per-game dataset file (``data.format``), or None with a self-sufficient cache.
        tokens_path: optional token cache for the same file.
        segment_length: L (8).
        stride: distance between segment starts (4; fine-tuning uses 1).
        in_memory: load the observation or token array into memory on first use; default True for
            tokens (small), False for frames (read from the file per batch).
        task_id: task-embedding row; default ``games.task_id(game, alias_held_out=alias_held_out)``.
        alias_held_out: the official training aliases held-out games to a pretraining row (spec 3.2).
    """

    def __init__(
        self,
        dataset_path: str | os.PathLike | None,
        tokens_path: str | os.PathLike | None = None,
        *,
        segment_length: int = 8,
        stride: int = 4,
        in_memory: bool | None = None,
        task_id: int | None = None,
        alias_held_out: bool = False,
        returns_gamma: float | None = None,
    ):
        self.dataset_path = Path(dataset_path) if dataset_path is not None else None
        self.tokens_path = Path(tokens_path) if tokens_path is not None else None
        self._arrays: dict[str, np.ndarray] | None = None
        if self.dataset_path is None and self.tokens_path is None:
            raise ValueError("SegmentSource needs a dataset_path or tokens_path (or use SegmentSource.from_arrays).")
        if self.dataset_path is not None:
            with open_dataset(self.dataset_path) as f:
                game, starts, n = str(f.attrs["game"]), f["episode_starts"][:], int(f["actions"].shape[0])
                lives = f["lives"][:] if "lives" in f else None
        else:
            game, starts, n, lives = self._read_cache_index()
        if self.tokens_path is not None:
            self._check_token_cache(n)
        kind = "tokens" if self.tokens_path is not None else "frames"
        in_memory = (kind == "tokens") if in_memory is None else bool(in_memory)
        self._setup(game, kind, starts, n, segment_length, stride, in_memory, task_id, alias_held_out, returns_gamma)
        self._index_life_starts(lives)

    def _setup(
        self,
        game: str,
        kind: str,
        starts: np.ndarray,
        n: int,
        segment_length: int,
        stride: int,
        in_memory: bool,
        task_id: int | None,
        alias_held_out: bool,
        returns_gamma: float | None = None,
    ) -> None:
        if len(starts) == 0:
            raise DatasetError(f"{self.dataset_path or self.tokens_path or 'the arrays'} hold no episodes to sample.")
        self.game = games.canonical_name(game)
        self.kind = kind
        self.in_memory = in_memory
        self.segment_length = int(segment_length)
        self.stride = int(stride)
        self.task_id = int(task_id) if task_id is not None else games.task_id(self.game, alias_held_out=alias_held_out)
        self.num_transitions = int(n)
        self.bounds = bounds_from_starts(starts, n)
        self._ep_start = self.bounds[:, 0]
        self._ep_len = self.bounds[:, 1] - self.bounds[:, 0]
        self.segments = segment_index(self.bounds, self.segment_length, self.stride)
        self._steps = np.arange(self.segment_length)
        if returns_gamma is not None and not 0.0 < returns_gamma <= 1.0:
            raise ValueError(f"returns_gamma must be in (0, 1], got {returns_gamma}.")
        self.returns_gamma = returns_gamma
        self.life_start_segments: np.ndarray | None = None  # set by _index_life_starts when lives are known
        self.life_ends: np.ndarray | None = None  # (N,) bool, idem: the last step of a life that is not the episode's
        self._cols: dict[str, Any] | None = None  # per-process state, built on first fetch
        self._files: list[h5py.File] = []
        self._pid = -1

    @classmethod
    def from_arrays(
        cls,
        game: str,
        actions: np.ndarray,
        rewards: np.ndarray,
        terminals: np.ndarray,
        episode_starts: np.ndarray,
        *,
        observations: np.ndarray | None = None,
        tokens: np.ndarray | None = None,
        truncations: np.ndarray | None = None,
        lives: np.ndarray | None = None,
        segment_length: int = 8,
        stride: int = 4,
        task_id: int | None = None,
        alias_held_out: bool = False,
        returns_gamma: float | None = None,
    ) -> SegmentSource:
        """A source over in-memory arrays (transition-major, as in the dataset file); give frames or tokens."""
        if (observations is None) == (tokens is None):
            raise ValueError("give exactly one of observations (N, 84, 84) uint8 or tokens (N, 36).")
        n = len(actions)
        arrays = {
            "actions": np.asarray(actions),
            "rewards": np.asarray(rewards, np.float32),
            "terminals": np.asarray(terminals, bool),
            "truncations": np.zeros(n, bool) if truncations is None else np.asarray(truncations, bool),
            "episode_starts": np.asarray(episode_starts, np.int64),
        }
        if observations is not None:
            arrays["observations"] = obs = np.asarray(observations)
            if obs.dtype != np.uint8 or obs.shape[1:] != (FRAME_SIZE, FRAME_SIZE):
                raise ValueError(f"observations must be uint8 (N, 84, 84); got {obs.dtype} {obs.shape}.")
        else:
            arrays["tokens"] = tok = np.asarray(tokens)
            if tok.dtype.kind not in "ui" or tok.shape[1:] != (OBS_TOKENS,):
                raise ValueError(f"tokens must be integers (N, {OBS_TOKENS}); got {tok.dtype} {tok.shape}.")
        for k, v in arrays.items():
            if k != "episode_starts" and len(v) != n:
                raise ValueError(f"{k} has {len(v)} rows but actions has {n}.")
        s = arrays["episode_starts"]
        if n == 0 or len(s) == 0 or s[0] != 0 or (np.diff(s) <= 0).any() or s[-1] >= n:
            raise ValueError("episode_starts must increase strictly from 0 and stay below the number of transitions.")
        self = cls.__new__(cls)
        self.dataset_path = self.tokens_path = None
        self._arrays = arrays
        kind = "frames" if observations is not None else "tokens"
        self._setup(game, kind, s, n, segment_length, stride, True, task_id, alias_held_out, returns_gamma)
        if lives is not None and len(lives) != n:
            raise ValueError(f"lives has {len(lives)} rows but actions has {n}.")
        self._index_life_starts(lives)
        return self

    def _index_life_starts(self, lives: np.ndarray | None) -> None:
        """``life_start_segments``: the rows of ``segments`` whose real steps include the first step of a
        life (``format.life_starts``), and ``life_ends``: the steps after which a life is lost and the episode
        goes on; both None when the data has no lives counter (only episode starts known)."""
        if lives is None:
            return
        starts = life_starts(lives, self.bounds[:, 0], self.num_transitions)
        self.life_ends = np.zeros(self.num_transitions, bool)
        self.life_ends[:-1] = starts[1:]
        self.life_ends[self.bounds[1:, 0] - 1] = False  # the step before an episode start ends the episode
        first = np.r_[0, np.cumsum(starts)]
        ep, start, stop = self.segments.T
        lo = self._ep_start[ep] + start
        hi = self._ep_start[ep] + np.minimum(stop, self._ep_len[ep])
        self.life_start_segments = np.flatnonzero(first[hi] > first[lo])

    def _read_cache_index(self) -> tuple[str, np.ndarray, int, np.ndarray | None]:
        """Game, episode starts and length from a token cache that carries the dataset's columns."""
        try:
            with h5py.File(self.tokens_path, "r") as f:
                missing = [k for k in _COLUMNS + ("episode_starts",) if k not in f] + (
                    ["game"] if "game" not in f.attrs else []
                )
                if missing:
                    raise DatasetError(
                        f"Token cache {self.tokens_path} lacks {missing}, so it cannot be used alone; pass the dataset "
                        f"file too: SegmentSource(dataset_path, tokens_path)."
                    )
                lives = f["lives"][:] if "lives" in f else None
                return str(f.attrs["game"]), f["episode_starts"][:].astype(np.int64), int(f["actions"].shape[0]), lives
        except OSError as e:
            raise DatasetError(f"Token cache {self.tokens_path} cannot be opened ({e}); rebuild it.") from None

    def _check_token_cache(self, n: int) -> None:
        try:
            with h5py.File(self.tokens_path, "r") as f:
                if "tokens" not in f:
                    raise DatasetError(
                        f"Token cache {self.tokens_path} has no 'tokens' dataset; rebuild the token cache."
                    )
                ds = f["tokens"]
                if ds.dtype.kind not in "ui" or ds.shape != (n, OBS_TOKENS):
                    raise DatasetError(
                        f"Token cache {self.tokens_path} holds tokens {ds.dtype} {ds.shape}, but {self.dataset_path} "
                        f"has {n} transitions (expected ({n}, {OBS_TOKENS}) integers). Rebuild the token cache."
                    )
        except OSError as e:
            raise DatasetError(f"Token cache {self.tokens_path} cannot be opened ({e}); rebuild it.") from None

    # -------------------------------------------------------------------------- per-process state

    def _open(self) -> dict[str, Any]:
        """Load the small columns and open (or load) the observations in this process."""
        if self._cols is not None and self._pid == os.getpid():
            return self._cols
        self._files = []  # handles inherited through fork are not ours to use or close
        if self._arrays is not None:
            cols = dict(self._arrays)
            cols["obs"] = cols.pop("tokens" if self.kind == "tokens" else "observations")
        else:
            try:
                cols = self._open_files()
            except OSError as e:
                self.close()
                raise DatasetError(
                    f"{self!r} cannot read its files any more ({e}); were they moved or rewritten?"
                ) from None
        if self.returns_gamma is not None:
            cols["returns_to_go"] = returns_to_go(cols["rewards"], self.bounds, self.returns_gamma).astype(np.float32)
        self._cols, self._pid = cols, os.getpid()
        return cols

    def _open_files(self) -> dict[str, Any]:
        f = h5py.File(self.dataset_path or self.tokens_path, "r", rdcc_nbytes=_CHUNK_CACHE_BYTES)
        self._files.append(f)
        cols = {k: f[k][:] for k in _COLUMNS}
        if self.kind == "tokens":
            if self.dataset_path is not None:
                f = h5py.File(self.tokens_path, "r", rdcc_nbytes=_CHUNK_CACHE_BYTES)
                self._files.append(f)
            ds = f["tokens"]
        else:
            ds = f["observations"]
        cols["obs"] = ds[:] if self.in_memory else ds
        return cols

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files, self._cols, self._pid = [], None, -1

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_cols=None, _files=[], _pid=-1)  # reopened lazily in the receiving process
        return state

    # ---------------------------------------------------------------------------------- fetching

    @property
    def num_segments(self) -> int:
        return len(self.segments)

    @property
    def obs_key(self) -> str:
        return "tokens" if self.kind == "tokens" else "obs"

    def fetch(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Gather the segments ``rows`` (indices into ``self.segments``) as a batch of numpy arrays.

        Returns:
            ``obs`` (B, L, 84, 84) uint8 or ``tokens`` (B, L, 36) int64, ``actions`` (B, L) int64,
            ``rewards`` (B, L) float32, ``ends`` (B, L) bool (terminal), ``truncated`` (B, L) bool,
            ``mask_padding`` (B, L) bool (True on real steps), ``life_ends`` (B, L) bool (the step lost a life and
            the episode goes on; all False without a lives counter), ``task_id`` (B,) int64, and with
            ``returns_gamma`` ``returns_to_go`` (B, L) float32 (``returns_to_go``; 0 on padding).
        """
        cols = self._open()
        seg = self.segments[np.asarray(rows, dtype=np.int64)]
        ep, start = seg[:, 0], seg[:, 1]
        length = self._ep_len[ep][:, None]
        step = start[:, None] + self._steps  # (B, L) episode-local step
        mask = step < length
        flat = self._ep_start[ep][:, None] + np.minimum(step, length - 1)  # (B, L), always inside the episode
        out = {
            "actions": np.where(mask, cols["actions"][flat], 0).astype(np.int64),
            "rewards": np.where(mask, cols["rewards"][flat], 0).astype(np.float32),
            "ends": cols["terminals"][flat] & mask,
            "truncated": cols["truncations"][flat] & mask,
            "mask_padding": mask,
            "life_ends": (self.life_ends[flat] & mask) if self.life_ends is not None else np.zeros_like(mask),
            "task_id": np.full(len(seg), self.task_id, np.int64),
        }
        if "returns_to_go" in cols:
            out["returns_to_go"] = np.where(mask, cols["returns_to_go"][flat], 0).astype(np.float32)
        obs = cols["obs"]
        if isinstance(obs, np.ndarray):
            x = obs[flat]
            x[~mask] = 0
        else:
            x = np.zeros(flat.shape + obs.shape[1:], obs.dtype)
            x[mask] = _read_ranges(obs, flat[:, 0], mask.sum(axis=1), flat[mask])
        out[self.obs_key] = x.astype(np.int64) if self.kind == "tokens" else x
        return out

    def __repr__(self) -> str:
        where = "memory" if self._arrays is not None else str(self.tokens_path or self.dataset_path)
        return (
            f"SegmentSource({self.game}, {self.kind} from {where}, {len(self.bounds)} episodes, "
            f"{self.num_segments} segments of {self.segment_length}, stride {self.stride}, task {self.task_id})"
        )


def require_lives(sources: Sequence[SegmentSource], setting: str, off: str) -> None:
    """Refuse ``setting`` (e.g. ``life_start_share=0.3``) unless every source knows its lives counter."""
    lacking = [repr(s) for s in sources if s.life_ends is None]
    if lacking:
        raise DatasetError(
            f"{setting} needs each game's lives counter, but {', '.join(lacking)} has none (files collected before "
            "lives were recorded, or DQN-Replay imports). Recollect the data with `jowa collect` and rebuild the "
            f"token cache, or set {off}."
        )


class SegmentSampler(IterableDataset):
    """An endless, reproducible stream of batches over several games (torch ``IterableDataset``).

    Games are drawn equally often by default (``weights`` to change that) with systematic sampling, so
    each game's share of a batch is within one of ``batch_size * weight``; segments are drawn uniformly
    (with replacement) within a game. Batch ``i`` is a pure function of ``(seed, rank, i)``: ranks get
    independent streams and DataLoader worker ``w`` of ``W`` produces batches ``w, w + W, ...``, so the
    workers' streams are disjoint and the batches reach the trainer in the same order whatever
    ``num_workers`` is. ``state_dict`` stores the next batch index, so a resumed run continues the
    stream. (The official loader shuffles segments without replacement per epoch with a
    ``DistributedSampler``; a uniform stream has no epochs to track across games of different sizes.)

    Use with ``DataLoader(sampler, batch_size=None, num_workers=k)``. With workers, the main process
    does not see their progress: call ``mark_consumed(batch)`` after each step before ``state_dict()``.

    Args:
        sources: one ``SegmentSource`` per game, all frames or all tokens, with one segment length.
        batch_size: segments per batch on this rank.
        seed: stream seed.
        rank, world_size: this process's DDP rank and the number of ranks.
        weights: relative game frequencies (default equal).
        num_batches: stop after batch index ``num_batches - 1`` (default: never stop).
        life_start_share: ours (0 in the paper's recipe): the expected share of each game's rows drawn
            from its segments that hold the first step of a life (``SegmentSource.life_start_segments``),
            the rest uniformly. Those frames decide, for example, Breakout's FIRE, and are too rare (about
            1 % of steps) for a short run to learn from when drawn uniformly. Needs the ``lives`` column.
    """

    def __init__(
        self,
        sources: Sequence[SegmentSource],
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        *,
        weights: Sequence[float] | None = None,
        num_batches: int | None = None,
        life_start_share: float = 0.0,
    ):
        super().__init__()
        self.sources = list(sources)
        if not 0.0 <= life_start_share <= 1.0:
            raise ValueError(f"life_start_share must be in [0, 1], got {life_start_share}.")
        if life_start_share > 0:
            require_lives(self.sources, f"life_start_share={life_start_share}", "life_start_share to 0")
        self.life_start_share = float(life_start_share)
        if not self.sources:
            raise ValueError("SegmentSampler needs at least one SegmentSource.")
        if len({s.kind for s in self.sources}) != 1 or len({s.segment_length for s in self.sources}) != 1:
            raise ValueError(
                "all sources must give the same kind (frames or tokens) and segment length; got "
                + ", ".join(f"{s.game}: {s.kind} L={s.segment_length}" for s in self.sources)
            )
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1.")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size}).")
        w = np.ones(len(self.sources)) if weights is None else np.asarray(weights, dtype=np.float64)
        if w.shape != (len(self.sources),) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights must be {len(self.sources)} non-negative numbers, not all zero; got {weights}.")
        self.batch_size, self.seed, self.rank, self.world_size = int(batch_size), int(seed), int(rank), int(world_size)
        self.weights = w / w.sum()
        self._cum = np.cumsum(self.weights)
        self.num_batches = num_batches
        self._next = 0

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        """Batch number ``index`` of this rank's stream (deterministic)."""
        rng = np.random.default_rng([self.seed, self.rank, int(index)])
        b = self.batch_size
        points = (rng.random() + np.arange(b)) / b  # systematic sampling: balanced game counts
        game = np.minimum(np.searchsorted(self._cum, points, side="right"), len(self.sources) - 1)
        counts = np.bincount(game, minlength=len(self.sources))
        parts = [src.fetch(self._rows(src, c, rng)) for src, c in zip(self.sources, counts) if c > 0]
        order = rng.permutation(b)
        out = {k: torch.from_numpy(np.concatenate([p[k] for p in parts])[order]) for k in parts[0]}
        out["batch_index"] = torch.tensor(int(index))
        return out

    def _rows(self, src: SegmentSource, count: int, rng: np.random.Generator) -> np.ndarray:
        """``count`` segment rows of ``src``: uniform, or a Binomial(count, share) part from its life starts."""
        if self.life_start_share == 0:  # otherwise __init__ checked that every source knows its life starts
            return rng.integers(0, src.num_segments, count)  # the paper's stream, draw for draw
        k = rng.binomial(count, self.life_start_share)
        focus = src.life_start_segments[rng.integers(0, len(src.life_start_segments), k)]
        return np.concatenate([rng.integers(0, src.num_segments, count - k), focus])

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        stop = self.num_batches if self.num_batches is not None else None
        i = self._next + worker
        while stop is None or i < stop:
            if info is None:
                self._next = i + 1
            yield self.batch(i)
            i += workers

    def mark_consumed(self, batch: dict[str, torch.Tensor]) -> None:
        """Record that ``batch`` was used (needed with DataLoader workers, harmless without)."""
        self._next = int(batch["batch_index"]) + 1

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "rank": self.rank, "world_size": self.world_size, "next_batch": self._next}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue a saved stream; seed, rank and world size must match the saved ones."""
        for key in ("seed", "rank", "world_size"):
            if int(state[key]) != getattr(self, key):
                raise ValueError(
                    f"sampler state was saved with {key}={state[key]} but this sampler has {key}={getattr(self, key)}; "
                    f"resume with the same {key} to continue the same stream."
                )
        self._next = int(state["next_batch"])
