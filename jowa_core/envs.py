"""Atari environments with the official JOWA evaluation protocol (spec section 2), vectorised.

One frame pipeline, two backends that produce the same frames:

- ``"native"``: ale-py's C++ ``AtariVectorEnv`` (worker threads outside the GIL; fastest). It does not
  expose the console RAM.
- ``"python"``: one ``ale_py.ALEInterface`` per env stepped in this process with the same preprocessing
  written in numpy/cv2; slower (one core) but gives ``ram()``. ``collect`` picks it for policies that
  read RAM. Frames, rewards, lives and sticky-action draws equal the native backend's for the same seed
  (tested); only the no-op-start counts come from a different random generator.

Protocol (``EnvConfig.official()``, the defaults): the agent acts in the full 18-action set (indices of
``jowa_core.games.FULL_ACTION_SET``) mapped to the game's minimal set for the emulator; frame skip 4
with rewards summed (raw, never clipped); max-pool of the last two frames of the skip; grayscale;
84x84 with ``cv2.INTER_AREA``; no sticky actions, no no-op starts, no FIRE on reset; a life loss is
not terminal, an episode ends at game over; 108,000 agent steps cap (truncation). As in Dopamine, the
reset observation is the raw first frame (the second pooling buffer is zeroed on reset); ale-py's native
env does the same, and ``gymnasium.wrappers.AtariPreprocessing`` too (tested pixel for pixel).

Autoreset (SAME_STEP): on a step where env ``i`` terminates or is truncated, ``obs[i]`` returned by
``step`` is already the first observation of its next episode; the last observation of the finished
episode is ``info["final_obs"][i]`` (rows of unfinished envs equal ``obs``), and ``lives``/``ram()``
also describe the new episode. So the observation returned by a step is always the one the next
action acts on, and a collector stores ``(obs_t, a_t, r_t, done_t)`` without skipping steps.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np

from jowa_core import games
from jowa_core.config import FRAME_SIZE, _check

Backend = Literal["native", "python"]
FIRE = games.FULL_ACTION_SET.index("FIRE")
NOOP = games.FULL_ACTION_SET.index("NOOP")
_NO_CAP = 2**31 - 1  # ale-py wants an int frame cap; this means "none"


class IllegalActionError(ValueError):
    """An action outside the game's legal (minimal) set was given while ``illegal_action="raise"``."""


