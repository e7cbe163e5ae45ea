"""Losses against hand-computed answers and per-row brute-force references (spec section 6)."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from jowa_core.config import ConfigError, TrainConfig, WorldActionConfig
from jowa_core.losses import (
    c51_project,
    c51_td_loss,
    compute_loss,
    cql_penalty,
    joint_loss,
    mse_td_loss,
    mtbc_loss,
    n_step_targets,
    td_rows,
    world_losses,
)
from jowa_core.models.world_action import WorldActionModel, WorldActionOutput
from tests.op_log import OpLog

ATOMS = torch.linspace(-10.0, 30.0, 51)
TPB = 37


# --- brute-force references (per-row Python loops, written independently of the library) ----------


def ref_project(p: list[float], r: float, done: bool, gamma: float, atoms: list[float]) -> list[float]:
    """Classic C51 projection (Bellemare et al. 2017, Alg. 1): floor/ceil split of each atom's mass."""
    n, v_min, v_max = len(atoms), atoms[0], atoms[-1]
    dz = (v_max - v_min) / (n - 1)
    m = [0.0] * n
    for j in range(n):
        tz = min(max(r + (0.0 if done else gamma) * atoms[j], v_min), v_max)
        b = (tz - v_min) / dz
        lo, hi = math.floor(b), math.ceil(b)
        if abs(b - round(b)) < 1e-6:  # lands on an atom (up to float error)
            m[round(b)] += p[j]
        else:
            m[lo] += p[j] * (hi - b)
            m[hi] += p[j] * (b - lo)
    return m


def ref_rows(mask: list[bool], ends: list[bool]) -> list[tuple[int, int | None]]:
    """(t, t_next) for bootstrapped rows, (t, None) for terminal rows, in the official order per row."""
    real = [t for t, m in enumerate(mask) if m]
    rows = [(t, real[i + 1]) for i, t in enumerate(real[:-1])]
    rows += [(t, None) for t in real if ends[t]]
    return rows


def mixture(logits: torch.Tensor) -> torch.Tensor:
    """(num_q, Z) -> (Z,) mean of the members' softmaxes."""
    return sum(F.softmax(logits[i].double(), -1) for i in range(logits.shape[0])) / logits.shape[0]


# --- C51 projection ------------------------------------------------------------------------------


def test_projection_known_answers():
    # a point mass at z = 2.0 (atom 15) moved by r + gamma z = 0.5 + 0.9 * 2.0 = 2.3, which lies
    # 0.3 above atom 15 (2.0) and 0.5 below atom 16 (2.8): weights 1 - 0.3/0.8 and 1 - 0.5/0.8.
    p = torch.zeros(1, 51)
    p[0, 15] = 1.0
    m = c51_project(p, torch.tensor([0.5]), torch.tensor([0.0]), 0.9, ATOMS)[0]
    assert m[15].item() == pytest.approx(0.625, abs=1e-5) and m[16].item() == pytest.approx(0.375, abs=1e-5)
    assert m.sum().item() == pytest.approx(1.0) and (m > 0).sum() == 2
    # terminal: point mass at r = -0.3, 0.1 above atom 12 (-0.4): 0.875 / 0.125, whatever P was
    q = torch.softmax(torch.randn(1, 51), -1)
    m = c51_project(q, torch.tensor([-0.3]), torch.tensor([1.0]), 0.99, ATOMS)[0]
    assert m[12].item() == pytest.approx(0.875, abs=1e-5) and m[13].item() == pytest.approx(0.125, abs=1e-5)
    # clipping: the top atom moved beyond v_max stays at v_max
    p = torch.zeros(1, 51)
    p[0, 50] = 1.0
    m = c51_project(p, torch.tensor([1.0]), torch.tensor([0.0]), 0.99, ATOMS)[0]
    assert m[50].item() == pytest.approx(1.0)


def test_projection_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    N = 12
    p = torch.softmax(3 * torch.randn(N, 51, generator=g), -1)
    r = torch.empty(N).uniform_(-1.5, 1.5, generator=g)
    r[0], r[1] = 40.0, -40.0  # whole distribution clipped
    d = (torch.rand(N, generator=g) < 0.3).float()
    got = c51_project(p, r, d, 0.99, ATOMS)
    for i in range(N):
        ref = ref_project(p[i].tolist(), r[i].item(), bool(d[i]), 0.99, ATOMS.tolist())
        torch.testing.assert_close(got[i], torch.tensor(ref), atol=1e-5, rtol=0)
    torch.testing.assert_close(got.sum(-1), torch.ones(N))


# --- TD rows and TD losses -------------------------------------------------------------------------


