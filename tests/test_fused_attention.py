"""The Triton flash-attention op (``jowa_core.models.fused_attention``): its torch reference against SDPA, the op's
gradients and dropout, the op inside ``torch.compile``, the model's switch, and the Triton kernels on CPU through
Triton's interpreter against the reference given the kernels' own dropout flags (skipped without triton)."""

import contextlib
import functools
import textwrap

import pytest
import torch
import torch.nn.functional as F

from jowa_core.models.fused_attention import KernelConfig, _attention, _check, _reference, causal_attention
from tests.test_fused_ln import _model_and_batch, switch_runs
from tests.triton_interpreter import needs_triton, run_in_interpreter


def _qkv(B=2, T=11, H=2, D=8, dtype=torch.float32, seed=0) -> torch.Tensor:
    return torch.randn(B, T, 3, H, D, generator=torch.Generator().manual_seed(seed), dtype=dtype).requires_grad_()


_SDPA = F.scaled_dot_product_attention


def _counted(calls: list[int], *args, **kwargs) -> torch.Tensor:
    calls.append(1)
    return _SDPA(*args, **kwargs)


def _sdpa(qkv: torch.Tensor) -> torch.Tensor:
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)


def test_reference_without_dropout_is_causal_sdpa_with_its_gradients() -> None:
    """p = 0, or p > 0 outside training: SDPA's causal attention, (B, T, H, D), forward and the packed gradient."""
    qkv = _qkv()
    do = torch.randn(2, 11, 2, 8, generator=torch.Generator().manual_seed(1))
    want = _sdpa(qkv)
    for p, training in ((0.0, True), (0.4, False)):
        got = causal_attention(qkv, p, training)
        assert got.shape == (2, 11, 2, 8)
        torch.testing.assert_close(got, want)
        want_grad = torch.autograd.grad(want, qkv, do, retain_graph=True)[0]
        torch.testing.assert_close(torch.autograd.grad(got, qkv, do)[0], want_grad)
    lse = _reference(qkv.detach(), None, 0.0)[1]  # base 2, one per (head, query): the first query sees itself only
    q, k, _ = qkv.detach().permute(2, 0, 3, 1, 4)
    first = (q[..., 0, :] * k[..., 0, :]).sum(-1) / 8**0.5 / torch.log(torch.tensor(2.0))
    torch.testing.assert_close(lse.view(2, 2, 11)[..., 0], first)


def test_dropout_drops_probabilities_and_the_gradient_follows() -> None:
    """With a seed: the reference's flags (a generator seeded with it), kept share about 1 - p, the output the
    dropped probabilities times v over 1 - p, and float64 gradients that match numerical ones."""
    qkv, p, seed = _qkv(2, 40, 3, 8), 0.3, torch.tensor([5])
    o, _, flags = _attention(qkv, seed, p)
    assert flags.numel() == 0  # the reference redraws from the seed
    keep = torch.rand((2, 3, 40, 40), generator=torch.Generator().manual_seed(5)) >= p
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    s = (q @ k.transpose(-1, -2) / 8**0.5).masked_fill(~torch.ones(40, 40, dtype=torch.bool).tril(), float("-inf"))
    want = ((s.softmax(-1) * keep / (1 - p)) @ v).transpose(1, 2)
    torch.testing.assert_close(o, want)
    assert abs(keep.float().mean().item() - 0.7) < 0.02
    x = _qkv(1, 6, 2, 4, torch.float64)
    assert torch.autograd.gradcheck(lambda t: _attention(t, seed, p)[0], (x,))
    assert torch.autograd.gradcheck(lambda t: _attention(t, None, 0.0)[0], (x,))


