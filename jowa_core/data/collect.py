"""Collect offline datasets by running behaviour policies in vectorised ALE environments.

``collect`` steps ``num_envs`` envs (``jowa_core.envs.AtariVecEnv``, official protocol unless told
otherwise) and writes each finished episode with ``DatasetWriter.add_episode``, aligned as
``(o_t, a_t, r_t, terminal_t)``: ``actions[t]`` is the full-set action executed in ``observations[t]``
and ``rewards[t]`` the raw reward it earned; ``lives[t]`` is ALE's lives counter when ``observations[t]``
was seen (``format.life_starts`` finds each life's first step from it).

Exact budget rule: exactly ``num_transitions`` transitions are written. Every agent step adds one
transition per env in env order; on the last step only the first ``remaining`` envs' transitions are
kept. Episodes still running at the end are written with their last kept step marked truncated.
Episodes appear in the file in the order they end (env order within a step), then the unfinished
ones by env index. A killed or failing collection leaves no final file (DatasetWriter's atomic rename).
Running episodes are buffered in memory (about 7 KB per step) until they end, so memory is bounded
by ``num_transitions`` and, in practice, by the longest episodes (``EnvConfig.max_episode_steps``).

Policies are small classes with ``act(obs, ram, legal_mask, rng) -> full-set actions`` and
``describe() -> dict`` (stored as the JSON attribute ``behaviour_policy``). ``MixedPolicy`` assigns a
sub-policy to each new episode and the file records which one produced each episode in the extra
dataset ``episode_policy`` (E,) int16 with names in the attribute ``episode_policy_names``; the env
that ran each episode is in ``episode_env`` (E,) int16. Root attributes also hold ``env_config`` (the
frame pipeline as JSON) and ``collection`` (seed, envs, backend, versions).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from jowa_core import games
from jowa_core.config import FRAME_SIZE
from jowa_core.data.format import DatasetWriter, dataset_path
from jowa_core.envs import FIRE, NOOP, AtariVecEnv, Backend, EnvConfig
from jowa_core.runtime import available_cores, configure_threads

RIGHT = games.FULL_ACTION_SET.index("RIGHT")
LEFT = games.FULL_ACTION_SET.index("LEFT")


def _legal_choice(legal_mask: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    legal = np.flatnonzero(legal_mask)
    return legal[rng.integers(0, len(legal), size=n)]


def _epsilon_mix(actions: np.ndarray, epsilon: float, legal_mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Replace each row's action by a uniform legal one with probability ``epsilon`` (one draw per env)."""
    if epsilon <= 0.0:
        return actions
    explore = rng.random(len(actions)) < epsilon
    if explore.any():
        actions = actions.copy()
        actions[explore] = _legal_choice(legal_mask, int(explore.sum()), rng)
    return actions


def _check_epsilon(epsilon: float) -> float:
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must be in [0, 1], got {epsilon}.")
    return float(epsilon)


