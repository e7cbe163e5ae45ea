"""Planner throughput: decisions/s of greedy and beam search, batched vs a per-node reference (JSON lines).

    python benchmarks/planner_throughput.py [--presets tiny jowa_40m] [--envs 1 16] [--seconds 3]

For each preset (a randomly initialised ``WorldActionModel`` in eval mode), number of environments
(random games, 8 steps of random history) and method (greedy; beam width 2 and 4 at horizon 2),
prints one JSON object per figure: ``jowa_core.planning`` (ours) and ``reference_beam_search``
below (straightforward per environment, per node: clone the cache, step one node at a time, Python
node objects, as the official agent's structure), their ratio, and whether both chose the same
actions. One torch thread. Target: ours >= 10x the reference at 16 environments on CPU. Beam search is
also timed with the history layout its default did not pick (``planning.shares_history``): beams reading
each environment's history from one shared cache, or each from a copy; ``..._shared_history_speedup``
is copied over shared time.

``reference_beam_search`` is also the independent reference of ``tests/test_planning.py``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass

import torch

from jowa_core import games
from jowa_core.config import preset
from jowa_core.models.world_action import KVCache, WorldActionModel
from jowa_core.planning import beam_search, shares_history


@dataclass
class StepNode:
    """One node of the reference search (official ``utils.StepNode``, with its return-to-date stored)."""

    critic: torch.Tensor  # (18,) masked expected Q at the node's state
    cache: KVCache | None
    parent: StepNode | None = None
    action: int | None = None
    reward: float = 0.0
    depth: int = 0
    ret: float = 0.0

    def score(self, gamma: float) -> float:
        return self.ret + gamma**self.depth * float(self.critic.max())


@torch.no_grad()
def reference_beam_search(
    model: WorldActionModel,
    history: torch.Tensor,
    task_ids: torch.Tensor,
    legal_mask: torch.Tensor,
    beam_width: int,
    horizon: int,
    gamma: float = 0.99,
    history_steps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """Spec 8.4 one env and one node at a time. Returns actions (B,) and each env's best-leaf score.

    Candidate ties are broken like ``jowa_core.planning`` (stable sort: lower action first), beam ties
    by Python's stable ``sorted``.
    """
    cfg, tpb = model.cfg, model.cfg.tokens_per_block
    B, T = history.shape
    actions, best_scores = [], []
    for b in range(B):
        steps = (T + 1) // tpb if history_steps is None else int(history_steps[b])
        g = min(cfg.max_blocks - horizon, steps)
        window = history[b : b + 1, T - (g * tpb - 1) :]
        task, legal = task_ids[b : b + 1], legal_mask[b : b + 1]
        cache = model.empty_cache(1) if horizon > 0 else None  # the official 296-slot cache
        out = model(window, task, cache)
        root = StepNode(model.q_values(out.q_logits[:, :, -1], legal)[0], cache)
        if horizon == 0:
            actions.append(int(root.critic.argmax()))
            best_scores.append(root.score(gamma))
            continue
        k = min(int(legal.sum()), beam_width)
        nodes = [root]
        for d in range(1, horizon + 1):
            children = []
            for node in nodes:
                for a in torch.sort(node.critic, descending=True, stable=True).indices[:k].tolist():
                    step = model.step(node.cache.clone(), torch.tensor([a]), task)
                    r = float(step.reward_logits[0].argmax()) - 1.0
                    critic = model.q_values(step.q_logits, legal)[0]
                    ret = node.ret + gamma ** (d - 1) * r
                    children.append(StepNode(critic, step.kv_cache, node, a, r, d, ret))
            nodes = sorted(children, key=lambda n: n.score(gamma), reverse=True)[:beam_width]
        leaf = nodes[0]
        best_scores.append(leaf.score(gamma))
        while leaf.depth > 1:
            leaf = leaf.parent
        actions.append(leaf.action)
    return torch.tensor(actions, dtype=torch.long), best_scores


def random_inputs(model: WorldActionModel, n_env: int, steps: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Random histories of ``steps`` steps for ``n_env`` random games: (history, task_ids, legal_mask)."""
    cfg, g = model.cfg, torch.Generator().manual_seed(seed)
    T = steps * cfg.tokens_per_block - 1
    history = torch.randint(0, cfg.obs_vocab_size, (n_env, T), generator=g)
    act_pos = torch.arange(T) % cfg.tokens_per_block == cfg.tokens_per_block - 1
    history[:, act_pos] = torch.randint(0, cfg.num_actions, (n_env, int(act_pos.sum())), generator=g)
    task_ids = torch.randint(0, games.NUM_TASKS, (n_env,), generator=g)
    legal = torch.from_numpy(games.action_masks())[task_ids]
    return history, task_ids, legal


def timed(fn, seconds: float, max_iters: int) -> tuple[float, object]:
    """Seconds per call (at least one call, until ``seconds`` or ``max_iters``) and the last result."""
    n, t0 = 0, time.perf_counter()
    while True:
        result = fn()
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds or n >= max_iters:
            return elapsed / n, result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "jowa_40m"])
    p.add_argument("--envs", nargs="+", type=int, default=[1, 16])
    p.add_argument("--steps", type=int, default=8, help="history steps per env (cut to 8 - horizon)")
    p.add_argument("--seconds", type=float, default=3.0, help="time budget per figure (at least one call)")
    p.add_argument("--max-iters", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-other-layout", action="store_true", help="skip timing ours with the other history layout")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    methods = [("greedy", 1, 0), ("beam_bw2_h2", 2, 2), ("beam_bw4_h2", 4, 2)]
    common = {"device": "cpu", "torch": torch.__version__, "threads": args.threads}
    for name in args.presets:
        torch.manual_seed(0)
        model = WorldActionModel(preset(name).model).eval()
        for n_env in args.envs:
            history, task_ids, legal = random_inputs(model, n_env, args.steps, seed=n_env)
            for method, bw, horizon in methods:
                inputs = (model, history, task_ids, legal, bw, horizon)
                t_ours, a_ours = timed(lambda inputs=inputs: beam_search(*inputs)[0], args.seconds, args.max_iters)
                t_ref, a_ref = timed(
                    lambda inputs=inputs: reference_beam_search(*inputs)[0], args.seconds, args.max_iters
                )
                tag = {"preset": name, "envs": n_env, "method": method, **common}
                timings = [("ours", t_ours), ("per_node_reference", t_ref)]
                if horizon > 0 and not args.no_other_layout:
                    shared = shares_history(model, n_env, "cpu")
                    t_other, a_other = timed(
                        lambda inputs=inputs, s=not shared: beam_search(*inputs, share_prefix=s)[0],
                        args.seconds, args.max_iters,
                    )  # fmt: skip
                    timings.append((f"ours_{'copied' if shared else 'shared'}_history", t_other))
                    print(json.dumps({
                        "name": f"{method}_shared_history_speedup",
                        "value": round((t_other / t_ours) if shared else (t_ours / t_other), 2), "unit": "x",
                        "ours_shares": shared, "actions_match": bool(torch.equal(a_ours, a_other)), **tag,
                    }))  # fmt: skip
                for who, t in timings:
                    print(
                        json.dumps(
                            {"name": f"{method}_{who}", "value": round(n_env / t, 3), "unit": "decisions/s", **tag}
                        )
                    )
                print(json.dumps({
                    "name": f"{method}_speedup", "value": round(t_ref / t_ours, 2), "unit": "x",
                    "actions_match": bool(torch.equal(a_ours, a_ref)), **tag,
                }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