def test_qkv_bias_gets_the_gradient_its_product_would_have_given() -> None:
    """``qkv_bias``, detached in the product and passed to the op: the same gradients for the input, the weight and
    the bias as the product with its bias attached, with and without dropout."""
    g = torch.Generator().manual_seed(4)
    x, w, b = torch.randn(2, 9, 12, generator=g), torch.randn(36, 12, generator=g), torch.randn(36, generator=g)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    for p in (0.0, 0.3):
        grads = []
        for routed in (False, True):
            torch.manual_seed(1)
            xx, ww, bb = leaves
            qkv = F.linear(xx, ww, bb.detach() if routed else bb).view(2, 9, 3, 2, 6)
            out = causal_attention(qkv, p, True, qkv_bias=bb if routed else None)
            grads.append(torch.autograd.grad(out.square().sum(), leaves))
        for name, a, e in zip("xwb", *grads):
            torch.testing.assert_close(a, e, msg=f"{name} p={p}")
    with pytest.raises(ValueError, match=r"qkv_bias \(35,\) must be \(36,\)"):
        causal_attention(qkv, 0.0, True, qkv_bias=b[:35])


def test_dropout_follows_torch_manual_seed_and_bad_input_is_refused() -> None:
    qkv = _qkv().detach()
    torch.manual_seed(3)
    a = causal_attention(qkv, 0.5, True)
    torch.manual_seed(3)
    assert torch.equal(a, causal_attention(qkv, 0.5, True))
    assert not torch.equal(a, causal_attention(qkv, 0.5, True))
    with pytest.raises(ValueError, match="0 <= p < 1"):
        causal_attention(qkv, 1.0, True)
    with pytest.raises(ValueError, match=r"must be \(B, T, 3, H, D\), got \(2, 11, 6, 8\)"):
        causal_attention(qkv.reshape(2, 11, 6, 8), 0.1, True)
    with pytest.raises(ValueError, match="power of two >= 16"):
        KernelConfig(fwd_m=24)
    with pytest.raises(ValueError, match="bwd_n must be 32 or more .* got 16"):
        KernelConfig(bwd_n=16)
    with pytest.raises(ValueError, match="fwd_maxnreg must be 0 .* got 300"):
        KernelConfig(fwd_maxnreg=300)
    with pytest.raises(ValueError, match="bwd_stages must be >= 1"):
        KernelConfig(bwd_stages=0)
    with pytest.raises(ValueError, match="head size that is a power of two >= 16, got 24; leave"):
        _check(torch.zeros(1, 4, 3, 2, 24))  # what the Triton path checks first
    with pytest.raises(ValueError, match="dropout_bits must be 8 or 16 .* got 12"):
        KernelConfig(dropout_bits=12)
    with pytest.raises(ValueError, match="fwd_n must be 64 or more with dropout_bits=8 .* got 32"):
        KernelConfig(fwd_n=32, dropout_bits=8)


def test_eight_bit_dropout_rounds_p_on_every_path() -> None:
    """``dropout_bits=8``: p as the kernels draw it, in 1/256, is the p of the reference too (the CPU path), so the
    drop scale matches the share dropped; 16 bits keep p as given."""
    from jowa_core.models import fused_attention as fa

    assert fa.drawn_p(0.1, 16) == 0.1 and fa.drawn_p(0.1, 8) == 26 / 256 and fa.drawn_p(0.3, 8) == 77 / 256
    assert fa.drawn_p(0.001, 8) == 0.0  # below half of 1/256: nothing is dropped
    with pytest.raises(ValueError, match="rounds to 1 in 1/256"):
        fa.drawn_p(0.999, 8)
    qkv = _qkv().detach()
    previous = fa.set_kernel_config(KernelConfig(dropout_bits=8))
    try:
        assert fa.drawn_p(0.1) == 26 / 256  # the process's config
        torch.manual_seed(5)
        got = causal_attention(qkv, 0.1, True)
    finally:
        fa.set_kernel_config(previous)
    torch.manual_seed(5)
    seed = torch.randint(2**62, (1,))
    B, T, _, H, _ = qkv.shape
    want = fa._reference(qkv, fa._reference_keep(seed, B, H, T, 26 / 256, qkv.device), 26 / 256)[0]
    torch.testing.assert_close(got, want.to(got.dtype))
    torch.manual_seed(5)
    assert not torch.allclose(causal_attention(qkv, 0.1, True), got)  # 16 bits: another p, another scale


