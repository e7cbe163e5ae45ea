"""Decision-time planning in the learned world model: greedy Q, batched beam search and MCTS (spec 8).

Pure functions over the ``WorldActionModel`` API (``forward`` with a KV cache, ``step``,
``q_values``, ``empty_cache``), in the style of tdmpc2's ``_plan``: no environment, no agent state.

Batching. The official code plans one environment at a time with per-node Python objects and cache
copies. Here every environment and every beam of a depth is one row of the batch: a depth costs one
``model.step`` (1 + 36 single-token forwards) whatever the number of environments and beams, and the
KV cache of the surviving beams is carried forward with one ``index_select`` per depth. On CPU, for
groups of envs wide enough (``shares_history``), the beams branch from their environment's history
without copying it (``KVCache.branch``): each depth copies only the imagined tokens, and attention
reads each history once per environment.

Histories of different lengths. Positions are absolute (the official feeds each environment's own
window starting at position 0, and heads are picked by absolute position), so rows whose windows
have different lengths cannot share one forward without per-row positions. Rows are therefore
grouped by their effective window length (at most ``max_blocks`` distinct values, usually one or
two) and each group is planned as one batch. Callers pass right-aligned (left-padded) histories and
``history_steps`` (B,), the number of valid steps per row; padding tokens are never read.

Ties. Candidate actions are ranked with a stable descending sort (equal Q: lower action index first;
the official ``torch.topk`` tie order is unspecified) and beams with Python-stable-sort semantics
(equal scores: parent order, then candidate order), as in spec 8.4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from jowa_core.models.world_action import KVCache, WorldActionModel

__all__ = ["PlanTrace", "beam_search", "decode_trace_frames", "greedy", "mcts", "shares_history", "state_value"]

SHARE_PREFIX_MIN_WIDTH = 256
"""``beam_search``'s default shares the history cache (CPU) for a group of n envs when n x embed_dim reaches
this: below it the shared attention's extra small ops cost more than the copies they save (measured on a
2-core CPU, one thread: the tiny preset (width 64) lost up to 22 % at 1 and 2 envs and gained from 4 on;
jowa_40m (width 512) gained at every count, README Performance)."""


# ---------------------------------------------------------------------------------------------
# Trace


@dataclass
class PlanTrace:
    """Every node of a beam search, as flat arrays (node-major, ordered by depth, then env, then
    expansion order). Roots are nodes 0..B-1 (node b is env b's root).

    Attributes:
        env: (N,) long, environment row of the node.
        depth: (N,) long, 0 for roots.
        parent: (N,) long node index of the parent, -1 for roots.
        action: (N,) long full-set action leading to the node, -1 for roots.
        reward: (N,) float predicted reward of that action (sign class - 1; 0 at roots).
        q: (N, 18) float masked expected Q at the node's state (-inf on illegal actions).
        return_to_date: (N,) float R_d = R_{d-1} + gamma^(d-1) r.
        score: (N,) float R_d + gamma^d V(q) (roots: V(q)), V = max over actions, or the mean over the
            legal ones with ``use_mean``.
        obs_tokens: (N, obs_tokens) long imagined observation (roots: the real current one).
        kept: (N,) bool, the node survived pruning to ``beam_width`` (roots: True).
        best_leaf: (B,) long node index of the best leaf (the root when horizon is 0).
        actions: (B,) long chosen actions (depth-1 action on the path to ``best_leaf``).
        beam_width, horizon, gamma, use_mean: the search settings.
    """

    env: Tensor
    depth: Tensor
    parent: Tensor
    action: Tensor
    reward: Tensor
    q: Tensor
    return_to_date: Tensor
    score: Tensor
    obs_tokens: Tensor
    kept: Tensor
    best_leaf: Tensor
    actions: Tensor
    beam_width: int
    horizon: int
    gamma: float
    use_mean: bool = False

    @property
    def num_nodes(self) -> int:
        return self.env.shape[0]

    def path(self, env: int) -> list[int]:
        """Node indices from env's root to its best leaf."""
        node, out = int(self.best_leaf[env]), []
        while node >= 0:
            out.append(node)
            node = int(self.parent[node])
        return out[::-1]


@torch.no_grad()
def decode_trace_frames(trace: PlanTrace, tokenizer: nn.Module, nodes: Tensor | list[int] | None = None) -> Tensor:
    """Frames (n, 1, 84, 84) in [0, 1] of the imagined observations of ``nodes`` (default: all).

    Decoding is left to the caller because it costs a tokenizer decode per node and only viewers need it.
    """
    tokens = trace.obs_tokens if nodes is None else trace.obs_tokens[torch.as_tensor(nodes, dtype=torch.long)]
    return tokenizer.decode(tokens)


def shares_history(model: nn.Module, num_envs: int, device: torch.device) -> bool:
    """``beam_search``'s default for ``share_prefix`` on a group of ``num_envs`` envs (see
    ``SHARE_PREFIX_MIN_WIDTH``): a ``WorldActionModel`` off CUDA, wide enough, and not drawing attention
    dropout (a model in train mode plans with copies, as before)."""
    if not isinstance(model, WorldActionModel) or torch.device(device).type == "cuda":
        return False
    if model.training and model.cfg.attn_pdrop > 0:
        return False
    return num_envs * model.cfg.embed_dim >= SHARE_PREFIX_MIN_WIDTH


# ---------------------------------------------------------------------------------------------
# Input checks and grouping


def _device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _check_inputs(
    model: nn.Module,
    history: Tensor,
    task_ids: Tensor,
    legal_mask: Tensor,
    horizon: int,
    history_steps: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Validate and move to the model's device; return (history, task_ids, legal_mask, steps)."""
    cfg = model.cfg
    tpb = cfg.tokens_per_block
    if not isinstance(history, Tensor) or history.ndim != 2 or history.is_floating_point():
        raise ValueError(
            f"history must be an integer tensor (B, k*{tpb}-1); got {getattr(history, 'shape', type(history))}."
        )
    B, T = history.shape
    if B == 0 or T % tpb != tpb - 1:
        raise ValueError(
            f"history must be (B >= 1, k*{tpb}-1) tokens: k past steps of [{tpb - 1} obs tokens, action] ending "
            f"with the current frame's {tpb - 1} obs tokens; got shape {tuple(history.shape)}."
        )
    if not 0 <= horizon < cfg.max_blocks:
        raise ValueError(
            f"horizon must be in [0, {cfg.max_blocks - 1}] (the window holds {cfg.max_blocks} steps and the "
            f"current one); got {horizon}."
        )
    task_ids = torch.as_tensor(task_ids)
    if task_ids.shape != (B,):
        raise ValueError(f"task_ids must be (B,) = ({B},); got {tuple(task_ids.shape)}.")
    legal_mask = torch.as_tensor(legal_mask)
    if legal_mask.shape != (B, cfg.num_actions) or legal_mask.dtype != torch.bool:
        raise ValueError(
            f"legal_mask must be bool (B, {cfg.num_actions}) = ({B}, {cfg.num_actions}); got "
            f"{legal_mask.dtype} {tuple(legal_mask.shape)} (jowa_core.games.action_masks()[task_ids])."
        )
    if not bool(legal_mask.any(-1).all()):
        raise ValueError("every row of legal_mask needs at least one legal action.")
    k_max = (T + 1) // tpb
    if history_steps is None:
        steps = torch.full((B,), k_max, dtype=torch.long)
    else:
        steps = torch.as_tensor(history_steps, dtype=torch.long).cpu()
        if steps.shape != (B,) or bool((steps < 1).any()) or bool((steps > k_max).any()):
            raise ValueError(
                f"history_steps must be (B,) = ({B},) with values in [1, {k_max}] (valid steps per right-aligned "
                f"row); got {steps.tolist() if steps.ndim == 1 else tuple(steps.shape)}."
            )
    dev = _device(model)
    return history.to(dev, torch.long), task_ids.to(dev, torch.long), legal_mask.to(dev), steps


def _groups(steps: Tensor, max_steps: int) -> list[tuple[int, Tensor]]:
    """[(window steps g, row indices)] for rows grouped by g = min(steps, max_steps)."""
    g = steps.clamp(max=max_steps)
    return [(int(v), torch.nonzero(g == v).flatten()) for v in torch.unique(g)]


def _root_q(model: nn.Module, tokens: Tensor, task_ids: Tensor, legal: Tensor, cache: KVCache | None) -> Tensor:
    """Masked expected Q (B, 18) at the last observation of ``tokens`` (spec 8.2); through ``forward_q`` (no
    world heads) for a plain ``WorldActionModel``, through ``forward`` for anything else (a compiled or
    wrapped model keeps its own forward)."""
    if isinstance(model, WorldActionModel):
        q_logits = model.forward_q(tokens, task_ids, cache)
    else:
        q_logits = model(tokens, task_ids, cache).q_logits
    return model.q_values(q_logits[:, :, -1], legal)


def state_value(q: Tensor, legal: Tensor, use_mean: bool = False) -> Tensor:
    """V(s) from the masked expected Q (..., 18) and the legal mask: max over actions (the official planners),
    or with ``use_mean`` the mean over the legal ones.

    Why the mean: CQL's penalty (logsumexp over actions minus the data's action) moves Q values between
    actions but leaves their sum unchanged, so it raises the data's action most where the behaviour
    always took it, and max Q ranks such states high whatever their returns. A planner that compares
    imagined states by max Q then steers towards histories that look like the most deterministic
    behaviour in the data (on the default Breakout data, the lazy player that never launches the ball).
    """
    if not use_mean:
        return q.max(-1).values
    legal = legal.expand_as(q)
    return q.masked_fill(~legal, 0.0).sum(-1) / legal.sum(-1)


def _rewards(reward_logits: Tensor, sample: bool, temperature: float, generator: torch.Generator | None) -> Tensor:
    """Predicted reward sign class - 1 in {-1, 0, 1} (argmax, or sampled with ``sample``)."""
    logits = reward_logits.float()
    if sample:
        cls = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator).squeeze(1)
    else:
        cls = logits.argmax(-1)
    return cls.float() - 1.0


def _best_per_group(score: Tensor, group: Tensor, num_groups: int, keep: int) -> Tensor:
    """Indices of the ``keep`` best scores of each group: group ascending, score descending, ties in
    index order (Python's stable ``sorted(..., reverse=True)`` applied per group)."""
    by_score = torch.sort(score, descending=True, stable=True).indices
    order = by_score[torch.sort(group[by_score], stable=True).indices]
    g = group[order]
    counts = torch.bincount(g, minlength=num_groups)
    rank = torch.arange(len(order), device=score.device) - (torch.cumsum(counts, 0) - counts)[g]
    return order[rank < keep]


# ---------------------------------------------------------------------------------------------
# Greedy and beam search


@torch.no_grad()
def greedy(
    model: nn.Module, history: Tensor, task_ids: Tensor, legal_mask: Tensor, *, history_steps: Tensor | None = None
) -> Tensor:
    """argmax of the masked expected Q at the current frame (spec 8.2); actions (B,) long.

    Uses the last ``max_blocks`` steps of each row (beam search with horizon 0).
    """
    return beam_search(model, history, task_ids, legal_mask, 1, 0, history_steps=history_steps)[0]


@torch.no_grad()
def beam_search(
    model: nn.Module,
    history: Tensor,
    task_ids: Tensor,
    legal_mask: Tensor,
    beam_width: int,
    horizon: int,
    gamma: float = 0.99,
    *,
    sample: bool = False,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    trace: bool = False,
    history_steps: Tensor | None = None,
    use_mean: bool = False,
    anchor_q: bool = False,
    share_prefix: bool | None = None,
) -> tuple[Tensor, PlanTrace | None]:
    """Beam search in the world model for a batch of environments (spec 8.4), all beams batched.

    Args:
        model: a ``WorldActionModel`` (or anything with its ``cfg``, ``forward``, ``step``,
            ``q_values`` and ``empty_cache``); put it in eval mode unless dropout is wanted.
        history: (B, k*37-1) long: k past steps of [36 obs tokens, action token] ending with the
            current frame's 36 obs tokens. Rows are right-aligned (see ``history_steps``).
        task_ids: (B,) long task ids; legal_mask: (B, 18) bool.
        beam_width: beams kept per env after each depth (>= 1); each beam expands its top
            min(#legal, beam_width) legal actions by expected Q.
        horizon: imagined steps (0 = greedy); the window is cut to max_blocks - horizon steps.
        gamma: discount of the score R_d + gamma^d V, V = max_a Q (official).
        sample: sample rewards and observation tokens (at ``temperature``, from ``generator``)
            instead of argmax decoding (the official planners decode greedily).
        trace: also return a ``PlanTrace`` of every node.
        history_steps: (B,) valid steps per row when rows have different lengths (left-padded);
            default: every row holds k steps.
        use_mean: V = the mean of Q over the legal actions instead of the max (ours; see ``state_value``).
        anchor_q: rank paths by Q(s, a0) at the root plus the imagined change after the first step,
            S_d - S_1 (ours; the official score S_d ranks the first action by the value of the frame it leads to,
            which drops the critic's action gap, CQL's included, when imagined frames barely differ by action:
            README, session 13). Q(s, a0) is read with greedy's whole context (up to ``max_blocks`` steps; the
            imagination keeps ``max_blocks - horizon``), so horizon 1 is greedy; trace scores are the anchored ones.
        share_prefix: beams read their environment's history from one shared cache (``KVCache.branch``)
            instead of a copy per beam; same search, floats equal to rounding. Default (None): on for a
            ``WorldActionModel`` off CUDA when a group of n envs has n x embed_dim >= ``SHARE_PREFIX_MIN_WIDTH``
            (where it measured faster); off on CUDA, where the CUDA-graph decode needs a plain cache.
    Returns:
        actions (B,) long full-set actions on ``history``'s device, and the trace or None.
    """
    if beam_width < 1:
        raise ValueError(f"beam_width must be >= 1, got {beam_width}.")
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}.")
    if sample and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}.")
    if share_prefix and not isinstance(model, WorldActionModel):
        raise ValueError("share_prefix needs a WorldActionModel (its attention reads a KVCache.branch).")
    out_device = history.device
    history, task_ids, legal, steps = _check_inputs(model, history, task_ids, legal_mask, horizon, history_steps)
    B, tpb = history.shape[0], model.cfg.tokens_per_block
    actions = torch.empty(B, dtype=torch.long, device=history.device)
    parts = []
    q_anchor = None
    if anchor_q and horizon > 0:  # Q at the root with greedy's whole context, not the planner's shorter one
        q_anchor = torch.empty(B, legal.shape[-1], device=history.device)
        for g, rows in _groups(steps, model.cfg.max_blocks):
            rows = rows.to(history.device)
            window = history[rows, history.shape[1] - (g * tpb - 1) :]
            q_anchor[rows] = _root_q(model, window, task_ids[rows], legal[rows], None).float()
    for g, rows in _groups(steps, model.cfg.max_blocks - horizon):
        rows = rows.to(history.device)
        window = history[rows, history.shape[1] - (g * tpb - 1) :]
        acts, nodes = _beam_search_group(
            model, window, task_ids[rows], legal[rows], beam_width, horizon, gamma,
            sample=sample, temperature=temperature, generator=generator, trace=trace, use_mean=use_mean,
            q_anchor=None if q_anchor is None else q_anchor[rows],
            share_prefix=shares_history(model, len(rows), history.device) if share_prefix is None else share_prefix,
        )  # fmt: skip
        actions[rows] = acts
        if trace:
            nodes["env"] = rows[nodes["env"]]
            parts.append(nodes)
    plan_trace = _merge_traces(parts, actions, B, beam_width, horizon, gamma, use_mean) if trace else None
    return actions.to(out_device), plan_trace