def test_td_row_selection_on_padded_segment_with_terminal():
    mask = torch.tensor([
        [False, True, True, True, False],  # left and right padding, terminal at its last real step
        [True, True, True, True, True],  # cut mid-episode: the last step gives no TD term
        [True, True, False, False, False],  # end flag on a padded step is ignored
        [False, False, False, False, False],  # all padding
    ])  # fmt: skip
    ends = torch.tensor([[0, 0, 0, 1, 0], [0, 0, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 1]])
    rows = td_rows(mask, ends)
    assert rows.nonterminal.tolist() == [
        [False, True, True, False, False],
        [True, True, True, True, False],
        [True, False, False, False, False],
        [False] * 5,
    ]
    assert rows.terminal.tolist() == [[False, False, False, True, False]] + [[False] * 5] * 3
    assert rows.next_index[0, 1:3].tolist() == [2, 3] and rows.next_index[1, :4].tolist() == [1, 2, 3, 4]
    assert rows.next_index[2, 0].item() == 1
    for b in range(4):  # same as the reference row builder
        ref = ref_rows(mask[b].tolist(), [bool(e) for e in ends[b]])
        got = [(t, int(rows.next_index[b, t])) for t in range(5) if rows.nonterminal[b, t]]
        got += [(t, None) for t in range(5) if rows.terminal[b, t]]
        assert got == ref


def random_td_case(seed: int, num_q: int = 2, B: int = 3, L: int = 5, A: int = 18, Z: int = 51, scalar: bool = False):
    g = torch.Generator().manual_seed(seed)
    shape = (num_q, B, L, A) if scalar else (num_q, B, L, A, Z)
    q = 2 * torch.randn(shape, generator=g)
    qt = 2 * torch.randn(shape, generator=g)
    actions = torch.randint(0, A, (B, L), generator=g)
    rewards = torch.randint(-1, 2, (B, L), generator=g).float()
    mask = torch.tensor([[True] * L, [False] + [True] * (L - 2) + [False], [True] * (L - 2) + [False] * 2])
    ends = torch.zeros(B, L, dtype=torch.long)
    ends[1, L - 2] = 1  # terminal at the last real step of row 1
    legal = torch.rand(B, A, generator=g) < 0.5
    legal[:, 0] = True
    return q, qt, actions, rewards, ends, mask, legal


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_c51_td_loss_equals_brute_force(seed):
    q, qt, actions, rewards, ends, mask, legal = random_td_case(seed)
    got = c51_td_loss(q, qt, actions, rewards, ends, mask, legal, ATOMS, 0.99)
    terms = []
    for b in range(q.shape[1]):
        for t, t_next in ref_rows(mask[b].tolist(), [bool(e) for e in ends[b]]):
            p = mixture(q[:, b, t, actions[b, t]])
            if t_next is None:
                target = ref_project([1.0] + [0.0] * 50, rewards[b, t].item(), True, 0.99, ATOMS.tolist())
            else:
                best, best_a = -float("inf"), None
                for a in range(18):
                    if legal[b, a]:
                        v = float(mixture(qt[:, b, t_next, a]) @ ATOMS.double())
                        if v > best:
                            best, best_a = v, a
                pn = mixture(qt[:, b, t_next, best_a]).tolist()
                target = ref_project(pn, rewards[b, t].item(), False, 0.99, ATOMS.tolist())
            terms.append(-sum(m * math.log(pi + 1e-8) for m, pi in zip(target, p.tolist())))
    assert got.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def ref_n_step_rows(mask: list[bool], ends: list[bool], rewards: list[float], gamma: float, n: int):
    """(t, G, discount, t_boot) per TD row for n > 1: rewards of the next real steps, at most n, never past
    an episode end, and only as far as a step that ends or has a successor (t_boot None when it ends)."""
    real = [t for t, m in enumerate(mask) if m]
    rows = []
    for i, t in enumerate(real):
        if not ends[t] and i + 1 == len(real):
            continue  # nothing to bootstrap from
        G, m, last = 0.0, 0, None
        for j in range(i, min(i + n, len(real))):
            s = real[j]
            if not ends[s] and j + 1 == len(real):
                break
            G += gamma**m * rewards[s]
            m, last = m + 1, j
            if ends[s]:
                break
        s = real[last]
        rows.append((t, G, gamma**m, None if ends[s] else real[last + 1]))
    return rows


