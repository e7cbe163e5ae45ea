"""Fine-tuning on a held-out game from few transitions, with optional imagination (paper 5.3, spec 9).

``finetune`` starts from a pretrained world-action model (one of our runs or the official release),
draws ``transitions`` transitions of the new game, and trains the stage-2 joint loss
(C51 TD + 0.1 CQL + 0.5 x world loss) from step 0, evaluating periodically and keeping the best
snapshot (the paper reports the best one). ``scratch=True`` trains the same model config from a
random initialisation on the same draw: the baseline.

The transition draw (``draw_transitions``). The paper draws "5k transitions uniformly" from the last
20% of DQN-Replay; the official data are about 4 whole episodes. A world model learns from 8-step
segments and the TD loss needs consecutive steps, so single transitions drawn one at a time (runs
of length 1) would teach almost nothing. We therefore draw whole *blocks* of ``block_length``
consecutive transitions (default 8, one segment): the slice is cut into blocks, each episode's part
from its first step (its last block may be shorter), the blocks are shuffled uniformly with the seed
and taken in that order until ``transitions`` are reached; the last block taken is cut to fit. Every
block is equally likely, so every transition of the slice is (up to the rare short blocks) equally
likely to be drawn, and exactly ``transitions`` are. Drawn blocks that touch within an episode merge
into one *run*. Training segments are the stride-1 right-padded 8-step windows of each run, exactly
as the official fine-tuning builds them over episodes: a run plays the role of an episode, so no
segment reads a transition that was not drawn. The last step of a run that is not an episode end
gives no TD term (its next observation was not drawn); ``block_length=1`` is the literal
"uniform transitions" reading (then only terminal steps give TD terms).

Dataset slices (``data_slice``), as fractions of the file's transitions in file order; in an imported
DQN-Replay file the order follows the DQN agent's training, so later means better play:

- ``"all"``: the whole file;
- ``"expert"``: the last 20% (the paper's fine-tuning data);
- ``"suboptimal"``: the first 20% (Kumar et al. 2023's sub-optimal split of DQN-Replay);
- ``"highly_suboptimal"``: the first 5% (ours: the earliest, most random play);
- or ``(lo, hi)`` fractions. For collected files (``data.collect``) the order is the order in which
  episodes ended, so use ``"all"`` there.

Decisions where the official code has a quirk (spec 9 and 11), by design:

- Task id (Q10): training uses ``games.task_id(game, alias_held_out=True)`` as the official code does
  (held-out games reuse a similar pretraining game's row: Robotank->Phoenix, ...; Pong and every
  non-held-out game keep their own). The official evaluation then acts with the *unaliased* row, which
  the fine-tuning never trained; we evaluate with the row we trained (``official_eval_task_id=True``
  reproduces the quirk). The scratch baseline uses the same rows.
- Legal actions (Q9): the TD target's argmax runs over the fine-tuned game's own legal actions
  (official: the aliased game's; ``official_legal_mask=True``).
- Tokenizer: frozen, tokens come from the token cache, as the paper says (the official script also
  trains the tokenizer, spec 9 [paper != code]). The scratch baseline shares the same tokenizer, so
  the comparison isolates the world-action pretraining.
- Imagination (spec 9 with Q11/Q12 fixed): from ``imagination_start`` on, every
  ``imagination_every``-th step (official: every step) draws
  ``imagination_batch`` windows of g = L - H real steps (L = 8 segment steps, H = ``horizon``) that lie
  inside one run and do not end the episode (official: 8-step segments whose last 6 steps are real,
  terminal ones included), runs ``planning.beam_search`` (width ``beam_width``, horizon H, argmax
  decoding, legal actions only) from the g steps minus the last action, and builds an L-step segment
  along the best path: obs = the g real observations + the H imagined ones; actions = the first g-1
  real actions, the H planned ones and a dummy repeat of the last; rewards likewise with the predicted
  signs (the real prefix is aligned correctly, Q11: official shifts it by one). Imagined observations
  stay tokens (no decode/re-encode, so Q12's missing /255 cannot happen). Ends are 0 and every step is
  real (official). Segments go to a FIFO buffer of ``buffer_factor`` x #segments; each training batch
  then holds ``imagined_fraction`` imagined rows and the rest real; the world losses use real rows
  only, TD and CQL all rows. The model plans in eval mode (no dropout).
- Evaluation: greedy (official in-training evaluation), ``eval_episodes`` episodes capped at
  ``eval_max_steps`` agent steps (official: 16 envs and a 180 s wall-clock cap, which is not
  reproducible); by default every epoch (#segments / batch_size steps, official) and at the end. The
  best snapshot is the one with the strictly highest mean return (the official keeps every snapshot
  within 0.8 x the best); ties keep the earlier one.
- One process (CPU or one GPU): fine-tuning batches are small (32). bf16 autocast on CUDA. During an
  evaluation torch gets the cores the envs' worker threads leave (``runtime.configure_threads``).

Run directory::

    <run_dir>/checkpoints/step_<step>/   resumable checkpoints (``checkpoints.save`` format)
    <run_dir>/best/checkpoints/step_<s>/ the best snapshot (weights only)
    <run_dir>/tokenizer/                 the (frozen) tokenizer, so the run is self-contained
    <run_dir>/metrics.jsonl              losses every ``log_every`` steps (``training.read_metrics``)
    <run_dir>/evals.jsonl                one line per evaluation: step, score, returns
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from jowa_core import checkpoints, games
from jowa_core.config import OBS_TOKENS, PRESETS, Preset, TrainConfig
from jowa_core.data.segments import SegmentSampler, SegmentSource
from jowa_core.data.token_cache import (
    TokenCacheError,
    build_token_cache,
    open_token_cache,
    read_token_cache,
    token_cache_path,
)
from jowa_core.losses import LossTerms, joint_loss
from jowa_core.models.world_action import WorldActionModel
from jowa_core.planning import beam_search
from jowa_core.runtime import available_cores, configure_threads, resolve_device, run_pair, truncate_jsonl
from jowa_core.training import (
    METRICS_FILE,
    Batch,
    clip_and_step,
    log_record,
    param_groups,
    read_metrics,
    rng_state,
    set_rng_state,
    set_stage,
)

__all__ = [
    "DATA_SLICES",
    "EVALS_FILE",
    "FinetuneConfig",
    "FinetuneResult",
    "ImaginationBuffer",
    "TransitionDraw",
    "draw_transitions",
    "finetune",
    "finetune_curves",
    "finetune_scores",
    "greedy_evaluator",
    "imagine_segments",
    "load_finetuned",
    "load_pretrained",
    "notebook_config",
    "read_evals",
    "resolve_token_cache",
    "slice_bounds",
]

EVALS_FILE = "evals.jsonl"
BEST_DIR = "best"
TOKENIZER_DIR = "tokenizer"
DATA_SLICES: dict[str, tuple[float, float]] = {
    "all": (0.0, 1.0),
    "expert": (0.8, 1.0),
    "suboptimal": (0.0, 0.2),
    "highly_suboptimal": (0.0, 0.05),
}
_IMAGINATION_SEED = 10_000  # official: the imagination sampler's seed is the run's + 10000
_BUFFER_SEED = 20_000

Evaluator = Callable[[WorldActionModel, int], Sequence[float]]
"""``(model, step) -> episode returns``; the model is in eval mode during the call."""


# ---------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning settings. Defaults are the official ``finetune_150M.yaml`` where it has one."""

    transitions: int = 5000
    """Transitions drawn from the slice (paper: 5k)."""
    data_slice: str | tuple[float, float] = "all"
    """"all", "expert" (last 20%), "suboptimal" (first 20%), "highly_suboptimal" (first 5%) or
    (lo, hi) fractions of the file (module docstring)."""
    block_length: int = 8
    """Consecutive transitions per drawn block (module docstring); 1 = single transitions."""
    steps: int = 50_000
    """Optimizer steps (official 50k)."""
    batch_size: int = 32
    """Segments per step (official 32)."""
    lr: float = 5e-5
    """AdamW learning rate of the world part and the critic (official 5e-5), weight decay 0.01."""
    supervised_weight: float = 0.5
    """lambda, the world-loss weight (official 0.5 in fine-tuning)."""
    target_update_every: int = 1000
    """Hard copy of the online Q head into the target head every this many steps."""
    imagination: bool = False
    """Add imagined segments from beam search in the model (spec 9)."""
    imagination_start: int = 20_000
    """First step (0-based) that uses imagination (official: after 20k steps)."""
    imagination_batch: int = 32
    """Real windows imagined from per imagination step (official: a second real batch of 32)."""
    imagination_every: int = 1
    """Imagine every this many steps (official 1; more saves planner time on CPU; the buffer is
    sampled at every step either way)."""
    imagined_fraction: float = 0.5
    """Share of each training batch taken from the imagination buffer once it is on (official 16/32)."""
    beam_width: int = 2
    horizon: int = 2
    """Beam search settings of imagination (official: width 2, horizon 2)."""
    buffer_factor: int = 10
    """FIFO capacity of the imagination buffer, in multiples of the number of real segments (official 10)."""
    eval_every: int = 0
    """Evaluate every this many steps; 0 = once per epoch (#segments / batch_size, official)."""
    eval_episodes: int = 8
    eval_max_steps: int = 10_000
    """Episodes per evaluation and their cap in agent steps."""
    eval_history: int = 8
    """Steps of context of the greedy evaluation agent (official buffer 8)."""
    seed: int = 0
    """Seeds the draw, the initialisation (scratch), the sampling streams and dropout."""
    log_every: int = 200
    save_every: int = 1000
    keep_last: int = 2
    """Resumable checkpoints kept."""
    scratch: bool = False
    """Random initialisation with the pretrained model's config: the scratch baseline."""
    official_eval_task_id: bool = False
    """Evaluate with the unaliased task id as the official code does (quirk Q10)."""
    official_legal_mask: bool = False
    """TD argmax over the aliased game's legal actions as the official code does (quirk Q9)."""
    clip_rewards: bool = True
    """Clip rewards to [-1, 1] for the TD target (DQN-Replay convention)."""

    def __post_init__(self) -> None:
        if isinstance(self.data_slice, list):
            object.__setattr__(self, "data_slice", tuple(self.data_slice))
        slice_fractions(self.data_slice)  # validates
        checks = [
            (self.transitions >= 1, f"transitions must be >= 1, got {self.transitions}."),
            (self.block_length >= 1, f"block_length must be >= 1, got {self.block_length}."),
            (self.steps >= 0, f"steps must be >= 0, got {self.steps}."),
            (self.batch_size >= 2, f"batch_size must be >= 2, got {self.batch_size}."),
            (self.lr > 0 and self.supervised_weight >= 0, "need lr > 0 and supervised_weight >= 0."),
            (self.target_update_every >= 1, "target_update_every must be >= 1."),
            (self.imagination_start >= 0 and self.imagination_batch >= 1 and self.imagination_every >= 1,
             "need imagination_start >= 0, imagination_batch >= 1 and imagination_every >= 1."),
            (0.0 < self.imagined_fraction < 1.0, f"imagined_fraction must be in (0, 1), got {self.imagined_fraction}."),
            (self.beam_width >= 1 and self.horizon >= 1, "imagination needs beam_width >= 1 and horizon >= 1."),
            (self.buffer_factor >= 1, "buffer_factor must be >= 1."),
            (self.eval_every >= 0 and self.eval_episodes >= 1 and self.eval_max_steps >= 1,
             "need eval_every >= 0 (0 = each epoch), eval_episodes >= 1 and eval_max_steps >= 1."),
            (self.eval_history >= 1, "eval_history must be >= 1."),
            (self.log_every >= 1 and self.save_every >= 1 and self.keep_last >= 1,
             "need log_every, save_every and keep_last >= 1."),
        ]  # fmt: skip
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["data_slice"] = list(self.data_slice) if isinstance(self.data_slice, tuple) else self.data_slice
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinetuneConfig:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(
                f"unknown FinetuneConfig field(s) {sorted(unknown)}; see jowa_core.finetune.FinetuneConfig."
            )
        return cls(**d)

    def imagined_rows(self) -> int:
        """Imagined rows per training batch once imagination is on."""
        return min(self.batch_size - 1, max(1, round(self.batch_size * self.imagined_fraction)))