def test_op_inside_torch_compile_gives_the_eager_result() -> None:
    qkv = _qkv()
    seed = torch.tensor([9])

    def f(qkv, seed):
        return (_attention(torch.tanh(qkv) * 2, seed, 0.2)[0] ** 2).sum() + causal_attention(qkv, 0.0, True).sum()

    want = torch.autograd.grad(f(qkv, seed), qkv)[0]
    got = torch.autograd.grad(torch.compile(f, fullgraph=True)(qkv, seed), qkv)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused_layer_norm", [False, True])
def test_switch_is_the_same_function_with_the_same_gradients(fused_layer_norm: bool) -> None:
    """``use_fused_attention`` (no dropout in the model): the same outputs and parameter gradients, the same state
    dict, the cached path untouched; and the switch is used: SDPA is not called without a cache."""
    model, tokens, tasks = _model_and_batch()
    model.use_fused_layer_norm(fused_layer_norm)
    keys = set(model.state_dict())

    @contextlib.contextmanager
    def sdpa_calls():
        calls: list[int] = []
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(F, "scaled_dot_product_attention", functools.partial(_counted, calls))
            yield calls

    (a, ga, ca, na), (b, gb, cb, nb) = switch_runs(model, tokens, tasks, "use_fused_attention", sdpa_calls)
    assert na > 0 and nb == 0 and set(model.state_dict()) == keys
    for name in ("hidden", "obs_logits", "q_logits"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cb, ca, atol=1e-6, rtol=1e-6)
    assert ga.keys() == gb.keys() and any(n.endswith("attn.key.weight") for n in ga)
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], atol=1e-5, rtol=1e-4, msg=n)


def test_every_fused_switch_compiles_in_one_graph_and_matches_eager() -> None:
    """The training recipe's structure with every switch on (fused LayerNorm op, one QKV product, bias + GELU op,
    branch biases, this op): ``torch.compile(fullgraph=True)`` of the model gives eager's outputs and parameter
    gradients (on CPU the ops run their references; the graph is the one CUDA compiles). About 15 s."""
    model, tokens, tasks = _model_and_batch()
    model.use_fused_layer_norm(True).use_fused_qkv(True).use_fused_bias_gelu(True).use_fused_branch_bias(True)
    model.use_fused_attention(True)

    def run(forward):
        model.zero_grad()
        out = forward(tokens, tasks)
        heads = out.q_logits.mean() + out.reward_logits.mean() + out.end_logits.mean()  # every head, so that
        (out.obs_logits.logsumexp(-1).mean() + heads).backward()  # no parameter is left out of one run's grads
        return out, {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}

    (a, ga), (b, gb) = run(model), run(torch.compile(model, fullgraph=True))
    for name in ("hidden", "obs_logits", "q_logits", "reward_logits", "end_logits"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), atol=1e-5, rtol=1e-5, msg=name)
    assert ga.keys() == gb.keys() and any(n.endswith("attn.query.bias") for n in ga)
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], atol=1e-5, rtol=1e-4, msg=n)


# --- the Triton kernels, on CPU through Triton's interpreter ----------------------------------