class Policy:
    """A behaviour policy acting on a batch of envs in the full 18-action set.

    ``act`` must treat rows independently (``MixedPolicy`` calls it on subsets of rows). Policies that
    read the console RAM set ``needs_ram = True``; ``collect`` then uses the env backend that has it.
    """

    name = "policy"
    needs_ram = False

    def act(
        self, obs: np.ndarray, ram: np.ndarray | None, legal_mask: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray:
        """obs (N, 84, 84) uint8, ram (N, 128) uint8 or None, legal_mask (18,) bool -> (N,) int64 actions."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name}

    def check_game(self, game: str) -> None:
        """Raise a clear error if this policy cannot play ``game`` (checked before collecting)."""

    # Per-episode assignment hooks (only MixedPolicy overrides them).
    def start_episodes(self, env_ids: np.ndarray, rng: np.random.Generator) -> None:
        """Called with the envs that start a new episode (all envs at the beginning)."""

    def episode_labels(self) -> list[str]:
        """Names of the sub-policies an episode can be labelled with."""
        return [self.name]

    def episode_label(self, env_id: int) -> int:
        """Index into ``episode_labels()`` of the sub-policy running env ``env_id``'s episode."""
        return 0


class UniformRandom(Policy):
    """Uniform over the game's legal actions (the usual "random" reference policy)."""

    name = "random"

    def act(self, obs, ram, legal_mask, rng):
        return _legal_choice(legal_mask, len(obs), rng)

    def describe(self) -> dict:
        return {"name": self.name, "type": "UniformRandom"}


class EpsilonGreedy(Policy):
    """``agent(obs) -> full-set actions`` with probability 1 - epsilon, else a uniform legal action.

    One draw per env and step (the official JOWA evaluation shares one draw across envs, quirk Q15).
    """

    def __init__(self, agent: Callable[[np.ndarray], np.ndarray], epsilon: float = 0.05, name: str = "agent"):
        self.agent = agent
        self.epsilon = _check_epsilon(epsilon)
        self.name = f"{name}_eps{epsilon:g}"
        self._agent_name = name

    def act(self, obs, ram, legal_mask, rng):
        actions = np.asarray(self.agent(obs), dtype=np.int64).reshape(len(obs))
        return _epsilon_mix(actions, self.epsilon, legal_mask, rng)

    def describe(self) -> dict:
        return {"name": self.name, "type": "EpsilonGreedy", "agent": self._agent_name, "epsilon": self.epsilon}


class BreakoutTracker(Policy):
    """Scripted Breakout player from RAM: move the paddle under the ball, FIRE when no ball is in play.
    With ``hold`` it launches the ball but then holds that action instead of tracking (a lazy player).

    RAM[99] = ball x, RAM[101] = ball y (0 when no ball is in play), RAM[72] = paddle x. The paddle
    aims at ``ball_x + AIM + offset``; ``AIM`` = -10 was tuned on random seeds (it lines the paddle's
    centre up with the ball); a nonzero ``offset`` makes a deliberately worse player. ``deadzone``
    avoids jitter. With probability ``epsilon`` a uniform legal action is taken instead.
    """

    needs_ram = True
    AIM = -10
    BALL_X, BALL_Y, PADDLE_X = 99, 101, 72

    def __init__(self, epsilon: float = 0.0, offset: int = 0, deadzone: int = 3, hold: int | str | None = None):
        self.epsilon = _check_epsilon(epsilon)
        self.offset = int(offset)
        self.deadzone = int(deadzone)
        self.hold = None if hold is None else games.action_index(hold)
        if self.hold is not None and not games.legal_mask("Breakout")[self.hold]:
            raise ValueError(f"hold must be a legal Breakout action (NOOP, FIRE, RIGHT, LEFT), got {hold!r}.")
        if self.hold is not None:  # a lazy player that still launches the ball
            self.name = f"launch_hold_{games.FULL_ACTION_SET[self.hold].lower()}_eps{epsilon:g}"
        else:
            self.name = f"tracker_eps{epsilon:g}" + (f"_off{offset:+d}" if offset else "")

    def check_game(self, game: str) -> None:
        if games.canonical_name(game) != "Breakout":
            raise ValueError(f"BreakoutTracker reads Breakout's RAM layout; it cannot play {game!r}.")

    def act(self, obs, ram, legal_mask, rng):
        if ram is None:
            raise ValueError("BreakoutTracker needs RAM: step the env with backend='python' (collect() does).")
        ball_x = ram[:, self.BALL_X].astype(np.int64)
        ball_y = ram[:, self.BALL_Y]
        paddle_x = ram[:, self.PADDLE_X].astype(np.int64)
        gap = ball_x + self.AIM + self.offset - paddle_x
        actions = np.where(gap > self.deadzone, RIGHT, np.where(gap < -self.deadzone, LEFT, NOOP))
        if self.hold is not None:
            actions = np.full_like(actions, self.hold)
        actions = np.where(ball_y == 0, FIRE, actions).astype(np.int64)
        return _epsilon_mix(actions, self.epsilon, legal_mask, rng)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "type": "BreakoutTracker",
            "epsilon": self.epsilon,
            "offset": self.offset,
            "aim": self.AIM,
            "deadzone": self.deadzone,
            "hold": None if self.hold is None else games.FULL_ACTION_SET[self.hold],
            "ram": {"ball_x": self.BALL_X, "ball_y": self.BALL_Y, "paddle_x": self.PADDLE_X},
        }


