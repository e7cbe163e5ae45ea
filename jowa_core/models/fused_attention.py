"""Causal self-attention with dropout straight from the packed QKV product: one op, Triton flash attention on CUDA.

``causal_attention(qkv, p, training)`` takes the (B, T, 3, H, D) output of one query/key/value product and returns
softmax(q k^T / sqrt(D) + causal mask), dropped out with probability p, times v, as (B, T, H, D).

Why a hand-written op (README Performance): in jowa_150m's step (batch 512, 12 heads, 296 tokens of 64) attention
takes about 37 ms on an H100 and 34 on an H200, at roughly 70 TFLOP/s:
- cuDNN's forward takes 12.6 ms with dropout and 6.9 ms without (H200): its Philox call per probability
  costs as much as the attention. Here one Philox call gives eight flags (as ``fused_ln``'s packed mask);
- its backward needs two more kernels (``compute_dot_do_o``, ``convert_dq_to_16bits``: 7 ms on an H100);
- the single QKV product's backward copies SDPA's three separate gradients into one tensor (4.0 ms on an
  H200). This op reads q, k and v from the product's output and writes their gradient back packed, and its
  output is (B, T, C) for the projection as it is.

The product's bias can hand its gradient to this op too (``qkv_bias``), which sums it as it writes the packed
gradient, where autograd would spend a pass over that gradient on it.

Dispatch as ``fused_ln``: Triton on CUDA for bf16/fp16 when triton imports; elsewhere a torch reference whose
dropout flags come from a generator seeded with the same seed (so not the kernels' flags: the tests hand the
kernels' flags to the reference). The Triton forward stores its flags as bits for the backward; the reference
redraws them from the seed.
"""

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from jowa_core.models.fused_ln import ConfigSlot, TileConfig, _cdiv, _on_device, triton_available

# ---------------------------------------------------------------------------------------------
# Pure-torch reference (CPU, no Triton, tests)


def _reference_keep(seed: Tensor, B: int, H: int, T: int, p: float, device: torch.device) -> Tensor:
    """(B, H, T, T) bool keep flags from a generator seeded with ``seed`` (not the kernels' flags)."""
    g = torch.Generator(device=device)
    g.manual_seed(int(seed.item()))
    return torch.rand((B, H, T, T), generator=g, device=device) >= p


def _split(qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(B, H, T, D) views of the packed (B, T, 3, H, D) product."""
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    return q, k, v


def _reference(qkv: Tensor, keep: Tensor | None, p: float) -> tuple[Tensor, Tensor]:
    """(o (B, T, H, D) in qkv's dtype, lse (B H, T) base-2 log-sum-exp, fp32) with the given keep flags."""
    cd = torch.promote_types(qkv.dtype, torch.float32)
    B, T, _, H, D = qkv.shape
    with torch.autocast(qkv.device.type, enabled=False):
        q, k, v = (t.to(cd) for t in _split(qkv))
        s = (q @ k.transpose(-1, -2)) / math.sqrt(D)
        s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=qkv.device).tril(), float("-inf"))
        lse = torch.logsumexp(s, -1)
        prob = torch.exp(s - lse[..., None])
        if keep is not None:
            prob = prob * keep.to(cd) / (1.0 - p)
        o = (prob @ v).transpose(1, 2).contiguous()
    return o.to(qkv.dtype), (lse / math.log(2)).float().reshape(B * H, T)


def _reference_backward(do: Tensor, qkv: Tensor, keep: Tensor | None, p: float) -> tuple[Tensor, Tensor]:
    """(d(qkv) packed like qkv, its column sums (3 H D,) in fp32 or fp64: the gradient of a bias added to qkv), written out (an op's implementation runs below autograd, so no autograd here):
    dV = Pd^T dO, dP = (dO V^T) x Z, dS = P (dP - rowsum(P dP)), dQ = dS K / sqrt(D), dK = dS^T Q / sqrt(D), with
    P the probabilities, Z the kept flags over 1 - p (or 1) and Pd = P Z."""
    cd = torch.promote_types(qkv.dtype, torch.float32)
    T, D = qkv.shape[1], qkv.shape[-1]
    with torch.autocast(qkv.device.type, enabled=False):
        q, k, v = (t.to(cd) for t in _split(qkv))
        g = do.to(cd).transpose(1, 2)  # (B, H, T, D)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(D)
        s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=qkv.device).tril(), float("-inf"))
        prob = s.softmax(-1)
        z = torch.ones((), dtype=cd, device=qkv.device) if keep is None else keep.to(cd) / (1.0 - p)
        dv = (prob * z).transpose(-1, -2) @ g
        dp = (g @ v.transpose(-1, -2)) * z
        ds = prob * (dp - (prob * dp).sum(-1, keepdim=True))
        dq, dk = ds @ k / math.sqrt(D), ds.transpose(-1, -2) @ q / math.sqrt(D)
        packed = torch.stack([t.transpose(1, 2) for t in (dq, dk, dv)], dim=2).contiguous()
    return packed.to(qkv.dtype), packed.sum((0, 1)).reshape(-1)


