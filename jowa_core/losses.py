"""JOWA's training objective as pure functions (spec section 6): world losses, the C51 projection and
TD loss, the CQL penalty, the MSE ablation, multi-task behaviour cloning and the joint sum.

Conventions: a batch is B segments of L steps; ``tokens`` (B, L * 37) are the model's input,
``actions`` (B, L) the action tokens, ``rewards`` (B, L) float (already clipped to [-1, 1], as in
DQN-Replay), ``ends`` (B, L) terminal flags, ``mask_padding`` (B, L) bool (True = real step) and
``legal_mask`` (B, 18) bool (``jowa_core.games.action_masks()[task_ids]``). Every function checks
shapes and returns tensors (no ``.item()``), so metrics stay on the device until log time.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from jowa_core.games import action_masks
from jowa_core.models.world_action import WorldActionModel, WorldActionOutput, expected_q

IGNORE = -100


def _expect(t: torch.Tensor, shape: tuple, name: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}.")


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ``mask``; 0 (not NaN) when the mask is empty."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1)


# ---------------------------------------------------------------------------------------------
# World part (spec 6.1)


class WorldLosses(NamedTuple):
    obs: torch.Tensor
    reward: torch.Tensor
    end: torch.Tensor


def world_losses(
    out: WorldActionOutput, tokens: torch.Tensor, rewards: torch.Tensor, ends: torch.Tensor, mask_padding: torch.Tensor,
    changed_token_weight: float = 1.0,
) -> WorldLosses:
    """Cross-entropies of the next obs token, the reward sign and the termination (unweighted).

    ``out`` must come from a full window (``tokens`` (B, L * tpb) run from position 0). CE_obs
    drops the last obs prediction (that of o_L^0, outside the segment) and shifts the flattened obs
    labels left by one; labels of padded steps are ignored. Each CE is a mean over its non-ignored
    targets (official; NaN if a batch has no real step at all).

    ``changed_token_weight`` (ours, 1 = official): CE_obs becomes a weighted mean in which an obs token
    that differs from the token at the same position one step earlier counts this many times. Small moving
    objects (Breakout's 2-pixel ball) are a few of 36 tokens; weighting them moves the argmax decoding of
    imagination toward drawing them (``TrainConfig.changed_token_weight``).
    """
    B, L = mask_padding.shape
    if tokens.ndim != 2 or tokens.shape[0] != B or tokens.shape[1] % L:
        raise ValueError(f"tokens must be (B, L * tokens_per_block) with B={B}, L={L}; got {tuple(tokens.shape)}.")
    tpb = tokens.shape[1] // L
    n_obs = tpb - 1
    if out.start != 0:
        raise ValueError("world_losses needs the output of a full-window forward (no KV cache).")
    for t, name in ((rewards, "rewards"), (ends, "ends")):
        _expect(t, (B, L), name)
    V = out.obs_logits.shape[-1]
    _expect(out.obs_logits, (B, L * n_obs, V), "out.obs_logits")
    _expect(out.reward_logits, (B, L, 3), "out.reward_logits")
    _expect(out.end_logits, (B, L, 2), "out.end_logits")

    pad = ~mask_padding.bool()
    obs = tokens.view(B, L, tpb)[:, :, :n_obs].masked_fill(pad.unsqueeze(-1), IGNORE)
    # label of prediction i is obs token i + 1; the last prediction's is IGNORE. Padding the labels, not slicing
    # the (B, L * 36, V) logits, keeps their gradient one pass: slicing made the backward copy it into a padded
    # tensor (jowa_150m on an H100: a 0.6 ms kernel a step, and a forward copy of the logits)
    labels_obs = F.pad(obs.reshape(B, L * n_obs)[:, 1:], (0, 1), value=IGNORE)
    logits_obs = out.obs_logits
    labels_rew = (torch.sign(rewards) + 1).long().masked_fill(pad, IGNORE)
    labels_end = ends.long().masked_fill(pad, IGNORE)
    if changed_token_weight == 1.0:
        ce_obs = F.cross_entropy(logits_obs.reshape(-1, V).float(), labels_obs.reshape(-1), ignore_index=IGNORE)
    else:
        if changed_token_weight <= 0:
            raise ValueError(f"changed_token_weight must be > 0, got {changed_token_weight}.")
        ce = F.cross_entropy(
            logits_obs.reshape(-1, V).float(), labels_obs.reshape(-1), ignore_index=IGNORE, reduction="none"
        )  # fmt: skip
        obs_steps = tokens.view(B, L, tpb)[:, :, :n_obs]
        changed = torch.zeros_like(obs_steps, dtype=torch.bool)  # a segment's first step: nothing to compare
        changed[:, 1:] = obs_steps[:, 1:] != obs_steps[:, :-1]
        changed = F.pad(changed.reshape(B, L * n_obs)[:, 1:], (0, 1))  # aligned with labels_obs
        weight = 1.0 + (changed_token_weight - 1.0) * changed.float()
        weight = weight.reshape(-1) * (labels_obs.reshape(-1) != IGNORE)
        ce_obs = (ce * weight).sum() / weight.sum()
    return WorldLosses(
        obs=ce_obs,
        reward=F.cross_entropy(out.reward_logits.reshape(-1, 3).float(), labels_rew.reshape(-1), ignore_index=IGNORE),
        end=F.cross_entropy(out.end_logits.reshape(-1, 2).float(), labels_end.reshape(-1), ignore_index=IGNORE),
    )


# ---------------------------------------------------------------------------------------------
# TD rows, C51 projection and TD losses (spec 6.2)


class TDRows(NamedTuple):
    """Which steps give a TD term. ``nonterminal`` (B, L): real steps except each row's last real
    step, bootstrapped from ``next_index`` (the next real step of the same row); ``terminal``
    (B, L): real steps with d_t = 1 (target: point mass at r_t). A step can be in both sets only
    in malformed data (an end before the row's last real step); it then counts twice, as in the
    official code. The last real step of a segment cut mid-episode gives no TD term.
    """

    nonterminal: torch.Tensor
    terminal: torch.Tensor
    next_index: torch.Tensor


def td_rows(mask_padding: torch.Tensor, ends: torch.Tensor) -> TDRows:
    """Row selection of the official TD loss, without boolean indexing (no device sync).

    The official code pairs ``mask minus its last True`` with ``mask minus its first True`` by
    row-major boolean indexing, i.e. each real step with the next real step of its row.
    """
    if mask_padding.ndim != 2:
        raise ValueError(f"mask_padding must be (B, L), got {tuple(mask_padding.shape)}.")
    _expect(ends, mask_padding.shape, "ends")
    mask = mask_padding.bool()
    B, L = mask.shape
    pos = torch.arange(L, device=mask.device).expand(B, L)
    real_pos = torch.where(mask, pos, torch.full_like(pos, L))
    suffix_min = real_pos.flip(1).cummin(1).values.flip(1)  # min real position >= t
    next_index = torch.cat([suffix_min[:, 1:], torch.full_like(suffix_min[:, :1], L)], dim=1)
    return TDRows(mask & (next_index < L), mask & ends.bool(), next_index)


@dataclass
class NStepTargets:
    """Per TD row: the discounted sum of rewards up to the bootstrap step, the discount of the bootstrap
    value, the index of the bootstrap step, and which rows end inside their window (and which bootstrap)."""

    returns: torch.Tensor
    discount: torch.Tensor
    boot_index: torch.Tensor
    terminal: torch.Tensor
    nonterminal: torch.Tensor


def _n_step_prefixes(rewards: torch.Tensor, rows: TDRows, gamma: float, n: int) -> list[NStepTargets]:
    """``n_step_targets`` for k = 1..n in one pass: entry k - 1 is the k-step target."""
    if n < 1:
        raise ValueError(f"td_steps must be >= 1, got {n}.")
    L = rewards.shape[1]
    nxt = rows.next_index
    end = rows.terminal
    r = rewards.float()
    ret = r.clone()
    disc = torch.full_like(ret, gamma)
    boot = nxt.clone()
    term = end.clone()
    alive = rows.nonterminal & ~term  # rows that may take one more reward
    cur = nxt
    out = [NStepTargets(ret, disc, boot, term, rows.nonterminal)]  # k = 1: the official rows, as they are
    for _ in range(n - 1):
        at = cur.clamp(max=L - 1)
        r_k, e_k, n_k = r.gather(1, at), end.gather(1, at), nxt.gather(1, at)
        take = alive & (e_k | (n_k < L))  # the reached step can be used: it ends or has a successor
        ret = torch.where(take, ret + disc * r_k, ret)
        disc = torch.where(take, disc * gamma, disc)
        boot = torch.where(take, n_k, boot)
        term = term | (take & e_k)
        alive = take & ~e_k
        cur = n_k
        out.append(NStepTargets(ret, disc, boot, term, rows.nonterminal & ~term))
    return out


def n_step_targets(rewards: torch.Tensor, rows: TDRows, gamma: float, n: int) -> NStepTargets:
    """n-step returns inside a segment (ours; the official loss is n = 1).

    Row t sums gamma^k r_{t+k} over its next real steps until it has n rewards, its episode ends, or the
    segment has no step after the one reached, and bootstraps from the step after the last reward
    (discount gamma^m for m rewards); a row whose window holds a terminal step is terminal (no
    bootstrap). Episode ends come from ``rows.terminal``. With n = 1 this is exactly the official
    pairing of ``td_rows``.
    """
    return _n_step_prefixes(rewards, rows, gamma, n)[-1]


def best_n_step_targets(
    rewards: torch.Tensor, rows: TDRows, gamma: float, n: int, values: torch.Tensor
) -> NStepTargets:
    """Per row, the k-step target (k = 1..n) whose value is highest (ours, ``TrainConfig.td_max_over_n``).

    With Q* as the bootstrap, every k-step return of any behaviour followed by max_a Q* is a lower bound
    of Q*(s_t, a_t), so their max is the tightest (He et al. 2017, optimality tightening). Data from
    players of mixed quality gains from it: a fixed n counts the noisy player's next n actions as if
    they were the agent's, one step ignores the good player's rewards until they are bootstrapped back.
    ``values`` (B, L') is the bootstrap value at each step (the target head's max expected Q); a
    terminal k-step target's value is its return. Ties go to the smaller k.
    """
    cands = _n_step_prefixes(rewards, rows, gamma, n)
    last = values.shape[1] - 1
    score = torch.stack([
        c.returns + torch.where(c.terminal, 0.0, c.discount * values.gather(1, c.boot_index.clamp(max=last)))
        for c in cands
    ])  # fmt: skip
    best = score.argmax(0, keepdim=True)  # (1, B, L): first max, i.e. the smallest k

    def pick(name: str) -> torch.Tensor:
        return torch.stack([getattr(c, name) for c in cands]).gather(0, best).squeeze(0)

    return NStepTargets(*(pick(f.name) for f in dataclasses.fields(NStepTargets)))


def c51_project(
    next_probs: torch.Tensor,
    rewards: torch.Tensor,
    dones: torch.Tensor,
    gamma: float | torch.Tensor,
    atoms: torch.Tensor,
) -> torch.Tensor:
    """Categorical projection of r + gamma (1 - d) Z' onto the support (C51; spec 6.2).

    m_i = sum_j max(0, 1 - |Tz_j - z_i| / dz) P_j with Tz_j = clip(r + gamma (1 - d) z_j, v_min,
    v_max); a terminal row is a point mass at clip(r) split between its two neighbouring atoms.

    Args:
        next_probs: (..., Z) probabilities of the bootstrap distribution (rows sum to 1).
        rewards, dones: (...) per row.
        gamma: a float, or (...) per-row discounts (n-step returns).
        atoms: (Z,) evenly spaced support.
    Returns:
        (..., Z) projected target probabilities.
    """
    Z = atoms.shape[0]
    if next_probs.shape[-1] != Z:
        raise ValueError(f"next_probs end in {next_probs.shape[-1]} atoms but the support has {Z}.")
    _expect(rewards, next_probs.shape[:-1], "rewards")
    _expect(dones, next_probs.shape[:-1], "dones")
    atoms = atoms.to(torch.float32)
    v_min, v_max = atoms[0], atoms[-1]
    dz = (v_max - v_min) / (Z - 1)
    gamma = torch.as_tensor(gamma, dtype=torch.float32, device=next_probs.device)
    discount = gamma * (1.0 - dones.to(torch.float32))
    tz = (rewards.to(torch.float32).unsqueeze(-1) + discount.unsqueeze(-1) * atoms).clamp(v_min, v_max)  # (..., Z_j)
    weight = (1.0 - (tz.unsqueeze(-2) - atoms.unsqueeze(-1)).abs() / dz).clamp(min=0.0)  # (..., Z_i, Z_j)
    return (weight * next_probs.to(torch.float32).unsqueeze(-2)).sum(-1)


def _mixture_probs(logits: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """(num_q, ..., Z) member logits -> (..., Z) mixture of their categoricals."""
    q = logits.shape[0]
    w = torch.full((q,), 1.0 / q, device=logits.device) if weights is None else weights.float()
    return torch.einsum("q,q...->...", w, logits.float().softmax(-1))


def _check_q_inputs(q_logits, q_target_logits, actions, rewards, ends, mask_padding, legal_mask, scalar: bool) -> None:
    B, L = mask_padding.shape
    if q_logits.ndim != (4 if scalar else 5):
        layout = "(num_q, B, L, A)" if scalar else "(num_q, B, L, A, atoms)"
        raise ValueError(f"q_logits must be {layout}, got {tuple(q_logits.shape)}.")
    n_q, A = q_logits.shape[0], q_logits.shape[3]
    tail = (A,) if scalar else (A, q_logits.shape[-1])
    _expect(q_logits, (n_q, B, L, *tail), "q_logits")
    _expect(q_target_logits, (q_target_logits.shape[0], B, L, *tail), "q_target_logits")
    for t, name in ((actions, "actions"), (rewards, "rewards"), (ends, "ends")):
        _expect(t, (B, L), name)
    _expect(legal_mask, (B, A), "legal_mask")


def c51_td_loss(
    q_logits: torch.Tensor,
    q_target_logits: torch.Tensor,
    actions: torch.Tensor,
    rewards: torch.Tensor,
    ends: torch.Tensor,
    mask_padding: torch.Tensor,
    legal_mask: torch.Tensor,
    atoms: torch.Tensor,
    gamma: float,
    weights: torch.Tensor | None = None,
    n_steps: int = 1,
    mc_returns: torch.Tensor | None = None,
    next_target_logits: torch.Tensor | None = None,
    next_mask: torch.Tensor | None = None,
    max_over_n: bool = False,
) -> torch.Tensor:
    """1-step distributional TD loss (spec 6.2): mean over TD rows of -sum_i m_i log(P_i + 1e-8).

    P is the online mixture at the dataset action; m projects the TARGET head's distribution at
    the next real step, at a* = argmax over the game's legal actions of its expected Q (the target
    net's own argmax, not double-Q). ``weights`` (num_q,): REM weights shared by online and target
    (default uniform). ``n_steps`` > 1 (ours) uses ``n_step_targets`` inside the segment.

    ``mc_returns`` (B, L) (ours, ``TrainConfig.mc_anchor``): each step's discounted return-to-go in the
    data (``data.segments.returns_to_go``). A TD row whose target head values its bootstrap step below
    that step's return-to-go G bootstraps from G instead (a point mass at the n-step return + discount x
    G: what the data itself collected from there is a lower bound of the optimal value), and a real step
    with no TD target (the last of a segment cut mid-episode) gets a point mass at its own G. Without it,
    every target of a segment bootstraps, directly or through its neighbours, from values that no target
    fixes the level of, and short runs leave them near the head's initial mean.

    ``next_target_logits`` (num_q, B, 18, Z) and ``next_mask`` (B,) (ours, ``TrainConfig.next_step_target``):
    the target head at the step after the segment, read from the window one step later, and whether that
    step is real. The segment's last step then has a TD target too, and n-step rows reach one step further;
    ``mc_returns`` then holds L + 1 steps.

    ``max_over_n`` (ours, ``TrainConfig.td_max_over_n``): each row takes the k-step target, k = 1..``n_steps``,
    whose expected value is highest (``best_n_step_targets``).

    Args:
        q_logits, q_target_logits: (num_q, B, L, 18, Z) online / target logits.
    """
    _check_q_inputs(q_logits, q_target_logits, actions, rewards, ends, mask_padding, legal_mask, scalar=False)
    Z = q_logits.shape[-1]
    B, L = rewards.shape
    probs = _mixture_probs(q_logits, weights)  # (B, L, A, Z)
    idx = actions.long().view(*actions.shape, 1, 1).expand(-1, -1, 1, Z)
    p_taken = probs.gather(2, idx).squeeze(2)  # (B, L, Z)
    with torch.no_grad():
        t_probs = _mixture_probs(q_target_logits.detach(), weights)  # (B, L, A, Z)
        if next_target_logits is not None:  # one more step at the end: targets over L + 1, rows over the first L
            if next_mask is None:
                raise ValueError(
                    "next_target_logits needs next_mask (B,): whether the step after each segment is real."
                )
            _expect(next_target_logits, (next_target_logits.shape[0], B, *q_logits.shape[3:]), "next_target_logits")
            _expect(next_mask, (B,), "next_mask")
            t_probs = torch.cat([t_probs, _mixture_probs(next_target_logits.detach(), weights).unsqueeze(1)], 1)
            rewards = torch.cat([rewards, rewards.new_zeros(B, 1)], 1)
            ends = torch.cat([ends, ends.new_zeros(B, 1)], 1)
            mask_padding = torch.cat([mask_padding.bool(), next_mask.bool().unsqueeze(1)], 1)
        rows = td_rows(mask_padding, ends)
        t_q = (t_probs @ atoms.float()).masked_fill(~legal_mask.bool().unsqueeze(1), float("-inf"))
        a_star = t_q.argmax(-1)  # (B, L')
        p_star = t_probs.gather(2, a_star.view(*a_star.shape, 1, 1).expand(-1, -1, 1, Z)).squeeze(2)  # (B, L', Z)
        n_t = p_star.shape[1]  # L, or L + 1 with the next step
        if max_over_n:
            tgt = best_n_step_targets(rewards, rows, gamma, n_steps, t_q.max(-1).values)
        else:
            tgt = n_step_targets(rewards, rows, gamma, n_steps)
        nxt = tgt.boot_index.clamp(max=n_t - 1)
        p_next = p_star.gather(1, nxt.unsqueeze(-1).expand(-1, -1, Z))  # (B, L', Z) at the bootstrap step
        m_boot = c51_project(p_next, tgt.returns, torch.zeros_like(rewards), tgt.discount, atoms)
        m_term = c51_project(p_next, tgt.returns, torch.ones_like(rewards), tgt.discount, atoms)
        mc_rows = torch.zeros_like(tgt.nonterminal)
        if mc_returns is not None:
            _expect(mc_returns, rewards.shape, "mc_returns")
            g = mc_returns.float()
            g_boot = g.gather(1, nxt)
            below = t_q.max(-1).values.gather(1, nxt) < g_boot  # (B, L) the target head's V at the bootstrap step
            ones = torch.ones_like(rewards)
            m_floor = c51_project(p_next, tgt.returns + tgt.discount * g_boot, ones, tgt.discount, atoms)
            m_boot = torch.where(below.unsqueeze(-1), m_floor, m_boot)
            m_mc = c51_project(p_next, g, ones, tgt.discount, atoms)  # point mass at G
            mc_rows = mask_padding.bool() & ~tgt.nonterminal & ~tgt.terminal
        if n_t > L:  # rows of the online window only
            m_boot, m_term, mc_rows = m_boot[:, :L], m_term[:, :L], mc_rows[:, :L]
            tgt = NStepTargets(**{f.name: getattr(tgt, f.name)[:, :L] for f in dataclasses.fields(tgt)})
            if mc_returns is not None:
                m_mc = m_mc[:, :L]
    log_p = torch.log(p_taken + 1e-8)
    ce_boot = -(m_boot * log_p).sum(-1)
    ce_term = -(m_term * log_p).sum(-1)
    total = (ce_boot * tgt.nonterminal).sum() + (ce_term * tgt.terminal).sum()
    if mc_returns is not None:
        total = total + (-(m_mc * log_p).sum(-1) * mc_rows).sum()
    return total / (tgt.nonterminal.sum() + tgt.terminal.sum() + mc_rows.sum()).clamp(min=1)


def mse_td_loss(
    q_values: torch.Tensor,
    q_target_values: torch.Tensor,
    actions: torch.Tensor,
    rewards: torch.Tensor,
    ends: torch.Tensor,
    mask_padding: torch.Tensor,
    legal_mask: torch.Tensor,
    gamma: float,
    weights: torch.Tensor | None = None,
    n_steps: int = 1,
    max_over_n: bool = False,
) -> torch.Tensor:
    """Ablation ``td_loss: mse`` (spec 6.4): 0.5 * mean over TD rows of (Q(s,a) - y)^2 with
    y = r + gamma max_{legal a'} Q_target(s', a') (y = r on terminal rows).

    Args:
        q_values, q_target_values: (num_q, B, L, 18) scalar outputs of the online / target heads.
    """
    _check_q_inputs(q_values, q_target_values, actions, rewards, ends, mask_padding, legal_mask, scalar=True)
    rows = td_rows(mask_padding, ends)
    q = expected_q(q_values.float(), None, weights)  # (B, L, A)
    q_taken = q.gather(2, actions.long().unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        t_q = expected_q(q_target_values.detach().float(), None, weights)
        v = t_q.masked_fill(~legal_mask.bool().unsqueeze(1), float("-inf")).max(-1).values  # (B, L)
        if max_over_n:
            tgt = best_n_step_targets(rewards, rows, gamma, n_steps, v)
        else:
            tgt = n_step_targets(rewards, rows, gamma, n_steps)
        v_next = v.gather(1, tgt.boot_index.clamp(max=v.shape[1] - 1))
        y_boot = tgt.returns + tgt.discount * v_next
        y_term = tgt.returns
    se = (q_taken - y_boot) ** 2 * tgt.nonterminal + (q_taken - y_term) ** 2 * tgt.terminal
    return 0.5 * se.sum() / (tgt.nonterminal.sum() + tgt.terminal.sum()).clamp(min=1)


# ---------------------------------------------------------------------------------------------
# Conservative penalty (spec 6.3) and behaviour cloning


def cql_penalty(
    q_expected: torch.Tensor,
    actions: torch.Tensor,
    mask: torch.Tensor,
    *,
    legal_mask: torch.Tensor | None = None,
    legal_only: bool = False,
    positive_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """CQL(H) penalty, unweighted: mean_{mask} logsumexp_a Q(s, a) - mean_{positive_mask} Q(s, a_data).

    Official (quirk Q8): the logsumexp runs over all 18 actions, illegal ones included; with
    ``legal_only`` (needs ``legal_mask`` (B, 18)) it runs over the game's legal actions only.
    ``positive_mask`` (default ``mask``) restricts the dataset term ("combo": real rows only).
    Both means run over every real step, the last one included.

    Args:
        q_expected: (B, L, 18) expected Q (``expected_q``); actions, mask: (B, L).
    """
    if q_expected.ndim != 3:
        raise ValueError(f"q_expected must be (B, L, A), got {tuple(q_expected.shape)}.")
    B, L, A = q_expected.shape
    _expect(actions, (B, L), "actions")
    _expect(mask, (B, L), "mask")
    q = q_expected.float()
    if legal_only:
        if legal_mask is None:
            raise ValueError("cql_penalty(legal_only=True) needs legal_mask (B, 18).")
        _expect(legal_mask, (B, A), "legal_mask")
        q_neg = q.masked_fill(~legal_mask.bool().unsqueeze(1), float("-inf"))
    else:
        q_neg = q
    negative = _masked_mean(torch.logsumexp(q_neg, dim=-1), mask.bool())
    q_data = q.gather(2, actions.long().unsqueeze(-1)).squeeze(-1)
    positive = _masked_mean(q_data, (mask if positive_mask is None else positive_mask).bool())
    return negative - positive


def mtbc_loss(
    bc_logits: torch.Tensor, actions: torch.Tensor, mask: torch.Tensor, legal_mask: torch.Tensor
) -> torch.Tensor:
    """Multi-task behaviour cloning: CE of the dataset action among the game's legal actions,
    averaged over real steps. Illegal logits are pushed to -1e9 (a dataset action that is illegal
    therefore gives a huge loss instead of a silent NaN).

    Args:
        bc_logits: (B, L, 18) (``WorldActionOutput.bc_logits``); actions, mask: (B, L);
        legal_mask: (B, 18).
    """
    if bc_logits.ndim != 3:
        raise ValueError(f"bc_logits must be (B, L, A), got {tuple(bc_logits.shape)}.")
    B, L, A = bc_logits.shape
    _expect(actions, (B, L), "actions")
    _expect(mask, (B, L), "mask")
    _expect(legal_mask, (B, A), "legal_mask")
    logits = bc_logits.float().masked_fill(~legal_mask.bool().unsqueeze(1), -1e9)
    ce = F.cross_entropy(logits.reshape(-1, A), actions.long().reshape(-1), reduction="none").view(B, L)
    return _masked_mean(ce, mask.bool())


# ---------------------------------------------------------------------------------------------
# The joint objective (spec 6.4)


@dataclass
class LossTerms:
    """Named terms of the objective, all tensors. ``total`` = supervised_weight * (obs + reward +
    end) + td + cql_weight * cql + bc_weight * bc; the terms are stored unweighted. ``q_data`` and
    ``q_logsumexp`` are the two sides of the CQL penalty, for logging."""

    total: torch.Tensor
    obs: torch.Tensor
    reward: torch.Tensor
    end: torch.Tensor
    td: torch.Tensor
    cql: torch.Tensor
    bc: torch.Tensor
    q_data: torch.Tensor
    q_logsumexp: torch.Tensor

    def metrics(self) -> dict[str, torch.Tensor]:
        """Detached terms for logging (still tensors; call ``.item()`` at log time only)."""
        return {f.name: getattr(self, f.name).detach() for f in dataclasses.fields(self)}


def joint_loss(
    out: WorldActionOutput,
    q_target_logits: torch.Tensor | None,
    tokens: torch.Tensor,
    rewards: torch.Tensor,
    ends: torch.Tensor,
    mask_padding: torch.Tensor,
    legal_mask: torch.Tensor,
    atoms: torch.Tensor,
    *,
    supervised_weight: float,
    train_critic: bool,
    gamma: float = 0.99,
    cql_weight: float = 0.1,
    td_loss: str = "c51",
    q_penalty: str = "cql",
    cql_legal_only: bool = False,
    rem_weights: torch.Tensor | None = None,
    bc_weight: float = 1.0,
    num_real_rows: int | None = None,
    td_steps: int = 1,
    mc_returns: torch.Tensor | None = None,
    next_target_logits: torch.Tensor | None = None,
    next_mask: torch.Tensor | None = None,
    changed_token_weight: float = 1.0,
    critic_ends: torch.Tensor | None = None,
    td_max_over_n: bool = False,
) -> LossTerms:
    """L = lambda (CE_obs + CE_rew + CE_end) + L_TD + alpha L_CQL (+ bc_weight L_BC) (paper Eq. 9).

    Args:
        out: full-window forward of ``tokens`` (B, L * 37).
        q_target_logits: ``model.q_target_logits(out.q_hidden)``; needed when ``train_critic``.
        supervised_weight: lambda (1.0 stage 1, 0.1 stage 2, 0.5 fine-tuning).
        train_critic: False in stage 1 (world losses only, TD/CQL are zero).
        q_penalty: "cql", "combo" (dataset term on the first ``num_real_rows`` rows only) or "null".
        num_real_rows: rows [0, num_real_rows) are real data, the rest imagined; world and BC losses
            use the real rows only (official). Default: all rows are real.
        td_steps: n of the n-step TD target inside the segment (official 1; ``n_step_targets``).
        mc_returns: (B, L) returns-to-go of the data for the C51 loss's MC anchor (``c51_td_loss``); (B, L + 1)
            with ``next_target_logits``.
        next_target_logits, next_mask: the target head at the step after each segment and whether it is real
            (``TrainConfig.next_step_target``, ``c51_td_loss``).
        changed_token_weight: CE_obs weight of tokens that changed since the previous step (``world_losses``).
        critic_ends: (B, L) the steps after which the TD targets stop bootstrapping (default ``ends``); ours:
            ``ends`` or a lost life (``TrainConfig.life_loss_terminal``). The world model still learns ``ends``.
        td_max_over_n: each TD row takes its best k-step target, k = 1..``td_steps`` (``best_n_step_targets``).

    Differences from the official code, all outside its default settings: with REM weights the CQL
    terms use the uniform mixture (official: the dataset term uses the REM mixture); the MSE
    ablation's CQL takes logsumexp of the mixture Q (official: of 0.1 * the sum over members,
    quirk Q8); "combo" keeps the dataset term on real rows (official: on the first
    ``real_batch_size`` real *steps* of the flattened batch).
    """
    B, L = mask_padding.shape
    n_real = B if num_real_rows is None else num_real_rows
    if not 0 < n_real <= B:
        raise ValueError(f"num_real_rows must be in [1, {B}], got {num_real_rows}.")
    tpb = tokens.shape[1] // L
    actions = tokens.view(B, L, tpb)[:, :, -1]
    mask = mask_padding.bool()
    zero = out.reward_logits.new_zeros((), dtype=torch.float32)

    real = dataclasses.replace(
        out,
        obs_logits=out.obs_logits[:n_real],
        reward_logits=out.reward_logits[:n_real],
        end_logits=out.end_logits[:n_real],
    )
    w = world_losses(real, tokens[:n_real], rewards[:n_real], ends[:n_real], mask[:n_real], changed_token_weight)
    total = supervised_weight * (w.obs + w.reward + w.end)

    bc = zero
    if out.bc_logits is not None:
        bc = mtbc_loss(out.bc_logits[:n_real], actions[:n_real], mask[:n_real], legal_mask[:n_real])
        total = total + bc_weight * bc

    td = cql = q_data = q_lse = zero
    td_ends = ends if critic_ends is None else critic_ends
    if train_critic:
        if q_target_logits is None:
            raise ValueError("train_critic=True needs q_target_logits (model.q_target_logits(out.q_hidden)).")
        if td_loss == "c51":
            td = c51_td_loss(out.q_logits, q_target_logits, actions, rewards, td_ends, mask, legal_mask, atoms, gamma,
                             rem_weights, n_steps=td_steps, mc_returns=mc_returns,
                             next_target_logits=next_target_logits, next_mask=next_mask,
                             max_over_n=td_max_over_n)  # fmt: skip
            q_exp = expected_q(out.q_logits, atoms)
        elif td_loss == "mse":
            if mc_returns is not None:
                raise ValueError("the MC anchor (mc_returns, TrainConfig.mc_anchor) is for td_loss='c51'; turn it off.")
            if next_target_logits is not None:
                raise ValueError(
                    "the next-step target (TrainConfig.next_step_target) is for td_loss='c51'; turn it off."
                )
            td = mse_td_loss(
                out.q_logits, q_target_logits, actions, rewards, td_ends, mask, legal_mask, gamma, rem_weights,
                n_steps=td_steps, max_over_n=td_max_over_n,
            )
            q_exp = expected_q(out.q_logits.float(), None)
        else:
            raise ValueError(f"td_loss must be 'c51' or 'mse', got {td_loss!r}.")
        total = total + td
        with torch.no_grad():
            q_data = _masked_mean(q_exp.gather(2, actions.long().unsqueeze(-1)).squeeze(-1), mask)
            q_lse = _masked_mean(torch.logsumexp(q_exp, -1), mask)
        if q_penalty in ("cql", "combo"):
            positive = mask
            if q_penalty == "combo":
                positive = mask & (torch.arange(B, device=mask.device) < n_real).unsqueeze(1)
            cql = cql_penalty(q_exp, actions, mask, legal_mask=legal_mask, legal_only=cql_legal_only,
                              positive_mask=positive)  # fmt: skip
            total = total + cql_weight * cql
        elif q_penalty != "null":
            raise ValueError(f"q_penalty must be 'cql', 'combo' or 'null', got {q_penalty!r}.")
    return LossTerms(total, w.obs, w.reward, w.end, td, cql, bc, q_data, q_lse)


def compute_loss(
    model: WorldActionModel,
    tokens: torch.Tensor,
    task_ids: torch.Tensor,
    rewards: torch.Tensor,
    ends: torch.Tensor,
    mask_padding: torch.Tensor,
    *,
    supervised_weight: float,
    train_critic: bool,
    gamma: float = 0.99,
    cql_weight: float = 0.1,
    bc_weight: float = 1.0,
    legal_mask: torch.Tensor | None = None,
    num_real_rows: int | None = None,
    clip_rewards: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[LossTerms, WorldActionOutput]:
    """Forward + target head + ``joint_loss`` with the model's config (td_loss, q_penalty, use_rem,
    cql_legal_only). ``legal_mask`` defaults to the games' masks for ``task_ids``. With
    ``clip_rewards`` the rewards are clamped to [-1, 1] first (DQN-Replay stores them clipped; our
    own datasets keep raw rewards).
    """
    cfg = model.cfg
    out = model(tokens, task_ids)
    if legal_mask is None:
        legal_mask = torch.as_tensor(action_masks(), device=tokens.device)[task_ids]
    if clip_rewards:
        rewards = rewards.clamp(-1.0, 1.0)
    rem = None
    if train_critic and cfg.use_rem:
        rem = torch.rand(cfg.num_q, generator=generator, device="cpu" if generator is None else generator.device)
        rem = (rem / rem.sum()).to(tokens.device)
    target = model.q_target_logits(out.q_hidden) if train_critic else None
    terms = joint_loss(
        out, target, tokens, rewards, ends, mask_padding, legal_mask, model.atoms,
        supervised_weight=supervised_weight, train_critic=train_critic, gamma=gamma, cql_weight=cql_weight,
        td_loss=cfg.td_loss, q_penalty=cfg.q_penalty, cql_legal_only=cfg.cql_legal_only, rem_weights=rem,
        bc_weight=bc_weight, num_real_rows=num_real_rows,
    )  # fmt: skip
    return terms, out