@dataclass(frozen=True)
class EnvConfig:
    """Frame pipeline and episode rules. Defaults are the official evaluation protocol (spec section 2).

    Variants used by the paper and common Atari setups are named constructors: ``official()``,
    ``sticky()`` (Machado et al. 2018), ``noop_starts()`` (DQN-style), ``frame_cap()`` (the paper's
    "108K frames" reading of the cap).
    """

    frame_skip: int = 4
    """Emulator frames per agent step; rewards are summed over them, the last two frames max-pooled."""
    max_episode_steps: int | None = 108_000
    """Truncate an episode after this many agent steps (official: 108,000 agent steps = 432k frames)."""
    max_episode_frames: int | None = None
    """Truncate after this many emulator frames instead (the paper's text says 108K frames). When both
    caps are set the tighter one applies. A frame cap that is not a multiple of ``frame_skip`` ends the
    last step early, as ale-py does."""
    repeat_action_probability: float = 0.0
    """Sticky actions: each emulator frame repeats the previous action with this probability (0.25 in
    Machado et al.); official evaluation: 0."""
    noop_max: int = 0
    """No-op starts: after reset, take a uniform number of NOOP frames in {0, ..., noop_max - 1}
    (ale-py's rule; gymnasium's wrapper draws {1..noop_max}). Official: 0 (none)."""
    fire_on_reset: bool = False
    """Press FIRE for one frame after each reset (games whose action set has FIRE). Official: False."""
    fire_on_life_loss: bool = False
    """After a step that loses a life (episode not over), replace that env's next action by FIRE
    (games whose action set has FIRE). ``info["actions"]`` reports the executed action. Official: False."""
    illegal_action: Literal["raise", "noop"] = "raise"
    """What to do with a full-set action outside the game's minimal set: raise ``IllegalActionError``
    (default; the official wrapper asserts) or execute NOOP (reported in ``info["actions"]``)."""

    def __post_init__(self) -> None:
        _check(self.frame_skip >= 1, f"EnvConfig.frame_skip must be >= 1, got {self.frame_skip}.")
        for name in ("max_episode_steps", "max_episode_frames"):
            v = getattr(self, name)
            _check(v is None or v >= 1, f"EnvConfig.{name} must be None (no cap) or >= 1, got {v}.")
        _check(
            0.0 <= self.repeat_action_probability < 1.0,
            f"EnvConfig.repeat_action_probability must be in [0, 1), got {self.repeat_action_probability}.",
        )
        _check(self.noop_max >= 0, f"EnvConfig.noop_max must be >= 0 (0 = no no-op starts), got {self.noop_max}.")
        _check(
            self.illegal_action in ("raise", "noop"),
            f"EnvConfig.illegal_action must be 'raise' or 'noop', got {self.illegal_action!r}.",
        )

    @classmethod
    def official(cls) -> EnvConfig:
        """The official JOWA evaluation protocol (the defaults)."""
        return cls()

    @classmethod
    def sticky(cls, repeat_action_probability: float = 0.25) -> EnvConfig:
        """Official pipeline with sticky actions (Machado et al. 2018)."""
        return cls(repeat_action_probability=repeat_action_probability)

    @classmethod
    def noop_starts(cls, noop_max: int = 30) -> EnvConfig:
        """Official pipeline with up to ``noop_max`` no-op frames after each reset (DQN evaluation)."""
        return cls(noop_max=noop_max)

    @classmethod
    def frame_cap(cls, max_episode_frames: int = 108_000) -> EnvConfig:
        """Official pipeline but the cap counted in emulator frames, as the paper's text states."""
        return cls(max_episode_steps=None, max_episode_frames=max_episode_frames)

    @property
    def effective_frame_cap(self) -> int | None:
        """The cap in emulator frames both backends enforce (``max_episode_steps * frame_skip`` or tighter)."""
        caps = [c for c in (self.max_episode_frames,) if c is not None]
        if self.max_episode_steps is not None:
            caps.append(self.max_episode_steps * self.frame_skip)
        return min(caps) if caps else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EnvConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        _check(not unknown, f"Unknown EnvConfig field(s) {sorted(unknown)}; the file was written by another version.")
        return cls(**d)


# ---------------------------------------------------------------------------------------------
# Backends: both take minimal-set action indices and return (N, 84, 84) frames.


class _NativeBackend:
    """ale-py's C++ vector env in synchronous SAME_STEP mode, with every default made explicit."""

    has_ram = False

    def __init__(self, game: str, num_envs: int, config: EnvConfig, num_threads: int):
        import ale_py

        cap = config.effective_frame_cap
        self._env = ale_py.AtariVectorEnv(
            games.rom_id(game),
            num_envs,
            batch_size=0,  # synchronous: every step returns all envs, in order
            num_threads=num_threads,
            max_num_frames_per_episode=_NO_CAP if cap is None else cap,
            repeat_action_probability=config.repeat_action_probability,
            full_action_space=False,  # minimal set; we map from the full set ourselves
            autoreset_mode="SameStep",
            img_height=FRAME_SIZE,
            img_width=FRAME_SIZE,
            grayscale=True,
            stack_num=1,  # no frame stacking: context comes from the transformer
            frameskip=config.frame_skip,
            maxpool=True,
            noop_max=config.noop_max,
            episodic_life=False,
            life_loss_info=False,
            reward_clipping=False,
            use_fire_reset=config.fire_on_reset,
        )
        self.num_envs = num_envs

    def reset(self, seed: int | None) -> tuple[np.ndarray, np.ndarray]:
        obs, info = self._env.reset(seed=seed)
        return obs[:, 0], info["lives"].astype(np.int64)

    def step(self, minimal: np.ndarray):
        obs, rew, term, trunc, info = self._env.step(minimal.astype(np.int32))
        done = term | trunc
        final = info["final_obs"][:, 0] if "final_obs" in info else None
        if final is None and done.any():  # pragma: no cover - ale-py always sends it with SameStep
            raise RuntimeError("ale-py did not return final_obs for a finished episode; check the ale-py version.")
        return obs[:, 0], rew.astype(np.float32), term, trunc, final, info["lives"].astype(np.int64)

    def ram(self) -> np.ndarray:
        raise NotImplementedError(
            "ale-py's native AtariVectorEnv does not expose the console RAM. Create the env with "
            "backend='python' (collect() does so for policies with needs_ram=True)."
        )

    def close(self) -> None:
        self._env.close()


