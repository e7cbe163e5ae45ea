"""Agents that act in vectorised Atari envs: JOWA with a token history, and the control agents.

Every agent has the same small interface, so ``jowa_core.evaluation`` can run any of them:

- ``bind(games, seed=None)``: one game per env slot (slots may play different games); clears all
  state and, with a seed, restarts the agent's random stream.
- ``act(obs, env_indices=None) -> actions``: obs (n, 84, 84) uint8 of the slots ``env_indices``
  (default: all, in order) -> (n,) int64 full-set actions, always legal in each slot's game.
- ``observe_actions(executed, env_indices=None)``: the actions the envs really executed (an env may
  replace the chosen one, e.g. FIRE after a life loss); agents with a history record them.
- ``reset(env_indices=None)``: the episodes of these slots ended; forget their history.

``Agent`` (spec 8.1-8.2): per slot, a history of the last ``history_steps`` steps of [36 obs tokens,
action token]. Before acting the current frame's 36 tokens are appended (dropping the oldest step on
overflow) and after acting the action token; the decision context is the min(history_steps, t + 1)
steps held, ending with the current observation: k*37 - 1 tokens. Greedy Q (``horizon`` 0) or
batched beam search (``jowa_core.planning``) chooses, for all slots of all games in one call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from jowa_core import games, planning
from jowa_core.config import OBS_TOKENS, TOKENS_PER_BLOCK
from jowa_core.runtime import resolve_device

__all__ = ["Agent", "BaseAgent", "ConstantAgent", "MTBCAgent", "PerGame", "PolicyAgent", "RandomAgent"]

PerGame = int | Mapping[str, int]
"""A setting that is the same for every game (int) or given per game name (e.g. the official table)."""


def _indices(env_indices: Any, num_envs: int, n: int | None = None) -> np.ndarray:
    """Validated int64 slot indices (default: all slots)."""
    if env_indices is None:
        idx = np.arange(num_envs, dtype=np.int64)
    else:
        idx = np.asarray(env_indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= num_envs):
            raise IndexError(f"env_indices must lie in [0, {num_envs}) (the slots given to bind); got {idx.tolist()}.")
        if len(np.unique(idx)) != len(idx):
            raise ValueError(f"env_indices must not repeat a slot; got {idx.tolist()}.")
    if n is not None and n != len(idx):
        raise ValueError(f"{n} rows given for {len(idx)} env slots; pass one row per entry of env_indices.")
    return idx


def _check_obs(obs: Any) -> np.ndarray:
    obs = np.asarray(obs)
    if obs.ndim != 3 or obs.shape[1:] != (84, 84) or obs.dtype != np.uint8:
        raise ValueError(
            f"obs must be uint8 (n, 84, 84) frames as AtariVecEnv returns them; got {obs.dtype} {obs.shape}. "
            "For one frame use obs[None]."
        )
    return obs


class BaseAgent:
    """Slot bookkeeping shared by all agents: the game, task id and legal mask of each env slot."""

    name = "agent"

    def __init__(self, seed: int | None = 0) -> None:
        self._games: tuple[str, ...] = ()
        self._legal = np.zeros((0, games.NUM_ACTIONS), dtype=bool)
        self.rng = np.random.default_rng(seed)

    @property
    def num_envs(self) -> int:
        return len(self._games)

    @property
    def games(self) -> tuple[str, ...]:
        """The game of each slot (canonical names)."""
        return self._games

    def bind(self, env_games: Sequence[str], seed: int | None = None) -> None:
        """Assign one game per env slot and clear every slot's state; ``seed`` restarts the random stream."""
        if isinstance(env_games, str) or len(env_games) == 0:
            raise ValueError(f"bind needs a non-empty sequence of game names, one per env slot; got {env_games!r}.")
        self._games = tuple(games.canonical_name(g) for g in env_games)
        self._legal = np.stack([games.legal_mask(g) for g in self._games])
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        self._on_bind()
        self.reset()

    def _on_bind(self) -> None:
        """Per-slot setup after ``bind`` assigned the games (subclasses)."""

    def _require_bound(self) -> None:
        if not self._games:
            raise RuntimeError(
                f"{type(self).__name__}: call bind(games) first (one game per env slot; evaluate() does)."
            )

    def reset(self, env_indices: Any = None) -> None:
        """The episodes of these slots ended (default: all)."""

    def observe_actions(self, executed: Any, env_indices: Any = None) -> None:
        """The full-set actions the envs executed for the last ``act`` (default: nothing to record)."""

    def act(self, obs: Any, env_indices: Any = None) -> np.ndarray:
        raise NotImplementedError

    def _random_legal(self, idx: np.ndarray) -> np.ndarray:
        """One uniform legal action per slot in ``idx`` (from ``self.rng``)."""
        counts = self._legal[idx].sum(1)
        pick = (self.rng.random(len(idx)) * counts).astype(np.int64)  # uniform in [0, count)
        order = np.argsort(~self._legal[idx], axis=1, kind="stable")  # legal actions first, ascending
        return order[np.arange(len(idx)), pick].astype(np.int64)

    def describe(self) -> dict[str, Any]:
        """JSON-able settings, stored with the scores."""
        return {"name": self.name, "type": type(self).__name__}


