"""Looking inside the planner (notebook 04, ``jowa play``): record an episode with every plan, re-plan
one step with other settings, and dream, i.e. step the world model by hand beside the real emulator.

Pure orchestration over ``Agent``, ``planning`` and ``AtariVecEnv``; the figures and widgets that show
these records live in ``jowa_core.viz``.

Reaching a recorded state in the real emulator. ``DreamSession`` replays the recorded executed
actions from the episode's seed in a fresh ``backend="python"`` env instead of cloning the emulator
(ALE ``cloneState``/``restoreState``): the env's own bookkeeping (pooling buffers, lives, step
counters, FIRE-after-life-loss flag) is not part of an ALE state, and replay through the public API
restores all of it. ALE is deterministic given its seed and the action sequence (sticky actions
draw from the seeded ALE stream too), and the session checks that the replayed frame equals the
recorded one. The cost is t emulator steps per (re)start, milliseconds for the episodes shown here.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from jowa_core import games, planning
from jowa_core.agent import Agent
from jowa_core.config import TOKENS_PER_BLOCK
from jowa_core.envs import AtariVecEnv, Backend, EnvConfig
from jowa_core.planning import PlanTrace

__all__ = [
    "DreamSession",
    "DreamStep",
    "EpisodeRecord",
    "StepRecord",
    "episode_video",
    "record_episode",
    "replan",
    "write_video",
]


def _trace_to_cpu(trace: PlanTrace) -> PlanTrace:
    return dataclasses.replace(
        trace, **{f.name: getattr(trace, f.name).cpu() for f in dataclasses.fields(trace)
                  if isinstance(getattr(trace, f.name), torch.Tensor)}
    )  # fmt: skip


@dataclass
class StepRecord:
    """One agent step of a recorded episode.

    Attributes:
        t: step index in the episode.
        frame: (84, 84) uint8, the real observation the agent acted on.
        history: (k*37 - 1,) long (CPU), the decision context: k steps ending with this frame's tokens.
        planned: the planner's full-set action (with the agent's beam settings).
        greedy: argmax expected Q at the same context (equals ``planned`` when the horizon is 0).
        executed: the action the env executed (differs when epsilon explored or the env replaced it).
        reward: the real reward of ``executed``.
        trace: the plan's ``PlanTrace`` for this one env (CPU), None when epsilon chose instead.
    """

    t: int
    frame: np.ndarray
    history: torch.Tensor
    planned: int
    greedy: int
    executed: int
    reward: float
    trace: PlanTrace | None


@dataclass
class EpisodeRecord:
    """An episode played by an agent with everything needed to replay and inspect it."""

    game: str
    seed: int
    env_config: EnvConfig
    beam_width: int
    horizon: int
    gamma: float
    use_mean: bool = False
    """The planner valued imagined states by mean Q over legal actions (``planning.state_value``)."""
    anchor_q: bool = False
    """The planner ranked paths by the root's Q plus the imagined change (``planning.beam_search``)."""
    steps: list[StepRecord] = field(default_factory=list)
    ended: bool = False
    """True when the episode ended (game over or the env's cap), False when ``record_episode`` stopped it."""

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def frames(self) -> np.ndarray:
        """(T, 84, 84) uint8 real frames."""
        return np.stack([s.frame for s in self.steps]) if self.steps else np.zeros((0, 84, 84), np.uint8)

    @property
    def planned(self) -> np.ndarray:
        return np.array([s.planned for s in self.steps], np.int64)

    @property
    def greedy(self) -> np.ndarray:
        return np.array([s.greedy for s in self.steps], np.int64)

    @property
    def executed(self) -> np.ndarray:
        return np.array([s.executed for s in self.steps], np.int64)

    @property
    def total_return(self) -> float:
        return float(sum(s.reward for s in self.steps))

    @property
    def agreement(self) -> float:
        """Share of steps where the planner chose the greedy action (NaN for an empty record)."""
        return float(np.mean(self.planned == self.greedy)) if self.steps else float("nan")

    def summary(self) -> dict[str, Any]:
        """JSON-able numbers for a notebook summary."""
        return {
            "game": self.game, "steps": len(self), "return": self.total_return, "ended": self.ended,
            "beam_width": self.beam_width, "horizon": self.horizon, "plan_greedy_agreement": self.agreement,
        }  # fmt: skip


