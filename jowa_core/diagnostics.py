"""Measurements that explain an agent's choices from its data: emulator RAM recovered by replaying a
dataset, the discounted returns that followed each action, and (Breakout) what the data and the
tokenizer show in frames with no ball in play.

The README's analysis of the default run (why greedy Q often fails to press FIRE) comes from these
functions, so anyone can redo it on their own run:

>>> from jowa_core import diagnostics
>>> diagnostics.breakout_no_ball_table("runs/default/data/Breakout.h5")        # per behaviour policy
>>> diagnostics.tokenizer_ball_check(tokenizer, "runs/default/data/Breakout.h5")
>>> diagnostics.value_fit(model, "runs/default/data/Breakout.tokens.h5")          # any game
>>> diagnostics.imagined_value_check(model, "runs/default/data/Breakout.tokens.h5")  # values of imagined frames
>>> diagnostics.greedy_agreement({"jowa": model, "mtbc": mtbc}, "runs/default/data/Breakout.tokens.h5")
>>> diagnostics.breakout_stalls(agent, "official")   # does a playing agent launch the ball?
>>> diagnostics.breakout_q_by_state(model, "runs/default/data/Breakout.h5")   # what it ranks with and without a ball
>>> diagnostics.breakout_tracker_agreement({"jowa": model}, "runs/default/data/Breakout.h5")  # toward the ball?
>>> diagnostics.q_trace(agent, "Breakout", past_action="NOOP")   # its Q as it plays; the state or its own actions?

``replay_ram`` needs a deterministic protocol (no sticky actions, no no-op starts), which makes an
episode a function of its actions; it checks every replayed frame against the stored one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from jowa_core import games
from jowa_core.agent import Agent, BaseAgent
from jowa_core.data.collect import BreakoutTracker
from jowa_core.data.format import DatasetError, bounds_from_starts, episode_bounds, open_dataset
from jowa_core.data.segments import returns_to_go
from jowa_core.data.token_cache import open_token_cache, token_cache_path
from jowa_core.envs import AtariVecEnv, EnvConfig
from jowa_core.evaluation import protocol

if TYPE_CHECKING:
    from jowa_core.inspection import EpisodeRecord

__all__ = [
    "RamReplay",
    "ball_visible",
    "breakout_no_ball_table",
    "breakout_q_by_state",
    "breakout_stalls",
    "discounted_returns",
    "greedy_agreement",
    "imagined_value_check",
    "q_trace",
    "replay_ram",
    "tokenizer_ball_check",
    "value_fit",
]

# Breakout's play field in the 84 x 84 frame: the rows between the lowest bricks and the paddle, inside the walls.
# Only the ball is drawn there, so its brightest pixel tells whether the ball is visible (not while it is among
# the bricks or level with the paddle).
PLAY_FIELD = (slice(38, 74), slice(8, 76))
BALL_THRESHOLD = 40
"""A ball pixel in the play field is 85-110 after the 84 x 84 resize; the background is 0."""

BREAKOUT_ACTIONS = np.flatnonzero(games.legal_mask("Breakout"))
"""Breakout's legal full-set actions (NOOP, FIRE, RIGHT, LEFT), from the game table."""


def discounted_returns(
    rewards: np.ndarray, episode_starts: np.ndarray, gamma: float = 0.99, *, clip: bool = True
) -> np.ndarray:
    """G_t = sum_k gamma^k r_{t+k} up to the end of t's episode, for every transition (rewards
    clipped to [-1, 1] as in training when ``clip``). An episode cut by the file's end counts only
    the rewards stored."""
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}.")
    n = len(rewards)
    starts = np.asarray(episode_starts, np.int64)
    if n and (len(starts) == 0 or starts[0] != 0 or np.any(np.diff(starts) <= 0) or starts[-1] >= n):
        raise ValueError("episode_starts must increase from 0 and stay inside rewards.")
    return returns_to_go(rewards, bounds_from_starts(starts, n), gamma, clip=clip)


def _episode_of(starts: np.ndarray, n: int) -> np.ndarray:
    """(n,) index of the episode that holds each of n transitions."""
    return np.searchsorted(starts, np.arange(n), side="right") - 1


@dataclass
class RamReplay:
    """Emulator RAM before each replayed transition: ``ram[i]`` belongs to transition ``index[i]``."""

    index: np.ndarray
    ram: np.ndarray