def _beam_search_group(
    model: nn.Module,
    window: Tensor,
    task_ids: Tensor,
    legal: Tensor,
    beam_width: int,
    horizon: int,
    gamma: float,
    *,
    sample: bool,
    temperature: float,
    generator: torch.Generator | None,
    trace: bool,
    use_mean: bool,
    q_anchor: Tensor | None = None,
    share_prefix: bool = False,
) -> tuple[Tensor, dict[str, Tensor] | None]:
    """Beam search for envs whose windows all hold the same number of steps (one batch)."""
    B, T = window.shape
    dev, tpb = window.device, model.cfg.tokens_per_block
    cache = None if horizon == 0 else model.empty_cache(B, max_tokens=T if share_prefix else T + horizon * tpb)
    c = _root_q(model, window, task_ids, legal, cache)  # (B, 18)
    env = torch.arange(B, device=dev)
    if cache is not None and share_prefix:  # row b continues env b's history; beams copy only imagined tokens
        cache = KVCache.branch(cache, env, horizon * tpb)
    nodes = None
    if trace:
        zeros, none = torch.zeros(B, device=dev), torch.full_like(env, -1)
        nodes = {
            "env": env, "depth": torch.zeros_like(env), "parent": none, "action": none, "reward": zeros, "q": c,
            "return_to_date": zeros, "score": state_value(c, legal, use_mean), "obs_tokens": window[:, T - (tpb - 1) :],
            "kept": torch.ones_like(env, dtype=torch.bool),
        }  # fmt: skip
        chunks = [nodes]
    if horizon == 0:
        if trace:
            nodes["best_leaf"] = env
        return c.argmax(-1), nodes

    k_env = legal.sum(-1).clamp(max=beam_width)  # (B,) candidates per node: min(#legal, bw)
    K = int(k_env.max())
    # Frontier (one row per beam, env-major): its row in `cache`, env, critic, return, first action, node id.
    f_row, f_env, f_c = env, env, c if q_anchor is None else q_anchor  # the root expands its top actions by it
    f_ret = torch.zeros(B, device=dev)
    f_first = torch.full((B,), -1, dtype=torch.long, device=dev)
    f_shift = torch.zeros(B, device=dev)  # anchor_q: Q(s, a0) - S_1 of each beam's depth-1 ancestor
    f_node, offset = env, B
    for d in range(1, horizon + 1):
        N = f_env.shape[0]
        cand = torch.sort(f_c, dim=-1, descending=True, stable=True).indices[:, :K]  # (N, K)
        valid = torch.arange(K, device=dev) < k_env[f_env].unsqueeze(1)  # (N, K), never an illegal action
        parent = torch.arange(N, device=dev).unsqueeze(1).expand(N, K)[valid]  # children: parent-major, then rank
        act = cand[valid]
        c_env = f_env[parent]
        out = model.step(
            cache.index_select(f_row[parent]), act, task_ids[c_env],
            sample=sample, temperature=temperature, generator=generator,
        )  # fmt: skip
        reward = _rewards(out.reward_logits, sample, temperature, generator)
        c = model.q_values(out.q_logits, legal[c_env])  # (M, 18)
        ret = f_ret[parent] + gamma ** (d - 1) * reward
        score = ret + gamma**d * state_value(c, legal[c_env], use_mean)
        if q_anchor is not None:
            shift = q_anchor[c_env, act] - score if d == 1 else f_shift[parent]
            score = score + shift
        keep = _best_per_group(score, c_env, B, beam_width)  # env-major, score-descending
        first = act if d == 1 else f_first[parent]
        if trace:
            kept = torch.zeros(act.shape[0], dtype=torch.bool, device=dev)
            kept[keep] = True
            chunks.append({
                "env": c_env, "depth": torch.full_like(act, d), "parent": f_node[parent], "action": act,
                "reward": reward, "q": c, "return_to_date": ret, "score": score, "obs_tokens": out.obs_tokens,
                "kept": kept,
            })  # fmt: skip
            f_node, offset = offset + keep, offset + act.shape[0]
        cache, f_row, f_env, f_c, f_ret, f_first = out.kv_cache, keep, c_env[keep], c[keep], ret[keep], first[keep]
        if q_anchor is not None:
            f_shift = shift[keep]

    # The frontier is env-major and score-descending: each env's first beam is its best leaf.
    is_first = torch.ones_like(f_env, dtype=torch.bool)
    is_first[1:] = f_env[1:] != f_env[:-1]
    if trace:
        nodes = {key: torch.cat([ch[key] for ch in chunks]) for key in chunks[0]}
        nodes["best_leaf"] = f_node[is_first]
    return f_first[is_first], nodes