class RandomAgent(BaseAgent):
    """Uniform over each slot's legal actions (the random control)."""

    name = "random"

    def act(self, obs: Any, env_indices: Any = None) -> np.ndarray:
        self._require_bound()
        idx = _indices(env_indices, self.num_envs, len(_check_obs(obs)))
        return self._random_legal(idx)


class ConstantAgent(BaseAgent):
    """Always the same full-set action (a control: e.g. always FIRE). It must be legal in every bound game."""

    def __init__(self, action: int | str) -> None:
        super().__init__(seed=None)
        self.action = games.action_index(action)
        self.name = f"constant_{games.FULL_ACTION_SET[self.action]}"

    def _on_bind(self) -> None:
        bad = sorted({g for g, ok in zip(self._games, self._legal[:, self.action]) if not ok})
        if bad:
            raise ValueError(
                f"{self.name}: action {games.FULL_ACTION_SET[self.action]} is not legal in {', '.join(bad)}; "
                "evaluate a constant action only on games whose action set has it (control_scores does)."
            )

    def act(self, obs: Any, env_indices: Any = None) -> np.ndarray:
        self._require_bound()
        idx = _indices(env_indices, self.num_envs, len(_check_obs(obs)))
        return np.full(len(idx), self.action, dtype=np.int64)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "action": self.action}