@torch.no_grad()
def record_episode(
    agent: Agent,
    game: str,
    max_steps: int,
    *,
    env_config: EnvConfig | str = "official",
    seed: int = 0,
    backend: Backend = "python",
    progress: bool = True,
) -> EpisodeRecord:
    """Play one episode of ``game`` (at most ``max_steps`` agent steps) and record every decision.

    The agent is bound to one env slot of ``game`` (its other bindings are dropped). Per step the
    record keeps the real frame, the decision context, the planned action with its ``PlanTrace``
    and the greedy action at the same context. ``backend="python"`` (default) gives the same
    frames as the native one and is what ``DreamSession`` replays.
    """
    from jowa_core.evaluation import protocol

    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}.")
    if not isinstance(agent, Agent):
        raise TypeError(f"record_episode needs a jowa_core.agent.Agent (it reads plans); got {type(agent).__name__}.")
    cfg = protocol(env_config) if isinstance(env_config, str) else env_config
    game = games.canonical_name(game)
    agent.bind([game], seed=seed)
    s = agent.slot_settings(0)
    task = torch.tensor([s["task_id"]], device=agent.device)
    legal = torch.as_tensor(games.legal_mask(game), device=agent.device)[None]
    rec = EpisodeRecord(game, seed, cfg, s["beam_width"], s["horizon"], agent.gamma, agent.use_mean,
                        getattr(agent, "anchor_q", False))  # fmt: skip
    with AtariVecEnv(game, 1, cfg, seed=seed, backend=backend) as env:
        obs = env.reset()
        for t in tqdm(range(max_steps), desc=f"record {game}", disable=not progress):
            actions, traces = agent.act(obs, return_trace=True)
            history = agent.history_tokens(0)[:-1]  # the context the planner saw (drops the new action token)
            trace = _trace_to_cpu(traces[0][1]) if traces else None
            planned = int(trace.actions[0]) if trace is not None else int(actions[0])
            if s["horizon"] == 0:
                greedy = planned
            else:
                with agent.autocast():  # as the agent's own forward
                    greedy = int(planning.greedy(agent.model, history[None], task, legal)[0])
            new_obs, reward, term, trunc, info = env.step(actions)
            agent.observe_actions(info["actions"])
            rec.steps.append(
                StepRecord(t, obs[0].copy(), history.cpu(), planned, greedy, int(info["actions"][0]),
                           float(reward[0]), trace)
            )  # fmt: skip
            obs = new_obs
            if term[0] or trunc[0]:
                rec.ended = True
                break
    return rec


@torch.no_grad()
def replan(
    model: nn.Module, record: EpisodeRecord, t: int, beam_width: int, horizon: int, gamma: float | None = None
) -> PlanTrace:
    """The plan of step ``t`` of ``record`` redone with other beam settings (a ``PlanTrace`` on CPU)."""
    if not 0 <= t < len(record):
        raise IndexError(f"step {t} is outside the record's {len(record)} steps.")
    max_h = model.cfg.max_blocks - 1
    if not 0 <= horizon <= max_h:
        raise ValueError(f"horizon must be in [0, {max_h}] for this model (max_blocks {model.cfg.max_blocks}).")
    step = record.steps[t]
    task = torch.tensor([games.task_id(record.game)])
    legal = torch.as_tensor(games.legal_mask(record.game))[None]
    _, trace = planning.beam_search(
        model, step.history[None], task, legal, max(beam_width, 1), horizon,
        record.gamma if gamma is None else gamma, trace=True, use_mean=record.use_mean, anchor_q=record.anchor_q,
    )  # fmt: skip
    return _trace_to_cpu(trace)


# ---------------------------------------------------------------------------------------------
# Videos


def write_video(frames: np.ndarray, path: str | os.PathLike, fps: int = 15, scale: int = 3) -> Path | None:
    """Write grayscale frames (T, H, W) uint8 as an mp4 (OpenCV, mp4v) enlarged ``scale`` times.

    Returns the path, or None when OpenCV has no mp4 encoder on this machine.
    """
    import cv2

    frames = np.asarray(frames)
    if frames.ndim != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"frames must be a non-empty uint8 (T, H, W) array; got {frames.dtype} {frames.shape}.")
    path = Path(path)
    if path.suffix != ".mp4":
        raise ValueError(f"write_video writes .mp4 files; got {path.name}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames.shape[1] * scale, frames.shape[2] * scale
    tmp = path.with_name(path.stem + ".partial.mp4")
    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h), isColor=False)
    if not writer.isOpened():
        return None
    try:
        for f in frames:
            writer.write(cv2.resize(f, (w, h), interpolation=cv2.INTER_NEAREST))
    finally:
        writer.release()
    os.replace(tmp, path)
    return path


