"""The Triton kernels of ``jowa_core.models.fused_attention`` (imported on first CUDA use or by the interpreter tests:
importing triton is slow, and CPU-only paths never need it).

Flash attention (FlashAttention-2's loop order: the forward and ``dq`` over query blocks, ``dk``/``dv`` over key
blocks), causal, with dropout on the probabilities. Layout: queries, keys and values are read from the packed
(B, T, 3, H, D) output of one QKV product, the output is written (B, T, H, D), so the projection reads it as
(B, T, C) without a copy, and the backward writes its gradient packed like the input. The log-sum-exp is kept in
base 2 (``qk_scale`` = the softmax scale x log2 e), as is ``exp2``.

Dropout: the keep flags of head ``bh``'s probabilities come from Philox-4x32-7 calls of the seed, whose four
32-bit words give eight 16-bit uniforms (as ``fused_ln``'s packed mask). Call ``(bh * T + m) * G + 4 s + q`` (G =
4 cdiv(T, 32) calls a row) draws row m's keys 32 s + 8 c + 2 q + e (c < 4, e < 2): the low (e = 0) and high (e =
1) halves of word c. Those are the keys that one thread holds in the accumulator of Hopper's (and Ampere's) matrix
products, where lane l holds columns 8 c + 2 (l % 4) + e of its rows, so each thread draws and reads its own flags:
no exchange through shared memory (with consecutive keys per call, the forward spent 9 more barriers and about 55
more shared-memory accesses a thread on each pass). Keys are therefore taken in blocks of 32 or more. The forward
stores the flags as one byte per call (bit 2 c + e), (B H, T, G) bytes, an eighth of a bf16 probability; the
backward kernels read those bytes instead of running Philox again (they would each spend as many instructions on
it as the forward). ``KernelConfig.dropout_bits=8`` draws 8-bit uniforms instead, sixteen a call over 64 keys
(``_draw8``), and stores the same bytes.

The backward is two kernels, ``attn_bwd_dq`` then ``attn_bwd_dkdv``: 7 matrix products per pass between them. A
persistent kernel that owned a head at a time, with 5 products a pass and dq summed in fp32 in L2, ran 1.8 times
slower on an H100 (session 20: 3.3 ms against 1.84 a layer at jowa_150m's shape) and was removed.
"""

import triton
import triton.language as tl