class _PythonBackend:
    """One ``ALEInterface`` per env with the native backend's preprocessing, rule for rule.

    Mirrors ale-py's ``PreprocessedEnv``: frames k = skip-1 and k = skip are grabbed (grayscale) into
    two buffers, a step that ends the episode (game over or frame cap) stops emulating at that frame
    without grabbing, the buffers are max-pooled in place and resized with INTER_AREA; on reset the
    first frame is grabbed and the other buffer zeroed.
    """

    has_ram = True

    def __init__(self, game: str, num_envs: int, config: EnvConfig):
        import ale_py
        from ale_py import roms

        ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Error)
        self._rom = roms.get_rom_path(games.rom_id(game))
        self._cfg = config
        cap = config.effective_frame_cap
        self._cap = _NO_CAP if cap is None else cap
        self.num_envs = num_envs
        self._ales = [ale_py.ALEInterface() for _ in range(num_envs)]
        for ale in self._ales:
            ale.setFloat("repeat_action_probability", config.repeat_action_probability)
        self._loaded = np.zeros(num_envs, bool)  # ROMs load at the first (seeded) reset: loading is slow
        # the minimal set in ALE's order; ALE's Action enum is indexed like our full set
        self._actions = [ale_py.Action(a) for a in games.legal_actions(game)]
        self._has_fire = ale_py.Action.FIRE in self._actions
        self._noop, self._fire = ale_py.Action.NOOP, ale_py.Action.FIRE
        self._raw = np.zeros((num_envs, 2, 0, 0), np.uint8)  # sized at the first ROM load (210x160 or taller)
        self._obs = np.zeros((num_envs, FRAME_SIZE, FRAME_SIZE), np.uint8)
        self._elapsed = np.zeros(num_envs, np.int64)
        self._lives = np.zeros(num_envs, np.int64)
        self._rngs = [np.random.default_rng(i) for i in range(num_envs)]

    def _process(self, i: int) -> None:
        b = self._raw[i]
        np.maximum(b[0], b[1], out=b[0])
        cv2.resize(b[0], (FRAME_SIZE, FRAME_SIZE), dst=self._obs[i], interpolation=cv2.INTER_AREA)

    def _reset_one(self, i: int, seed: int | None) -> None:
        ale = self._ales[i]
        if seed is None and not self._loaded[i]:
            seed = 0
        if seed is not None:
            ale.setInt("random_seed", int(seed))
            ale.loadROM(self._rom)
            self._loaded[i] = True
            dims = ale.getScreenDims()
            if self._raw.shape[2:] != dims:
                self._raw = np.zeros((self.num_envs, 2, *dims), np.uint8)
            self._rngs[i] = np.random.default_rng(int(seed))
        ale.reset_game()
        fire = self._cfg.fire_on_reset and self._has_fire
        if fire:
            ale.act(self._fire)
        noops = (int(self._rngs[i].integers(0, self._cfg.noop_max)) if self._cfg.noop_max > 0 else 0) - int(fire)
        for _ in range(max(noops, 0)):
            ale.act(self._noop)
            if ale.game_over():
                ale.reset_game()
        ale.getScreenGrayscale(self._raw[i, 0])
        self._raw[i, 1] = 0
        self._process(i)
        self._elapsed[i] = 0
        self._lives[i] = ale.lives()

    def reset(self, seed: int | None) -> tuple[np.ndarray, np.ndarray]:
        for i in range(self.num_envs):
            self._reset_one(i, None if seed is None else seed + i)
        return self._obs.copy(), self._lives.copy()

    def step(self, minimal: np.ndarray):
        n, skip, cap = self.num_envs, self._cfg.frame_skip, self._cap
        rew = np.zeros(n, np.float32)
        term = np.zeros(n, bool)
        trunc = np.zeros(n, bool)
        final = None
        for i in range(n):
            ale, action, raw = self._ales[i], self._actions[int(minimal[i])], self._raw[i]
            r = 0
            over = False
            for k in range(skip, 0, -1):  # k counts down as ale-py's skip_id
                r += ale.act(action)
                self._elapsed[i] += 1
                over = ale.game_over()
                if over or self._elapsed[i] >= cap:
                    break
                if k <= 2:
                    ale.getScreenGrayscale(raw[k - 1])
            self._process(i)
            rew[i] = r
            term[i] = over
            trunc[i] = self._elapsed[i] >= cap and not over
            self._lives[i] = ale.lives()
            if term[i] or trunc[i]:
                if final is None:
                    final = np.empty_like(self._obs)
                final[i] = self._obs[i]
                self._reset_one(i, None)
        return self._obs.copy(), rew, term, trunc, final, self._lives.copy()

    def ram(self) -> np.ndarray:
        return np.stack([ale.getRAM() for ale in self._ales])

    def close(self) -> None:
        self._ales = []