SMOKE = {
    "transitions": 200,
    "steps": 4,
    "batch_size": 4,
    "eval_every": 2,
    "eval_episodes": 1,
    "eval_max_steps": 30,
    "imagination_start": 2,
    "imagination_batch": 4,
    "log_every": 1,
}
"""What ``notebook_config(smoke=True)`` shrinks (at most these values): seconds on a CPU."""


def notebook_config(smoke: bool = False, **fields: Any) -> FinetuneConfig:
    """A ``FinetuneConfig`` from notebook parameters; ``smoke`` caps the sizes by ``SMOKE`` (tests)."""
    cfg = FinetuneConfig(**_check_overrides(fields))
    if smoke:
        cfg = replace(cfg, **{k: min(getattr(cfg, k) or v, v) for k, v in SMOKE.items()})  # eval_every 0: auto
    return cfg


# Fields whose change makes a run a different experiment (resume refuses them); the others
# (steps, eval and log settings) may change between a run and its resumption.
_EXPERIMENT_FIELDS = ("transitions", "data_slice", "block_length", "batch_size", "lr", "supervised_weight",
                      "target_update_every", "imagination", "imagination_start", "imagination_batch", "imagination_every",
                      "imagined_fraction", "beam_width", "horizon", "buffer_factor", "seed", "scratch",
                      "official_legal_mask", "clip_rewards")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The transition draw


def slice_fractions(data_slice: str | tuple[float, float]) -> tuple[float, float]:
    """(lo, hi) fractions of a named slice or of a (lo, hi) pair, validated."""
    if isinstance(data_slice, str):
        if data_slice not in DATA_SLICES:
            raise ValueError(f"data_slice must be one of {', '.join(DATA_SLICES)} or (lo, hi) fractions; "
                             f"got {data_slice!r}.")  # fmt: skip
        return DATA_SLICES[data_slice]
    lo, hi = (float(x) for x in data_slice)
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"data_slice fractions must satisfy 0 <= lo < hi <= 1; got {data_slice}.")
    return lo, hi