# ---------------------------------------------------------------------------------------------
# Triton kernels (CUDA; also run on CPU by Triton's interpreter in the tests)


@dataclass(frozen=True)
class KernelConfig(TileConfig):
    """Tiles of the kernels (queries x keys per pass, warps, software-pipeline stages), the forward's and the
    backward's apart. The defaults are the fastest of ``benchmarks/attention_sweep.py``'s 44 at jowa_150m's shape
    on an H100 (session 20, dropout 0.1: forward 0.739 ms, backward 1.839 ms a layer; cuDNN's forward and
    backward took 2.896 ms): 64 x 64 on 4 warps, FlashAttention-2's choice for a head size of 64, in 3 stages;
    jowa_150m's 296 tokens make 5 blocks of 64.

    ``fwd_maxnreg``: registers a thread of the forward may use (0: the compiler's choice, 172 for these tiles on
    sm_90). At 168, three programs of 4 warps share an SM's 65,536 registers instead of two, and the forward's
    loops compile to as many instructions with no spills (``benchmarks.attention_isa``): 0.868 -> 0.739 ms
    a layer on an H100 (session 20).

    ``dropout_bits``: the width of a dropout uniform. 16 (the default): eight flags a Philox call, p in 1/65536.
    8: sixteen flags a call, as FlashAttention-2 draws them, so half the forward's Philox calls (about 570 of its
    880 instructions a thread per pass are the draw, ``benchmarks.attention_isa``), with p rounded to 1/256
    (0.1 is drawn as 26/256 = 0.1016; ``drawn_p``) in the kernels and the reference alike. Needs ``fwd_n`` >= 64
    (a call draws 64 keys of a row); the stored flags and the backward are the same either way. Not yet timed."""

    fwd_m: int = 64
    fwd_n: int = 64
    fwd_warps: int = 4
    bwd_m: int = 64
    bwd_n: int = 64
    bwd_warps: int = 4
    fwd_stages: int = 3
    bwd_stages: int = 3
    fwd_maxnreg: int = 168
    dropout_bits: int = 16

    NAME = "fused_attention KernelConfig"

    def __post_init__(self) -> None:
        blocks = ("fwd_m", "fwd_n", "bwd_m", "bwd_n")  # tl.dot needs 16 or more
        self.check_integers((*blocks, "fwd_warps", "bwd_warps", "fwd_stages", "bwd_stages"), blocks, least_power=16)
        for name in ("fwd_n", "bwd_n"):  # a dropout call draws keys in spans of 32 (fused_attention_kernels)
            if getattr(self, name) < 32:
                raise ValueError(f"{self.NAME}.{name} must be 32 or more (keys are drawn for dropout in spans of 32), "
                                 f"got {getattr(self, name)}.")  # fmt: skip
        if self.dropout_bits not in (8, 16) or isinstance(self.dropout_bits, bool):
            raise ValueError(f"{self.NAME}.dropout_bits must be 8 or 16 (bits of a dropout uniform), "
                             f"got {self.dropout_bits!r}.")  # fmt: skip
        if self.dropout_bits == 8 and self.fwd_n < 64:
            raise ValueError(f"{self.NAME}.fwd_n must be 64 or more with dropout_bits=8 (a Philox call draws 64 keys "
                             f"of a row), got {self.fwd_n}.")  # fmt: skip
        r = self.fwd_maxnreg
        if isinstance(r, bool) or not isinstance(r, int) or not (r == 0 or 64 <= r <= 255):
            raise ValueError(f"{self.NAME}.fwd_maxnreg must be 0 (the compiler's choice) or 64 to 255 registers, "
                             f"got {r!r}.")  # fmt: skip