@pytest.mark.parametrize("n", [2, 3, 5])
def test_n_step_targets_equal_reference(n):
    g = torch.Generator().manual_seed(n)
    B, L = 64, 6
    starts = torch.randint(0, 3, (B,), generator=g)
    stops = torch.randint(3, L + 1, (B,), generator=g)
    pos = torch.arange(L)
    mask = (pos >= starts[:, None]) & (pos < stops[:, None])
    ends = torch.zeros(B, L, dtype=torch.long)
    ended = torch.rand(B, generator=g) < 0.5
    ends[ended, stops[ended] - 1] = 1  # the episode ends at the last real step of half the rows
    rewards = torch.randint(-1, 2, (B, L), generator=g).float()
    got = n_step_targets(rewards, td_rows(mask, ends), 0.9, n)
    for b in range(B):
        ref = ref_n_step_rows(mask[b].tolist(), [bool(e) for e in ends[b]], rewards[b].tolist(), 0.9, n)
        rows = [t for t in range(L) if got.terminal[b, t] or got.nonterminal[b, t]]
        assert rows == [r[0] for r in ref]
        for t, G, disc, boot in ref:
            assert got.returns[b, t].item() == pytest.approx(G, abs=1e-6)
            assert bool(got.terminal[b, t]) == (boot is None)
            if boot is not None:
                assert got.discount[b, t].item() == pytest.approx(disc) and got.boot_index[b, t].item() == boot


def test_n_step_one_is_the_official_loss():
    q, qt, actions, rewards, ends, mask, legal = random_td_case(4)
    one = c51_td_loss(q, qt, actions, rewards, ends, mask, legal, ATOMS, 0.99)
    assert c51_td_loss(q, qt, actions, rewards, ends, mask, legal, ATOMS, 0.99, n_steps=1).item() == one.item()
    assert c51_td_loss(q, qt, actions, rewards, ends, mask, legal, ATOMS, 0.99, n_steps=3).item() != one.item()


def test_c51_n_step_loss_equals_brute_force():
    q, qt, actions, rewards, ends, mask, legal = random_td_case(5, L=6)
    got = c51_td_loss(q, qt, actions, rewards, ends, mask, legal, ATOMS, 0.9, n_steps=3)
    terms = []
    for b in range(q.shape[1]):
        for t, G, disc, boot in ref_n_step_rows(mask[b].tolist(), [bool(e) for e in ends[b]], rewards[b].tolist(), 0.9, 3):
            p = mixture(q[:, b, t, actions[b, t]])
            if boot is None:
                target = ref_project([1.0] + [0.0] * 50, G, True, 0.9, ATOMS.tolist())
            else:
                vals = {a: float(mixture(qt[:, b, boot, a]) @ ATOMS.double()) for a in range(18) if legal[b, a]}
                best_a = max(vals, key=vals.get)
                # the projection of G + disc * z is the reference projection with gamma = disc
                target = ref_project(mixture(qt[:, b, boot, best_a]).tolist(), G, False, disc, ATOMS.tolist())
            terms.append(-sum(m * math.log(pi + 1e-8) for m, pi in zip(target, p.tolist())))
    assert got.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


@pytest.mark.parametrize("seed", [6, 7])
def test_c51_max_over_n_takes_each_rows_best_k_step_target_by_brute_force(seed):
    q, qt, actions, rewards, ends, mask, legal = random_td_case(seed, L=7)
    got = c51_td_loss(q, qt, actions, rewards, ends, mask, legal, ATOMS, 0.9, n_steps=4, max_over_n=True)
    terms, ks = [], set()
    for b in range(q.shape[1]):
        v_at = {}  # V at each step: the target mixture's best legal expected Q, and its argmax
        for s in range(q.shape[2]):
            vals = {a: float(mixture(qt[:, b, s, a]) @ ATOMS.double()) for a in range(18) if legal[b, a]}
            best_a = max(vals, key=vals.get)
            v_at[s] = (vals[best_a], best_a)
        cands = {}
        for k in range(1, 5):
            for t, G, disc, boot in ref_n_step_rows(mask[b].tolist(), [bool(e) for e in ends[b]], rewards[b].tolist(), 0.9, k):
                score = G if boot is None else G + disc * v_at[boot][0]
                if t not in cands or score > cands[t][0] + 1e-9:
                    cands[t] = (score, G, disc, boot, k)
        for t, (_, G, disc, boot, k) in sorted(cands.items()):
            ks.add(k)
            p = mixture(q[:, b, t, actions[b, t]])
            if boot is None:
                target = ref_project([1.0] + [0.0] * 50, G, True, 0.9, ATOMS.tolist())
            else:
                target = ref_project(mixture(qt[:, b, boot, v_at[boot][1]]).tolist(), G, False, disc, ATOMS.tolist())
            terms.append(-sum(m * math.log(pi + 1e-8) for m, pi in zip(target, p.tolist())))
    assert len(ks) > 1  # the case mixes horizons, so a fixed n would not pass
    assert got.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    fixed = c51_td_loss(q, qt, actions, rewards, ends, mask, legal, ATOMS, 0.9, n_steps=4)
    assert got.item() != pytest.approx(fixed.item(), rel=1e-4)