def slice_bounds(num_transitions: int, data_slice: str | tuple[float, float]) -> tuple[int, int]:
    """[start, stop) transition indices of a slice of a file with ``num_transitions`` transitions."""
    lo, hi = slice_fractions(data_slice)
    a = min(math.floor(lo * num_transitions), max(num_transitions - 1, 0))
    return a, min(num_transitions, max(a + 1, math.floor(hi * num_transitions + 1e-9)))  # never empty


@dataclass(frozen=True)
class TransitionDraw:
    """The drawn transitions of one file.

    Attributes:
        indices: (K,) int64 sorted transition indices into the file.
        run_starts: (R,) int64 positions in ``indices`` where a run (maximal block of consecutive
            transitions of one episode) starts; runs play the role of episodes for segments.
        slice: [start, stop) of the slice drawn from.
        num_blocks: blocks drawn.
    """

    indices: np.ndarray
    run_starts: np.ndarray
    slice: tuple[int, int]
    num_blocks: int

    @property
    def run_lengths(self) -> np.ndarray:
        return np.diff(np.append(self.run_starts, len(self.indices)))

    def digest(self) -> str:
        """Short hash of the drawn indices (recorded in the run, checked on resume)."""
        return hashlib.sha256(np.ascontiguousarray(self.indices, dtype=np.int64).tobytes()).hexdigest()[:16]