_SLOT = ConfigSlot(KernelConfig())  # process-wide, as fused_ln's; benchmarks/attention_sweep.py writes --best
kernel_config, set_kernel_config = _SLOT.get, _SLOT.set


@functools.cache
def _kernels():
    """Compile-on-first-use kernels: module level in their own module (the interpreter resolves helpers there)."""
    from jowa_core.models import fused_attention_kernels

    return fused_attention_kernels


def drawn_p(p: float, bits: int | None = None) -> float:
    """p as the kernels draw it with uniforms of ``bits`` bits (``KernelConfig.dropout_bits`` if None): as given at
    16, where it is off by less than 1/131072 (the drop scale has used the given p since session 18), rounded to
    1/256 at 8, so that the drop scale 1/(1 - p) matches the share the kernels drop."""
    bits = kernel_config().dropout_bits if bits is None else bits
    if bits == 16:
        return p
    n = round(p * 256)
    if n >= 256:
        raise ValueError(
            f"causal_attention: p={p} rounds to 1 in 1/256 (dropout_bits=8); use p < 255.5/256 or 16 bits."
        )
    return n / 256


def _flag_bytes(T: int) -> int:
    """Dropout flag bytes per query row: one per Philox call, 4 calls per 32 keys (fused_attention_kernels)."""
    return 4 * _cdiv(T, 32)


def takes_head_size(D: int) -> bool:
    """Whether the Triton kernels take heads of size D: a power of two >= 16 (tl.dot's least; every preset's)."""
    return D >= 16 and D & (D - 1) == 0


def _check(qkv: Tensor) -> Tensor:
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"causal_attention: qkv must be (B, T, 3, H, D), got {tuple(qkv.shape)}.")
    D = qkv.shape[-1]
    if not takes_head_size(D):
        raise ValueError(
            f"causal_attention: the Triton kernels need a head size that is a power of two >= 16, got {D}; "
            "leave WorldActionModel.use_fused_attention off for this model (every preset's head size is 16 or 64)."
        )
    if qkv.numel() >= 2**31:
        raise ValueError(f"causal_attention: {qkv.numel()} elements exceed the kernels' int32 offsets.")
    B, T, _, H, _ = qkv.shape
    if B * H * T * _flag_bytes(T) >= 2**31:
        raise ValueError("causal_attention: too many probabilities for the dropout's int32 Philox offsets.")
    if qkv.stride(4) != 1 or qkv.stride(3) != D or qkv.stride(2) != H * D:
        qkv = qkv.contiguous()  # the kernels step through (3, H, D) as one contiguous row
    return qkv


def _triton_forward(qkv: Tensor, seed: Tensor | None, p: float) -> tuple[Tensor, Tensor, Tensor]:
    """(o, lse, flags): flags, the dropout's keep bits for the backward, (B H, T, 4 cdiv(T, 32)) uint8 (empty without
    dropout; bytes past the causal edge unwritten)."""
    qkv = _check(qkv)
    B, T, _, H, D = qkv.shape
    cfg, k = kernel_config(), _kernels()
    o = qkv.new_empty(B, T, H, D)
    lse = torch.empty(B * H, T, device=qkv.device, dtype=torch.float32)
    dropout = seed is not None
    flags = torch.empty((B * H, T, _flag_bytes(T)) if dropout else (0,), device=qkv.device, dtype=torch.uint8)
    p, bits = drawn_p(p, cfg.dropout_bits), cfg.dropout_bits
    with _on_device(qkv):
        k.attn_fwd[(_cdiv(T, cfg.fwd_m), B * H)](
            # without dropout lse stands in for the pointers that a constexpr branch never reads
            qkv, o, lse, seed if dropout else lse, flags if dropout else lse, T, H, qkv.stride(0), qkv.stride(1),
            o.stride(0), o.stride(1), 1.0 / math.sqrt(D) * math.log2(math.e), round(p * (1 << bits)),
            1.0 / (1.0 - p) if dropout else 1.0,
            D=D, DROPOUT=dropout, BLOCK_M=cfg.fwd_m, BLOCK_N=cfg.fwd_n, BITS=bits, num_warps=cfg.fwd_warps,
            num_stages=cfg.fwd_stages, maxnreg=cfg.fwd_maxnreg or None,
        )  # fmt: skip
    return o, lse, flags