# ---------------------------------------------------------------------------------------------


class AtariVecEnv:
    """``num_envs`` copies of one game under ``config``, stepped together with full-set actions.

    >>> env = AtariVecEnv("Pong", 4, EnvConfig.official(), seed=0)
    >>> obs = env.reset()                                   # (4, 84, 84) uint8
    >>> obs, rew, term, trunc, info = env.step(np.zeros(4, int))

    Args:
        game: any spelling ``games.canonical_name`` accepts.
        num_envs: parallel copies; env ``i`` is seeded with ``seed + i``.
        config: the frame pipeline and episode rules (default: the official protocol).
        seed: seed of the first ``reset()`` (ALE's ``random_seed``: sticky actions and no-op starts).
        backend: ``"native"`` (fast, no RAM) or ``"python"`` (RAM available); see the module docstring.
        num_threads: worker threads of the native backend (default ``min(num_envs, free cores)``).

    ``step`` returns ``(obs, rewards, terminated, truncated, info)``: obs (N, 84, 84) uint8 with SAME_STEP
    autoreset (module docstring), rewards float32 raw, terminated (game over) and truncated (step or
    frame cap) bool, and info with ``final_obs`` (N, 84, 84) (rows of finished envs hold their last
    frame), ``lives`` (N,), ``actions`` (N,) the executed full-set actions, ``episode_step`` (N,) agent
    steps taken so far in the episode now running (0 right after an autoreset).
    """

    def __init__(
        self,
        game: str,
        num_envs: int = 1,
        config: EnvConfig | None = None,
        seed: int = 0,
        *,
        backend: Backend = "native",
        num_threads: int | None = None,
    ):
        self.game = games.canonical_name(game)
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}.")
        if backend not in ("native", "python"):
            raise ValueError(f"backend must be 'native' (fast, no RAM) or 'python' (RAM access), got {backend!r}.")
        self.config = config or EnvConfig.official()
        self.num_envs = num_envs
        self.backend = backend
        self.seed = seed
        self.legal_mask = games.legal_mask(self.game)
        self._full_to_min = games.full_to_minimal(self.game)
        self._has_fire = bool(self.legal_mask[FIRE])
        if backend == "native":
            from jowa_core.runtime import available_cores

            threads = num_threads or min(num_envs, available_cores())
            self._backend: _NativeBackend | _PythonBackend = _NativeBackend(self.game, num_envs, self.config, threads)
        else:
            self._backend = _PythonBackend(self.game, num_envs, self.config)
        self._seeded = False
        self._lives = np.zeros(num_envs, np.int64)
        self._steps = np.zeros(num_envs, np.int64)
        self._fire_next = np.zeros(num_envs, bool)

    @property
    def lives(self) -> np.ndarray:
        """(N,) int lives left in each env's current episode (0 for games without lives)."""
        return self._lives.copy()

    @property
    def has_ram(self) -> bool:
        return self._backend.has_ram

    def ram(self) -> np.ndarray:
        """(N, 128) uint8 console RAM of each env's current state (``backend="python"`` only)."""
        return self._backend.ram()

    def reset(self, seed: int | None = None) -> np.ndarray:
        """Start a new episode in every env; returns obs (N, 84, 84) uint8.

        The first reset seeds env ``i`` with ``seed + i`` (``seed`` defaults to the constructor's);
        later resets without a seed continue the emulators' random streams.
        """
        if seed is None and not self._seeded:
            seed = self.seed
        obs, lives = self._backend.reset(seed)
        self._seeded = True
        self._lives[:] = lives
        self._steps[:] = 0
        self._fire_next[:] = False
        return np.ascontiguousarray(obs)

    def _to_minimal(self, actions: Any) -> tuple[np.ndarray, np.ndarray]:
        a = np.asarray(actions)
        if a.shape != (self.num_envs,) or not np.issubdtype(a.dtype, np.integer):
            raise ValueError(
                f"actions must be an integer array of shape ({self.num_envs},) with full-set indices in [0, 18); "
                f"got {a.dtype} {a.shape}."
            )
        if a.size and (a.min() < 0 or a.max() >= games.NUM_ACTIONS):
            raise ValueError(f"actions must be full-set indices in [0, 18); got range [{a.min()}, {a.max()}].")
        a = a.astype(np.int64)
        if self.config.fire_on_life_loss and self._fire_next.any():
            a = np.where(self._fire_next, FIRE, a)
        minimal = self._full_to_min[a]
        bad = minimal < 0
        if bad.any():
            if self.config.illegal_action == "noop":
                a = np.where(bad, NOOP, a)
                minimal = self._full_to_min[a]
            else:
                i = int(np.flatnonzero(bad)[0])
                legal = ", ".join(f"{k} {games.FULL_ACTION_SET[k]}" for k in np.flatnonzero(self.legal_mask))
                raise IllegalActionError(
                    f"env {i}: action {a[i]} ({games.FULL_ACTION_SET[a[i]]}) is not legal in {self.game}; "
                    f"legal full-set actions: {legal}. Mask the policy with games.legal_mask({self.game!r}) "
                    f"or use EnvConfig(illegal_action='noop')."
                )
        return a, minimal

    def step(self, actions: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Advance every env by one agent step (``frame_skip`` frames); see the class docstring."""
        if not self._seeded:
            raise RuntimeError("call reset() before step().")
        executed, minimal = self._to_minimal(actions)
        obs, rew, term, trunc, final, lives = self._backend.step(minimal)
        done = term | trunc
        self._steps += 1
        self._steps[done] = 0
        if self.config.fire_on_life_loss and self._has_fire:
            self._fire_next = (lives < self._lives) & ~done
        self._lives[:] = lives
        if final is None or not done.any():
            final = obs
        else:  # ale-py leaves unfinished rows of final_obs stale; define them as the current obs
            final = np.where(done[:, None, None], final, obs)
        info = {
            "final_obs": final,
            "lives": lives,
            "actions": executed,
            "episode_step": self._steps.copy(),
        }
        return np.ascontiguousarray(obs), rew, term, trunc, info

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> AtariVecEnv:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