def test_mse_max_over_n_target_is_the_best_k_step_target():
    q, qt, actions, rewards, ends, mask, legal = random_td_case(8, L=6, scalar=True)
    got = mse_td_loss(q, qt, actions, rewards, ends, mask, legal, 0.9, n_steps=3, max_over_n=True)
    terms = []
    for b in range(q.shape[1]):
        v = {s: max(float(qt[:, b, s, a].mean()) for a in range(18) if legal[b, a]) for s in range(6)}
        best = {}
        for k in range(1, 4):
            for t, G, disc, boot in ref_n_step_rows(mask[b].tolist(), [bool(e) for e in ends[b]], rewards[b].tolist(), 0.9, k):
                y = G if boot is None else G + disc * v[boot]
                best[t] = max(best.get(t, -float("inf")), y)
        for t, y in best.items():
            terms.append(0.5 * (float(q[:, b, t, actions[b, t]].mean()) - y) ** 2)
    assert got.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_td_max_over_n_needs_more_than_one_step():
    with pytest.raises(ConfigError, match="td_steps > 1"):
        TrainConfig(td_max_over_n=True, td_steps=1)


def test_c51_td_loss_gradient_reaches_only_the_online_logits():
    q, qt, actions, rewards, ends, mask, legal = random_td_case(0)
    q.requires_grad_(True)
    qt.requires_grad_(True)
    c51_td_loss(q, qt, actions, rewards, ends, mask, legal, ATOMS, 0.99).backward()
    assert q.grad.abs().sum() > 0 and qt.grad is None


def test_c51_td_loss_shape_errors():
    q, qt, actions, rewards, ends, mask, legal = random_td_case(0)
    with pytest.raises(ValueError, match="legal_mask"):
        c51_td_loss(q, qt, actions, rewards, ends, mask, legal[:, :17], ATOMS, 0.99)
    with pytest.raises(ValueError, match="actions"):
        c51_td_loss(q, qt, actions[:, :3], rewards, ends, mask, legal, ATOMS, 0.99)


def test_mse_td_loss_equals_brute_force():
    q, qt, actions, rewards, ends, mask, legal = random_td_case(3, num_q=3, scalar=True)
    got = mse_td_loss(q, qt, actions, rewards, ends, mask, legal, 0.9)
    terms = []
    for b in range(q.shape[1]):
        for t, t_next in ref_rows(mask[b].tolist(), [bool(e) for e in ends[b]]):
            pred = q[:, b, t, actions[b, t]].mean().item()
            y = rewards[b, t].item()
            if t_next is not None:
                y += 0.9 * max(qt[:, b, t_next, a].mean().item() for a in range(18) if legal[b, a])
            terms.append(0.5 * (pred - y) ** 2)
    assert got.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


# --- CQL and BC -------------------------------------------------------------------------------------


def test_cql_penalty_hand_computed():
    q = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [9.0, 9.0, 9.0]]])  # step 2 is padding
    actions = torch.tensor([[2, 0, 1]])
    mask = torch.tensor([[True, True, False]])
    lse0 = 3 + math.log(1 + math.exp(-1) + math.exp(-2))
    expected = (lse0 + math.log(3)) / 2 - (3.0 + 0.0) / 2
    assert cql_penalty(q, actions, mask).item() == pytest.approx(expected, rel=1e-6)
    legal = torch.tensor([[True, False, True]])
    expected_legal = (3 + math.log(1 + math.exp(-2)) + math.log(2)) / 2 - 1.5
    got = cql_penalty(q, actions, mask, legal_mask=legal, legal_only=True)
    assert got.item() == pytest.approx(expected_legal, rel=1e-6)
    only_first = torch.tensor([[True, False, False]])
    got = cql_penalty(q, actions, mask, positive_mask=only_first)
    assert got.item() == pytest.approx((lse0 + math.log(3)) / 2 - 3.0, rel=1e-6)
    with pytest.raises(ValueError, match="legal_mask"):
        cql_penalty(q, actions, mask, legal_only=True)