class PolicyAgent(BaseAgent):
    """A behaviour policy of ``data.collect`` (e.g. "mixed", the default data's players) run as an agent (ours),
    so that the behaviour behind a dataset is scored under any protocol, with the same episodes and CIs as the
    agents: the data's own mean is fixed by the protocol it was collected under.

    Each game gets its own policy object (a ``MixedPolicy`` draws a sub-policy per episode, at ``bind`` and at
    every ``reset``). Policies that read the console RAM (``needs_ram``) need ``observe_ram`` before each ``act``;
    ``evaluation.evaluate`` calls it, on the python env backend, for agents whose ``needs_ram`` is True.
    """

    def __init__(self, policy: str = "mixed", *, seed: int | None = 0, name: str = "behaviour") -> None:
        super().__init__(seed)
        from jowa_core.data.collect import POLICY_NAMES, make_policy

        try:  # make_policy knows the names and their aliases; any game that has them all will do
            make_policy(str(policy), "Breakout")
        except ValueError:
            raise ValueError(f"PolicyAgent policy must be one of {POLICY_NAMES}; got {policy!r}.") from None
        self.policy = str(policy)
        self.name = name
        self._policies: dict[str, Any] = {}  # game -> its Policy
        self._slots: dict[str, np.ndarray] = {}  # game -> its slots, ascending; a policy's env id = position here
        self._ram: np.ndarray | None = None

    @property
    def needs_ram(self) -> bool:
        return any(p.needs_ram for p in self._policies.values())

    def _on_bind(self) -> None:
        from jowa_core.data.collect import make_policy

        names = np.asarray(self._games)
        self._policies, self._slots = {}, {}
        for game in dict.fromkeys(self._games):
            policy = make_policy(self.policy, game)
            policy.check_game(game)  # e.g. the RAM tracker plays Breakout only
            self._policies[game] = policy
            self._slots[game] = np.flatnonzero(names == game)
        self._ram = None

    def reset(self, env_indices: Any = None) -> None:
        idx = _indices(env_indices, self.num_envs)
        for game, slots in self._slots.items():
            ended = np.flatnonzero(np.isin(slots, idx))
            if len(ended):
                self._policies[game].start_episodes(ended, self.rng)

    def observe_ram(self, ram: Any, env_indices: Any = None) -> None:
        """The console RAM (n, 128) uint8 of the slots ``env_indices``, read before the coming ``act``."""
        self._require_bound()
        ram = np.asarray(ram, dtype=np.uint8)
        idx = _indices(env_indices, self.num_envs, len(ram))
        if self._ram is None:
            self._ram = np.zeros((self.num_envs, ram.shape[1]), np.uint8)
        self._ram[idx] = ram

    def act(self, obs: Any, env_indices: Any = None) -> np.ndarray:
        self._require_bound()
        obs = _check_obs(obs)
        idx = _indices(env_indices, self.num_envs, len(obs))
        if self.needs_ram and self._ram is None:
            raise RuntimeError(
                f"{self.name}: the {self.policy!r} policy reads the console RAM; call observe_ram(ram, env_indices) "
                "before act (evaluation.evaluate does, on the python env backend)."
            )
        out = np.empty(len(idx), np.int64)
        for game, slots in self._slots.items():
            mine = np.flatnonzero(np.isin(idx, slots))
            if not len(mine):
                continue
            pos = np.searchsorted(slots, idx[mine])
            frames = np.zeros((len(slots), *obs.shape[1:]), np.uint8)  # the policy's rows are all its game's slots
            frames[pos] = obs[mine]
            policy = self._policies[game]
            ram = self._ram[slots] if policy.needs_ram else None
            out[mine] = policy.act(frames, ram, games.legal_mask(game), self.rng)[pos]
        return out

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "policy": {g: p.describe() for g, p in self._policies.items()}}


