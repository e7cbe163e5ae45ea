"""Evaluation: vectorised rollouts, normalised scores, aggregates with bootstrap CIs, result tables.

Protocol (spec 2 and 10). ``evaluate`` runs ``episodes`` episodes of every game with one
``AtariVecEnv`` per game and one ``act`` call per agent step for all envs of all games. An env whose
episode has ended starts another only while the game still needs episodes, so exactly ``episodes``
returns are collected per game (episode ``i`` is the ``i``-th started; env ``j`` starts episode ``j``).
The official default is the official protocol: no sticky actions, game-over termination, a cap of
108,000 agent steps, 16 episodes, environment seeds ``seed + j``. Variants: ``protocol("sticky")``
(repeat probability 0.25), ``protocol("fire")`` (FIRE after reset and after each life loss).

Terminal reward. Ours counts the reward of the step that ends the game (``count_terminal_reward=True``);
the official multi-env evaluation drops it (quirk Q13); ``False`` reproduces that. Truncated
episodes (step cap) always keep their last reward.

Scores (spec 10). HNS = (s - random) / (human - random); DNS = (s - random) / (dqn - random) with
the DQN column of the official results file (or the paper's Table 18 for held-out games). A game's
score is the mean return over its episodes; aggregates over games are mean, median and IQM =
``scipy.stats.trim_mean(x, 0.25)`` (the official definition: for 15 games drop 3 + 3, average 9).
The official scripts report no confidence interval; ours are percentile intervals of a stratified
bootstrap (Agarwal et al. 2021, as in ``rliable``): resample each game's episodes with replacement,
recompute the per-game means, the normalisation and the aggregate, repeat ``reps`` times.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy import stats as sp_stats
from tqdm.auto import tqdm

from jowa_core import games as games_mod
from jowa_core.agent import BaseAgent, ConstantAgent, RandomAgent
from jowa_core.envs import AtariVecEnv, Backend, EnvConfig
from jowa_core.runtime import atomic_path

__all__ = [
    "Aggregate",
    "ScoreTable",
    "aggregate_scores",
    "bootstrap_ci",
    "control_scores",
    "dqn_normalized",
    "evaluate",
    "human_normalized",
    "iqm",
    "normalize",
    "protocol",
    "stratified_bootstrap",
]

Metric = Literal["raw", "hns", "dns"]
Stat = Literal["mean", "median", "iqm"]
FORMAT = "jowa-score-table"
FORMAT_VERSION = 1

# ---------------------------------------------------------------------------------------------
# Normalised scores


def human_normalized(score: float | np.ndarray, game: str) -> float | np.ndarray:
    """HNS = (score - random) / (human - random) with the official reference scores (spec 10)."""
    ref = games_mod.reference_scores(game)
    return (np.asarray(score, dtype=np.float64) - ref.random) / (ref.human - ref.random)


def dqn_normalized(
    score: float | np.ndarray, game: str, dqn_source: Literal["results_file", "paper_table18"] = "results_file"
) -> float | np.ndarray:
    """DNS = (score - random) / (dqn - random); ``dqn_source`` picks the official results file's DQN
    column (default) or the paper's Table 18 (held-out games only), which differ (spec 10)."""
    ref = games_mod.reference_scores(game, dqn_source=dqn_source)
    if ref.dqn is None:
        raise games_mod.UnknownGameError(f"No DQN score for {game} in {dqn_source!r}; use dqn_source='results_file'.")
    return (np.asarray(score, dtype=np.float64) - ref.random) / (ref.dqn - ref.random)


def normalize(score: float | np.ndarray, game: str, metric: Metric = "hns") -> float | np.ndarray:
    """``score`` as raw, HNS or DNS."""
    if metric == "raw":
        return np.asarray(score, dtype=np.float64)
    if metric == "hns":
        return human_normalized(score, game)
    if metric == "dns":
        return dqn_normalized(score, game)
    raise ValueError(f"metric must be 'raw', 'hns' or 'dns'; got {metric!r}.")