def _merge_traces(
    parts: list[dict[str, Tensor]], actions: Tensor, B: int, beam_width: int, horizon: int, gamma: float,
    use_mean: bool,
) -> PlanTrace:
    """One trace from per-group traces, re-ordered by (depth, env, expansion order)."""
    sizes = [p["env"].shape[0] for p in parts]
    offsets = [sum(sizes[:i]) for i in range(len(parts))]
    cat = {}
    for key in parts[0]:
        if key == "best_leaf":
            continue
        vals = []
        for p, off in zip(parts, offsets):
            v = p[key]
            if key == "parent":
                v = torch.where(v >= 0, v + off, v)
            vals.append(v)
        cat[key] = torch.cat(vals)
    best_leaf = torch.empty(B, dtype=torch.long, device=actions.device)
    for p, off in zip(parts, offsets):
        roots = p["env"][p["depth"] == 0]  # group-local root order == best_leaf order
        best_leaf[roots] = p["best_leaf"] + off
    perm = torch.sort(cat["depth"] * B + cat["env"], stable=True).indices
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.shape[0], device=perm.device)
    cat = {k: v[perm] for k, v in cat.items()}
    cat["parent"] = torch.where(cat["parent"] >= 0, inverse[cat["parent"].clamp(min=0)], cat["parent"])
    return PlanTrace(
        **cat,
        best_leaf=inverse[best_leaf],
        actions=actions.clone(),
        beam_width=beam_width,
        horizon=horizon,
        gamma=gamma,
        use_mean=use_mean,
    )