def replay_ram(dataset: str | os.PathLike, episodes: Sequence[int] | None = None) -> RamReplay:
    """Replay stored episodes (default: all) action by action from reset and record the RAM seen
    before every transition. Raises ``DatasetError`` if the file's protocol is not deterministic or a
    replayed frame differs from the stored one (then the RAM would describe another game)."""
    path = Path(dataset)
    with open_dataset(path) as f:
        cfg = EnvConfig.from_dict(json.loads(str(f.attrs["env_config"]))) if "env_config" in f.attrs else None
        if cfg is None or cfg.repeat_action_probability > 0 or cfg.noop_max > 0:
            raise DatasetError(
                f"Dataset {path}: cannot be replayed, because its protocol is not deterministic (sticky actions or "
                "no-op starts) or not recorded. Collect the data under the official protocol "
                "(`jowa collect`, the default) to analyse it with replay_ram."
            )
        game = str(f.attrs["game"])
        bounds = episode_bounds(f)
        chosen = range(len(bounds)) if episodes is None else list(episodes)
        idx, rams = [], []
        for ep in chosen:
            if not 0 <= ep < len(bounds):
                raise ValueError(f"episode {ep} is out of range: {path} holds episodes 0..{len(bounds) - 1}.")
            start, stop = bounds[ep]
            actions = f["actions"][start:stop].astype(np.int64)
            frames = f["observations"][start:stop]
            with AtariVecEnv(game, 1, cfg, seed=0, backend="python") as env:
                obs = env.reset()
                for t in range(stop - start):
                    if not np.array_equal(obs[0], frames[t]):
                        raise DatasetError(
                            f"Dataset {path}: episode {ep} diverges from its replay at step {t} (transition "
                            f"{start + t}), so the file was not collected from reset by this emulator with these "
                            "actions (another ale-py version, or imported data). replay_ram only works on data "
                            "collected by `jowa collect`."
                        )
                    rams.append(env.ram()[0].copy())
                    obs, *_ = env.step(actions[t : t + 1])
            idx.append(np.arange(start, stop))
    ram = np.stack(rams) if rams else np.zeros((0, 128), np.uint8)
    return RamReplay(np.concatenate(idx) if idx else np.zeros(0, np.int64), ram)


def ball_visible(frames: np.ndarray, threshold: int = BALL_THRESHOLD) -> np.ndarray:
    """(N, 84, 84) Breakout frames (uint8, or float in [0, 1]) -> (N,) bool: a ball in the play field."""
    x = np.asarray(frames)
    if x.ndim != 3 or x.shape[1:] != (84, 84):
        raise ValueError(f"frames must be (N, 84, 84), got {x.shape}.")
    if x.dtype != np.uint8:
        x = np.round(np.clip(x, 0.0, 1.0) * 255.0)
    return x[:, PLAY_FIELD[0], PLAY_FIELD[1]].max(axis=(1, 2)) > threshold


def _require_breakout(f, path: Path) -> None:
    game = games.canonical_name(str(f.attrs["game"]))
    if game != "Breakout":
        raise ValueError(f"{path} holds {game}; this analysis reads Breakout's RAM and screen layout.")


def _step_policies(f, starts: np.ndarray, n: int) -> tuple[list[str], np.ndarray | None]:
    """The behaviour policies a collected file names and, per transition, the index of the one that acted
    (None, and no names, for files without policy labels)."""
    if "episode_policy_names" not in f.attrs:
        return [], None
    return json.loads(str(f.attrs["episode_policy_names"])), f["episode_policy"][:][_episode_of(starts, n)]


def _cache_of(path: Path, token_cache: str | os.PathLike | None, actions: np.ndarray) -> Path:
    """The token cache to read beside ``path`` (default: its own), refused unless it was encoded from it."""
    cache = Path(token_cache) if token_cache is not None else token_cache_path(path)
    with open_token_cache(cache) as g:
        same = g["actions"].shape == actions.shape and np.array_equal(g["actions"][:], actions)
    if not same:
        raise ValueError(
            f"{cache} was not encoded from {path} (their actions differ); pass the token cache built from this "
            "dataset (build_token_cache(dataset, tokenizer))."
        )
    return cache


def _ram_by_step(path: Path, n: int) -> np.ndarray:
    """(n, 128) the RAM before each of the file's n transitions (``replay_ram`` of every episode)."""
    replay = replay_ram(path)
    ram = np.zeros((n, replay.ram.shape[1]), np.uint8)
    ram[replay.index] = replay.ram
    return ram


def _no_ball_steps(path: Path, n: int) -> np.ndarray:
    """(n,) True where a transition starts with no ball in play (RAM[101] = 0, by ``replay_ram``)."""
    return _ram_by_step(path, n)[:, BreakoutTracker.BALL_Y] == 0