def iqm(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Interquartile mean, ``scipy.stats.trim_mean(x, 0.25)`` (the official definition)."""
    return sp_stats.trim_mean(x, 0.25, axis=axis)


_STATS: dict[str, Callable[..., np.ndarray]] = {"mean": np.mean, "median": np.median, "iqm": iqm}


def _stat(stat: str) -> Callable[..., np.ndarray]:
    if stat not in _STATS:
        raise ValueError(f"stat must be one of {', '.join(_STATS)}; got {stat!r}.")
    return _STATS[stat]


# ---------------------------------------------------------------------------------------------
# Stratified bootstrap


def stratified_bootstrap(
    per_game: Sequence[np.ndarray],
    statistic: Callable[[np.ndarray], np.ndarray],
    reps: int = 2000,
    seed: int = 0,
) -> np.ndarray:
    """Bootstrap distribution (reps,) of ``statistic`` over games.

    Each replicate resamples every game's episodes with replacement (same count, independently per
    game: strata = games) and passes the (reps, G) matrix of resampled per-game means to
    ``statistic``, which must reduce the last axis: (reps, G) -> (reps,).
    """
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}.")
    if len(per_game) == 0:
        raise ValueError("stratified_bootstrap needs at least one game.")
    rng = np.random.default_rng(seed)
    means = np.empty((reps, len(per_game)))
    for j, x in enumerate(per_game):
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        if x.size == 0:
            raise ValueError(f"game {j} has no episodes.")
        means[:, j] = x[rng.integers(0, x.size, size=(reps, x.size))].mean(1)
    return np.asarray(statistic(means), dtype=np.float64).reshape(reps)


def bootstrap_ci(distribution: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Percentile interval: the (1-c)/2 and (1+c)/2 quantiles of a bootstrap distribution."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
    lo, hi = np.quantile(distribution, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(lo), float(hi)


@dataclass(frozen=True)
class Aggregate:
    """One aggregate over games, with its bootstrap percentile interval."""

    metric: str
    stat: str
    value: float
    low: float
    high: float
    confidence: float
    games: tuple[str, ...]
    reps: int


def aggregate_scores(
    per_game_returns: dict[str, np.ndarray],
    metric: Metric = "hns",
    stat: Stat = "iqm",
    *,
    confidence: float = 0.95,
    reps: int = 2000,
    seed: int = 0,
) -> Aggregate:
    """``stat`` across games of the normalised per-game mean return, with a stratified bootstrap CI."""
    names = [games_mod.canonical_name(g) for g in per_game_returns]
    returns = [np.asarray(v, dtype=np.float64) for v in per_game_returns.values()]
    fn = _stat(stat)
    if metric == "raw":
        offset, scale = np.zeros(len(names)), np.ones(len(names))
    else:
        try:  # normalisation is affine per game: (s - a) / b
            offset = np.array([float(normalize(0.0, g, metric)) for g in names])
            scale = np.array([float(normalize(1.0, g, metric)) for g in names]) - offset
        except games_mod.UnknownGameError as e:
            raise ValueError(f"cannot aggregate {metric.upper()}: {e} Use metric='raw' or drop those games.") from e
    point = float(fn(np.array([r.mean() for r in returns]) * scale + offset))
    dist = stratified_bootstrap(returns, lambda m: fn(m * scale + offset, axis=-1), reps=reps, seed=seed)
    lo, hi = bootstrap_ci(dist, confidence)
    return Aggregate(metric, stat, point, lo, hi, confidence, tuple(names), reps)


# ---------------------------------------------------------------------------------------------
# Score table


@dataclass
class ScoreTable:
    """Episode returns per agent and game, with the settings that produced them.

    Attributes:
        returns: agent -> game -> episode returns (raw, undiscounted), in episode order.
        lengths: agent -> game -> episode lengths in agent steps.
        meta: agent -> JSON-able settings (agent description, env protocol, seed, ...).
    """

    returns: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    lengths: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    meta: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def agents(self) -> list[str]:
        return list(self.returns)

    @property
    def games(self) -> list[str]:
        """Every game of every agent, in order of first appearance."""
        return list(dict.fromkeys(g for per in self.returns.values() for g in per))

    def _agent(self, agent: str | None) -> str:
        if agent is None:
            if len(self.returns) != 1:
                raise ValueError(f"the table holds agents {self.agents}; name one with agent=...")
            return self.agents[0]
        if agent not in self.returns:
            raise KeyError(f"no agent {agent!r} in the table; agents: {self.agents}.")
        return agent

    def episode_returns(self, game: str, agent: str | None = None) -> np.ndarray:
        a, g = self._agent(agent), games_mod.canonical_name(game)
        if g not in self.returns[a]:
            raise KeyError(f"agent {a!r} has no episodes of {g}; games: {list(self.returns[a])}.")
        return np.asarray(self.returns[a][g], dtype=np.float64)

    def mean(self, game: str, agent: str | None = None) -> float:
        """The game score: mean return over the episodes."""
        return float(self.episode_returns(game, agent).mean())

    def ci(
        self, game: str, agent: str | None = None, *, confidence: float = 0.95, reps: int = 2000, seed: int = 0
    ) -> tuple[float, float]:
        """Bootstrap percentile interval of the mean return of one game."""
        dist = stratified_bootstrap([self.episode_returns(game, agent)], lambda m: m[:, 0], reps, seed)
        return bootstrap_ci(dist, confidence)

    def aggregate(
        self,
        metric: Metric = "hns",
        stat: Stat = "iqm",
        *,
        agent: str | None = None,
        games: Sequence[str] | None = None,
        confidence: float = 0.95,
        reps: int = 2000,
        seed: int = 0,
    ) -> Aggregate:
        """``stat`` (mean, median, iqm) over games of the per-game ``metric`` (raw, hns, dns) of one
        agent (the only one by default), with a stratified bootstrap CI; ``games`` restricts the set."""
        a = self._agent(agent)
        chosen = list(self.returns[a]) if games is None else [games_mod.canonical_name(g) for g in games]
        per_game = {g: self.episode_returns(g, a) for g in chosen}
        return aggregate_scores(per_game, metric, stat, confidence=confidence, reps=reps, seed=seed)

    def aggregates(
        self, metric: Metric = "hns", stats: Sequence[str] = ("mean", "median", "iqm"), **kwargs: Any
    ) -> Any:
        """pandas DataFrame: one row per agent and stat with value and CI (agents whose games all have
        reference scores for ``metric``)."""
        import pandas as pd

        rows = []
        for a in self.agents:
            for s in stats:
                try:
                    r = self.aggregate(metric, s, agent=a, **kwargs)
                except ValueError:
                    continue
                rows.append({"agent": a, "metric": metric, "stat": s, "value": r.value, "ci_low": r.low,
                             "ci_high": r.high, "games": len(r.games)})  # fmt: skip
        return pd.DataFrame(rows, columns=["agent", "metric", "stat", "value", "ci_low", "ci_high", "games"])

    def to_frame(self, *, confidence: float = 0.95, reps: int = 2000, seed: int = 0) -> Any:
        """pandas DataFrame, one row per (agent, game): episodes, mean, CI, std, min, max, mean length,
        HNS and DNS of the mean (NaN for games without reference scores)."""
        import pandas as pd

        rows = []
        for a, per in self.returns.items():
            for g in per:
                x = self.episode_returns(g, a)
                lo, hi = self.ci(g, a, confidence=confidence, reps=reps, seed=seed)
                row = {"agent": a, "game": g, "episodes": x.size, "mean": x.mean(), "ci_low": lo, "ci_high": hi,
                       "std": x.std(ddof=1) if x.size > 1 else 0.0, "min": x.min(), "max": x.max(),
                       "mean_length": float(np.mean(self.lengths.get(a, {}).get(g, [np.nan])))}  # fmt: skip
                for m in ("hns", "dns"):
                    try:
                        row[m] = float(normalize(x.mean(), g, m))
                    except games_mod.UnknownGameError:
                        row[m] = math.nan
                rows.append(row)
        return pd.DataFrame(rows)

    def to_markdown(self, *, confidence: float = 0.95, digits: int = 1) -> str:
        """A markdown table (agent, game, episodes, mean [CI], HNS), then the HNS aggregates where defined."""
        df = self.to_frame(confidence=confidence)
        pct = round(confidence * 100)
        lines = [f"| agent | game | episodes | mean [{pct}% CI] | HNS |", "|---|---|---:|---:|---:|"]
        for r in df.itertuples():
            hns = "" if math.isnan(r.hns) else f"{r.hns:.3f}"
            lines.append(
                f"| {r.agent} | {r.game} | {r.episodes} | {r.mean:.{digits}f} [{r.ci_low:.{digits}f}, "
                f"{r.ci_high:.{digits}f}] | {hns} |"
            )
        agg = self.aggregates("hns", confidence=confidence)
        if len(agg):
            lines += ["", f"| agent | HNS stat | value [{pct}% CI] | games |", "|---|---|---:|---:|"]
            for r in agg.itertuples():
                lines.append(f"| {r.agent} | {r.stat} | {r.value:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}] | {r.games} |")
        return "\n".join(lines) + "\n"

    def best(self, agents: Sequence[str] | None = None) -> dict[str, tuple[str, float]]:
        """game -> (agent, mean) of the highest mean among ``agents`` (default all): e.g. the best
        control a trained agent must beat."""
        out: dict[str, tuple[str, float]] = {}
        for a in agents or self.agents:
            for g in self.returns[self._agent(a)]:
                m = self.mean(g, a)
                if g not in out or m > out[g][1]:
                    out[g] = (a, m)
        return out

    def merge(self, *others: ScoreTable) -> ScoreTable:
        """A new table with the agents of all tables (an agent's games are combined; a game twice is an error)."""
        out = ScoreTable()
        for t in (self, *others):
            for a, per in t.returns.items():
                for g, r in per.items():
                    if g in out.returns.get(a, {}):
                        raise ValueError(f"agent {a!r} has {g} in two tables; rename one agent before merging.")
                    out.returns.setdefault(a, {})[g] = list(r)
                    out.lengths.setdefault(a, {})[g] = list(t.lengths.get(a, {}).get(g, []))
                out.meta.setdefault(a, {}).update(t.meta.get(a, {}))
        return out

    def to_dict(self) -> dict[str, Any]:
        agents = {}
        for a, per in self.returns.items():
            agents[a] = {
                "meta": self.meta.get(a, {}),
                "games": {
                    g: {
                        "returns": [float(v) for v in r],
                        "lengths": [int(v) for v in self.lengths.get(a, {}).get(g, [])],
                    }
                    for g, r in per.items()
                },
            }
        return {"format": FORMAT, "version": FORMAT_VERSION, "agents": agents}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the table as JSON (atomically); returns the path."""
        path = Path(path)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScoreTable:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError(f"not a score table: expected format {FORMAT!r} (written by ScoreTable.save).")
        if d.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"score table version {d.get('version')} is not {FORMAT_VERSION}; it was written by another version."
            )
        t = cls()
        for a, entry in d["agents"].items():
            t.meta[a] = dict(entry.get("meta", {}))
            t.returns[a] = {g: [float(v) for v in e["returns"]] for g, e in entry["games"].items()}
            t.lengths[a] = {g: [int(v) for v in e.get("lengths", [])] for g, e in entry["games"].items()}
        return t

    @classmethod
    def load(cls, path: str | os.PathLike) -> ScoreTable:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no score table at {path}; write one with ScoreTable.save(path).")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); was the write interrupted?") from e
        return cls.from_dict(d)


# ---------------------------------------------------------------------------------------------
# Rollouts

_PROTOCOLS: dict[str, Callable[[], EnvConfig]] = {
    "official": EnvConfig.official,
    "sticky": lambda: EnvConfig.sticky(0.25),
    "fire": lambda: EnvConfig(fire_on_reset=True, fire_on_life_loss=True),
    "sticky_fire": lambda: EnvConfig(repeat_action_probability=0.25, fire_on_reset=True, fire_on_life_loss=True),
}


def protocol(name: str) -> EnvConfig:
    """Named evaluation protocols: "official" (spec 2), "sticky" (repeat probability 0.25, Machado
    et al.), "fire" (official + FIRE after reset and at the start of each life), "sticky_fire"."""
    if name not in _PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; choose one of {', '.join(_PROTOCOLS)} or pass an EnvConfig.")
    return _PROTOCOLS[name]()


def _is_deterministic(cfg: EnvConfig) -> bool:
    return cfg.repeat_action_probability == 0.0 and cfg.noop_max == 0


class _Video:
    """Streams one episode's frames (84x84 grayscale, enlarged ``scale`` times) to a file: imageio when
    installed (mp4 needs imageio-ffmpeg; gif needs pillow), else OpenCV for mp4."""

    def __init__(self, path: Path, fps: int = 15, scale: int = 4) -> None:
        self.path, self.scale, self._writer, self._cv = path, scale, None, None
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            import imageio.v2 as imageio

            kwargs = {"fps": fps} if path.suffix == ".mp4" else {"duration": 1000 / fps, "loop": 0}
            if path.suffix == ".mp4":
                kwargs["macro_block_size"] = 1
            self._writer = imageio.get_writer(str(path), **kwargs)
            return
        except (ImportError, OSError, ValueError, RuntimeError) as e:  # no imageio / plugin: OpenCV or skip
            reason = f"{type(e).__name__}: {e}"
        if path.suffix == ".mp4":
            import cv2

            side = 84 * scale
            cv = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (side, side), isColor=False)
            if cv.isOpened():
                self._cv = cv
                return
        warnings.warn(
            f"video {path.name} skipped: no writer ({reason}). `pip install imageio imageio-ffmpeg` for mp4/gif.",
            stacklevel=3,
        )

    @property
    def ok(self) -> bool:
        return self._writer is not None or self._cv is not None

    def add(self, frame: np.ndarray) -> None:
        big = np.kron(frame, np.ones((self.scale, self.scale), np.uint8))
        if self._writer is not None:
            self._writer.append_data(big)
        elif self._cv is not None:
            self._cv.write(big)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._cv is not None:
            self._cv.release()
        self._writer = self._cv = None


def evaluate(
    agent: BaseAgent | Callable[[], BaseAgent],
    games: str | Sequence[str],
    episodes: int = 16,
    *,
    env_config: EnvConfig | str | None = None,
    num_envs: int | None = None,
    max_steps: int | None = 108_000,
    seed: int = 0,
    count_terminal_reward: bool = True,
    progress: bool = True,
    video_dir: str | os.PathLike | None = None,
    video_format: Literal["mp4", "gif"] = "mp4",
    backend: Backend | None = None,
    name: str | None = None,
) -> ScoreTable:
    """Roll out ``agent`` for ``episodes`` episodes of each game; returns a ``ScoreTable`` (one agent).

    Args:
        agent: an agent (``jowa_core.agent`` interface) or a zero-argument factory of one.
        games: game names; all games run together, one ``act`` call per step for all their envs.
        episodes: episodes per game (official 16).
        env_config: an ``EnvConfig`` or a ``protocol`` name (default: the official protocol).
        num_envs: parallel envs per game (default ``episodes``: all at once); with fewer, an env
            whose episode ended starts the next one until ``episodes`` have started.
        max_steps: episode cap in agent steps (overrides ``env_config.max_episode_steps``; None keeps it).
        seed: env ``j`` of each game is seeded ``seed + j``; the agent's random stream is restarted
            with ``seed`` (``bind``), so a table is reproducible from its seed.
        count_terminal_reward: count the reward of the game-over step (ours, default); False drops
            it as the official evaluation does (quirk Q13).
        progress: tqdm bar over finished episodes.
        video_dir: write the first episode of each game as ``<agent>_<Game>.<video_format>`` there.
        backend: ``AtariVecEnv`` backend; None: "python" for agents that read the RAM (``needs_ram``, which then get
            ``observe_ram`` before each ``act``), else "native".
        name: the agent's name in the table (default ``agent.name``).
    """
    if not hasattr(agent, "act"):
        agent = agent()
    game_list = (
        [games_mod.canonical_name(games)] if isinstance(games, str) else [games_mod.canonical_name(g) for g in games]
    )
    if not game_list or len(set(game_list)) != len(game_list):
        raise ValueError(f"games must be a non-empty list of distinct game names; got {games!r}.")
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}.")
    cfg = protocol(env_config) if isinstance(env_config, str) else (env_config or EnvConfig.official())
    if max_steps is not None:
        cfg = dataclasses.replace(cfg, max_episode_steps=int(max_steps))
    n_env = min(episodes, num_envs or episodes)
    if n_env < 1:
        raise ValueError(f"num_envs must be >= 1, got {num_envs}.")
    label = name or getattr(agent, "name", type(agent).__name__)

    G, S = len(game_list), len(game_list) * n_env
    slot_game = np.repeat(np.arange(G), n_env)  # slot s = g * n_env + j
    agent.bind([game_list[g] for g in slot_game], seed=seed)
    reads_ram = bool(getattr(agent, "needs_ram", False))  # e.g. PolicyAgent with the RAM tracker
    if backend is None:
        backend = "python" if reads_ram else "native"
    elif reads_ram and backend != "python":
        raise ValueError(f"{label} reads the console RAM, which only backend='python' gives; pass that or None.")
    envs = [AtariVecEnv(g, n_env, cfg, seed=seed, backend=backend) for g in game_list]
    noop = [int(np.flatnonzero(games_mod.legal_mask(g))[0]) for g in game_list]  # NOOP, for envs that are done
    idle_actions = np.array([noop[g] for g in slot_game], dtype=np.int64)
    returns = np.full((G, episodes), np.nan)
    lengths = np.zeros((G, episodes), np.int64)
    episode_of = np.tile(np.arange(n_env), G)
    started = np.full(G, n_env)
    active = np.ones(S, bool)
    ret = np.zeros(S)
    steps = np.zeros(S, np.int64)
    obs = np.concatenate([env.reset() for env in envs])  # (S, 84, 84)
    videos: dict[int, _Video] = {}
    if video_dir is not None:
        for g, game in enumerate(game_list):
            v = _Video(Path(video_dir) / f"{label}_{game}.{video_format}")
            if v.ok:
                videos[g * n_env] = v
                v.add(obs[g * n_env])

    t0, agent_steps, iteration = time.perf_counter(), 0, 0
    bar = tqdm(total=G * episodes, desc=f"evaluate {label}", disable=not progress, unit="ep")
    try:
        while active.any():
            live = np.flatnonzero(active)
            if reads_ram:
                agent.observe_ram(np.concatenate([env.ram() for env in envs])[live], live)
            chosen = np.asarray(agent.act(obs[live], live), dtype=np.int64).reshape(-1)
            if chosen.shape != live.shape:
                raise ValueError(f"agent.act returned {chosen.shape[0]} actions for {len(live)} envs.")
            actions = idle_actions.copy()
            actions[live] = chosen
            executed = actions.copy()
            rew = np.zeros(S)
            term = np.zeros(S, bool)
            done = np.zeros(S, bool)
            final_obs: dict[int, np.ndarray] = {}
            for g, env in enumerate(envs):
                sl = slice(g * n_env, (g + 1) * n_env)
                if not active[sl].any():
                    continue  # every episode of this game is over: stop emulating it
                o, r, te, tr, info = env.step(actions[sl])
                obs[sl], rew[sl], term[sl], done[sl] = o, r, te, te | tr
                executed[sl], final_obs[g] = info["actions"], info["final_obs"]
            agent.observe_actions(executed[live], live)
            counted = rew if count_terminal_reward else np.where(term, 0.0, rew)
            ret[live] += counted[live]
            steps[live] += 1
            agent_steps += len(live)
            for s, v in list(videos.items()):
                v.add(final_obs[slot_game[s]][s % n_env])  # == obs[s] unless the episode ended
                if done[s]:
                    v.close()
                    del videos[s]
            ended = live[done[live]]
            for s in ended:
                g = slot_game[s]
                returns[g, episode_of[s]], lengths[g, episode_of[s]] = ret[s], steps[s]
                ret[s], steps[s] = 0.0, 0
                if started[g] < episodes:  # the autoreset obs starts the next episode
                    episode_of[s] = started[g]
                    started[g] += 1
                else:
                    active[s] = False
            if len(ended):
                agent.reset(ended)
                bar.update(len(ended))
            if len(ended) or (progress and iteration % 1000 == 0):
                bar.set_postfix(agent_steps=agent_steps, per_s=f"{agent_steps / (time.perf_counter() - t0):.0f}")
            iteration += 1
    finally:
        bar.close()
        for v in videos.values():
            v.close()
        for env in envs:
            env.close()

    meta = {
        "agent": agent.describe() if hasattr(agent, "describe") else {"name": label},
        "env_config": cfg.to_dict(), "episodes": episodes, "num_envs": n_env, "seed": seed,
        "count_terminal_reward": count_terminal_reward, "backend": backend,
        "agent_steps": int(agent_steps), "wall_s": round(time.perf_counter() - t0, 3),
    }  # fmt: skip
    return ScoreTable(
        returns={label: {g: returns[i].tolist() for i, g in enumerate(game_list)}},
        lengths={label: {g: lengths[i].tolist() for i, g in enumerate(game_list)}},
        meta={label: meta},
    )


def control_scores(
    games: str | Sequence[str],
    episodes: int = 16,
    *,
    actions: Sequence[int] | None = None,
    include_random: bool = True,
    replicate_deterministic: bool = True,
    seed: int = 0,
    **kwargs: Any,
) -> ScoreTable:
    """Scores of the controls a trained agent must beat: uniform random and every constant legal action.

    ``ConstantAgent(a)`` runs on the games where ``a`` is legal (``actions`` restricts the set).
    With ``replicate_deterministic`` and a deterministic protocol (no sticky actions, no no-op
    starts) a constant agent's episodes are all the same, so one is run and its return repeated
    ``episodes`` times (``meta["replicated"]`` says so). Other keyword arguments go to ``evaluate``.
    Beware: a constant action that never ends an episode (e.g. Breakout without FIRE) runs to the cap.
    """
    game_list = [games] if isinstance(games, str) else list(games)
    game_list = [games_mod.canonical_name(g) for g in game_list]
    masks = {g: games_mod.legal_mask(g) for g in game_list}
    tables = []
    if include_random:
        tables.append(evaluate(RandomAgent(), game_list, episodes, seed=seed, **kwargs))
    cfg = kwargs.get("env_config")
    cfg = protocol(cfg) if isinstance(cfg, str) else (cfg or EnvConfig.official())
    replicate = replicate_deterministic and _is_deterministic(cfg)
    for a in actions if actions is not None else range(games_mod.NUM_ACTIONS):
        on = [g for g in game_list if masks[g][a]]
        if not on:
            continue
        t = evaluate(ConstantAgent(a), on, 1 if replicate else episodes, seed=seed, **kwargs)
        if replicate:
            (name,) = t.agents
            for g in on:
                t.returns[name][g] = t.returns[name][g] * episodes
                t.lengths[name][g] = t.lengths[name][g] * episodes
            t.meta[name]["replicated"] = True
            t.meta[name]["episodes"] = episodes
        tables.append(t)
    return tables[0].merge(*tables[1:]) if tables else ScoreTable()