class LazyPolicy(Policy):
    """Holds one action (e.g. RIGHT) all the time; epsilon-random so games that wait for FIRE start."""

    def __init__(self, action: int | str = "RIGHT", epsilon: float = 0.05):
        self.action = games.action_index(action)
        self.epsilon = _check_epsilon(epsilon)
        self.name = f"lazy_{games.FULL_ACTION_SET[self.action].lower()}_eps{epsilon:g}"

    def check_game(self, game: str) -> None:
        if not games.legal_mask(game)[self.action]:
            raise ValueError(
                f"LazyPolicy holds {games.FULL_ACTION_SET[self.action]}, which is not legal in {game}; legal: "
                f"{[games.FULL_ACTION_SET[a] for a in games.legal_actions(game)]}."
            )

    def act(self, obs, ram, legal_mask, rng):
        return _epsilon_mix(np.full(len(obs), self.action, np.int64), self.epsilon, legal_mask, rng)

    def describe(self) -> dict:
        return {"name": self.name, "type": "LazyPolicy", "action": self.action, "epsilon": self.epsilon}


class MixedPolicy(Policy):
    """Gives each new episode a sub-policy drawn with ``weights``; rows of ``act`` are env indices.

    The sub-policies must treat rows independently (all the policies above do). ``episode_label``
    tells ``collect`` which sub-policy produced each episode.
    """

    name = "mixed"

    def __init__(self, policies: Sequence[Policy], weights: Sequence[float] | None = None):
        if not policies:
            raise ValueError("MixedPolicy needs at least one sub-policy.")
        names = [p.name for p in policies]
        if len(set(names)) != len(names):
            raise ValueError(f"MixedPolicy sub-policy names must be distinct (they label episodes): {names}.")
        w = np.ones(len(policies)) if weights is None else np.asarray(weights, dtype=np.float64)
        if w.shape != (len(policies),) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(
                f"weights must be {len(policies)} non-negative numbers with a positive sum, got {weights}."
            )
        self.policies = list(policies)
        self.weights = w / w.sum()
        self.needs_ram = any(p.needs_ram for p in policies)
        self._assigned = np.zeros(0, np.int64)

    def check_game(self, game: str) -> None:
        for p in self.policies:
            p.check_game(game)

    def start_episodes(self, env_ids, rng):
        env_ids = np.asarray(env_ids, dtype=np.int64)
        if len(env_ids) and env_ids.max() >= len(self._assigned):
            self._assigned = np.concatenate(
                [self._assigned, np.zeros(env_ids.max() + 1 - len(self._assigned), np.int64)]
            )
        self._assigned[env_ids] = rng.choice(len(self.policies), size=len(env_ids), p=self.weights)

    def episode_labels(self) -> list[str]:
        return [p.name for p in self.policies]

    def episode_label(self, env_id: int) -> int:
        return int(self._assigned[env_id])

    def act(self, obs, ram, legal_mask, rng):
        n = len(obs)
        if len(self._assigned) < n:
            raise RuntimeError("MixedPolicy.start_episodes must be called for every env before act().")
        actions = np.empty(n, np.int64)
        assigned = self._assigned[:n]
        for k in np.unique(assigned):
            rows = np.flatnonzero(assigned == k)
            actions[rows] = self.policies[k].act(obs[rows], None if ram is None else ram[rows], legal_mask, rng)
        return actions

    def describe(self) -> dict:
        return {
            "name": self.name,
            "type": "MixedPolicy",
            "assignment": "per episode, drawn with weights",
            "weights": self.weights.tolist(),
            "policies": [p.describe() for p in self.policies],
        }


def mixed_quality(game: str) -> MixedPolicy:
    """Several behaviour qualities in one dataset.

    Breakout: the RAM tracker at epsilons 0.05/0.3/0.5/0.7/1.0 (1.0 is uniform random), a lazy player
    holding RIGHT, and a tracker aiming 20 pixels off. Other games (no scripted player): uniform random
    and lazy players holding each of the first two legal movement actions.
    """
    game = games.canonical_name(game)
    if game == "Breakout":
        subs: list[Policy] = [BreakoutTracker(epsilon=e) for e in (0.05, 0.3, 0.5, 0.7, 1.0)]
        subs += [LazyPolicy("RIGHT", epsilon=0.05), BreakoutTracker(epsilon=0.05, offset=20)]
        return MixedPolicy(subs)
    moves = [a for a in games.legal_actions(game) if a not in (NOOP, FIRE)][:2]
    return MixedPolicy([UniformRandom()] + [LazyPolicy(a, epsilon=0.05) for a in moves])