class Agent(BaseAgent):
    """JOWA acting from a token history: greedy Q or beam search in the world model (spec 8).

    Args:
        tokenizer: frames -> 36 tokens (``jowa_core.models.Tokenizer``).
        model: ``WorldActionModel`` (or anything ``jowa_core.planning`` accepts).
        history_steps: steps of context kept per slot, the current one included (official
            ``buffer_size``, 1..max_blocks); an int, or a mapping game -> int (``Agent.official``).
            With ``horizon`` H > 0 the planner uses at most max_blocks - H of them (spec 8.4).
        beam_width, horizon: beam search settings, int or per game; ``horizon`` 0 means greedy Q
            (``beam_width`` is then ignored; 0 is allowed for it).
        gamma: discount of the beam score.
        use_mean: the beam scores imagined states by the mean of Q over legal actions instead of the
            max (ours, ``planning.state_value``: the max favours states where CQL raised the data's action).
        anchor_q: the beam ranks paths by Q(s, a0), read with the whole context, plus the imagined change after
            the first step (ours, ``planning.beam_search``; README, session 13).
        epsilon: probability of a uniform legal action instead of the plan (official 0.001).
        shared_epsilon: False (ours, default): one draw per env and call. True: the official rule,
            one draw per ``act`` call shared by all envs, so either every env explores or none
            (quirk Q15).
        alias_held_out: use the aliased task row for held-out games (the official fine-tuning
            trains it; official evaluation does not alias, quirk Q10).
        device: where the model and tokenizer run; None keeps the model's device. Both modules are
            moved there and put in eval mode (dropout off).
        amp: bf16 autocast on CUDA (the official setting, quirk Q21); ignored on CPU.
        seed: seed of the exploration stream (``bind(..., seed)`` restarts it).
        name: the agent's name in score tables.
    """

    def __init__(
        self,
        tokenizer: nn.Module,
        model: nn.Module,
        *,
        history_steps: PerGame = 8,
        beam_width: PerGame = 0,
        horizon: PerGame = 0,
        gamma: float = 0.99,
        use_mean: bool = False,
        anchor_q: bool = False,
        epsilon: float = 0.001,
        shared_epsilon: bool = False,
        alias_held_out: bool = False,
        device: str | torch.device | None = None,
        amp: bool = True,
        seed: int | None = 0,
        name: str = "jowa",
    ) -> None:
        super().__init__(seed)
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {epsilon}.")
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {gamma}.")
        cfg = model.cfg
        if cfg.tokens_per_block != TOKENS_PER_BLOCK:
            raise ValueError(
                f"the model's tokens_per_block is {cfg.tokens_per_block}; the agent needs {TOKENS_PER_BLOCK}."
            )
        vocab = getattr(getattr(tokenizer, "cfg", None), "vocab_size", None)
        if vocab is not None and vocab != cfg.obs_vocab_size:
            raise ValueError(
                f"tokenizer vocabulary {vocab} != model obs_vocab_size {cfg.obs_vocab_size}; load the tokenizer "
                "the model was trained with."
            )
        if device is None:
            device = next(iter(model.parameters()), torch.zeros(())).device
        self.device = resolve_device(device)
        self.tokenizer = tokenizer.to(self.device).eval()
        self.model = model.to(self.device).eval()
        self.max_blocks = cfg.max_blocks
        self.history_steps = self._setting("history_steps", history_steps, 1, cfg.max_blocks)
        self.beam_width = self._setting("beam_width", beam_width, 0, None)
        self.horizon = self._setting("horizon", horizon, 0, cfg.max_blocks - 1)
        self.gamma, self.epsilon, self.shared_epsilon = float(gamma), float(epsilon), bool(shared_epsilon)
        self.use_mean, self.anchor_q = bool(use_mean), bool(anchor_q)
        self.alias_held_out = bool(alias_held_out)
        self.amp = bool(amp)
        self.name = name
        self.last_explored = np.zeros(0, dtype=bool)  # (n,) of the last act: True where epsilon chose
        self._alloc(0)

    @classmethod
    def official(
        cls, tokenizer: nn.Module, model: nn.Module, size: str = "150M", *, planning: bool = True, **kwargs: Any
    ) -> Agent:
        """The official per-game evaluation settings (spec 2): history ``buffer_size`` of the model
        ``size`` ("40M", "70M", "150M") and, with ``planning``, beam width and horizon 2 per game;
        without planning, greedy with 8 steps of context (``eval_wo_planning.sh`` sweeps 1..8)."""
        table = {g: games.planning_settings(g, size) for g in games.GAMES}
        if planning:
            kwargs.setdefault("history_steps", {g: s["buffer_size"] for g, s in table.items()})
            kwargs.setdefault("beam_width", {g: s["beam_width"] for g, s in table.items()})
            kwargs.setdefault("horizon", {g: s["horizon"] for g, s in table.items()})
        kwargs.setdefault("name", f"jowa_{size}" + ("_planning" if planning else "_greedy"))
        return cls(tokenizer, model, **kwargs)

    # -- settings and state -------------------------------------------------------------------

    @staticmethod
    def _setting(name: str, value: PerGame, lo: int, hi: int | None) -> PerGame:
        """Validate an int-or-per-game setting; mapping keys become canonical game names."""
        items = value.items() if isinstance(value, Mapping) else [(None, value)]
        for _, v in items:
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo or (hi is not None and v > hi):
                bounds = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
                raise ValueError(f"{name} must be an int in {bounds} (or a mapping game -> such int); got {v!r}.")
        return {games.canonical_name(g): int(v) for g, v in items} if isinstance(value, Mapping) else int(value)

    @staticmethod
    def _lookup(name: str, value: PerGame, game: str) -> int:
        if not isinstance(value, Mapping):
            return int(value)
        if game not in value:
            raise KeyError(f"{name} has no entry for {game}; add it to the mapping or pass one int for every game.")
        return value[game]

    def _alloc(self, n: int) -> None:
        self._cap = np.array([self._lookup("history_steps", self.history_steps, g) for g in self._games], np.int64)
        bw = [self._lookup("beam_width", self.beam_width, g) for g in self._games]
        hz = [self._lookup("horizon", self.horizon, g) for g in self._games]
        bad = [g for g, b, h in zip(self._games, bw, hz) if h > 0 and b < 1]
        if bad:
            raise ValueError(f"horizon > 0 needs beam_width >= 1 (games {', '.join(sorted(set(bad)))}).")
        self._plan = np.array([(b if h > 0 else 1, h) for b, h in zip(bw, hz)], np.int64).reshape(n, 2)
        self._task = torch.tensor(
            [games.task_id(g, alias_held_out=self.alias_held_out) for g in self._games], dtype=torch.long
        )
        size = int(self._cap.max()) if n else 1
        self._blocks = torch.zeros(n, size, TOKENS_PER_BLOCK, dtype=torch.long, device=self.device)
        self._steps = np.zeros(n, np.int64)
        self._legal_t = torch.as_tensor(self._legal, device=self.device)

    def _on_bind(self) -> None:
        self._alloc(len(self._games))  # resolve the per-game settings, fresh histories

    def reset(self, env_indices: Any = None) -> None:
        """Forget the history of these slots (their episodes ended)."""
        idx = _indices(env_indices, self.num_envs)
        if len(idx):
            self._steps[idx] = 0
            self._blocks[torch.as_tensor(idx, device=self.device)] = 0

    def slot_settings(self, env: int) -> dict[str, int]:
        """The resolved settings of slot ``env``: history_steps, beam_width, horizon (0 = greedy), task_id."""
        bw, h = self._plan[env]
        return {
            "history_steps": int(self._cap[env]),
            "beam_width": int(bw),
            "horizon": int(h),
            "task_id": int(self._task[env]),
        }

    def history_tokens(self, env: int) -> torch.Tensor:
        """The tokens held for slot ``env``: its last steps, oldest first (ends with an action token
        after ``act``; empty after ``reset``)."""
        k = int(self._steps[env])
        return self._blocks[env, self._blocks.shape[1] - k :].reshape(-1).clone()

    def history_length(self, env_indices: Any = None) -> np.ndarray:
        """Steps held per slot (the k of the next decision is min(this + 1, history_steps))."""
        return self._steps[_indices(env_indices, self.num_envs)].copy()

    # -- acting ---------------------------------------------------------------------------------

    def autocast(self):
        """The context of the agent's own forwards: bf16 autocast on CUDA when ``amp``, else nothing."""
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp and self.device.type == "cuda")

    @torch.no_grad()
    def act(
        self, obs: Any, env_indices: Any = None, *, return_trace: bool = False
    ) -> np.ndarray | tuple[np.ndarray, list[tuple[np.ndarray, planning.PlanTrace]]]:
        """Append the frames' tokens, choose, append the actions; returns (n,) full-set actions.

        With ``return_trace``, also a list of ``(rows, PlanTrace)``: one per group of slots planned
        together (same beam width and horizon), ``rows`` indexing this call's batch; epsilon rows
        have no trace.
        """
        self._require_bound()
        obs = _check_obs(obs)
        idx = _indices(env_indices, self.num_envs, len(obs))
        n = len(idx)
        rows_dev = torch.as_tensor(idx, device=self.device)
        with self.autocast():
            tokens = self.tokenizer.encode(torch.from_numpy(obs).to(self.device))  # (n, 36)
        # Append the observation: shift the held steps left by one (the oldest falls off at the cap).
        blocks = torch.roll(self._blocks[rows_dev], shifts=-1, dims=1)
        blocks[:, -1, :OBS_TOKENS] = tokens.long()
        blocks[:, -1, OBS_TOKENS] = 0  # action slot, written below
        self._blocks[rows_dev] = blocks
        self._steps[idx] = np.minimum(self._steps[idx] + 1, self._cap[idx])

        if self.shared_epsilon:
            explore = np.full(n, self.rng.random() < self.epsilon) if n else np.zeros(0, bool)
        else:
            explore = self.rng.random(n) < self.epsilon
        actions = np.empty(n, dtype=np.int64)
        if explore.any():
            actions[explore] = self._random_legal(idx[explore])
        traces = []
        plan_rows = np.flatnonzero(~explore)
        settings = self._plan[idx]
        for bw, h in np.unique(settings[plan_rows], axis=0) if len(plan_rows) else []:
            group = plan_rows[(settings[plan_rows] == (bw, h)).all(1)]
            acts, trace = self._decide(idx[group], int(bw), int(h), return_trace)
            actions[group] = acts
            if trace is not None:
                traces.append((group, trace))
        self.last_explored = explore
        self._blocks[rows_dev, -1, OBS_TOKENS] = torch.as_tensor(actions, device=self.device)
        return (actions, traces) if return_trace else actions

    def _context(self, slots: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-aligned decision contexts (len(slots), k*37 - 1) and the valid steps per row."""
        steps = self._steps[slots]
        k = int(steps.max())
        history = self._blocks[torch.as_tensor(slots, device=self.device), -k:].reshape(len(slots), -1)[:, :-1]
        return history, torch.as_tensor(steps)

    def _decide(
        self, slots: np.ndarray, beam_width: int, horizon: int, want_trace: bool
    ) -> tuple[np.ndarray, planning.PlanTrace | None]:
        history, steps = self._context(slots)
        with self.autocast():
            acts, trace = planning.beam_search(
                self.model, history, self._task[slots], self._legal_t[torch.as_tensor(slots, device=self.device)],
                beam_width, horizon, self.gamma, trace=want_trace, history_steps=steps, use_mean=self.use_mean,
                anchor_q=self.anchor_q,
            )  # fmt: skip
        return acts.cpu().numpy().astype(np.int64), trace

    def observe_actions(self, executed: Any, env_indices: Any = None) -> None:
        """Record the executed actions as the last action tokens (when the env replaced the choice)."""
        idx = _indices(env_indices, self.num_envs)
        a = np.asarray(executed, dtype=np.int64).reshape(-1)
        if len(a) != len(idx):
            raise ValueError(f"{len(a)} actions given for {len(idx)} env slots.")
        held = self._steps[idx] > 0
        if held.any():
            self._blocks[torch.as_tensor(idx[held], device=self.device), -1, OBS_TOKENS] = torch.as_tensor(
                a[held], device=self.device
            )

    def describe(self) -> dict[str, Any]:
        def plain(v: PerGame) -> Any:
            return dict(v) if isinstance(v, Mapping) else int(v)

        return {
            **super().describe(),
            "history_steps": plain(self.history_steps), "beam_width": plain(self.beam_width),
            "horizon": plain(self.horizon), "gamma": self.gamma, "use_mean": self.use_mean,
            "anchor_q": self.anchor_q, "epsilon": self.epsilon,
            "shared_epsilon": self.shared_epsilon, "alias_held_out": self.alias_held_out,
            "model_config": {k: getattr(self.model.cfg, k) for k in ("num_layers", "embed_dim", "num_q")},
        }  # fmt: skip


class MTBCAgent(Agent):
    """The multi-task behaviour-cloning baseline: argmax of the model's ``head_bc`` logits at the
    current frame over legal actions, with the same token history and epsilon rule as ``Agent``.

    Needs a model built with ``WorldActionConfig(bc_head=True)``; planning settings are ignored.
    """

    def __init__(self, tokenizer: nn.Module, model: nn.Module, **kwargs: Any) -> None:
        if getattr(model, "head_bc", None) is None:
            raise ValueError("MTBCAgent needs a model with a behaviour-cloning head (WorldActionConfig(bc_head=True)).")
        kwargs.setdefault("name", "mtbc")
        super().__init__(tokenizer, model, **kwargs)

    def _decide(
        self, slots: np.ndarray, beam_width: int, horizon: int, want_trace: bool
    ) -> tuple[np.ndarray, planning.PlanTrace | None]:
        steps = self._steps[slots]
        out = np.empty(len(slots), dtype=np.int64)
        for k in np.unique(steps):  # positions are absolute: one forward per context length
            rows = np.flatnonzero(steps == k)
            sl = torch.as_tensor(slots[rows], device=self.device)
            window = self._blocks[sl, -int(k) :].reshape(len(rows), -1)[:, :-1]
            with self.autocast():
                logits = self.model(window, self._task[slots[rows]].to(self.device)).bc_logits[:, -1].float()
            out[rows] = logits.masked_fill(~self._legal_t[sl], float("-inf")).argmax(-1).cpu().numpy()
        return out, None