def _triton_backward(
    do: Tensor, qkv: Tensor, o: Tensor, lse: Tensor, flags: Tensor | None, p: float, need_dbias: bool = False
) -> tuple[Tensor, Tensor]:
    """(d(qkv), its column sums (3 H D,) fp32, empty unless ``need_dbias``); with dropout, ``flags`` are the
    forward's keep bits."""
    qkv, do, o = _check(qkv), do.contiguous(), o.contiguous()
    B, T, _, H, D = qkv.shape
    cfg, k = kernel_config(), _kernels()
    delta = torch.empty_like(lse)
    dqkv = torch.empty_like(qkv)
    dropout = flags is not None and flags.numel() > 0
    p = drawn_p(p, cfg.dropout_bits)  # the process's config must not change between the passes
    sm_scale = 1.0 / math.sqrt(D)
    n_blocks = max(_cdiv(T, cfg.bwd_m), _cdiv(T, cfg.bwd_n))
    common = (T, H, qkv.stride(0), qkv.stride(1), o.stride(0), o.stride(1), sm_scale * math.log2(math.e), sm_scale,
              1.0 / (1.0 - p) if dropout else 1.0, n_blocks)  # fmt: skip
    tiles = {
        "D": D,
        "DROPOUT": dropout,
        "HAS_DBIAS": need_dbias,
        "num_warps": cfg.bwd_warps,
        "num_stages": cfg.bwd_stages,
    }
    flags_arg = flags if dropout else lse  # a constexpr branch never reads it without dropout
    # each part is written by one program when both kernels have n_blocks blocks; otherwise the blocks that one
    # kernel lacks must hold zeros
    alloc = torch.empty if _cdiv(T, cfg.bwd_m) == _cdiv(T, cfg.bwd_n) else torch.zeros
    parts = alloc((B, n_blocks, 3, H, D) if need_dbias else (0,), device=qkv.device, dtype=torch.float32)
    parts_arg = parts if need_dbias else lse
    blocks = {"BLOCK_M": cfg.bwd_m, "BLOCK_N": cfg.bwd_n}
    with _on_device(qkv):
        k.attn_bwd_dq[(_cdiv(T, cfg.bwd_m), B * H)](  # first: it writes delta for the dk/dv kernel
            qkv, do, o, lse, delta, flags_arg, dqkv, parts_arg, *common, **blocks, **tiles
        )
        k.attn_bwd_dkdv[(_cdiv(T, cfg.bwd_n), B * H)](
            qkv, do, lse, delta, flags_arg, dqkv, parts_arg, *common, **blocks, **tiles
        )
    return dqkv, parts.sum((0, 1)).reshape(-1) if need_dbias else parts


def triton_keep(seed: Tensor, B: int, H: int, T: int, p: float) -> Tensor:
    """The (B, H, T, T) keep flags the forward kernel draws for ``seed`` (for tests and the reference), under the
    process's ``KernelConfig.dropout_bits``."""
    keep = torch.empty(B * H, T, T, device=seed.device, dtype=torch.uint8)
    bits = kernel_config().dropout_bits
    p_int = round(drawn_p(p, bits) * (1 << bits))
    with _on_device(seed):
        _kernels().attn_dropout_keep[(_cdiv(T, 16), B * H)](seed, keep, T, p_int, BLOCK_M=16, BLOCK_N=64, BITS=bits)
    return keep.view(B, H, T, T).bool()


# ---------------------------------------------------------------------------------------------
# The op: one opaque node for torch.compile, Triton on CUDA, the reference elsewhere


def _use_triton(t: Tensor) -> bool:
    return t.is_cuda and t.dtype in (torch.bfloat16, torch.float16) and triton_available()


def _flag_shape(qkv: Tensor, seed: Tensor | None) -> tuple[int, ...]:
    """The Triton forward's keep-bit bytes (the reference redraws from the seed instead and keeps none)."""
    B, T, _, H, _ = qkv.shape
    return (B * H, T, _flag_bytes(T)) if seed is not None and _use_triton(qkv) else (0,)