INTERPRETER_CHECK = textwrap.dedent(
    """
    from unittest import mock

    import torch
    from jowa_core.models import fused_attention as fa

    torch.manual_seed(0)
    # tiles smaller than the sequence (several query and key blocks, a part-filled last one); the forward's and the
    # backward's tiles differ, so the backward's redrawn flags are checked against the forward's on other tiles.
    # fp32 and fp16 (the interpreter has no bf16 matrix product; tests/test_gpu.py runs bf16 on CUDA)
    configs = [fa.KernelConfig(16, 32, 2, 64, 32, 2, 1, 1), fa.KernelConfig(32, 64, 2, 16, 32, 2, 1, 1)]
    shapes = [(2, 37, 2, 16), (1, 80, 3, 32)]
    for cfg in configs:
        for (B, T, H, D) in shapes:
            for dtype in (torch.float32, torch.float16):
                qkv, do = torch.randn(B, T, 3, H, D).to(dtype), torch.randn(B, T, H, D).to(dtype)
                for p in (0.0, 0.3):
                    fa.set_kernel_config(cfg)
                    seed = torch.tensor([123]) if p > 0 else None
                    tag = f"{cfg} {(B, T, H, D)} {dtype} p={p}"
                    keep = fa.triton_keep(torch.tensor([123]), B, H, T, p) if p > 0 else None
                    o, lse, flags = fa._triton_forward(qkv, seed, p)
                    assert flags.shape == ((B * H, T, 4 * ((T + 31) // 32)) if p > 0 else (0,)), tag
                    ro, rlse = fa._reference(qkv, keep, p)
                    rdq, rdb = fa._reference_backward(do, qkv, keep, p)
                    tol = {"rtol": 2e-3, "atol": 2e-3} if dtype == torch.float16 else {"rtol": 1e-5, "atol": 1e-5}
                    assert o.shape == (B, T, H, D) and o.dtype == dtype, tag
                    torch.testing.assert_close(o, ro, **tol, msg=f"o {tag}")
                    torch.testing.assert_close(lse, rlse, rtol=1e-5, atol=1e-5, msg=f"lse {tag}")
                    dq, db = fa._triton_backward(do, qkv, o, lse, flags, p, need_dbias=True)
                    assert fa._triton_backward(do, qkv, o, lse, flags, p)[1].numel() == 0, tag
                    torch.testing.assert_close(db, rdb.float(), rtol=1e-4, atol=1e-4 if dtype == torch.float32 else 2e-2,
                                               msg=f"dbias {tag}")  # fmt: skip
                    assert dq.shape == qkv.shape and dq.dtype == dtype, tag
                    torch.testing.assert_close(dq, rdq, **{k: 4 * v for k, v in tol.items()}, msg=f"dqkv {tag}")
    # the default tiles at jowa_150m's sequence and head size (296 tokens of 64: five blocks, the last part-filled).
    # Their query and key blocks are as many, so the bias's partial sums are left unzeroed for the kernels to fill:
    # with deterministic algorithms torch.empty fills them with NaN, so a part no program writes fails the check.
    torch.use_deterministic_algorithms(True)
    assert torch.utils.deterministic.fill_uninitialized_memory and torch.empty(3).isnan().all()
    qkv, do = torch.randn(1, 296, 3, 1, 64), torch.randn(1, 296, 1, 64)
    for p in (0.0, 0.1):
        fa.set_kernel_config(fa.KernelConfig())
        seed = torch.tensor([5]) if p > 0 else None
        keep = fa.triton_keep(torch.tensor([5]), 1, 1, 296, p) if p > 0 else None
        o, lse, flags = fa._triton_forward(qkv, seed, p)
        ro, rlse = fa._reference(qkv, keep, p)
        rdq, rdb = fa._reference_backward(do, qkv, keep, p)
        dq, db = fa._triton_backward(do, qkv, o, lse, flags, p, need_dbias=True)
        for name, a, e in (("o", o, ro), ("lse", lse, rlse), ("dqkv", dq, rdq), ("dbias", db, rdb)):
            torch.testing.assert_close(a, e.float(), rtol=1e-5, atol=5e-5, msg=f"default tiles, 296 tokens: {name} p={p}")
    torch.use_deterministic_algorithms(False)
    fa.set_kernel_config(fa.KernelConfig())
    # a strided input (a slice of a wider product) reads as its contiguous copy
    wide = torch.randn(2, 37, 4, 2, 16)
    a = fa._triton_forward(wide[:, :, 1:], None, 0.0)[0]
    assert torch.equal(a, fa._triton_forward(wide[:, :, 1:].contiguous(), None, 0.0)[0])
    # the stored flags' layout: key 32 s + 8 c + 2 q + e of row m is bit 2 c + e of row m's byte 4 s + q (written
    # for the keys each row sees)
    fa.set_kernel_config(fa.KernelConfig(64, 32, 4, 64, 64, 4, 2, 2, fwd_maxnreg=168))  # a launch option on CUDA
    B, T, H = 1, 80, 2
    flags = fa._triton_forward(torch.randn(B, T, 3, H, 16), torch.tensor([9]), 0.25)[2].long()
    n = torch.arange(T)
    bits = (flags[:, :, (n // 32) * 4 + (n % 8) // 2] >> (2 * ((n % 32) // 8) + n % 2)) & 1
    seen = torch.ones(T, T, dtype=torch.bool).tril()
    assert torch.equal(bits.bool()[:, seen], fa.triton_keep(torch.tensor([9]), B, H, T, 0.25).reshape(B * H, T, T)[:, seen])
    fa.set_kernel_config(fa.KernelConfig())
    # the flags: kept share, the same seed the same, another seed others, rows and heads apart, neighbours (which
    # share Philox words) as if independent
    p = 0.1
    keep = fa.triton_keep(torch.tensor([7]), 2, 3, 96, p).float()
    assert torch.equal(keep, fa.triton_keep(torch.tensor([7]), 2, 3, 96, p).float())
    other = fa.triton_keep(torch.tensor([8]), 2, 3, 96, p).float()
    assert abs((keep != other).float().mean().item() - 2 * p * (1 - p)) < 0.01
    assert abs(keep.mean().item() - (1 - p)) < 0.005, keep.mean().item()  # 55,296 draws: sd 0.0013
    n = torch.arange(96)
    for j in range(8):  # each of a call's 8 bits: keys 32 s + 8 c + 2 q + e hold bit 2 c + e
        cols = n[((n % 32) // 8 == j // 2) & (n % 2 == j % 2)]
        assert abs(keep[..., cols].mean().item() - (1 - p)) < 0.015, j
    pairs = (keep[..., 1:] == keep[..., :-1]).float().mean().item()
    assert abs(pairs - (p * p + (1 - p) ** 2)) < 0.01, pairs
    rows = keep.reshape(-1, 96)
    assert len({tuple(r.tolist()) for r in rows.bool()}) == rows.shape[0], "rows must not repeat"
    # the kernels through the public op and autograd, as on a GPU: torch.library checks what the ops return
    # (session 21's LayerNorm backward returned outputs that shared storage, and only CUDA runs saw it)
    qkv, bias, do = torch.randn(2, 37, 3, 2, 16), torch.randn(96), torch.randn(2, 37, 2, 16)
    with mock.patch.object(fa, "_use_triton", lambda t: True):
        for p in (0.0, 0.3):
            leaves = (qkv.clone().requires_grad_(), bias.clone().requires_grad_())
            torch.manual_seed(11)
            o = fa.causal_attention(leaves[0], p, True, leaves[1])
            dq, db = torch.autograd.grad(o, leaves, do)
            torch.manual_seed(11)
            seed = torch.randint(2**62, (1,)) if p > 0 else None  # as causal_attention draws it
            keep = fa.triton_keep(seed, 2, 2, 37, p) if p > 0 else None
            ro = fa._reference(qkv, keep, p)[0]
            rdq, rdb = fa._reference_backward(do, qkv, keep, p)
            for name, a, e in (("o", o, ro), ("dqkv", dq, rdq), ("dbias", db, rdb)):
                torch.testing.assert_close(a, e, rtol=1e-5, atol=5e-5, msg=f"the op's {name} p={p}")
    # dropout_bits=8: sixteen 8-bit uniforms a Philox call (FlashAttention-2's draw), p rounded to 1/256; the flags
    # are stored alike, so the backward kernels are the ones above. Several query and key blocks, a part-filled one.
    for cfg in (fa.KernelConfig(16, 64, 2, 64, 32, 2, 1, 1, dropout_bits=8),
                fa.KernelConfig(32, 128, 4, 16, 32, 2, 1, 1, dropout_bits=8)):
        fa.set_kernel_config(cfg)
        for (B, T, H, D) in ((2, 37, 2, 16), (1, 150, 2, 16)):
            p, seed = 0.3, torch.tensor([31])
            pe = fa.drawn_p(p)
            assert pe == 77 / 256, pe
            qkv, do = torch.randn(B, T, 3, H, D), torch.randn(B, T, H, D)
            keep = fa.triton_keep(seed, B, H, T, p)
            o, lse, flags = fa._triton_forward(qkv, seed, p)
            tag = f"8-bit {cfg} {(B, T, H, D)}"
            n = torch.arange(T)
            bits = (flags.long()[:, :, (n // 32) * 4 + (n % 8) // 2] >> (2 * ((n % 32) // 8) + n % 2)) & 1
            seen = torch.ones(T, T, dtype=torch.bool).tril()
            assert torch.equal(bits.bool()[:, seen], keep.reshape(B * H, T, T)[:, seen]), tag
            ro, rlse = fa._reference(qkv, keep, pe)
            rdq, rdb = fa._reference_backward(do, qkv, keep, pe)
            dq, db = fa._triton_backward(do, qkv, o, lse, flags, p, need_dbias=True)
            for name, a, e in (("o", o, ro), ("lse", lse, rlse), ("dqkv", dq, rdq), ("dbias", db, rdb)):
                torch.testing.assert_close(a, e.float(), rtol=1e-5, atol=5e-5, msg=f"{name} {tag}")
    # the 8-bit flags: the kept share follows the rounded p (1.4/256 is drawn as 1/256: 262,144 draws, sd 0.00012,
    # against the 0.0016 between them), each of a call's 16 bytes on its own, neighbours as if independent, and
    # other flags than the 16-bit draw's
    fa.set_kernel_config(fa.KernelConfig(dropout_bits=8))
    keep = fa.triton_keep(torch.tensor([7]), 4, 4, 128, 1.4 / 256).float()
    assert abs(keep.mean().item() - (1 - 1 / 256)) < 0.0006, keep.mean().item()
    p = 0.1
    keep = fa.triton_keep(torch.tensor([7]), 4, 4, 128, p).float()
    pe = fa.drawn_p(p)
    assert torch.equal(keep, fa.triton_keep(torch.tensor([7]), 4, 4, 128, p).float())
    assert abs(keep.mean().item() - (1 - pe)) < 0.003, keep.mean().item()
    n = torch.arange(128)
    for j in range(16):  # byte j = 4 c + 2 t + e of a call: keys 64 u + 32 t + 8 c + 2 q + e
        c, t, e = j // 4, (j // 2) % 2, j % 2
        cols = n[((n % 32) // 8 == c) & ((n % 64) // 32 == t) & (n % 2 == e)]
        assert abs(keep[..., cols].mean().item() - (1 - pe)) < 0.01, j
    for gap in (1, 2, 8, 32, 64):  # keys apart in a call's byte (e), quad (q: another call), word (c), span (t), pair
        pairs = (keep[..., gap:] == keep[..., :-gap]).float().mean().item()
        assert abs(pairs - (pe * pe + (1 - pe) ** 2)) < 0.006, (gap, pairs)
    rows = keep.reshape(-1, 128)
    assert len({tuple(r.tolist()) for r in rows.bool()}) == rows.shape[0], "rows must not repeat"
    # calls must not repeat across rows: a row's second 64 keys against the next row's first 64
    across = (keep[..., :-1, 64:] == keep[..., 1:, :64]).float().mean().item()
    assert abs(across - (pe * pe + (1 - pe) ** 2)) < 0.006, across
    fa.set_kernel_config(fa.KernelConfig())
    assert abs((keep != fa.triton_keep(torch.tensor([7]), 4, 4, 128, p).float()).float().mean().item() - 0.18) < 0.01
    print("interpreter check passed")
    """
)


@needs_triton
def test_triton_kernels_match_the_reference_in_the_interpreter() -> None:
    run_in_interpreter(INTERPRETER_CHECK, timeout=400)