@torch.no_grad()
def imagined_next_frames(record: EpisodeRecord, tokenizer: nn.Module) -> np.ndarray:
    """(T, 84, 84) uint8: per step, the decoded imagined frame after the chosen action (the first node
    of the best path); the real frame where the step has no imagined child (greedy or epsilon)."""
    out = record.frames.copy()
    idx = [(i, s.trace.path(0)[1]) for i, s in enumerate(record.steps) if s.trace is not None and s.trace.horizon > 0]
    if idx:
        dev = next(tokenizer.parameters()).device
        tokens = torch.stack([record.steps[i].trace.obs_tokens[n] for i, n in idx]).to(dev)
        frames = tokenizer.decode(tokens)[:, 0].float().clamp(0, 1).mul(255).round().byte().cpu().numpy()
        for (i, _), f in zip(idx, frames):
            out[i] = f
    return out


def episode_video(
    record: EpisodeRecord, path: str | os.PathLike, tokenizer: nn.Module | None = None, fps: int = 15, scale: int = 3
) -> Path | None:
    """The episode as an mp4: real frames, and with a ``tokenizer`` the imagined next frame of the
    plan beside each one (left real, right imagined)."""
    frames = record.frames
    if tokenizer is not None:
        gap = np.full((len(frames), 84, 2), 128, np.uint8)
        frames = np.concatenate([frames, gap, imagined_next_frames(record, tokenizer)], axis=2)
    return write_video(frames, path, fps=fps, scale=scale)


# ---------------------------------------------------------------------------------------------
# Dreaming


@dataclass
class DreamStep:
    """One step taken in a ``DreamSession``: what the world model predicts and what the emulator does.

    Attributes:
        action: full-set action fed to both.
        imagined: (84, 84) uint8 decoded imagined next frame; tokens: its (36,) tokens.
        reward_probs: (3,) predicted probabilities of reward sign -1, 0, +1; predicted_reward: the argmax sign.
        end_prob: predicted probability that the episode ends here.
        q: (18,) expected Q at the imagined frame (-inf on illegal actions).
        real: (84, 84) uint8 the emulator's next frame (None once the real episode is over).
        real_reward: the emulator's reward; real_done: the real episode ended at this step.
    """

    action: int
    imagined: np.ndarray
    tokens: np.ndarray
    reward_probs: np.ndarray
    predicted_reward: int
    end_prob: float
    q: np.ndarray
    real: np.ndarray | None
    real_reward: float
    real_done: bool