def breakout_no_ball_table(dataset: str | os.PathLike, gamma: float = 0.99) -> pd.DataFrame:
    """Per behaviour policy (and "all"): how many transitions start with no ball in play (RAM, by
    replay), the share of each action there, and the mean discounted return that followed each action
    there (``discounted_returns``). NaN where an action never occurs."""
    path = Path(dataset)
    with open_dataset(path) as f:
        _require_breakout(f, path)
        actions = f["actions"][:].astype(np.int64)
        starts = f["episode_starts"][:]
        returns = discounted_returns(f["rewards"][:], starts, gamma)
        names, policy = _step_policies(f, starts, len(actions))
    no_ball = _no_ball_steps(path, len(actions))
    groups = [("all", np.ones(len(actions), bool))]
    groups += [(n, policy == k) for k, n in enumerate(names)]
    rows = []
    for name, sel in groups:
        m = sel & no_ball
        row: dict[str, float | int | str] = {"policy": name, "transitions": int(sel.sum()), "no_ball": int(m.sum())}
        for a in BREAKOUT_ACTIONS:
            a_name = games.FULL_ACTION_SET[a]
            hit = m & (actions == a)
            row[f"share_{a_name}"] = float(hit.sum() / m.sum()) if m.any() else float("nan")
            row[f"return_{a_name}"] = float(returns[hit].mean()) if hit.any() else float("nan")
        rows.append(row)
    return pd.DataFrame(rows).set_index("policy")