@triton.jit
def _draw(seed, bh, T, offs_m, start_n, p16, BLOCK_N: tl.constexpr):
    """Keys ``start_n ..`` (multiples of 32) of rows ``offs_m``: ([BLOCK_M, BLOCK_N] keep flags, [BLOCK_M,
    BLOCK_N // 8] int32 flag bytes as stored). Each 16-bit half of a call's words is kept if >= p16 (p in 1/65536).
    Philox-4x32-7, as FlashAttention-2's dropout (and PyTorch's copy of it) draws: 7 rounds pass BigCrush (Salmon
    et al. 2011), 10 add margin."""
    S: tl.constexpr = BLOCK_N // 32
    calls = (start_n // 32 + tl.arange(0, S))[None, :, None] * 4 + tl.arange(0, 4)[None, None, :]
    pk = (bh * T + offs_m)[:, None, None] * (((T + 31) // 32) * 4) + calls  # [BLOCK_M, S, 4]: (row, span, quad)
    r0, r1, r2, r3 = tl.randint4x(seed, pk, n_rounds=7)
    # a 16-bit half is >= p16 iff its word, shifted so that half leads, is >= p16 << 16 (unsigned): no extraction
    t = p16.to(tl.uint32) << 16
    l0, l1 = ((r0 << 16) >= t).to(tl.int32), ((r1 << 16) >= t).to(tl.int32)
    l2, l3 = ((r2 << 16) >= t).to(tl.int32), ((r3 << 16) >= t).to(tl.int32)
    h0, h1 = (r0 >= t).to(tl.int32), (r1 >= t).to(tl.int32)
    h2, h3 = (r2 >= t).to(tl.int32), (r3 >= t).to(tl.int32)
    byte = _flag_byte(l0, h0, l1, h1, l2, h2, l3, h3)
    M: tl.constexpr = offs_m.shape[0]
    return _spread(l0, h0, l1, h1, l2, h2, l3, h3, M, BLOCK_N), tl.reshape(byte, (M, BLOCK_N // 8))


@triton.jit
def _flag_byte(x0, x1, x2, x3, x4, x5, x6, x7):
    """A call's stored flag byte from its eight int32 0/1 flags: x_k at bit k (bit 2 c + e)."""
    return x0 | (x1 << 1) | (x2 << 2) | (x3 << 3) | (x4 << 4) | (x5 << 5) | (x6 << 6) | (x7 << 7)


@triton.jit
def _kept(r, shift, t):
    """int32 flags: the byte of words ``r`` that a left shift by ``shift`` makes lead is >= ``t`` >> 24."""
    return ((r << shift) >= t).to(tl.int32)


@triton.jit
def _draw8(seed, bh, T, offs_m, start_n, p8, BLOCK_N: tl.constexpr):
    """``_draw`` with 8-bit uniforms (``KernelConfig.dropout_bits=8``), sixteen a call as FlashAttention-2 draws
    them, so half the calls: call ``(bh * T + m) * G + 4 u + q`` (G = 4 cdiv(T, 64)) draws row m's keys
    64 u + 32 t + 8 c + 2 q + e from byte 2 t + e of word c, keys of one thread's accumulator (``start_n`` a
    multiple of 64); a byte is kept if >= p8 (p in 1/256). Returns the keep flags and the flag bytes of spans
    2 u + t as [BLOCK_M, U, 4, 2] (row, pair, quad, t), which ``_flag_ptrs8`` stores as ``_draw``'s layout."""
    U: tl.constexpr = BLOCK_N // 64
    calls = (start_n // 64 + tl.arange(0, U))[None, :, None] * 4 + tl.arange(0, 4)[None, None, :]
    pk = (bh * T + offs_m)[:, None, None] * (((T + 63) // 64) * 4) + calls  # [BLOCK_M, U, 4]: (row, pair, quad)
    r0, r1, r2, r3 = tl.randint4x(seed, pk, n_rounds=7)
    t = p8.to(tl.uint32) << 24  # byte j leads its word shifted left by 24 - 8 j
    a0, a1, a2, a3 = _kept(r0, 24, t), _kept(r1, 24, t), _kept(r2, 24, t), _kept(r3, 24, t)  # byte 0: t = 0, e = 0
    b0, b1, b2, b3 = _kept(r0, 16, t), _kept(r1, 16, t), _kept(r2, 16, t), _kept(r3, 16, t)  # byte 1: t = 0, e = 1
    c0, c1, c2, c3 = _kept(r0, 8, t), _kept(r1, 8, t), _kept(r2, 8, t), _kept(r3, 8, t)  # byte 2: t = 1, e = 0
    d0, d1, d2, d3 = _kept(r0, 0, t), _kept(r1, 0, t), _kept(r2, 0, t), _kept(r3, 0, t)  # byte 3: t = 1, e = 1
    first, second = _flag_byte(a0, b0, a1, b1, a2, b2, a3, b3), _flag_byte(c0, d0, c1, d1, c2, d2, c3, d3)
    M: tl.constexpr = offs_m.shape[0]
    z = tl.join(_joined(a0, b0, a1, b1, a2, b2, a3, b3), _joined(c0, d0, c1, d1, c2, d2, c3, d3))
    keep = tl.reshape(tl.permute(z, (0, 1, 6, 5, 4, 2, 3)), (M, BLOCK_N)) != 0  # -> (.., t, c // 2, c % 2, q, e)
    return keep, tl.join(first, second)


@triton.jit
def _joined(x0, x1, x2, x3, x4, x5, x6, x7):
    """[.., 2, 2, 2] of eight flags: x_(4 i + 2 j + k) at [.., k, j, i] (tl.join adds the last axis)."""
    return tl.join(tl.join(tl.join(x0, x1), tl.join(x2, x3)), tl.join(tl.join(x4, x5), tl.join(x6, x7)))


@triton.jit
def _flag_ptrs8(FLAGS, bh, T, offs_m, start_n, BLOCK_N: tl.constexpr):
    """``_flag_ptrs`` shaped as ``_draw8``'s bytes, [BLOCK_M, U, 4, 2] (row, pair, quad, t): byte 4 (2 u + t) + q
    of the block's keys, and where they lie in the tensor."""
    groups = ((T + 31) // 32) * 4
    g = start_n // 8 + 8 * tl.arange(0, BLOCK_N // 64)[:, None, None] + tl.arange(0, 4)[None, :, None]
    g = g + 4 * tl.arange(0, 2)[None, None, :]  # [U, 4, 2]
    rows = (bh * T + offs_m)[:, None, None, None]
    return FLAGS + rows * groups + g[None], (offs_m < T)[:, None, None, None] & (g < groups)[None]


@triton.jit
def _spread(x0, x1, x2, x3, x4, x5, x6, x7, M: tl.constexpr, N: tl.constexpr):
    """[M, N] flags from the eight [M, N // 32, 4] (row, span, quad) ones of a call's bits: bit 2 c + e of call
    (m, s, q) is key 32 s + 8 c + 2 q + e. Joins, a permutation and a reshape, which lay the bits out as the
    products' accumulators hold them, so none crosses threads."""
    z = _joined(x0, x1, x2, x3, x4, x5, x6, x7)
    return tl.reshape(tl.permute(z, (0, 1, 5, 4, 2, 3)), (M, N)) != 0  # (.., q, e, c % 2, c // 2) -> (.., c, q, e)


@triton.jit
def _unpack(byte):
    """[BLOCK_M, 8 x width] keep flags from [BLOCK_M, width] flag bytes as ``_draw`` stores them."""
    M: tl.constexpr = byte.shape[0]
    W: tl.constexpr = byte.shape[1]
    b = tl.reshape(byte, (M, W // 4, 4))
    return _spread(b & 1, b & 2, b & 4, b & 8, b & 16, b & 32, b & 64, b & 128, M, W * 8)


@triton.jit
def _flag_ptrs(FLAGS, bh, T, offs_m, start_n, BLOCK_N: tl.constexpr):
    """Pointers to the flag bytes of rows ``offs_m`` and keys ``start_n ..``, and where they lie in the tensor."""
    groups = ((T + 31) // 32) * 4
    g = start_n // 8 + tl.arange(0, BLOCK_N // 8)
    return FLAGS + (bh * T + offs_m)[:, None] * groups + g[None, :], (offs_m < T)[:, None] & (g < groups)[None, :]


@triton.jit
def _fwd_pass(acc, l_i, m_i, q, base, SEED, FLAGS, bh, T, H, s_t, qk_scale, p_int, offs_m, start_n,
              D: tl.constexpr, DROPOUT: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr,
              BITS: tl.constexpr):  # fmt: skip
    """One block of keys for the forward's online softmax; ``MASKED``: the block crosses the causal diagonal (or
    the sequence's end), so the mask applies; the blocks before it are seen whole and skip it."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    kv_mask = (offs_n < T)[:, None] if MASKED else None  # keys before the diagonal block all lie inside T
    k = tl.load(base + H * D + offs_n[:, None] * s_t, mask=kv_mask, other=0.0 if MASKED else None)
    s = tl.dot(q, tl.trans(k)) * qk_scale
    if MASKED:
        s = tl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)  # the normaliser counts every probability, dropped or not
    if DROPOUT:
        if BITS == 16:
            keep, byte = _draw(tl.load(SEED), bh, T, offs_m, start_n, p_int, BLOCK_N)
            ptrs, inside = _flag_ptrs(FLAGS, bh, T, offs_m, start_n, BLOCK_N)
        else:
            keep, byte = _draw8(tl.load(SEED), bh, T, offs_m, start_n, p_int, BLOCK_N)
            ptrs, inside = _flag_ptrs8(FLAGS, bh, T, offs_m, start_n, BLOCK_N)
        tl.store(ptrs, byte.to(tl.uint8), mask=inside)
        p = tl.where(keep, p, 0.0)
    v = tl.load(base + 2 * H * D + offs_n[:, None] * s_t, mask=kv_mask, other=0.0 if MASKED else None)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, l_i, m_new


@triton.jit
def attn_fwd(QKV, O, LSE, SEED, FLAGS, T, H, s_b, s_t, s_o_b, s_o_t, qk_scale, p_int, drop_scale,
             D: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BITS: tl.constexpr = 16):  # fmt: skip
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    base = QKV + b * s_b + h * D + offs_d[None, :]  # the (3, H, D) axes are contiguous: q at 0, k at H D, v at 2 H D
    q = tl.load(base + offs_m[:, None] * s_t, mask=(offs_m < T)[:, None], other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    whole = (start_m // BLOCK_N) * BLOCK_N  # keys before it precede every query of the block
    for start_n in range(0, whole, BLOCK_N):
        acc, l_i, m_i = _fwd_pass(acc, l_i, m_i, q, base, SEED, FLAGS, bh, T, H, s_t, qk_scale, p_int, offs_m,
                                  start_n, D, DROPOUT, False, BLOCK_N, BITS)  # fmt: skip
    for start_n in range(whole, tl.minimum(start_m + BLOCK_M, T), BLOCK_N):
        acc, l_i, m_i = _fwd_pass(acc, l_i, m_i, q, base, SEED, FLAGS, bh, T, H, s_t, qk_scale, p_int, offs_m,
                                  start_n, D, DROPOUT, True, BLOCK_N, BITS)  # fmt: skip
    acc = acc * (drop_scale / l_i)[:, None]
    o_ptr = O + b * s_o_b + h * D + offs_m[:, None] * s_o_t + offs_d[None, :]
    tl.store(o_ptr, acc.to(O.dtype.element_ty), mask=(offs_m < T)[:, None])
    tl.store(LSE + bh * T + offs_m, m_i + tl.log2(l_i), mask=offs_m < T)


@triton.jit
def _dkdv_pass(dk, dv, k, v, base, do_base, LSE, DELTA, FLAGS, bh, T, s_t, s_o_t, qk_scale, drop_scale, offs_n,
               start_n, start_m, DROPOUT: tl.constexpr, MASKED: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr):  # fmt: skip
    """One block of queries against the kernel's keys. Rows past T read lse = +inf, so their probabilities are 0
    without a mask; ``MASKED`` adds the causal one, for blocks that cross the diagonal."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    rows = offs_m < T
    q = tl.load(base + offs_m[:, None] * s_t, mask=rows[:, None], other=0.0)
    do = tl.load(do_base + offs_m[:, None] * s_o_t, mask=rows[:, None], other=0.0)
    lse = tl.load(LSE + bh * T + offs_m, mask=rows, other=float("inf"))
    delta = tl.load(DELTA + bh * T + offs_m, mask=rows, other=0.0)
    p = tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])
    if MASKED:
        p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v))
    if DROPOUT:  # flags past the causal edge were never written: p is 0 there, so they do not matter
        ptrs, inside = _flag_ptrs(FLAGS, bh, T, offs_m, start_n, BLOCK_N)
        keep = _unpack(tl.load(ptrs, mask=inside, other=0).to(tl.int32))
        pd = tl.where(keep, p * drop_scale, 0.0)
        dp = tl.where(keep, dp * drop_scale, 0.0)
    else:
        pd = p
    dv += tl.dot(tl.trans(pd.to(do.dtype)), do)
    ds = (p * (dp - delta[:, None])).to(q.dtype)
    dk += tl.dot(tl.trans(ds), q)
    return dk, dv


@triton.jit
def attn_bwd_dkdv(QKV, DO, LSE, DELTA, FLAGS, DQKV, DBIAS, T, H, s_b, s_t, s_o_b, s_o_t, qk_scale, sm_scale,
                  drop_scale, n_blocks, D: tl.constexpr, DROPOUT: tl.constexpr, HAS_DBIAS: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """One block of keys: dk and dv summed over the query blocks that see them (causal: from the block's start);
    with ``HAS_DBIAS`` also their column sums, this block's share of the key and value biases' gradients."""
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    offs_d = tl.arange(0, D)
    base = QKV + b * s_b + h * D + offs_d[None, :]
    do_base = DO + b * s_o_b + h * D + offs_d[None, :]
    start_n = tl.program_id(0) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    kv_mask = (offs_n < T)[:, None]
    k = tl.load(base + H * D + offs_n[:, None] * s_t, mask=kv_mask, other=0.0)
    v = tl.load(base + 2 * H * D + offs_n[:, None] * s_t, mask=kv_mask, other=0.0)
    dk = tl.zeros((BLOCK_N, D), tl.float32)
    dv = tl.zeros((BLOCK_N, D), tl.float32)
    whole = ((start_n + BLOCK_N + BLOCK_M - 1) // BLOCK_M) * BLOCK_M  # query blocks from here see every key
    for start_m in range((start_n // BLOCK_M) * BLOCK_M, tl.minimum(whole, T), BLOCK_M):
        dk, dv = _dkdv_pass(dk, dv, k, v, base, do_base, LSE, DELTA, FLAGS, bh, T, s_t, s_o_t, qk_scale, drop_scale,
                            offs_n, start_n, start_m, DROPOUT, True, BLOCK_M, BLOCK_N)  # fmt: skip
    for start_m in range(whole, T, BLOCK_M):
        dk, dv = _dkdv_pass(dk, dv, k, v, base, do_base, LSE, DELTA, FLAGS, bh, T, s_t, s_o_t, qk_scale, drop_scale,
                            offs_n, start_n, start_m, DROPOUT, False, BLOCK_M, BLOCK_N)  # fmt: skip
    dk = dk * sm_scale
    out = DQKV + b * s_b + h * D + offs_n[:, None] * s_t + offs_d[None, :]
    tl.store(out + H * D, dk.to(DQKV.dtype.element_ty), mask=kv_mask)
    tl.store(out + 2 * H * D, dv.to(DQKV.dtype.element_ty), mask=kv_mask)
    if HAS_DBIAS:  # (B, n_blocks, 3, H, D) partial sums; rows past T hold zeros
        part = DBIAS + ((b * n_blocks + tl.program_id(0)) * 3 * H + h) * D + offs_d
        tl.store(part + H * D, tl.sum(dk, 0))
        tl.store(part + 2 * H * D, tl.sum(dv, 0))


@triton.jit
def _dq_pass(dq, q, do, lse, delta, base, FLAGS, bh, T, H, s_t, qk_scale, drop_scale, offs_m, start_n,
             D: tl.constexpr, DROPOUT: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """One block of keys against the kernel's queries (rows past T: lse = +inf, so p = 0)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    kv_mask = (offs_n < T)[:, None] if MASKED else None  # keys before the diagonal block all lie inside T
    k = tl.load(base + H * D + offs_n[:, None] * s_t, mask=kv_mask, other=0.0 if MASKED else None)
    v = tl.load(base + 2 * H * D + offs_n[:, None] * s_t, mask=kv_mask, other=0.0 if MASKED else None)
    p = tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])
    if MASKED:
        p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v))
    if DROPOUT:
        ptrs, inside = _flag_ptrs(FLAGS, bh, T, offs_m, start_n, BLOCK_N)
        keep = _unpack(tl.load(ptrs, mask=inside, other=0).to(tl.int32))
        dp = tl.where(keep, dp * drop_scale, 0.0)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k)


@triton.jit
def attn_bwd_dq(QKV, DO, O, LSE, DELTA, FLAGS, DQKV, DBIAS, T, H, s_b, s_t, s_o_b, s_o_t, qk_scale, sm_scale,
                drop_scale, n_blocks, D: tl.constexpr, DROPOUT: tl.constexpr, HAS_DBIAS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """One block of queries: dq summed over the key blocks it sees (and with ``HAS_DBIAS`` its column sums). It
    runs first: it also writes delta = rowsum(dO * O) for its rows, which the dk/dv kernel reads. (With dropout
    that still equals rowsum(P * dP), dP holding the mask.)"""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    rows = offs_m < T
    base = QKV + b * s_b + h * D + offs_d[None, :]
    q = tl.load(base + offs_m[:, None] * s_t, mask=rows[:, None], other=0.0)
    o_offs = b * s_o_b + h * D + offs_m[:, None] * s_o_t + offs_d[None, :]
    do = tl.load(DO + o_offs, mask=rows[:, None], other=0.0)
    lse = tl.load(LSE + bh * T + offs_m, mask=rows, other=float("inf"))
    delta = tl.sum(tl.load(O + o_offs, mask=rows[:, None], other=0.0).to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh * T + offs_m, delta, mask=rows)
    dq = tl.zeros((BLOCK_M, D), tl.float32)
    whole = (start_m // BLOCK_N) * BLOCK_N  # keys before it precede every query of the block
    for start_n in range(0, whole, BLOCK_N):
        dq = _dq_pass(dq, q, do, lse, delta, base, FLAGS, bh, T, H, s_t, qk_scale, drop_scale, offs_m, start_n, D,
                      DROPOUT, False, BLOCK_N)  # fmt: skip
    for start_n in range(whole, tl.minimum(start_m + BLOCK_M, T), BLOCK_N):
        dq = _dq_pass(dq, q, do, lse, delta, base, FLAGS, bh, T, H, s_t, qk_scale, drop_scale, offs_m, start_n, D,
                      DROPOUT, True, BLOCK_N)  # fmt: skip
    dq = dq * sm_scale
    out = DQKV + b * s_b + h * D + offs_m[:, None] * s_t + offs_d[None, :]
    tl.store(out, dq.to(DQKV.dtype.element_ty), mask=rows[:, None])
    if HAS_DBIAS:
        tl.store(DBIAS + ((b * n_blocks + tl.program_id(0)) * 3 * H + h) * D + offs_d, tl.sum(dq, 0))


@triton.jit
def attn_dropout_keep(SEED, KEEP, T, p_int, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BITS: tl.constexpr = 16):
    """The keep flags the forward draws, as a (BH, T, T) uint8 tensor: for tests, which give them to the reference."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1)
    seed = tl.load(SEED)
    for start_n in range(0, T, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if BITS == 16:
            keep, _ = _draw(seed, bh, T, offs_m, start_n, p_int, BLOCK_N)
        else:
            keep, _ = _draw8(seed, bh, T, offs_m, start_n, p_int, BLOCK_N)
        m = (offs_m < T)[:, None] & (offs_n < T)[None, :]
        tl.store(KEEP + (bh * T + offs_m[:, None]) * T + offs_n[None, :], keep.to(tl.uint8), mask=m)