def draw_transitions(
    episode_starts: np.ndarray,
    num_transitions: int,
    k: int,
    *,
    data_slice: str | tuple[float, float] = "all",
    block_length: int = 8,
    seed: int = 0,
) -> TransitionDraw:
    """Draw ``k`` transitions of a file as shuffled blocks of consecutive steps (module docstring).

    Args:
        episode_starts: (E,) first transition of each episode (the file's ``episode_starts``).
        num_transitions: N, transitions in the file.
        k: transitions to draw (<= the slice's size).
        data_slice: named slice or (lo, hi) fractions.
        block_length: steps per block.
        seed: the draw is a pure function of the arguments and this seed.
    """
    starts = np.asarray(episode_starts, dtype=np.int64).reshape(-1)
    if num_transitions < 1 or len(starts) == 0 or starts[0] != 0 or (np.diff(starts) <= 0).any() \
            or starts[-1] >= num_transitions:  # fmt: skip
        raise ValueError("episode_starts must increase strictly from 0 and stay below num_transitions.")
    if block_length < 1:
        raise ValueError(f"block_length must be >= 1, got {block_length}.")
    a, b = slice_bounds(num_transitions, data_slice)
    if k < 1 or k > b - a:
        raise ValueError(
            f"cannot draw {k} transitions from slice {data_slice!r}, which holds {b - a} (transitions [{a}, {b}) of "
            f"{num_transitions}); ask for fewer transitions or a larger slice (data_slice='all')."
        )
    # Episode parts inside the slice, then blocks of block_length from each part's first step.
    ends = np.append(starts[1:], num_transitions)
    lo, hi = np.maximum(starts, a), np.minimum(ends, b)
    keep = hi > lo
    lo, hi = lo[keep], hi[keep]
    n_blocks = -(-(hi - lo) // block_length)
    part = np.repeat(np.arange(len(lo)), n_blocks)
    first = np.repeat(np.cumsum(n_blocks) - n_blocks, n_blocks)
    b_start = lo[part] + (np.arange(len(part)) - first) * block_length
    b_len = np.minimum(b_start + block_length, hi[part]) - b_start
    order = np.random.default_rng(np.random.SeedSequence([int(seed), 0x6A6F7761])).permutation(len(b_start))
    cum = np.cumsum(b_len[order])
    m = int(np.searchsorted(cum, k)) + 1  # blocks needed to reach k
    chosen = order[:m]
    lens = b_len[chosen].copy()
    lens[-1] -= int(cum[m - 1]) - k  # cut the last block to fit
    idx = np.concatenate([np.arange(s, s + n) for s, n in zip(b_start[chosen].tolist(), lens.tolist())])
    idx.sort()
    episode = np.searchsorted(starts, idx, side="right") - 1
    new_run = np.r_[True, (np.diff(idx) != 1) | (np.diff(episode) != 0)]
    return TransitionDraw(idx.astype(np.int64), np.flatnonzero(new_run).astype(np.int64), (a, b), m)


# ---------------------------------------------------------------------------------------------
# Data of a fine-tuning run


@dataclass
class _FinetuneData:
    """The drawn transitions as in-memory arrays (run-major) and the samplers built on them."""

    game: str
    task_id: int
    draw: TransitionDraw
    tokens: np.ndarray  # (K, 36)
    actions: np.ndarray  # (K,)
    rewards: np.ndarray
    terminals: np.ndarray
    source: SegmentSource
    cache_path: Path

    @property
    def num_segments(self) -> int:
        return self.source.num_segments

    def imagination_windows(self, length: int) -> np.ndarray:
        """Start positions (into the drawn arrays) of every ``length``-step window inside one run
        whose last step does not end the episode (nothing to imagine after a terminal)."""
        out = []
        for s, n in zip(self.draw.run_starts.tolist(), self.draw.run_lengths.tolist()):
            if n >= length:
                out.append(np.arange(s, s + n - length + 1))
        w = np.concatenate(out) if out else np.zeros(0, np.int64)
        return w[~self.terminals[w + length - 1]] if len(w) else w

    def windows(self, starts: np.ndarray, length: int) -> dict[str, torch.Tensor]:
        """Real windows: tokens (B, length, 36) long, actions (B, length) long, rewards (B, length)."""
        idx = starts[:, None] + np.arange(length)
        return {
            "tokens": torch.from_numpy(self.tokens[idx].astype(np.int64)),
            "actions": torch.from_numpy(self.actions[idx].astype(np.int64)),
            "rewards": torch.from_numpy(self.rewards[idx].astype(np.float32)),
        }


def _load_data(cache_path: Path, game: str, task_id: int, cfg: FinetuneConfig, tokenizer, segment_length: int
               ) -> _FinetuneData:  # fmt: skip
    arrays = read_token_cache(cache_path, expected_hash=tokenizer)
    cache_game = games.canonical_name(str(arrays["attrs"]["game"]))
    if cache_game != game:
        raise ValueError(f"{cache_path} holds {cache_game} data but game={game!r}; pass the dataset of {game}.")
    n = len(arrays["actions"])
    draw = draw_transitions(arrays["episode_starts"], n, cfg.transitions, data_slice=cfg.data_slice,
                            block_length=cfg.block_length, seed=cfg.seed)  # fmt: skip
    i = draw.indices
    tokens, actions = arrays["tokens"][i], arrays["actions"][i].astype(np.int64)
    rewards, terminals = arrays["rewards"][i].astype(np.float32), arrays["terminals"][i].astype(bool)
    run_end = np.zeros(len(i), bool)
    run_end[np.append(draw.run_starts[1:], len(i)) - 1] = True
    source = SegmentSource.from_arrays(
        game, actions, rewards, terminals, draw.run_starts, tokens=tokens, truncations=run_end & ~terminals,
        segment_length=segment_length, stride=1, task_id=task_id,
    )  # fmt: skip
    return _FinetuneData(game, task_id, draw, tokens, actions, rewards, terminals, source, cache_path)


def resolve_token_cache(dataset_path: str | os.PathLike, tokenizer, run_dir: str | os.PathLike, *,
                        device: str | torch.device = "auto", progress: bool = True) -> Path:  # fmt: skip
    """The token cache of ``dataset_path`` made by ``tokenizer``: the path itself when it is a cache,
    else ``<Game>.tokens.h5`` beside the dataset or in ``<run_dir>/data`` when one of them was built by
    this tokenizer, else a new one built into ``<run_dir>/data`` (the dataset folder is not touched)."""
    path = Path(dataset_path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset {path} does not exist; collect one (jowa collect) or pass its path.")
    if path.name.endswith(".tokens.h5"):
        open_token_cache(path, expected_hash=tokenizer).close()  # refuses another tokenizer's cache
        return path
    for candidate in (token_cache_path(path), Path(run_dir) / "data" / token_cache_path(path).name):
        if candidate.is_file():
            try:
                open_token_cache(candidate, expected_hash=tokenizer).close()
                return candidate
            except TokenCacheError:
                continue
    out = Path(run_dir) / "data" / token_cache_path(path).name
    return build_token_cache(path, tokenizer, out, device=device, progress=progress)


# ---------------------------------------------------------------------------------------------
# Imagination


@torch.no_grad()
def imagine_segments(
    model: WorldActionModel,
    tokens: torch.Tensor,
    actions: torch.Tensor,
    rewards: torch.Tensor,
    task_ids: torch.Tensor,
    legal_mask: torch.Tensor,
    *,
    beam_width: int = 2,
    horizon: int = 2,
    gamma: float = 0.99,
) -> dict[str, torch.Tensor]:
    """Imagined L-step segments from g = L - H real steps along the beam search's best path (spec 9).

    Args:
        model: the world-action model (put it in eval mode for deterministic imagination).
        tokens: (B, g, 36) real observation tokens; actions, rewards: (B, g) real actions and rewards
            (the last action and reward are not used: the planner chooses from the last observation).
        task_ids: (B,); legal_mask: (B, 18) bool.
        beam_width, horizon, gamma: beam search settings; g + horizon must equal ``max_blocks``.
    Returns:
        ``tokens`` (B, L, 36) long, ``actions`` (B, L) long, ``rewards`` (B, L) float, ``ends``
        (B, L) bool (all False), ``mask_padding`` (B, L) bool (all True): steps 0..g-2 are the real
        ones; step g-1 is the last real observation with the first planned action and its predicted
        reward; steps g..L-1 hold the imagined observations, each with the next planned action and
        reward; the last step repeats the last action and reward (a dummy, as officially).
    """
    B, g, n_obs = tokens.shape
    L = model.cfg.max_blocks
    if g + horizon != L or n_obs != model.cfg.tokens_per_block - 1:
        raise ValueError(f"tokens must be (B, g, {model.cfg.tokens_per_block - 1}) with g + horizon = {L} "
                         f"(g = {L - horizon} for horizon {horizon}); got {tuple(tokens.shape)}.")  # fmt: skip
    if actions.shape != (B, g) or rewards.shape != (B, g):
        raise ValueError(f"actions and rewards must be (B, g) = ({B}, {g}); got {tuple(actions.shape)}, "
                         f"{tuple(rewards.shape)}.")  # fmt: skip
    history = torch.cat([tokens, actions.unsqueeze(-1)], -1).reshape(B, -1)[:, :-1]  # (B, g*37 - 1)
    _, trace = beam_search(model, history, task_ids, legal_mask, beam_width, horizon, gamma, trace=True)
    nodes = [trace.best_leaf]
    for _ in range(horizon - 1):
        nodes.insert(0, trace.parent[nodes[0]])
    path = torch.stack(nodes, 1)  # (B, H) node ids at depths 1..H
    dev = tokens.device
    a = trace.action[path].to(dev)  # (B, H)
    r = trace.reward[path].to(dev, torch.float32)
    o = trace.obs_tokens[path].to(dev, torch.long)  # (B, H, 36)
    return {
        "tokens": torch.cat([tokens.long(), o], 1),
        "actions": torch.cat([actions[:, : g - 1].long(), a, a[:, -1:]], 1),
        "rewards": torch.cat([rewards[:, : g - 1].float(), r, r[:, -1:]], 1),
        "ends": torch.zeros(B, L, dtype=torch.bool, device=dev),
        "mask_padding": torch.ones(B, L, dtype=torch.bool, device=dev),
    }


class ImaginationBuffer:
    """FIFO of imagined segments (official capacity: 10 x the number of real segments), on the CPU.

    Only tokens, actions and rewards are stored: imagined segments have no ends and no padding.
    """

    def __init__(self, capacity: int, segment_length: int, obs_tokens: int = OBS_TOKENS, vocab_size: int = 2048):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}.")
        dtype = torch.int16 if vocab_size <= 32768 else torch.int32
        self.tokens = torch.zeros(capacity, segment_length, obs_tokens, dtype=dtype)
        self.actions = torch.zeros(capacity, segment_length, dtype=torch.uint8)
        self.rewards = torch.zeros(capacity, segment_length, dtype=torch.float32)
        self.capacity, self.size, self.next = capacity, 0, 0

    def __len__(self) -> int:
        return self.size

    def push(self, segments: dict[str, torch.Tensor]) -> None:
        """Append segments (``imagine_segments`` output); the oldest are overwritten when full."""
        n = segments["actions"].shape[0]
        rows = (self.next + torch.arange(n)) % self.capacity
        if n > self.capacity:  # only the newest capacity rows survive
            rows, keep = rows[-self.capacity :], slice(n - self.capacity, n)
        else:
            keep = slice(0, n)
        self.tokens[rows] = segments["tokens"][keep].cpu().to(self.tokens.dtype)
        self.actions[rows] = segments["actions"][keep].cpu().to(torch.uint8)
        self.rewards[rows] = segments["rewards"][keep].cpu().float()
        self.next = int((self.next + n) % self.capacity)
        self.size = min(self.capacity, self.size + n)

    def sample(self, n: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """``n`` stored segments drawn uniformly with replacement, as a batch dict."""
        if self.size == 0:
            raise RuntimeError("the imagination buffer is empty; push segments before sampling.")
        rows = torch.from_numpy(rng.integers(0, self.size, n))
        L = self.actions.shape[1]
        return {
            "tokens": self.tokens[rows].long(),
            "actions": self.actions[rows].long(),
            "rewards": self.rewards[rows],
            "ends": torch.zeros(n, L, dtype=torch.bool),
            "mask_padding": torch.ones(n, L, dtype=torch.bool),
        }

    def state_dict(self) -> dict[str, Any]:
        s = self.size
        return {"tokens": self.tokens[:s].clone(), "actions": self.actions[:s].clone(),
                "rewards": self.rewards[:s].clone(), "next": self.next, "capacity": self.capacity}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["capacity"]) != self.capacity:
            raise ValueError(f"buffer state has capacity {state['capacity']}, this buffer {self.capacity}.")
        s = state["actions"].shape[0]
        self.tokens[:s], self.actions[:s], self.rewards[:s] = state["tokens"], state["actions"], state["rewards"]
        self.size, self.next = s, int(state["next"])


class _Imagination:
    """Imagination during fine-tuning: which real windows to plan from, the FIFO buffer, the batch mix."""

    def __init__(self, cfg: FinetuneConfig, data: _FinetuneData, segment_length: int, vocab_size: int,
                 legal: torch.Tensor, gamma: float) -> None:  # fmt: skip
        self.cfg, self.data, self.legal, self.gamma = cfg, data, legal, gamma
        self.context = segment_length - cfg.horizon
        self.windows = data.imagination_windows(self.context)
        if len(self.windows) == 0:
            raise ValueError(
                f"imagination needs runs of at least {self.context} drawn steps that do not end the "
                f"episode; none exist. Raise block_length (now {cfg.block_length}) or transitions."
            )
        self.buffer = ImaginationBuffer(cfg.buffer_factor * data.num_segments, segment_length, vocab_size=vocab_size)

    def mix(self, model: WorldActionModel, raw: dict[str, torch.Tensor], step: int, autocast: Callable[[], Any]
            ) -> tuple[list[dict[str, torch.Tensor]], int]:  # fmt: skip
        """The batch parts of step ``step`` and the number of real rows (imagined rows come last)."""
        cfg = self.cfg
        if step < cfg.imagination_start:
            return [raw], cfg.batch_size
        if (step - cfg.imagination_start) % cfg.imagination_every == 0:
            dev, n = model.atoms.device, cfg.imagination_batch
            rng = np.random.default_rng([cfg.seed, _IMAGINATION_SEED, step])
            real = self.data.windows(self.windows[rng.integers(0, len(self.windows), n)], self.context)
            model.eval()  # plan without dropout
            with autocast():
                seg = imagine_segments(
                    model, real["tokens"].to(dev), real["actions"].to(dev), real["rewards"].to(dev),
                    torch.full((n,), self.data.task_id, device=dev), self.legal.to(dev).unsqueeze(0).expand(n, -1),
                    beam_width=cfg.beam_width, horizon=cfg.horizon, gamma=self.gamma,
                )  # fmt: skip
            model.train()
            self.buffer.push(seg)
        n_im = cfg.imagined_rows()
        n_real = cfg.batch_size - n_im
        real_rows = {k: v[:n_real] for k, v in raw.items() if k != "batch_index"}
        return [real_rows, self.buffer.sample(n_im, np.random.default_rng([cfg.seed, _BUFFER_SEED, step]))], n_real


# ---------------------------------------------------------------------------------------------
# Pretrained model, evaluation


def _preset_for(tokenizer, model: WorldActionModel) -> Preset:
    """The named preset whose model config is the model's, else a "custom" one (recorded in checkpoints)."""
    for make in PRESETS.values():
        p = make()
        if p.model == model.cfg:
            return replace(p, tokenizer=tokenizer.cfg)
    return Preset("custom", tokenizer=tokenizer.cfg, model=model.cfg)


def load_pretrained(
    pretrained: str | os.PathLike | tuple[Any, WorldActionModel],
    tokenizer: Any = None,
    device: str | torch.device = "cpu",
) -> tuple[Any, WorldActionModel, Preset]:
    """``(tokenizer, model, preset)`` of a pretrained model.

    Args:
        pretrained: a world-action run folder or checkpoint folder of ours (``checkpoints.load``), a
            notebook run folder holding ``model/`` (its model), or a ``(tokenizer, model)`` pair (e.g.
            ``checkpoints.load_official(...)``).
        tokenizer: for a run folder: a Tokenizer or a saved tokenizer folder; default: the
            ``tokenizer/`` folder beside the run (the notebooks' layout: ``<run_dir>/model`` and
            ``<run_dir>/tokenizer``).
    """
    from jowa_core.checkpoints import load_tokenizer

    if isinstance(pretrained, tuple):
        if len(pretrained) != 2:
            raise ValueError("pretrained as a tuple must be (tokenizer, model).")
        tok, model = pretrained
        preset = _preset_for(tok, model)
    else:
        path = Path(pretrained)
        if (path / "model" / checkpoints.RUN_CHECKPOINTS_DIR).is_dir():  # a notebook run folder
            path = path / "model"
        ckpt = checkpoints.load(path, device=device)
        model = ckpt.model
        tok = tokenizer
        if tok is None:
            run = ckpt.path.parent.parent  # <run>/checkpoints/step_x
            candidates = [run / TOKENIZER_DIR, run.parent / TOKENIZER_DIR]
            found = [c for c in candidates if (c / "config.json").is_file()]
            if not found:
                raise FileNotFoundError(
                    f"no tokenizer beside {run} (looked for {', '.join(str(c) for c in candidates)}); pass "
                    "tokenizer= (a Tokenizer or the folder train_tokenizer wrote)."
                )
            tok = load_tokenizer(found[0], device=device)
        elif isinstance(tok, (str, os.PathLike)):
            tok = load_tokenizer(tok, device=device)
        preset = replace(ckpt.preset, tokenizer=tok.cfg)
    if tok.cfg.vocab_size != model.cfg.obs_vocab_size:
        raise ValueError(f"tokenizer vocabulary {tok.cfg.vocab_size} != model obs_vocab_size "
                         f"{model.cfg.obs_vocab_size}; pass the tokenizer the model was trained with.")  # fmt: skip
    return tok.to(device).eval(), model.to(device), preset


def greedy_evaluator(
    tokenizer: Any,
    game: str,
    *,
    episodes: int = 8,
    max_steps: int = 10_000,
    history_steps: int = 8,
    alias_task: bool = True,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> Evaluator:
    """The default in-training evaluation: a greedy ``Agent`` (epsilon 0.001) for ``episodes`` episodes
    of ``game`` (official protocol, capped at ``max_steps`` agent steps); returns the episode returns.
    ``alias_task``: act with the aliased task row (the one fine-tuning trains; official: False, Q10)."""
    from jowa_core.agent import Agent
    from jowa_core.evaluation import evaluate

    game = games.canonical_name(game)

    def run(model: WorldActionModel, step: int) -> list[float]:
        agent = Agent(tokenizer, model, history_steps=min(history_steps, model.cfg.max_blocks),
                      alias_held_out=alias_task, device=device, name=f"finetune_step{step}")  # fmt: skip
        threads = torch.get_num_threads()
        configure_threads(env_workers=min(episodes, available_cores()))  # the envs' workers count (runtime)
        try:
            table = evaluate(agent, game, episodes, max_steps=max_steps, seed=seed, progress=False)
        finally:
            torch.set_num_threads(threads)
        return table.episode_returns(game).tolist()

    return run


# ---------------------------------------------------------------------------------------------
# Loss of one step


def _loss(model: WorldActionModel, batch: Batch, n_real: int, cfg: FinetuneConfig, tc: TrainConfig) -> LossTerms:
    """Stage-2 joint loss with the fine-tuning lambda; rows [0, n_real) are real, the rest imagined."""
    out = model(batch.tokens, batch.task_ids)
    rewards = batch.rewards.clamp(-1.0, 1.0) if cfg.clip_rewards else batch.rewards
    rem = None
    if model.cfg.use_rem:
        rem = torch.rand(model.cfg.num_q, device=batch.tokens.device)
        rem = rem / rem.sum()
    return joint_loss(
        out, model.q_target_logits(out.q_hidden), batch.tokens, rewards, batch.ends, batch.mask, batch.legal,
        model.atoms, supervised_weight=cfg.supervised_weight, train_critic=True, gamma=tc.gamma,
        cql_weight=tc.cql_weight, td_loss=model.cfg.td_loss, q_penalty=model.cfg.q_penalty,
        cql_legal_only=model.cfg.cql_legal_only, rem_weights=rem, num_real_rows=n_real, td_steps=tc.td_steps,
        changed_token_weight=tc.changed_token_weight, td_max_over_n=tc.td_max_over_n,
    )  # fmt: skip


def _to_batch(parts: Sequence[dict[str, torch.Tensor]], task_id: int, legal: torch.Tensor, dev: torch.device
              ) -> Batch:  # fmt: skip
    """Concatenate row dicts (tokens (B, L, 36), actions, rewards, ends, mask_padding) into a Batch."""
    obs = torch.cat([p["tokens"] for p in parts]).long()
    actions = torch.cat([p["actions"] for p in parts]).long()
    B = actions.shape[0]
    tokens = torch.cat([obs, actions.unsqueeze(-1)], -1).reshape(B, -1)
    return Batch(
        tokens=tokens.to(dev),
        task_ids=torch.full((B,), task_id, dtype=torch.long, device=dev),
        rewards=torch.cat([p["rewards"] for p in parts]).float().to(dev),
        ends=torch.cat([p["ends"] for p in parts]).bool().to(dev),
        mask=torch.cat([p["mask_padding"] for p in parts]).bool().to(dev),
        legal=legal.to(dev).unsqueeze(0).expand(B, -1),
    )


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass
class FinetuneResult:
    """What ``finetune`` returns.

    Attributes:
        run_dir: the run's folder.
        game: canonical game name; task_id: the task row trained (aliased for held-out games).
        steps: steps done; model: the final model (eval mode); tokenizer: the frozen tokenizer.
        evals: one dict per evaluation (step, score, returns), in step order.
        best_step, best_score: the best snapshot (None before any evaluation).
        num_transitions, num_segments, num_runs: the drawn data.
        scratch: whether the model started from a random initialisation.
    """

    run_dir: Path
    game: str
    task_id: int
    steps: int
    model: WorldActionModel
    tokenizer: Any
    evals: list[dict[str, Any]] = field(default_factory=list)
    best_step: int | None = None
    best_score: float | None = None
    num_transitions: int = 0
    num_segments: int = 0
    num_runs: int = 0
    scratch: bool = False

    @property
    def final_score(self) -> float | None:
        return self.evals[-1]["score"] if self.evals else None

    def load_best(self, device: str | torch.device = "cpu") -> WorldActionModel:
        """The best snapshot's model (eval mode)."""
        return checkpoints.load(self.run_dir / BEST_DIR, device=device).model


def finetune_with_scratch(
    pretrained: str | os.PathLike | tuple[Any, WorldActionModel],
    game: str,
    dataset_path: str | os.PathLike,
    run_dir: str | os.PathLike,
    config: FinetuneConfig | None = None,
    *,
    parallel: bool | None = None,
    **kwargs: Any,
) -> dict[str, FinetuneResult]:
    """The fine-tuning run and its scratch baseline (same data, config and evaluations) in ``run_dir/pretrained``
    and ``run_dir/scratch``; other keyword arguments go to both ``finetune`` calls.

    ``parallel`` (default: on a CPU with at least 2 free cores) trains the baseline in a spawned process beside
    the pretrained run, one torch thread each, as ``training.train_with_mtbc`` does: on 2 cores that is faster
    than one after the other. Returns ``{"pretrained": ..., "scratch": ...}``.
    """
    run_dir = Path(run_dir)
    pre = functools.partial(finetune, pretrained, game, dataset_path, run_dir / "pretrained", config, **kwargs)
    scratch = functools.partial(finetune, pretrained, game, dataset_path, run_dir / "scratch", config, scratch=True,
                                **kwargs)  # fmt: skip
    results = run_pair(pre, scratch, device=kwargs.get("device", "auto"), num_threads=kwargs.get("num_threads"),
                       parallel=parallel)  # fmt: skip
    return dict(zip(("pretrained", "scratch"), results))


def finetune(
    pretrained: str | os.PathLike | tuple[Any, WorldActionModel],
    game: str,
    dataset_path: str | os.PathLike,
    run_dir: str | os.PathLike,
    config: FinetuneConfig | None = None,
    *,
    tokenizer: Any = None,
    evaluator: Evaluator | None = None,
    device: str | torch.device = "auto",
    resume: bool = True,
    progress: bool = True,
    num_threads: int | None = None,
    stop_at_step: int | None = None,
    **overrides: Any,
) -> FinetuneResult:
    """Fine-tune a pretrained world-action model on ``game`` from few transitions (module docstring).

    Args:
        pretrained: a world-action run (or checkpoint) folder of ours, or ``(tokenizer, model)``,
            e.g. ``checkpoints.load_official(tokenizer_pt, model_pt, size)``; with ``scratch=True``
            only its config (and tokenizer) is used.
        game: the game to fine-tune on (any spelling ``games.canonical_name`` accepts).
        dataset_path: our HDF5 dataset of ``game`` (its token cache is found or built with the
            pretrained tokenizer, ``resolve_token_cache``) or directly a ``<Game>.tokens.h5`` cache.
        run_dir: the run's folder (checkpoints, best snapshot, metrics, evaluations).
        config: a ``FinetuneConfig``; keyword ``overrides`` replace its fields, e.g.
            ``transitions=5000, steps=2000, imagination=True, scratch=True``.
        tokenizer: tokenizer for a run-folder ``pretrained`` (default: ``tokenizer/`` beside it).
        evaluator: ``(model, step) -> episode returns``; default ``greedy_evaluator`` with the
            config's evaluation settings. Tests pass a fake one.
        device: "auto", "cpu" or "cuda".
        resume: continue from the newest checkpoint in ``run_dir`` (the experiment settings must
            match); False deletes the run's checkpoints, best snapshot, metrics and evaluations.
        num_threads: torch CPU threads (default: every free core, ``runtime.configure_threads``).
        stop_at_step: save and return once this many steps are done, without changing the schedule
            (splits a run into pieces; tests use it for resume).
    """
    cfg = replace(config or FinetuneConfig(), **_check_overrides(overrides))
    game = games.canonical_name(game)
    run_dir = Path(run_dir)
    dev = resolve_device(device)
    if num_threads is None:
        configure_threads()
    else:
        torch.set_num_threads(max(1, num_threads))
    tok, base, preset = load_pretrained(pretrained, tokenizer, device=dev)
    L = base.cfg.max_blocks
    if cfg.imagination and cfg.horizon >= L:
        raise ValueError(f"horizon {cfg.horizon} leaves no real context in {L}-step segments; use horizon < {L}.")

    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoints.remove_incomplete(run_dir)
    if not resume:
        for sub in (checkpoints.RUN_CHECKPOINTS_DIR, BEST_DIR):
            shutil.rmtree(run_dir / sub, ignore_errors=True)
        for name in (METRICS_FILE, EVALS_FILE):
            (run_dir / name).unlink(missing_ok=True)

    train_task = games.task_id(game, alias_held_out=True)
    cache = resolve_token_cache(dataset_path, tok, run_dir, device=dev, progress=progress)
    data = _load_data(cache, game, train_task, cfg, tok, L)
    legal = torch.as_tensor(games.legal_mask(game))
    if cfg.official_legal_mask:  # quirk Q9: the aliased game's action set
        legal = torch.as_tensor(games.action_masks()[train_task])
    epoch = max(1, -(-data.num_segments // cfg.batch_size))
    eval_every = cfg.eval_every or epoch
    if evaluator is None:
        evaluator = greedy_evaluator(tok, game, episodes=cfg.eval_episodes, max_steps=cfg.eval_max_steps,
                                     history_steps=cfg.eval_history, alias_task=not cfg.official_eval_task_id,
                                     seed=cfg.seed, device=dev)  # fmt: skip

    tc = replace(preset.train, batch_size=cfg.batch_size, grad_accum=1, lr_stage1=cfg.lr, lr_stage2=cfg.lr,
                 critic_lr=cfg.lr, supervised_weight_finetune=cfg.supervised_weight,
                 target_update_every=cfg.target_update_every, stage1_steps=0, stage2_steps=cfg.steps,
                 log_every=cfg.log_every, save_every=cfg.save_every, seed=cfg.seed)  # fmt: skip
    preset = replace(preset, train=tc)
    source = "modules passed in" if isinstance(pretrained, tuple) else str(pretrained)
    options = {"finetune": cfg.to_dict(), "game": game, "task_id": train_task, "token_cache": str(cache),
               "pretrained": source, "preset": preset.name,
               "draw_digest": data.draw.digest(), "num_segments": data.num_segments}  # fmt: skip

    # -- model: pretrained, scratch or resumed ----------------------------------------------------
    if cfg.scratch:
        torch.manual_seed(cfg.seed)
        model = WorldActionModel(base.cfg)
    else:
        model = copy.deepcopy(base)
    del base
    model.to(dev)
    set_stage(model, 2)
    opt = torch.optim.AdamW(param_groups(model, 2, tc), betas=(0.9, 0.999), eps=1e-8, fused=dev.type == "cuda")
    imagination = _Imagination(cfg, data, L, model.cfg.obs_vocab_size, legal, tc.gamma) if cfg.imagination else None
    buffer = imagination.buffer if imagination else None
    step, best = 0, {"step": None, "score": None}
    newest = checkpoints.latest_checkpoint(run_dir) if resume else None
    if newest is not None:
        ckpt = checkpoints.load(newest, training_state=True)
        _check_resumable(ckpt, model, options)
        model.load_state_dict(ckpt.model.state_dict())
        state = ckpt.training_state
        opt.load_state_dict(state["optimizer"])
        for g, fresh in zip(opt.param_groups, param_groups(model, 2, tc)):
            g["lr"], g["weight_decay"] = fresh["lr"], fresh["weight_decay"]
        set_rng_state(state["rng"])
        if buffer is not None and state.get("buffer") is not None:
            buffer.load_state_dict(state["buffer"])
        step, best = ckpt.step, dict(state["best"])
        truncate_jsonl(run_dir / METRICS_FILE, step)
        truncate_jsonl(run_dir / EVALS_FILE, step)
    else:
        model.update_target()  # spec 9: hard copy of the target head at load
        torch.manual_seed(cfg.seed)  # dropout / REM stream
    checkpoints.save_tokenizer(run_dir / TOKENIZER_DIR, tok)
    model.train()

    sampler = SegmentSampler([data.source], cfg.batch_size, seed=cfg.seed)
    end = cfg.steps if stop_at_step is None else min(cfg.steps, stop_at_step)
    use_amp = dev.type == "cuda"

    def autocast():
        return torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_amp)

    def save(s: int) -> None:
        state = {"step": s, "optimizer": opt.state_dict(), "rng": rng_state(), "best": dict(best),
                 "buffer": buffer.state_dict() if buffer is not None else None}  # fmt: skip
        checkpoints.save(run_dir, model, preset, step=s, training_state=state, options=options,
                         keep_last=cfg.keep_last)  # fmt: skip

    def save_best() -> None:
        checkpoints.save(run_dir / BEST_DIR, model, preset, step=best["step"],
                         options={**options, "eval_score": best["score"]}, keep_last=1)  # fmt: skip

    def run_eval(s: int) -> bool:
        """Evaluate, record, and return whether this is a new best (strictly higher mean return)."""
        saved = rng_state()  # evaluation must not shift the training streams (exact resume)
        model.eval()
        try:
            with autocast():
                returns = [float(x) for x in evaluator(model, s)]
        finally:
            model.train()
            set_rng_state(saved)
        score = float(np.mean(returns)) if returns else float("nan")
        rec = {"step": s, "score": score, "returns": returns, "time": time.time()}
        with open(run_dir / EVALS_FILE, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        if best["score"] is None or score > best["score"]:
            best.update(step=s, score=score)
            return True
        return False

    best_dir = checkpoints.latest_checkpoint(run_dir / BEST_DIR)
    best_saved = None if best_dir is None else checkpoints.read_checkpoint_config(best_dir)["step"]
    if best["step"] is not None and best["step"] == step and best_saved != step:
        save_best()  # killed between the checkpoint of a new best and its snapshot: these are its weights

    acc: dict[str, torch.Tensor] = {}
    n_acc, t_log = 0, time.perf_counter()
    bar = tqdm(total=end, initial=step, desc=f"finetune {game}", disable=not progress)
    while step < end:
        raw = sampler.batch(step)
        parts, n_real = imagination.mix(model, raw, step, autocast) if imagination else ([raw], cfg.batch_size)
        batch = _to_batch(parts, train_task, legal, dev)
        opt.zero_grad(set_to_none=True)
        with autocast():
            terms = _loss(model, batch, n_real, cfg, tc)
        terms.total.backward()
        grad_norm = clip_and_step(opt, [p for p in model.parameters() if p.requires_grad], tc.grad_clip)
        step += 1
        if step % cfg.target_update_every == 0:
            model.update_target()
        with torch.no_grad():
            for k, v in terms.metrics().items():
                acc[f"loss/{k}"] = acc.get(f"loss/{k}", 0.0) + v.float()
            acc["grad_norm"] = acc.get("grad_norm", 0.0) + grad_norm.detach().float()
            acc["imagined_rows"] = acc.get("imagined_rows", 0.0) + torch.tensor(float(cfg.batch_size - n_real))
        n_acc += 1
        if step % cfg.log_every == 0 or step == end:
            names = sorted(acc)
            values = (torch.stack([acc[n] for n in names]).cpu() / n_acc).tolist()
            rate = n_acc * cfg.batch_size / max(time.perf_counter() - t_log, 1e-9)
            rec = log_record(step, 2, dict(zip(names, values)), opt, rate, model.cfg)
            rec["buffer_size"] = len(buffer) if buffer is not None else 0
            with open(run_dir / METRICS_FILE, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
            bar.set_postfix(loss=f"{rec['loss/total']:.4f}")
            acc, n_acc, t_log = {}, 0, time.perf_counter()
        evaluated = step % eval_every == 0 or step == cfg.steps
        new_best = evaluated and run_eval(step)
        saved = new_best or step % cfg.save_every == 0 or step == end
        if saved:
            save(step)  # a new best is checkpointed first, then snapshotted: a kill between is repaired above
        if new_best:
            save_best()
        if evaluated or saved:
            t_log = time.perf_counter()  # the throughput counts training only
        bar.update(1)
    bar.close()
    if step == 0 and end == 0 and checkpoints.latest_checkpoint(run_dir) is None:
        save(0)  # a zero-step run still leaves a loadable checkpoint
    return FinetuneResult(
        run_dir=run_dir, game=game, task_id=train_task, steps=step, model=model.eval(), tokenizer=tok,
        evals=read_evals(run_dir), best_step=best["step"], best_score=best["score"],
        num_transitions=len(data.draw.indices), num_segments=data.num_segments,
        num_runs=len(data.draw.run_starts), scratch=cfg.scratch,
    )  # fmt: skip


def _check_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(FinetuneConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"finetune() got unknown setting(s) {unknown}; settings are the fields of "
                        "jowa_core.finetune.FinetuneConfig.")  # fmt: skip
    return overrides


def _check_resumable(ckpt: checkpoints.RunCheckpoint, model: WorldActionModel, options: dict[str, Any]) -> None:
    """Refuse to resume a run made with another model config, game, data draw or experiment setting."""
    fix = "use a new run_dir, the settings of the saved run, or resume=False to start over."
    if ckpt.preset.model != model.cfg:
        raise ValueError(f"{ckpt.path} was trained with another model config; {fix}")
    if ckpt.training_state is None:
        raise checkpoints.CheckpointError(f"{ckpt.path} has no {checkpoints.RUN_STATE_FILE}; it cannot be resumed.")
    saved = ckpt.options
    old, new = saved.get("finetune", {}), options["finetune"]
    diff = [k for k in _EXPERIMENT_FIELDS if old.get(k) != new.get(k)]
    if diff:
        changes = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
        raise ValueError(f"{ckpt.path} was fine-tuned with other settings ({changes}); {fix}")
    if saved.get("game") != options["game"]:
        raise ValueError(f"{ckpt.path} was fine-tuned on {saved.get('game')}, not {options['game']}; {fix}")
    if saved.get("draw_digest") != options["draw_digest"]:
        raise ValueError(
            f"{ckpt.path} was fine-tuned on other transitions (the dataset or its token cache "
            f"changed: {saved.get('token_cache')} then, {options['token_cache']} now); {fix}"
        )


# ---------------------------------------------------------------------------------------------
# Reading runs back (notebook 05, CLI)


def read_evals(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The evaluations of a fine-tuning run (``evals.jsonl``), in step order."""
    path = Path(run_dir) / EVALS_FILE
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def load_finetuned(run_dir: str | os.PathLike, which: str = "best", device: str | torch.device = "cpu"
                   ) -> tuple[Any, WorldActionModel]:  # fmt: skip
    """``(tokenizer, model)`` of a fine-tuning run: its best snapshot (``which="best"``) or its newest
    checkpoint (``"last"``), in eval mode."""
    from jowa_core.checkpoints import load_tokenizer

    run_dir = Path(run_dir)
    if which not in ("best", "last"):
        raise ValueError(f"which must be 'best' or 'last', got {which!r}.")
    folder = run_dir / BEST_DIR if which == "best" else run_dir
    if which == "best" and checkpoints.latest_checkpoint(folder) is None:
        raise FileNotFoundError(f"{run_dir} has no best snapshot yet (no evaluation ran); use which='last'.")
    model = checkpoints.load(folder, device=device).model
    return load_tokenizer(run_dir / TOKENIZER_DIR, device=device), model


def finetune_curves(runs: dict[str, str | os.PathLike], keys: Sequence[str] = ("loss/world", "loss/td", "loss/cql",
                    "eval/score")) -> Any:  # fmt: skip
    """Long pandas DataFrame (run, step, metric, value) of several fine-tuning runs for side-by-side
    curves: the ``metrics.jsonl`` keys and ``eval/score`` (mean evaluation return)."""
    import pandas as pd

    rows = []
    for label, run in runs.items():
        for rec in read_metrics(run):
            rows += [{"run": label, "step": rec["step"], "metric": k, "value": rec[k]} for k in keys if k in rec]
        if "eval/score" in keys:
            rows += [{"run": label, "step": e["step"], "metric": "eval/score", "value": e["score"]}
                     for e in read_evals(run)]  # fmt: skip
    return pd.DataFrame(rows, columns=["run", "step", "metric", "value"])


def finetune_scores(results: dict[str, FinetuneResult]) -> Any:
    """pandas DataFrame, one row per run: best and final mean return and their DQN-normalised scores
    (DNS with the official results file's DQN column, spec 10; NaN, with a note, for games without a
    DQN reference: it exists for the 20 paper games only),
    beside the paper's Table 3 return of JOWA-150M fine-tuned (or from scratch, for scratch runs) on
    that game (5k expert transitions, 50k steps; held-out paper games only)."""
    import pandas as pd

    from jowa_core.evaluation import dqn_normalized

    table3 = games.paper_scores("paper_table3_finetune_dns")
    rows = []
    for label, r in results.items():
        row = {
            "run": label,
            "game": r.game,
            "task_id": r.task_id,
            "steps": r.steps,
            "best_step": r.best_step,
            "best_score": r.best_score,
            "final_score": r.final_score,
            "transitions": r.num_transitions,
        }
        try:
            has_dqn = games.reference_scores(r.game).dqn is not None
        except games.UnknownGameError:
            has_dqn = False
        for k in ("best", "final"):
            s = row[f"{k}_score"]
            row[f"{k}_dns"] = float(dqn_normalized(s, r.game)) if has_dqn and s is not None else float("nan")
        paper = table3.get("JOWA-150M-scratch" if r.scratch else "JOWA-150M", {})
        row["paper_150M_score"] = paper.get(r.game, float("nan"))
        row["note"] = "" if has_dqn else f"no DQN reference score for {r.game} (only the 20 paper games have one)"
        rows.append(row)
    return pd.DataFrame(rows)