def test_mtbc_loss_equals_brute_force():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 18, generator=g)
    actions = torch.tensor([[0, 4, 5], [1, 1, 2]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    legal = torch.zeros(2, 18, dtype=torch.bool)
    legal[0, [0, 4, 5, 7]] = True
    legal[1, [1, 2]] = True
    terms = []
    for b in range(2):
        for t in range(3):
            if mask[b, t]:
                legal_logits = [logits[b, t, a].item() for a in range(18) if legal[b, a]]
                lse = math.log(sum(math.exp(x) for x in legal_logits))
                terms.append(lse - logits[b, t, actions[b, t]].item())
    assert mtbc_loss(logits, actions, mask, legal).item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


# --- world losses and the joint objective -----------------------------------------------------------


def tiny_model(**kw) -> WorldActionModel:
    torch.manual_seed(0)
    cfg = WorldActionConfig(
        num_layers=1, num_heads=2, embed_dim=16, max_blocks=3, obs_vocab_size=10, q_mlp_dim=8, num_q=2,
        embed_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0, q_dropout=0.0, **kw,
    )  # fmt: skip
    return WorldActionModel(cfg).eval()


def batch(B: int = 3, L: int = 3, vocab: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    obs = torch.randint(0, vocab, (B, L, 36), generator=g)
    actions = torch.randint(0, 18, (B, L), generator=g)
    tokens = torch.cat([obs, actions.unsqueeze(-1)], -1).view(B, L * TPB)
    rewards = torch.tensor([[0.0, 1.0, -1.0], [0.5, 0.0, 0.0], [0.0, -2.0, 3.0]])[:B, :L]
    ends = torch.zeros(B, L, dtype=torch.long)
    ends[1, 1] = 1
    mask = torch.tensor([[True, True, True], [True, True, False], [False, True, True]])[:B, :L]
    return tokens, actions, rewards, ends, mask


def test_world_losses_equal_brute_force():
    model = tiny_model()
    tokens, _, rewards, ends, mask = batch()
    out = model(tokens, torch.tensor([0, 1, 2]))
    got = world_losses(out, tokens, rewards, ends, mask)
    B, L = mask.shape
    obs_terms, rew_terms, end_terms = [], [], []
    for b in range(B):
        obs_flat = [(t, tokens[b, t * TPB + k].item()) for t in range(L) for k in range(36)]  # (step, token)
        for i in range(L * 36 - 1):  # prediction i -> flat obs token i + 1, the last prediction is dropped
            step, label = obs_flat[i + 1]
            if mask[b, step]:
                obs_terms.append(-F.log_softmax(out.obs_logits[b, i], -1)[label].item())
        for t in range(L):
            if mask[b, t]:
                r = rewards[b, t].item()
                rew_terms.append(-F.log_softmax(out.reward_logits[b, t], -1)[(r > 0) - (r < 0) + 1].item())
                end_terms.append(-F.log_softmax(out.end_logits[b, t], -1)[int(ends[b, t])].item())
    assert got.obs.item() == pytest.approx(sum(obs_terms) / len(obs_terms), rel=1e-5)
    assert got.reward.item() == pytest.approx(sum(rew_terms) / len(rew_terms), rel=1e-5)
    assert got.end.item() == pytest.approx(sum(end_terms) / len(end_terms), rel=1e-5)


def test_changed_token_weight_is_a_weighted_mean_over_changed_tokens_by_brute_force():
    """Tokens equal to the same position's token one step earlier weigh 1, the others w; a segment's first
    step has nothing to compare with; padded steps drop out; w = 1 is the official mean."""
    model = tiny_model()
    tokens, _, rewards, ends, mask = batch(vocab=3)  # 3 symbols: about two thirds of the tokens change
    out = model(tokens, torch.tensor([0, 1, 2]))
    B, L = mask.shape
    w = 4.0
    num = den = 0.0
    n_changed = 0
    for b in range(B):
        obs = tokens[b].view(L, TPB)[:, :36]
        for i in range(L * 36 - 1):
            step, pos = divmod(i + 1, 36)
            if not mask[b, step]:
                continue
            changed = step > 0 and obs[step, pos] != obs[step - 1, pos]
            n_changed += bool(changed)
            weight = w if changed else 1.0
            num += weight * -F.log_softmax(out.obs_logits[b, i], -1)[obs[step, pos]].item()
            den += weight
    assert 0 < n_changed < den  # both kinds present
    got = world_losses(out, tokens, rewards, ends, mask, changed_token_weight=w)
    assert got.obs.item() == pytest.approx(num / den, rel=1e-5)
    plain = world_losses(out, tokens, rewards, ends, mask)
    assert world_losses(out, tokens, rewards, ends, mask, 1.0).obs.item() == plain.obs.item()
    assert got.reward.item() == plain.reward.item() and got.end.item() == plain.end.item()
    # every step a copy of the first: nothing changes, so any weight gives the official mean
    still = tokens.view(B, L, TPB).clone()
    still[:, 1:, :36] = still[:, :1, :36]
    still = still.view(B, L * TPB)
    out2 = model(still, torch.tensor([0, 1, 2]))
    assert world_losses(out2, still, rewards, ends, mask, w).obs.item() == pytest.approx(
        world_losses(out2, still, rewards, ends, mask).obs.item(), rel=1e-6
    )
    with pytest.raises(ValueError, match="changed_token_weight must be > 0"):
        world_losses(out, tokens, rewards, ends, mask, changed_token_weight=0.0)


@pytest.mark.parametrize("w", [1.0, 4.0])
def test_obs_loss_takes_the_logits_whole_and_leaves_the_last_prediction_out(w):
    """The last obs prediction (of the next segment's first token) gets a zero gradient from a label of IGNORE, not
    from a slice of the (B, L * 36, V) logits: a slice cost a copy in the forward and a padded copy of the
    gradient in the backward (jowa_150m: V = 2048, 0.6 ms a step on an H100)."""
    model = tiny_model()
    tokens, _, rewards, ends, mask = batch(vocab=3)
    logits = model(tokens, torch.tensor([0, 1, 2])).obs_logits.detach().requires_grad_()
    out = dataclasses.replace(model(tokens, torch.tensor([0, 1, 2])), obs_logits=logits)
    with OpLog() as ops:
        world_losses(out, tokens, rewards, ends, mask, changed_token_weight=w).obs.backward()
    sliced = [name for name, shape in ops.seen if shape == tuple(logits.shape) and ("slice" in name or "clone" in name)]
    assert not sliced, f"the obs logits were sliced or copied: {sliced}"
    assert not any("slice_backward" in name for name, _ in ops.seen)
    assert torch.count_nonzero(logits.grad[:, -1]) == 0  # the last prediction has no label in the segment
    assert torch.count_nonzero(logits.grad[0, :-1]) > 0


def test_world_losses_shape_errors():
    model = tiny_model()
    tokens, _, rewards, ends, mask = batch()
    out = model(tokens[:, :-1], torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="tokens"):
        world_losses(out, tokens[:, :-1], rewards, ends, mask)
    out = model(tokens, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="rewards"):
        world_losses(out, tokens, rewards[:, :2], ends, mask)


def legal_for(B: int) -> torch.Tensor:
    legal = torch.ones(B, 18, dtype=torch.bool)
    legal[0, 10:] = False
    return legal


def test_joint_loss_is_the_named_weighted_sum():
    model = tiny_model(bc_head=True)
    tokens, actions, rewards, ends, mask = batch()
    out = model(tokens, torch.tensor([0, 1, 2]))
    target = model.q_target_logits(out.q_hidden)
    legal = legal_for(3)
    terms = joint_loss(out, target, tokens, rewards, ends, mask, legal, model.atoms, supervised_weight=0.1,
                       train_critic=True, gamma=0.99, cql_weight=0.1, bc_weight=0.5)  # fmt: skip
    w = world_losses(out, tokens, rewards, ends, mask)
    td = c51_td_loss(out.q_logits, target, actions, rewards, ends, mask, legal, model.atoms, 0.99)
    q_exp = model.q_values(out.q_logits)
    cql = cql_penalty(q_exp, actions, mask)
    bc = mtbc_loss(out.bc_logits, actions, mask, legal)
    expected = 0.1 * (w.obs + w.reward + w.end) + td + 0.1 * cql + 0.5 * bc
    torch.testing.assert_close(terms.total, expected)
    for name, value in (("obs", w.obs), ("td", td), ("cql", cql), ("bc", bc)):
        torch.testing.assert_close(getattr(terms, name), value)
    assert all(not v.requires_grad for v in terms.metrics().values())

    stage1 = joint_loss(out, None, tokens, rewards, ends, mask, legal, model.atoms, supervised_weight=1.0,
                        train_critic=False, bc_weight=0.0)  # fmt: skip
    torch.testing.assert_close(stage1.total, w.obs + w.reward + w.end)
    assert stage1.td.item() == 0 and stage1.cql.item() == 0

    null = joint_loss(out, target, tokens, rewards, ends, mask, legal, model.atoms, supervised_weight=0.1,
                      train_critic=True, q_penalty="null", bc_weight=0.0)  # fmt: skip
    torch.testing.assert_close(null.total, 0.1 * (w.obs + w.reward + w.end) + td)


def test_critic_ends_stop_the_td_targets_and_leave_the_world_loss_alone():
    """``critic_ends`` (a lost life, ``TrainConfig.life_loss_terminal``): the TD term is the C51 loss with those
    steps terminal, computed independently; the world model's end loss still reads the real ``ends``."""
    model = tiny_model()
    tokens, actions, rewards, ends, mask = batch()
    out = model(tokens, torch.tensor([0, 1, 2]))
    target = model.q_target_logits(out.q_hidden)
    legal = legal_for(3)
    lost = torch.zeros_like(ends)
    lost[0, 1] = lost[2, 0] = True
    kw = {"supervised_weight": 0.1, "train_critic": True, "gamma": 0.99, "cql_weight": 0.1, "td_steps": 2}
    plain = joint_loss(out, target, tokens, rewards, ends, mask, legal, model.atoms, **kw)
    life = joint_loss(out, target, tokens, rewards, ends, mask, legal, model.atoms, critic_ends=ends | lost, **kw)
    td = c51_td_loss(out.q_logits, target, actions, rewards, ends | lost, mask, legal, model.atoms, 0.99, n_steps=2)
    torch.testing.assert_close(life.td, td)
    assert not torch.allclose(life.td, plain.td)
    for name in ("obs", "reward", "end", "cql"):
        torch.testing.assert_close(getattr(life, name), getattr(plain, name))


def test_combo_and_real_rows():
    model = tiny_model()
    tokens, actions, rewards, ends, mask = batch()
    out = model(tokens, torch.tensor([0, 1, 2]))
    target = model.q_target_logits(out.q_hidden)
    terms = joint_loss(out, target, tokens, rewards, ends, mask, legal_for(3), model.atoms, supervised_weight=1.0,
                       train_critic=True, q_penalty="combo", num_real_rows=2)  # fmt: skip
    q_exp = model.q_values(out.q_logits)
    real_rows = mask.clone()
    real_rows[2] = False
    torch.testing.assert_close(terms.cql, cql_penalty(q_exp, actions, mask, positive_mask=real_rows))
    real = WorldActionOutput(**{**out.__dict__, "obs_logits": out.obs_logits[:2], "reward_logits": out.reward_logits[:2],
                                "end_logits": out.end_logits[:2]})  # fmt: skip
    torch.testing.assert_close(terms.obs, world_losses(real, tokens[:2], rewards[:2], ends[:2], mask[:2]).obs)


def test_compute_loss_backprops_and_clips_rewards():
    model = tiny_model()
    model.train()
    tokens, actions, rewards, ends, mask = batch()
    tasks = torch.tensor([3, 9, 59])
    terms, out = compute_loss(model, tokens, tasks, rewards, ends, mask, supervised_weight=0.1, train_critic=True)
    assert torch.isfinite(terms.total)
    terms.total.backward()
    assert model.transformer.blocks[0].attn.query.weight.grad.abs().sum() > 0
    assert model.head_q.head_module.params[0].grad.abs().sum() > 0
    assert all(p.grad is None for p in model.head_q_target.parameters())
    from jowa_core.games import action_masks

    legal = torch.as_tensor(action_masks())[tasks]
    model.eval()
    with torch.no_grad():
        terms, out = compute_loss(model, tokens, tasks, rewards, ends, mask, supervised_weight=0.1, train_critic=True)
        td = c51_td_loss(out.q_logits, model.q_target_logits(out.q_hidden), actions, rewards.clamp(-1, 1), ends, mask,
                         legal, model.atoms, 0.99)  # fmt: skip
    torch.testing.assert_close(terms.td, td)


def test_c51_mc_anchor_equals_brute_force():
    """The MC anchor: a bootstrap value below the data's return-to-go there is replaced by it (a point mass at
    G + discount x G_boot), and a real step with no TD target gets a point mass at its own return-to-go."""
    q, qt, actions, rewards, ends, mask, legal = random_td_case(5, L=6)
    g = torch.Generator().manual_seed(11)
    mc = 12.0 + 8.0 * torch.rand(rewards.shape, generator=g)  # around the target head's max values (14-19)
    got = c51_td_loss(q, qt, actions, rewards, ends, mask, legal, ATOMS, 0.9, n_steps=3, mc_returns=mc)
    point = [1.0] + [0.0] * 50
    terms, floored = [], 0
    for b in range(q.shape[1]):
        rows = {t: (G, disc, boot) for t, G, disc, boot in
                ref_n_step_rows(mask[b].tolist(), [bool(e) for e in ends[b]], rewards[b].tolist(), 0.9, 3)}  # fmt: skip
        for t in range(q.shape[2]):
            if not mask[b, t]:
                continue
            p = mixture(q[:, b, t, actions[b, t]])
            if t not in rows:  # no TD target: regress on the return-to-go itself
                target = ref_project(point, mc[b, t].item(), True, 0.9, ATOMS.tolist())
            else:
                G, disc, boot = rows[t]
                if boot is None:
                    target = ref_project(point, G, True, 0.9, ATOMS.tolist())
                else:
                    vals = {a: float(mixture(qt[:, b, boot, a]) @ ATOMS.double()) for a in range(18) if legal[b, a]}
                    best_a = max(vals, key=vals.get)
                    if vals[best_a] < mc[b, boot].item():
                        floored += 1
                        target = ref_project(point, G + disc * mc[b, boot].item(), True, 0.9, ATOMS.tolist())
                    else:
                        target = ref_project(mixture(qt[:, b, boot, best_a]).tolist(), G, False, disc, ATOMS.tolist())
            terms.append(-sum(m * math.log(pi + 1e-8) for m, pi in zip(target, p.tolist())))
    assert 0 < floored < len(terms)  # the case holds floored and kept bootstraps, and MC rows
    assert len(terms) > sum(len(ref_n_step_rows(mask[b].tolist(), [bool(e) for e in ends[b]], rewards[b].tolist(),
                                                0.9, 3)) for b in range(q.shape[1]))  # fmt: skip
    assert got.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    # returns-to-go far below every value change nothing but add the MC rows' terms
    low = c51_td_loss(q, qt, actions, rewards, ends, mask, legal, ATOMS, 0.9, n_steps=3, mc_returns=mc - 100.0)
    plain = c51_td_loss(q, qt, actions, rewards, ends, mask, legal, ATOMS, 0.9, n_steps=3)
    assert low.item() != pytest.approx(plain.item())
    with pytest.raises(ValueError, match="mc_returns"):
        c51_td_loss(q, qt, actions, rewards, ends, mask, legal, ATOMS, 0.9, mc_returns=mc[:, :3])


@pytest.mark.parametrize("n", [1, 3])
def test_next_step_target_equals_the_loss_over_one_more_step(n):
    """``next_target_logits`` adds the step after the window as a bootstrap only: the loss equals the plain
    loss over L + 1 steps whose extra step ends no episode (that step has no TD row of its own), and the
    window's last real step gains a TD row it lacks without it."""
    q, qt, actions, rewards, ends, mask, legal = random_td_case(7, L=6)
    ends[:, -1] = 0
    mask[2, 4:] = True  # row 2: real up to the extra step
    full = c51_td_loss(q, qt, actions, rewards, ends, mask, legal, ATOMS, 0.9, n_steps=n)
    w = slice(0, 5)
    got = c51_td_loss(q[:, :, w], qt[:, :, w], actions[:, w], rewards[:, w], ends[:, w], mask[:, w], legal, ATOMS, 0.9,
                      n_steps=n, next_target_logits=qt[:, :, 5], next_mask=mask[:, 5])  # fmt: skip
    plain = c51_td_loss(q[:, :, w], qt[:, :, w], actions[:, w], rewards[:, w], ends[:, w], mask[:, w], legal, ATOMS,
                        0.9, n_steps=n)  # fmt: skip
    assert got.item() == pytest.approx(full.item(), rel=1e-6)
    assert got.item() != pytest.approx(plain.item(), rel=1e-3)
    with pytest.raises(ValueError, match="next_mask"):
        c51_td_loss(q[:, :, w], qt[:, :, w], actions[:, w], rewards[:, w], ends[:, w], mask[:, w], legal, ATOMS, 0.9,
                    next_target_logits=qt[:, :, 5])  # fmt: skip


def test_next_step_target_reaches_an_exact_one_step_target():
    """A hand-made case: two steps, the target head's best action at the extra step a point mass at 10, reward
    1 at the last step, gamma 0.5: the last step's target is 1 + 0.5 x 10 = 6, atom 20 of the support."""
    Z, A = 51, 18
    q = torch.zeros(1, 1, 2, A, Z)
    qt = torch.zeros(1, 1, 2, A, Z)
    nxt = torch.full((1, 1, A, Z), -50.0)
    nxt[..., 0] = 50.0  # every action: a point mass at -10
    nxt[0, 0, 3, 0], nxt[0, 0, 3, 25] = -50.0, 50.0  # but action 3: a point mass at atom 25 = 10.0, the max
    actions, rewards = torch.tensor([[1, 2]]), torch.tensor([[0.0, 1.0]])
    ends, mask, legal = torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.bool), torch.ones(1, A, dtype=torch.bool)
    q[0, 0, 1, 2, 20] = 10.0  # the online head at the last step, taken action 2: most mass at 6.0
    got = c51_td_loss(q, qt, actions, rewards, ends, mask, legal, ATOMS, 0.5, next_target_logits=nxt,
                      next_mask=torch.tensor([True]))  # fmt: skip
    p_last = F.softmax(q[0, 0, 1, 2].double(), -1)
    p_first = F.softmax(q[0, 0, 0, 1].double(), -1)
    m_first = ref_project(F.softmax(qt[0, 0, 1, 0].double(), -1).tolist(), 0.0, False, 0.5, ATOMS.tolist())
    expect = (-math.log(p_last[20].item() + 1e-8) - sum(m * math.log(p + 1e-8) for m, p in zip(m_first, p_first.tolist()))) / 2
    assert got.item() == pytest.approx(expect, rel=1e-4)
    alone = c51_td_loss(q, qt, actions, rewards, ends, mask, legal, ATOMS, 0.5, next_target_logits=nxt,
                        next_mask=torch.tensor([False]))  # the extra step is padding: the last step has no row again
    assert alone.item() == pytest.approx(-sum(m * math.log(p + 1e-8) for m, p in zip(m_first, p_first.tolist())), rel=1e-4)