class DreamSession:
    """Step the world model by hand from a real history, beside the real emulator from the same state.

    Starts at step ``t`` of ``record``: the imagination starts from that step's decision context,
    and a ``backend="python"`` emulator replays the record's executed actions from its seed to reach
    the same state (see the module docstring: replay, not ALE state cloning). ``step(action)`` feeds
    the same action to both; ``agent_action()`` is what the planner would choose in the imagined
    state. When the imagined context fills the model's window the oldest step is dropped and the
    cache rebuilt (a sliding window, as the agent does).

    Args:
        model, tokenizer: the run's world-action model and tokenizer (any device; eval mode).
        record: a recorded episode (``record_episode``).
        t: the branch point, a step of ``record``.
        beam_width, horizon: planner settings of ``agent_action`` (horizon 0: greedy).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: nn.Module,
        record: EpisodeRecord,
        t: int = 0,
        *,
        beam_width: int = 1,
        horizon: int = 0,
    ) -> None:
        if not 0 <= t < len(record):
            raise IndexError(f"branch step {t} is outside the record's {len(record)} steps.")
        if not 0 <= horizon < model.cfg.max_blocks:
            raise ValueError(f"horizon must be in [0, {model.cfg.max_blocks - 1}], got {horizon}.")
        self.model, self.tokenizer, self.record, self.t = model.eval(), tokenizer.eval(), record, t
        self.beam_width, self.horizon = max(int(beam_width), 1), int(horizon)
        self.device = next(model.parameters()).device
        self.task = torch.tensor([games.task_id(record.game)], device=self.device)
        self.legal = torch.as_tensor(games.legal_mask(record.game), device=self.device)[None]
        self.legal_actions: tuple[int, ...] = games.legal_actions(record.game)
        self._env: AtariVecEnv | None = None
        self.reset()

    # -- state --------------------------------------------------------------------------------

    def reset(self, t: int | None = None) -> None:
        """Back to the branch point (or to a new one, step ``t`` of the record): the recorded context,
        and the emulator replayed to that step."""
        if t is not None:
            if not 0 <= t < len(self.record):
                raise IndexError(f"branch step {t} is outside the record's {len(self.record)} steps.")
            self.t = int(t)
        self.steps: list[DreamStep] = []
        self.tokens = self.record.steps[self.t].history.to(self.device)  # (k*37 - 1,)
        self._rebuild_cache()
        self.imagined = self.record.steps[self.t].frame.copy()
        self.real: np.ndarray | None = self._replay()
        self.real_done = False

    def _replay(self) -> np.ndarray:
        if self._env is not None:
            self._env.close()
        self._env = AtariVecEnv(self.record.game, 1, self.record.env_config, seed=self.record.seed, backend="python")
        obs = self._env.reset()
        for s in self.record.steps[: self.t]:
            obs = self._env.step(np.array([s.executed]))[0]
        if not np.array_equal(obs[0], self.record.steps[self.t].frame):
            raise RuntimeError(
                f"replaying {self.t} recorded actions of {self.record.game} (seed {self.record.seed}) did not reproduce "
                "the recorded frame; record the episode with a deterministic env (record_episode's defaults)."
            )
        return obs[0].copy()

    @torch.no_grad()
    def _rebuild_cache(self) -> None:
        """Run the imagined context into a fresh cache; the Q at its last frame."""
        self.cache = self.model.empty_cache(1)
        out = self.model(self.tokens[None], self.task, self.cache)
        self.q = self.model.q_values(out.q_logits[:, :, -1], self.legal)[0].float().cpu().numpy()

    @property
    def context_steps(self) -> int:
        """Steps in the imagined context (the current imagined frame included)."""
        return (self.tokens.shape[0] + 1) // TOKENS_PER_BLOCK

    # -- acting ------------------------------------------------------------------------------

    @torch.no_grad()
    def agent_action(self) -> int:
        """The planner's choice in the current imagined state (beam search with the session's settings)."""
        steps = min(self.context_steps, self.model.cfg.max_blocks - self.horizon)
        window = self.tokens[self.tokens.shape[0] - (steps * TOKENS_PER_BLOCK - 1) :]
        acts, _ = planning.beam_search(self.model, window[None], self.task, self.legal, self.beam_width, self.horizon,
                                       self.record.gamma, use_mean=self.record.use_mean,
                                       anchor_q=self.record.anchor_q)  # fmt: skip
        return int(acts[0])

    @torch.no_grad()
    def step(self, action: int) -> DreamStep:
        """Feed ``action`` to the world model and to the emulator; returns both outcomes."""
        action = int(action)
        if action not in self.legal_actions:
            names = ", ".join(f"{a} {games.FULL_ACTION_SET[a]}" for a in self.legal_actions)
            raise ValueError(f"action {action} is not legal in {self.record.game}; legal: {names}.")
        k, max_blocks = self.context_steps, self.model.cfg.max_blocks
        if k >= max_blocks:  # no room for another step: drop the oldest ones (positions restart at 0)
            self.tokens = self.tokens[(k - max_blocks + 1) * TOKENS_PER_BLOCK :]
            self._rebuild_cache()
        out = self.model.step(self.cache, torch.tensor([action], device=self.device), self.task)
        new = out.obs_tokens[0]
        self.tokens = torch.cat([self.tokens, torch.tensor([action], device=self.device), new])
        self.q = self.model.q_values(out.q_logits, self.legal)[0].float().cpu().numpy()
        frame = self.tokenizer.decode(new[None].to(next(self.tokenizer.parameters()).device))[0, 0]
        self.imagined = frame.float().clamp(0, 1).mul(255).round().byte().cpu().numpy()
        probs = out.reward_logits[0].float().softmax(-1).cpu().numpy()
        real_reward = 0.0
        if not self.real_done:
            _, r, term, trunc, info = self._env.step(np.array([action]))
            real_reward, self.real_done = float(r[0]), bool(term[0] or trunc[0])
            self.real = info["final_obs"][0].copy()
        res = DreamStep(
            action=action, imagined=self.imagined, tokens=new.cpu().numpy(), reward_probs=probs,
            predicted_reward=int(probs.argmax()) - 1, end_prob=float(out.end_logits[0].float().softmax(-1)[1]),
            q=self.q.copy(), real=self.real, real_reward=real_reward, real_done=self.real_done,
        )  # fmt: skip
        self.steps.append(res)
        return res

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None