POLICY_NAMES = ("random", "lazy", "tracker", "mixed")


def make_policy(spec: str | Policy, game: str) -> Policy:
    """A policy from its name (``random``, ``lazy``, ``tracker``, ``mixed``) or the object itself."""
    if isinstance(spec, Policy):
        return spec
    key = str(spec).lower()
    if key == "random":
        return UniformRandom()
    if key == "lazy":
        moves = [a for a in games.legal_actions(game) if a not in (NOOP, FIRE)]
        return LazyPolicy(moves[0] if moves else FIRE)
    if key in ("tracker", "breakout_tracker"):
        return BreakoutTracker(epsilon=0.05)
    if key in ("mixed", "mixed_quality"):
        return mixed_quality(game)
    raise ValueError(f"Unknown policy {spec!r}; use one of {POLICY_NAMES} or pass a Policy object.")


# ---------------------------------------------------------------------------------------------


class _EpisodeBuffer:
    """Growable per-env storage of the running episode (amortised O(1) appends, no per-step lists)."""

    def __init__(self, capacity: int = 1024):
        self.obs = np.empty((capacity, FRAME_SIZE, FRAME_SIZE), np.uint8)
        self.actions = np.empty(capacity, np.uint8)
        self.rewards = np.empty(capacity, np.float32)
        self.lives = np.empty(capacity, np.uint8)
        self.n = 0

    def append(self, obs: np.ndarray, action: int, reward: float, lives: int) -> None:
        if self.n == len(self.actions):
            cap = 2 * self.n
            self.obs = np.concatenate([self.obs, np.empty_like(self.obs)])[:cap]
            self.actions = np.resize(self.actions, cap)
            self.rewards = np.resize(self.rewards, cap)
            self.lives = np.resize(self.lives, cap)
        self.obs[self.n] = obs
        self.actions[self.n] = action
        self.rewards[self.n] = reward
        self.lives[self.n] = lives
        self.n += 1

    def flush(self, writer: DatasetWriter, terminal: bool) -> None:
        n = self.n
        ends = np.zeros(n, bool)
        ends[-1] = True
        writer.add_episode(
            self.obs[:n], self.actions[:n], self.rewards[:n], ends & terminal, ends & (not terminal), self.lives[:n]
        )
        self.n = 0