# ---------------------------------------------------------------------------------------------
# MCTS (spec 8.5; the paper's baseline)


class _MinMax:
    """MuZero's running min/max of node values, used to normalise the UCB value term."""

    def __init__(self) -> None:
        self.lo, self.hi = math.inf, -math.inf

    def update(self, v: float) -> None:
        self.lo, self.hi = min(self.lo, v), max(self.hi, v)

    def normalize(self, v: float) -> float:
        return (v - self.lo) / (self.hi - self.lo) if self.hi > self.lo else v


class _Node:
    __slots__ = ("cache", "children", "leaf_value", "legal", "prior", "reward", "row", "value_sum", "visits")

    def __init__(self, prior: float, legal: bool) -> None:
        self.prior, self.legal = prior, legal
        self.visits, self.value_sum, self.reward = 0, 0.0, 0.0
        self.children: list[_Node] = []
        self.cache: KVCache | None = None  # the batched cache holding this node's state ...
        self.row = 0  # ... at this row
        self.leaf_value: float | None = None

    def value(self) -> float:
        return self.value_sum / self.visits if self.visits else 0.0

    def expand(self, critic: Tensor, legal: Tensor, temperature: float) -> None:
        prior = torch.softmax(critic / temperature, -1).tolist()
        self.children = [_Node(p, ok) for p, ok in zip(prior, legal.tolist())]