@torch.no_grad()
def tokenizer_ball_check(
    tokenizer: torch.nn.Module, dataset: str | os.PathLike, *, every: int = 50, batch: int = 256
) -> dict[str, float | int]:
    """Does the tokenizer keep Breakout's ball? Encodes and decodes every ``every``-th stored frame and
    compares ``ball_visible`` on the reconstruction with the original (and with RAM, by replay).

    Returns recall (share of frames with a visible ball whose reconstruction shows one), false_positive
    (share of frames with no ball in play whose reconstruction shows one) and the median and 90th
    percentile distance (pixels, max over axes) between the brightest play-field pixels."""
    path = Path(dataset)
    with open_dataset(path) as f:
        _require_breakout(f, path)
        n = f["actions"].shape[0]
        frames = f["observations"][0:n:every]
        starts = f["episode_starts"][:]
    picked = np.arange(0, n, every)
    replay = replay_ram(path, np.unique(_episode_of(starts, n)[picked]))
    ball_y = np.full(n, -1, np.int64)  # only the replayed episodes are filled in
    ball_y[replay.index] = replay.ram[:, BreakoutTracker.BALL_Y]
    in_play = ball_y[picked] != 0
    device = next(tokenizer.parameters()).device
    recon = []
    for i in range(0, len(frames), batch):
        x = torch.from_numpy(frames[i : i + batch]).to(device)
        recon.append(tokenizer.decode(tokenizer.encode(x))[:, 0].float().cpu().numpy())
    rec = np.concatenate(recon)  # floats in [0, 1]; ball_visible and the argmax below take them as they are
    seen, kept = ball_visible(frames), ball_visible(rec)

    def argmax_yx(x: np.ndarray) -> np.ndarray:
        field = x[:, PLAY_FIELD[0], PLAY_FIELD[1]].reshape(len(x), -1)
        flat = field.argmax(1)
        w = PLAY_FIELD[1].stop - PLAY_FIELD[1].start
        return np.stack([flat // w, flat % w], 1)

    dist = np.abs(argmax_yx(frames[seen]) - argmax_yx(rec[seen])).max(1) if seen.any() else np.zeros(0)
    return {
        "frames": len(frames),
        "with_visible_ball": int(seen.sum()),
        "without_ball_in_play": int((~in_play).sum()),
        "recall": float(kept[seen].mean()) if seen.any() else float("nan"),
        "false_positive": float(kept[~in_play].mean()) if (~in_play).any() else float("nan"),
        "distance_median_px": float(np.median(dist)) if len(dist) else float("nan"),
        "distance_p90_px": float(np.percentile(dist, 90)) if len(dist) else float("nan"),
    }


@torch.no_grad()
def imagined_ball_check(
    record: EpisodeRecord, tokenizer: torch.nn.Module, *, batch: int = 256
) -> dict[str, float | int | None]:
    """Does the world model keep Breakout's ball when it imagines? For every recorded plan
    (``inspection.record_episode`` with a horizon) whose real frame shows the ball, decodes each node of the
    plan and counts those that show one: the root (the tokenizer's reconstruction of the real frame) and each
    imagined depth. ``real_next`` is the share of those steps whose next real frame still shows the ball, the
    reference for depth 1. Low imagined shares mean the planner scores frames without the ball, so its values
    say little about where the ball goes."""
    if games.canonical_name(record.game) != "Breakout":
        raise ValueError(f"imagined_ball_check reads Breakout's play field; the record is of {record.game}.")
    planned = [i for i, s in enumerate(record.steps) if s.trace is not None and s.trace.horizon > 0]
    real = ball_visible(record.frames)
    picked = [i for i in planned if real[i]]
    out: dict[str, float | int | None] = {"plans": len(planned), "plans_with_ball": len(picked)}
    if picked:
        tokens = torch.cat([record.steps[i].trace.obs_tokens for i in picked])
        depth = torch.cat([record.steps[i].trace.depth for i in picked]).numpy()
        device = next(tokenizer.parameters()).device
        vis = np.concatenate([ball_visible(tokenizer.decode(tokens[k : k + batch].to(device))[:, 0].float().cpu().numpy())
                              for k in range(0, len(tokens), batch)])  # fmt: skip
        for d in np.unique(depth):
            out["root" if d == 0 else f"depth_{d}"] = float(vis[depth == d].mean())
    nxt = [real[i + 1] for i in picked if i + 1 < len(record)]
    out["real_next"] = float(np.mean(nxt)) if nxt else None
    return out


@dataclass
class _Windows:
    """Dataset steps ``steps`` with the ``L``-step token windows (B, L * 37) that end at them."""

    game: str
    steps: np.ndarray
    tokens: np.ndarray
    actions: np.ndarray
    returns: np.ndarray
    rewards_in: np.ndarray
    """The data's reward of the step before each window's last one (unclipped)."""

    def take(self, rows: np.ndarray) -> _Windows:
        return _Windows(self.game, *(getattr(self, k)[rows] for k in ("steps", "tokens", "actions", "returns",
                                                                       "rewards_in")))  # fmt: skip


def _windows(token_cache: str | os.PathLike, L: int, samples: int, seed: int, gamma: float = 0.99) -> _Windows:
    path = Path(token_cache)
    with open_token_cache(path) as f:
        game = str(f.attrs["game"])
        tokens = f["tokens"][:].astype(np.int64)
        actions = f["actions"][:].astype(np.int64)
        starts = f["episode_starts"][:]
        rewards = f["rewards"][:]
    returns = discounted_returns(rewards, starts, gamma)
    n = len(actions)
    episode_start = starts[_episode_of(starts, n)]
    eligible = np.flatnonzero(np.arange(n) - episode_start >= L - 1)
    if len(eligible) == 0:
        raise ValueError(f"{path} has no episode of {L} steps or more, so no full context window to read Q from.")
    ts = np.sort(np.random.default_rng(seed).choice(eligible, min(samples, len(eligible)), replace=False))
    rows = ts[:, None] + np.arange(1 - L, 1)  # (b, L) step indices ending at t
    seq = np.concatenate([tokens[rows], actions[rows][..., None]], axis=-1).reshape(len(ts), -1)
    return _Windows(game, ts, seq, actions[ts], returns[ts], rewards[ts - 1])


def _scores(model: torch.nn.Module, w: _Windows, batch: int) -> np.ndarray:
    """(b, 18) what the agent ranks at each window's last step: expected Q, or ``head_bc``'s logits (MTBC)."""
    device = next(model.parameters()).device
    task = games.task_id(w.game)
    out_rows = []
    for i in range(0, len(w.steps), batch):
        x = torch.from_numpy(w.tokens[i : i + batch]).to(device)
        out = model(x, torch.full((len(x),), task, device=device))
        s = out.bc_logits[:, -1] if out.bc_logits is not None else model.q_values(out.q_logits[:, :, -1])
        out_rows.append(s.float().cpu().numpy())
    return np.concatenate(out_rows)


def _greedy_picks(models: dict[str, torch.nn.Module], w: _Windows, legal: np.ndarray, batch: int
                  ) -> dict[str, np.ndarray]:  # fmt: skip
    """Each model's first choice among the legal actions at each window's last step (``_scores``)."""
    picks = {}
    for name, m in models.items():
        sc = _scores(m, w, batch)
        sc[:, ~legal] = -np.inf
        picks[name] = sc.argmax(-1)
    return picks


@torch.no_grad()
def value_fit(
    model: torch.nn.Module,
    token_cache: str | os.PathLike,
    *,
    gamma: float = 0.99,
    samples: int = 2000,
    seed: int = 0,
    batch: int = 200,
) -> dict[str, float | int | str]:
    """Has the critic learned values? Its Q(s_t, a_t) for dataset steps, read as the agent reads it (the
    last step of a ``max_blocks``-step window inside the episode), against the discounted return G_t
    that followed in the data (``discounted_returns``, rewards clipped as in training).

    With max bootstrapping Q estimates a better policy than the data's, so its mean may exceed G's; a
    correlation near 0 means the critic ranks by something other than value (the CQL term's data
    frequencies, or its initialisation). ``samples`` steps are drawn without replacement (``seed``).
    """
    w = _windows(token_cache, int(model.cfg.max_blocks), samples, seed, gamma)
    qa, g = _scores(model, w, batch)[np.arange(len(w.steps)), w.actions], w.returns
    corr = float(np.corrcoef(qa, g)[0, 1]) if qa.std() > 0 and g.std() > 0 else float("nan")
    return {
        "game": w.game,
        "samples": len(w.steps),
        "corr": corr,
        "mean_q": float(qa.mean()),
        "mean_return": float(g.mean()),
        "std_q": float(qa.std()),
        "std_return": float(g.std()),
    }


@torch.no_grad()
def imagined_value_check(
    model: torch.nn.Module,
    token_cache: str | os.PathLike,
    *,
    gamma: float = 0.99,
    samples: int = 512,
    seed: int = 0,
    batch: int = 128,
    per_action: bool = False,
) -> dict[str, float | int | str]:
    """Can the critic value what the world model imagines? For dataset transitions (s, a, r, s') read as the
    planner reads them (s' the last step of a full window inside the episode), the world model imagines s'
    from the same context and a by argmax decoding, token by token, as beam search does; then:

    - ``token_match``: share of s''s 36 tokens imagined right; ``changed_token_match``: the same over the
      tokens that differ from s's (what moved), ``frame_match``: share of frames imagined exactly;
    - ``next_value_corr`` / ``next_value_mae``: max-over-legal expected Q of the imagined s' against that of
      the real s';
    - ``bellman_gap_real`` / ``bellman_gap_imagined``: mean |Q(s, a) - (r + gamma max Q(s'))| with the real r and
      s' (clipped reward sign, as in training), and with the predicted reward sign and the imagined s'. A
      horizon-1 planner ranks actions by the imagined target; where its gap is much larger than the real
      one, planning replaces a fitted Q(s, a) with a worse estimate (README, session 13).

    ``per_action`` also runs the horizon-1 planner at s (imagined reward sign + gamma max Q of s' imagined after
    each legal action; as many imaginations again per action): ``plan_greedy_agreement`` (its choice equals
    greedy Q's at s), the median spreads of its scores and of Q(s, .) over the legal actions, and
    ``imagined_frames_differ`` (share of states where the actions lead to different imagined frames at all).
    """
    L = int(model.cfg.max_blocks)
    if L < 2:
        raise ValueError(f"imagined_value_check needs windows of 2 steps or more; the model's max_blocks is {L}.")
    w = _windows(token_cache, L, samples, seed, gamma)
    rewards = np.sign(w.rewards_in).astype(np.float32)  # clipped r of the step before s'
    device = next(model.parameters()).device
    task = games.task_id(w.game)
    legal = torch.as_tensor(games.legal_mask(w.game), device=device)
    tpb = int(model.cfg.tokens_per_block)
    n_obs = tpb - 1
    first = (L - 1) * tpb  # position of s''s first token in the window
    res: dict[str, list[np.ndarray]] = {k: [] for k in ("match", "exact", "vi", "vr", "gr", "gi")}
    if per_action:
        res.update({k: [] for k in ("agree", "plan_spread", "q_spread", "differ")})
    legal_actions = legal.nonzero().flatten()
    changed_right = changed_all = 0
    for i in range(0, len(w.steps), batch):
        real = torch.from_numpy(w.tokens[i : i + batch]).to(device)
        b = len(real)
        tid = torch.full((b,), task, device=device)
        mask = legal.expand(b, -1)
        imag, out = _imagine_last_step(model, real, tid)  # out: the forward of the real window
        q_prev = model.q_values(out.q_logits[:, :, -2], mask)  # (b, 18) at s
        a = real.view(b, L, tpb)[:, L - 2, -1]  # the data's action at s
        q_sa = q_prev.gather(1, a[:, None]).squeeze(1)
        v_real = model.q_values(out.q_logits[:, :, -1], mask).max(-1).values
        r_hat = _reward_sign(out)
        v_imag = _last_value(model, imag, tid, mask)
        if per_action:  # the horizon-1 planner: every legal action at s, each with its own imagined s'
            scores, frames = [], []
            for act in legal_actions:
                x = real.clone()
                x[:, first - 1] = act  # the action token of the step before s'
                im, out_x = _imagine_last_step(model, x, tid)
                frames.append(im[:, first : first + n_obs])
                scores.append(_reward_sign(out_x) + gamma * _last_value(model, im, tid, mask))
            plan, q_legal = torch.stack(scores, 1), q_prev[:, legal_actions]
            res["agree"].append((plan.argmax(1) == q_legal.argmax(1)).float().cpu().numpy())
            res["plan_spread"].append((plan.max(1).values - plan.min(1).values).float().cpu().numpy())
            res["q_spread"].append((q_legal.max(1).values - q_legal.min(1).values).float().cpu().numpy())
            differ = torch.stack([(f != frames[0]).any(-1) for f in frames[1:]], 1).any(1)
            res["differ"].append(differ.float().cpu().numpy())
        s_next, s_now = real.view(b, L, tpb)[:, L - 1, :n_obs], real.view(b, L, tpb)[:, L - 2, :n_obs]
        s_imag = imag.view(b, L, tpb)[:, L - 1, :n_obs]
        right = s_imag == s_next
        moved = s_next != s_now
        changed_right += int((right & moved).sum())
        changed_all += int(moved.sum())
        r = torch.from_numpy(rewards[i : i + batch]).to(device)
        res["match"].append(right.float().mean(-1).cpu().numpy())
        res["exact"].append(right.all(-1).float().cpu().numpy())
        res["vi"].append(v_imag.float().cpu().numpy())
        res["vr"].append(v_real.float().cpu().numpy())
        res["gr"].append((q_sa - (r + gamma * v_real)).abs().float().cpu().numpy())
        res["gi"].append((q_sa - (r_hat + gamma * v_imag)).abs().float().cpu().numpy())
    cat = {k: np.concatenate(v) for k, v in res.items()}
    vi, vr = cat["vi"], cat["vr"]
    planner = {}
    if per_action:
        planner = {
            "plan_greedy_agreement": float(cat["agree"].mean()),
            "plan_spread_median": float(np.median(cat["plan_spread"])),
            "q_spread_median": float(np.median(cat["q_spread"])),
            "imagined_frames_differ": float(cat["differ"].mean()),
        }
    return {
        "game": w.game,
        "samples": len(w.steps),
        "token_match": float(cat["match"].mean()),
        "changed_token_match": changed_right / changed_all if changed_all else float("nan"),
        "frame_match": float(cat["exact"].mean()),
        "next_value_corr": float(np.corrcoef(vi, vr)[0, 1]) if vi.std() > 0 and vr.std() > 0 else float("nan"),
        "next_value_mae": float(np.abs(vi - vr).mean()),
        "bellman_gap_real": float(cat["gr"].mean()),
        "bellman_gap_imagined": float(cat["gi"].mean()),
        **planner,
    }


def _imagine_last_step(
    model: torch.nn.Module, window: torch.Tensor, task_ids: torch.Tensor
) -> tuple[torch.Tensor, Any]:
    """The window with its last step's observation tokens replaced by argmax decoding, token by token, from
    everything before them (beam search's greedy imagination, done with full-window forwards), and the forward
    of the window as given (its first decoding pass), whose heads before the last step the callers read."""
    L, tpb = int(model.cfg.max_blocks), int(model.cfg.tokens_per_block)
    n_obs, first = tpb - 1, (L - 1) * tpb
    imag, given = window.clone(), None
    for k in range(n_obs):  # obs logits row (L - 1) * 36 + k - 1 predicts the last step's token k
        out = model(imag, task_ids)
        given = out if k == 0 else given
        imag[:, first + k] = out.obs_logits[:, (L - 1) * n_obs + k - 1].argmax(-1)
    return imag, given


def _reward_sign(out: Any) -> torch.Tensor:
    """The reward sign the model predicts for the step before the window's last one."""
    return out.reward_logits[:, -2].argmax(-1).float() - 1.0


def _last_value(
    model: torch.nn.Module, window: torch.Tensor, task_ids: torch.Tensor, legal: torch.Tensor
) -> torch.Tensor:
    """max over legal actions of the expected Q at the window's last step."""
    return model.q_values(model(window, task_ids).q_logits[:, :, -1], legal).max(-1).values


@torch.no_grad()
def greedy_agreement(
    models: dict[str, torch.nn.Module],
    token_cache: str | os.PathLike,
    *,
    samples: int = 2000,
    seed: int = 0,
    batch: int = 200,
) -> pd.DataFrame:
    """How often agents pick the same action on the same dataset windows: greedy Q for JOWA models,
    ``head_bc``'s argmax for MTBC ones, over the game's legal actions, at the last step of a full
    window. The "data" row and column are the dataset's own actions. High agreement with MTBC means
    the greedy agent chooses much as behaviour cloning does."""
    if not models:
        raise ValueError("greedy_agreement needs at least one model.")
    L = min(int(m.cfg.max_blocks) for m in models.values())
    w = _windows(token_cache, L, samples, seed)
    picks = {"data": w.actions, **_greedy_picks(models, w, games.legal_mask(w.game), batch)}
    names = list(picks)
    return pd.DataFrame(
        [[float((picks[a] == picks[b]).mean()) for b in names] for a in names], index=names, columns=names
    )


@torch.no_grad()
def q_trace(
    agent: Agent,
    game: str,
    steps: int = 8,
    *,
    env_config: EnvConfig | str = "official",
    seed: int = 0,
    forced: Sequence[int | str] | None = None,
    past_action: int | str | None = None,
) -> pd.DataFrame:
    """A JOWA agent's greedy Q at each step of one episode, as it plays: the expected Q of every legal action
    at the decision context, and the action executed. ``forced`` actions (full-set indices or names) replace
    the agent's first choices. With ``past_action`` the Q columns are read from a counterfactual context: the
    frames as played, every past action token replaced by that action (the agent still plays from the real
    history). The README's analysis of why a seed never launches the ball comes from this: did the state or
    the agent's own actions in its history move the critic?"""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}.")
    names = games.FULL_ACTION_SET
    forced_idx = [games.action_index(a) for a in (forced or [])]
    replace = None if past_action is None else games.action_index(past_action)
    cfg = protocol(env_config) if isinstance(env_config, str) else env_config
    game = games.canonical_name(game)
    legal_np = games.legal_mask(game)
    legal = torch.as_tensor(legal_np, device=agent.device)[None]
    task = torch.tensor([games.task_id(game)], device=agent.device)
    tpb = agent.model.cfg.tokens_per_block
    rows = []
    with AtariVecEnv(game, 1, cfg, seed=seed, backend="python") as env:
        agent.bind([game], seed=seed)
        obs = env.reset()
        for t in range(steps):
            chosen = np.asarray(agent.act(obs), dtype=np.int64).reshape(-1)
            if t < len(forced_idx):
                chosen = np.array([forced_idx[t]])
            history = agent.history_tokens(0)[:-1].clone()  # the decision context (drops the new action token)
            if replace is not None:
                history[tpb - 1 :: tpb] = replace  # every past action token (each block ends with one)
            with agent.autocast():
                out = agent.model(history[None], task)
            q = agent.model.q_values(out.q_logits[:, :, -1], legal)[0].float().cpu().numpy()
            obs, _, term, trunc, info = env.step(chosen)
            agent.observe_actions(info["actions"])
            rows.append({"step": t, **{names[a]: float(q[a]) for a in np.flatnonzero(legal_np)},
                         "executed": names[int(info["actions"][0])]})  # fmt: skip
            if term[0] or trunc[0]:
                break
    return pd.DataFrame(rows).set_index("step")


@torch.no_grad()
def breakout_q_by_state(
    model: torch.nn.Module,
    dataset: str | os.PathLike,
    token_cache: str | os.PathLike | None = None,
    *,
    ball_samples: int = 3000,
    gamma: float = 0.99,
    seed: int = 0,
    batch: int = 200,
) -> pd.DataFrame:
    """What a model ranks in the data's frames with and without a ball in play, per behaviour policy.

    Reads the model as the agent does (the last step of a full ``max_blocks`` window, see ``value_fit``)
    at every dataset step with no ball in play (RAM[101] = 0, by ``replay_ram``) and at ``ball_samples``
    steps with one (drawn with ``seed``). Rows are indexed by (state, policy), with "all" for the whole
    file: the windows read, the mean discounted return that followed in the data, the mean score of each
    legal action (``q_<ACTION>``: expected Q, or MTBC's logits) and the share of windows where each action
    ranks first (``first_<ACTION>``). It separates "the critic cannot see that no ball is in play" from
    "it sees it and still ranks FIRE low", and shows which behaviour's states carry the highest values.
    ``token_cache`` defaults to the dataset's own (``<Game>.tokens.h5`` beside it).
    """
    if ball_samples < 0:
        raise ValueError(f"ball_samples must be >= 0, got {ball_samples}.")
    path = Path(dataset)
    with open_dataset(path) as f:
        _require_breakout(f, path)
        actions = f["actions"][:].astype(np.int64)
        starts = f["episode_starts"][:]
        names, policy = _step_policies(f, starts, len(actions))
    cache = _cache_of(path, token_cache, actions)
    w = _windows(cache, int(model.cfg.max_blocks), len(actions), seed, gamma)
    no_ball = _no_ball_steps(path, len(actions))
    rng = np.random.default_rng(seed)
    in_play = np.flatnonzero(~no_ball[w.steps])
    keep = np.sort(
        np.r_[np.flatnonzero(no_ball[w.steps]), rng.choice(in_play, min(ball_samples, len(in_play)), replace=False)]
    )
    w = w.take(keep)
    scores = _scores(model, w, batch)[:, BREAKOUT_ACTIONS]
    first = scores.argmax(1)
    state = np.where(no_ball[w.steps], "no_ball", "ball")
    groups = [("all", np.ones(len(w.steps), bool))]
    groups += [(n, policy[w.steps] == k) for k, n in enumerate(names)]
    rows = []
    for st in ("no_ball", "ball"):
        for name, sel in groups:
            m = sel & (state == st)
            row: dict[str, float | int | str] = {"state": st, "policy": name, "windows": int(m.sum())}
            row["mean_return"] = float(w.returns[m].mean()) if m.any() else float("nan")
            for j, a in enumerate(BREAKOUT_ACTIONS):
                row[f"q_{games.FULL_ACTION_SET[a]}"] = float(scores[m, j].mean()) if m.any() else float("nan")
            for j, a in enumerate(BREAKOUT_ACTIONS):
                row[f"first_{games.FULL_ACTION_SET[a]}"] = float((first[m] == j).mean()) if m.any() else float("nan")
            rows.append(row)
    return pd.DataFrame(rows).set_index(["state", "policy"])


@torch.no_grad()
def breakout_tracker_agreement(
    models: dict[str, torch.nn.Module],
    dataset: str | os.PathLike,
    token_cache: str | os.PathLike | None = None,
    *,
    samples: int = 8000,
    far: int = 15,
    seed: int = 0,
    batch: int = 200,
) -> pd.DataFrame:
    """How often each agent picks what the noiseless RAM tracker would, in the data's Breakout frames.

    The tracker without noise is the data's best player; its action at each dataset step comes from the RAM
    by replay (``BreakoutTracker(epsilon=0)``). Each model is read as the agent reads it (greedy Q, or MTBC's
    ``head_bc``, at the last step of a full window; ``samples`` windows drawn with ``seed``). Rows: "moving"
    (ball in play and the tracker moves the paddle), "far" (ball in play more than ``far`` pixels from the
    tracker's aim, where the direction is plain), "no_ball" (the tracker presses FIRE). Columns: the windows,
    each model's agreement, "data" (the data's own actions) and "majority" (the share of the tracker's
    commonest action there: what always choosing it would score).
    """
    if not models:
        raise ValueError("breakout_tracker_agreement needs at least one model.")
    if samples < 1 or far < 0:
        raise ValueError(f"breakout_tracker_agreement needs samples >= 1 and far >= 0, got {samples} and {far}.")
    path = Path(dataset)
    with open_dataset(path) as f:
        _require_breakout(f, path)
        actions = f["actions"][:].astype(np.int64)
    cache = _cache_of(path, token_cache, actions)
    w = _windows(cache, min(int(m.cfg.max_blocks) for m in models.values()), samples, seed)
    ram = _ram_by_step(path, len(actions))[w.steps]
    legal = games.legal_mask(w.game)
    tracker = BreakoutTracker(epsilon=0.0)
    ideal = tracker.act(None, ram, np.broadcast_to(legal, (len(ram), legal.size)), np.random.default_rng(0))
    ball_x, ball_y, paddle_x = (ram[:, k].astype(np.int64) for k in (tracker.BALL_X, tracker.BALL_Y, tracker.PADDLE_X))
    in_play = ball_y != 0
    moving = in_play & np.isin(ideal, [games.FULL_ACTION_SET.index(a) for a in ("LEFT", "RIGHT")])
    plain = in_play & (np.abs(ball_x + tracker.AIM - paddle_x) > far)
    picks = {"data": w.actions, **_greedy_picks(models, w, legal, batch)}
    rows = []
    for state, sel in (("moving", moving), ("far", plain), ("no_ball", ~in_play)):
        row: dict[str, float | int | str] = {"state": state, "windows": int(sel.sum())}
        for name in [*models, "data"]:
            row[name] = float((picks[name][sel] == ideal[sel]).mean()) if sel.any() else float("nan")
        row["majority"] = float(np.bincount(ideal[sel]).max() / sel.sum()) if sel.any() else float("nan")
        rows.append(row)
    return pd.DataFrame(rows).set_index("state")


def breakout_stalls(
    agent: BaseAgent,
    env_config: EnvConfig | str = "official",
    *,
    steps: int = 300,
    num_envs: int = 4,
    seed: int = 0,
) -> dict[str, float | int | dict[str, float]]:
    """Does a playing agent launch the ball? ``steps`` agent steps in ``num_envs`` Breakout envs (episodes
    restart as in ``evaluation.evaluate``), with RAM[101] read before every choice: the share of steps
    with no ball in play, what the agent chose there, and its longest wait. Under the official protocol
    only FIRE launches, so a greedy agent that prefers anything else there waits until its 0.001 random
    actions press FIRE for it (about 4,000 steps on average)."""
    if steps < 1 or num_envs < 1:
        raise ValueError(f"steps and num_envs must be >= 1, got {steps} and {num_envs}.")
    cfg = protocol(env_config) if isinstance(env_config, str) else env_config
    no_ball = np.zeros((steps, num_envs), bool)
    chosen = np.zeros((steps, num_envs), np.int64)
    rewards = np.zeros(num_envs)
    wait = np.zeros(num_envs, np.int64)  # consecutive no-ball steps so far, per env
    lives_lost = longest = 0
    with AtariVecEnv("Breakout", num_envs, cfg, seed=seed, backend="python") as env:
        agent.bind(["Breakout"] * num_envs, seed=seed)
        obs = env.reset()
        lives = env.lives
        for t in range(steps):
            no_ball[t] = env.ram()[:, BreakoutTracker.BALL_Y] == 0
            wait = np.where(no_ball[t], wait + 1, 0)
            longest = max(longest, int(wait.max()))
            chosen[t] = np.asarray(agent.act(obs), dtype=np.int64).reshape(-1)
            obs, r, term, trunc, info = env.step(chosen[t])
            agent.observe_actions(info["actions"])
            rewards += r
            done = term | trunc
            lives_lost += int(((info["lives"] < lives) & ~done).sum())
            lives = info["lives"]
            if done.any():
                agent.reset(np.flatnonzero(done))
    waiting = chosen[no_ball]
    return {
        "steps": steps * num_envs,
        "no_ball_share": float(no_ball.mean()),
        "choices_without_ball": {
            games.FULL_ACTION_SET[a]: float((waiting == a).mean()) if len(waiting) else float("nan")
            for a in BREAKOUT_ACTIONS
        },
        "longest_wait": longest,
        "lives_lost": lives_lost,
        "reward_per_env": float(rewards.mean()),
    }