def collect(
    game: str,
    num_transitions: int,
    out_path: str | os.PathLike,
    policy: str | Policy = "random",
    *,
    num_envs: int = 8,
    seed: int = 0,
    config: EnvConfig | None = None,
    backend: Backend | None = None,
    num_threads: int | None = None,
    progress: bool = True,
) -> Path:
    """Run ``policy`` in ``num_envs`` envs of ``game`` and write exactly ``num_transitions`` to ``out_path``.

    Args:
        game: any spelling ``games.canonical_name`` accepts.
        num_transitions: transitions to write (see the module docstring for the exact rule).
        out_path: the ``.h5`` file to create (it appears only when complete).
        policy: a ``Policy`` or a name from ``POLICY_NAMES``.
        num_envs: parallel envs; env ``i`` is seeded ``seed + i``.
        seed: seeds the emulators and the policy's random generator (``np.random.default_rng(seed)``).
        config: frame pipeline and episode rules (default ``EnvConfig.official()``).
        backend: ``"native"`` or ``"python"``; default native, python when the policy reads RAM.
        num_threads: native env worker threads (default ``min(num_envs, free cores)``); they count
            toward the core budget, so torch gets the rest while collecting (restored afterwards).
        progress: show a tqdm bar.

    Returns:
        the path of the written file.
    """
    game = games.canonical_name(game)
    if num_transitions < 1:
        raise ValueError(f"num_transitions must be >= 1, got {num_transitions}.")
    if num_envs < 1:
        raise ValueError(f"num_envs must be >= 1, got {num_envs}.")
    policy = make_policy(policy, game)
    policy.check_game(game)
    config = config or EnvConfig.official()
    backend = backend or ("python" if policy.needs_ram else "native")
    if policy.needs_ram and backend != "python":
        raise ValueError(f"policy {policy.name!r} reads RAM, which only backend='python' provides.")
    workers = (num_threads or min(num_envs, available_cores())) if backend == "native" else 0

    import ale_py

    from jowa_core import __version__

    attrs = {
        "behaviour_policy": json.dumps(policy.describe(), sort_keys=True),
        "env_config": config.to_json(),
        "episode_policy_names": json.dumps(policy.episode_labels()),
        "collection": json.dumps(
            {
                "seed": seed,
                "num_envs": num_envs,
                "backend": backend,
                "num_transitions": num_transitions,
                "env_seeds": f"seed + env index ({seed}..{seed + num_envs - 1})",
                "ale_py": ale_py.__version__,
                "jowa_core": __version__,
            },
            sort_keys=True,
        ),
    }
    torch_threads = torch.get_num_threads()
    configure_threads(env_workers=workers)
    rng = np.random.default_rng(seed)
    legal = games.legal_mask(game)
    buffers = [_EpisodeBuffer() for _ in range(num_envs)]
    episode_policy: list[int] = []
    episode_env: list[int] = []
    try:
        with (
            AtariVecEnv(game, num_envs, config, seed, backend=backend, num_threads=workers or None) as env,
            DatasetWriter(out_path, game, source="collected", attrs=attrs) as writer,
            tqdm(total=num_transitions, disable=not progress, unit="tr", desc=f"collect {game}") as bar,
        ):
            obs = env.reset()
            policy.start_episodes(np.arange(num_envs), rng)
            kept = 0
            while kept < num_transitions:
                ram = env.ram() if policy.needs_ram else None
                actions = policy.act(obs, ram, legal, rng)
                lives = env.lives  # of the frames in obs, before acting
                next_obs, rewards, terminated, truncated, info = env.step(actions)
                executed = info["actions"]
                k = min(num_envs, num_transitions - kept)
                ended = []
                for i in range(k):
                    buffers[i].append(obs[i], executed[i], rewards[i], lives[i])
                    if terminated[i] or truncated[i]:
                        episode_policy.append(policy.episode_label(i))
                        episode_env.append(i)
                        buffers[i].flush(writer, terminal=bool(terminated[i]))
                        ended.append(i)
                if ended:
                    policy.start_episodes(np.asarray(ended), rng)
                kept += k
                bar.update(k)
                obs = next_obs
            for i, buf in enumerate(buffers):  # unfinished episodes end truncated
                if buf.n:
                    episode_policy.append(policy.episode_label(i))
                    episode_env.append(i)
                    buf.flush(writer, terminal=False)
            if writer.num_transitions != num_transitions or writer.num_episodes != len(episode_policy):
                raise RuntimeError(  # pragma: no cover - an internal invariant, never user-facing
                    f"collect wrote {writer.num_transitions} transitions / {writer.num_episodes} episodes, "
                    f"expected {num_transitions} / {len(episode_policy)}."
                )
            writer.add_episode_field("episode_policy", np.asarray(episode_policy, np.int16))
            writer.add_episode_field("episode_env", np.asarray(episode_env, np.int16))
    finally:
        torch.set_num_threads(torch_threads)
    return Path(out_path)


def collect_many(
    game_names: Sequence[str],
    num_transitions: int,
    root: str | os.PathLike,
    policy: str | Policy | Callable[[str], Policy] = "random",
    **kwargs,
) -> list[Path]:
    """``collect`` for several games into ``<root>/<Game>.h5``; ``policy`` may be a per-game factory.

    Keyword arguments go to ``collect`` (``num_envs``, ``seed``, ``config``, ``progress``...); every game
    uses the same seed.
    """
    names = [games.canonical_name(g) for g in game_names]  # fail on a bad name before any work
    paths = []
    for name in names:
        p = policy(name) if callable(policy) and not isinstance(policy, Policy) else policy
        paths.append(collect(name, num_transitions, dataset_path(root, name), p, **kwargs))
    return paths