@torch.library.custom_op("jowa::causal_attention", mutates_args=())
def _attention(
    qkv: Tensor, seed: Tensor | None, p: float, qkv_bias: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """(o (B, T, H, D), lse (B H, T), flags) for qkv (B, T, 3, H, D); dropout with probability p iff ``seed`` is
    given; flags, the keep bits the backward reads, empty off Triton (the reference redraws from the seed).
    ``qkv_bias`` is not read: the op returns its gradient (``causal_attention``)."""
    if _use_triton(qkv):
        return _triton_forward(qkv, seed, p)
    B, T, _, H, _ = qkv.shape
    keep = None if seed is None else _reference_keep(seed, B, H, T, p, qkv.device)
    o, lse = _reference(qkv, keep, p)
    return o, lse, qkv.new_empty(0, dtype=torch.uint8)


@_attention.register_fake
def _(qkv, seed, p, qkv_bias=None):
    B, T, _, H, D = qkv.shape
    flags = qkv.new_empty(_flag_shape(qkv, seed), dtype=torch.uint8)
    return qkv.new_empty(B, T, H, D), qkv.new_empty(B * H, T, dtype=torch.float32), flags


@torch.library.custom_op("jowa::causal_attention_backward", mutates_args=())
def _attention_backward(
    do: Tensor, qkv: Tensor, o: Tensor, lse: Tensor, flags: Tensor, seed: Tensor | None, p: float, need_dbias: bool
) -> tuple[Tensor, Tensor]:
    """(d(qkv) packed (B, T, 3, H, D) like qkv, its column sums (3 H D,) fp32 or empty unless ``need_dbias``); with
    dropout the forward's ``flags``, or off Triton ``seed``."""
    if _use_triton(qkv):
        return _triton_backward(do, qkv, o, lse, flags if seed is not None else None, p, need_dbias)
    B, T, _, H, _ = qkv.shape
    keep = None if seed is None else _reference_keep(seed, B, H, T, p, qkv.device)
    dqkv, dbias = _reference_backward(do, qkv, keep, p)
    return dqkv, dbias.float() if need_dbias else dbias.new_empty(0, dtype=torch.float32)


@_attention_backward.register_fake
def _(do, qkv, o, lse, flags, seed, p, need_dbias):
    *_, H, D = qkv.shape
    return torch.empty_like(qkv), qkv.new_empty(3 * H * D if need_dbias else 0, dtype=torch.float32)


def _setup_context(ctx, inputs, output) -> None:
    qkv, seed, p, qkv_bias = inputs
    o, lse, flags = output
    ctx.save_for_backward(qkv, o, lse, flags, seed)
    ctx.p, ctx.bias_dtype = p, None if qkv_bias is None else qkv_bias.dtype


def _backward(ctx, do, _dlse, _dflags):
    qkv, o, lse, flags, seed = ctx.saved_tensors
    need = ctx.bias_dtype is not None
    dqkv, dbias = _attention_backward(do, qkv, o, lse, flags, seed, ctx.p, need)
    return dqkv, None, None, dbias.to(ctx.bias_dtype) if need else None


_attention.register_autograd(_backward, setup_context=_setup_context)


def causal_attention(qkv: Tensor, p: float, training: bool, qkv_bias: Tensor | None = None) -> Tensor:
    """Causal softmax attention with dropout, from the packed product of one QKV projection.

    Args:
        qkv: (B, T, 3, H, D) queries, keys and values, e.g. ``F.linear(x, w_qkv, b_qkv).view(B, T, 3, H, D)``.
        p, training: dropout probability on the attention probabilities, applied only when ``training``.
        qkv_bias: (3 H D,) the bias that qkv's product already added, given there detached
            (``F.linear(x, w_qkv, b_qkv.detach())``). The op does not read it; its backward returns its gradient,
            the column sums of d(qkv), which the Triton kernels sum as they write d(qkv) instead of in a pass of
            their own over it.
    Returns:
        (B, T, H, D) in qkv's dtype: ``scaled_dot_product_attention(q, k, v, is_causal=True)`` transposed.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"causal_attention needs 0 <= p < 1, got p={p}.")
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"causal_attention: qkv must be (B, T, 3, H, D), got {tuple(qkv.shape)}.")
    H, D = qkv.shape[3:]
    if qkv_bias is not None and qkv_bias.shape != (3 * H * D,):
        raise ValueError(f"causal_attention: qkv_bias {tuple(qkv_bias.shape)} must be ({3 * H * D},), 3 x H x D.")
    p = drawn_p(float(p)) if training else 0.0  # at dropout_bits=8, rounded to 1/256 on every path
    seed = torch.randint(2**62, (1,), device=qkv.device) if p > 0 else None
    return _attention(qkv, seed, p, qkv_bias)[0]