def _ucb(parent: _Node, child: _Node, stats: _MinMax, gamma: float, c1: float = 1.25, c2: float = 19652.0) -> float:
    if not child.legal:
        return -math.inf
    pb_c = math.log((parent.visits + c2 + 1) / c2) + c1
    prior_score = math.sqrt(parent.visits) * pb_c * child.prior / (child.visits + 1)
    value = stats.normalize(child.reward + gamma * child.value()) if child.visits > 0 else 0.0
    return prior_score + value


@torch.no_grad()
def mcts(
    model: nn.Module,
    history: Tensor,
    task_ids: Tensor,
    legal_mask: Tensor,
    horizon: int = 6,
    temperature: float = 0.9,
    num_simulations: int = 20,
    gamma: float = 0.99,
    use_mean: bool = False,
    use_count: bool = False,
    *,
    history_steps: Tensor | None = None,
) -> Tensor:
    """MuZero-style MCTS in the world model (spec 8.5, official ``plan_MCTS``); actions (B,) long.

    Each env keeps its own tree (Python nodes); the imagined steps of all envs in one simulation
    run as one batch per cache length. Priors are softmax(masked E[Q] / temperature); UCB with
    c1 = 1.25, c2 = 19652, min-max-normalised r + gamma * mean value, ties to the larger action;
    selection stops at an unexpanded node or at depth horizon - 1; leaf value max (or mean with
    ``use_mean``) of the new critic; backup value <- r + gamma * value. As in the official code the
    final choice compares root children's mean values, which do not include the reward of the
    root action itself (kept: it is the paper's baseline).

    Args:
        model, history, task_ids, legal_mask, history_steps: as for ``beam_search``; the window is
            cut to max_blocks - horizon steps.
        horizon: depth cap (selection stops at depth horizon - 1, at least 1).
        temperature: of the prior softmax over the masked critic.
        num_simulations: simulations per env (each runs at most one imagined step).
        gamma: discount of the backup.
        use_mean: leaf value = mean instead of max of the new critic.
        use_count: final action by visit count instead of mean value.

    Deviations from the official code (spec Q15), all for legality and finiteness:
    - illegal actions are excluded by the legal mask (official: prior < 1e-12);
    - ``use_mean`` averages over legal actions only (official: -inf with masked actions);
    - the final action is the legal, visited root child with the best mean value (official: argmax
      over all 18 children where unvisited count 0, so an unvisited or illegal child could win);
      with ``use_count``, the most visited legal child. With no simulation: greedy.
    - a node at the depth cap that is selected again reuses its stored (deterministic, greedy)
      leaf value instead of re-running the identical imagined step; the result is the same.
    """
    if num_simulations < 0 or temperature <= 0 or horizon < 1:
        raise ValueError(
            f"need num_simulations >= 0, temperature > 0 and horizon >= 1; got {num_simulations}, "
            f"{temperature}, {horizon}."
        )
    out_device = history.device
    history, task_ids, legal, steps = _check_inputs(model, history, task_ids, legal_mask, horizon, history_steps)
    B, tpb = history.shape[0], model.cfg.tokens_per_block
    roots = [_Node(1.0, True) for _ in range(B)]
    stats = [_MinMax() for _ in range(B)]
    root_q = torch.empty(B, model.cfg.num_actions, device=history.device)
    groups = _groups(steps, model.cfg.max_blocks - horizon)
    # One cache size for every group, so that imagined steps of envs with equal cache lengths batch.
    max_tokens = (max(g for g, _ in groups) + horizon) * tpb - 1
    for g, rows in groups:
        rows = rows.to(history.device)
        window = history[rows, history.shape[1] - (g * tpb - 1) :]
        cache = model.empty_cache(len(rows), max_tokens=max_tokens)
        c = _root_q(model, window, task_ids[rows], legal[rows], cache)
        root_q[rows] = c.float()  # c is bf16 under autocast
        for i, b in enumerate(rows.tolist()):
            roots[b].cache, roots[b].row = cache, i
            roots[b].expand(c[i], legal[b], temperature)
    max_depth = horizon - 1

    for _ in range(num_simulations):
        pending: dict[int, list[tuple[int, list[_Node], int]]] = {}  # parent cache length -> [(env, path, action)]
        for b in range(B):
            node, path, depth, action = roots[b], [roots[b]], 0, -1
            while node.children:
                scores = [(_ucb(node, ch, stats[b], gamma), a) for a, ch in enumerate(node.children)]
                _, action = max(scores)  # ties: larger action index, as the official tuple max
                node = node.children[action]
                path.append(node)
                depth += 1
                if depth >= max_depth:
                    break
            if node.leaf_value is not None:  # revisited at the depth cap
                _backup(path, node.leaf_value, stats[b], gamma)
            else:
                pending.setdefault(path[-2].cache.length, []).append((b, path, action))
        for items in pending.values():
            parents = [path[-2] for _, path, _ in items]
            cache = KVCache.cat([p.cache.index_select(torch.tensor([p.row])) for p in parents])
            envs = torch.tensor([b for b, _, _ in items], device=history.device)
            acts = torch.tensor([a for _, _, a in items], device=history.device)
            out = model.step(cache, acts, task_ids[envs])
            rewards = _rewards(out.reward_logits, False, 1.0, None).tolist()
            critic = model.q_values(out.q_logits, legal[envs])
            values = state_value(critic, legal[envs], use_mean).tolist()
            for i, (b, path, _) in enumerate(items):
                leaf = path[-1]
                leaf.reward, leaf.cache, leaf.row = rewards[i], out.kv_cache, i
                leaf.leaf_value = values[i]
                leaf.expand(critic[i], legal[b], temperature)
                _backup(path, leaf.leaf_value, stats[b], gamma)

    actions = torch.empty(B, dtype=torch.long)
    for b, root in enumerate(roots):
        visits = torch.tensor([ch.visits for ch in root.children])
        ok = legal[b].cpu() & (visits > 0)
        if not bool(ok.any()):
            actions[b] = int(root_q[b].argmax())
            continue
        key = visits.float() if use_count else torch.tensor([ch.value() for ch in root.children])
        actions[b] = int(key.masked_fill(~ok, -math.inf).argmax())
    return actions.to(out_device)


def _backup(path: list[_Node], value: float, stats: _MinMax, gamma: float) -> None:
    for node in reversed(path):
        node.value_sum += value
        node.visits += 1
        stats.update(node.value())
        value = node.reward + gamma * value
