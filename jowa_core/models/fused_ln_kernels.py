"""The Triton kernels of ``jowa_core.models.fused_ln`` (imported on first CUDA use or by the interpreter tests:
importing triton is slow, and CPU-only paths never need it). Module-level, so that the kernels' helpers are found
in their globals, as the interpreter needs.

The packed dropout mask: Philox call ``ROW_CALLS * row + k`` (``ROW_CALLS`` = next_power_of_2(C) / 8) draws the
8 flags of columns 8 k to 8 k + 7 (its four 32-bit words, each two 16-bit uniforms). The forward draws it; the
backward draws it again under ``recompute_mask``, a whole row or a tile of it (``bwd_split``), with the same
numbering.
"""

import triton
import triton.language as tl


@triton.jit
def _packed_keep(seed, rows, FIRST_CALL: tl.constexpr, ROW_CALLS: tl.constexpr, WIDTH: tl.constexpr, p16):
    """[rows, WIDTH] keep flags of columns 8 FIRST_CALL .. 8 FIRST_CALL + WIDTH - 1: one Philox call per 8."""
    pk = rows[:, None] * ROW_CALLS + FIRST_CALL + tl.arange(0, WIDTH // 8)[None, :]  # never repeats
    r0, r1, r2, r3 = tl.randint4x(seed, pk)
    words = tl.interleave(tl.interleave(r0, r1), tl.interleave(r2, r3)).to(tl.int32, bitcast=True)
    return tl.interleave(words & 0xFFFF, (words >> 16) & 0xFFFF) >= p16  # >> sign-extends: mask


@triton.jit
def _tile_xhat_dy(XN, DY, offs, m, mean, rstd):
    """A tile's normalised x_new (0 where masked) and its y gradient, in fp32."""
    xhat = (tl.load(XN + offs, mask=m, other=0.0).to(tl.float32) - mean[:, None]) * rstd[:, None]
    return tl.where(m, xhat, 0.0), tl.load(DY + offs, mask=m, other=0.0).to(tl.float32)


@triton.jit
def _tile_grad(g, xhat, c1, c2, rstd, DXN, DX, DH, MASK, offs, m, keep_drawn, scale,
               HAS_DXN: tl.constexpr, HAS_DX: tl.constexpr, DROPOUT: tl.constexpr, RECOMPUTE_MASK: tl.constexpr):  # fmt: skip
    """A tile's x_new gradient (LayerNorm's backward of g = dy w, plus the residual's), stored as dx, and h's,
    stored as dh after the dropout (the stored mask, or ``keep_drawn`` under ``RECOMPUTE_MASK``); returns dh."""
    g = (g - c2[:, None] - xhat * c1[:, None]) * rstd[:, None]
    if HAS_DXN:
        g += tl.load(DXN + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_DX:
        tl.store(DX + offs, g.to(DX.dtype.element_ty), mask=m)
    if DROPOUT:
        if RECOMPUTE_MASK:
            keep = keep_drawn
        else:
            keep = tl.load(MASK + offs, mask=m, other=0) != 0
        g = tl.where(keep, g * scale, 0.0)
    tl.store(DH + offs, g.to(DH.dtype.element_ty), mask=m)
    return g


@triton.jit
def dropout_add_layer_norm_fwd(X, H, W, B, XN, Y, MEAN, RSTD, MASK, SEED, HB, N, C, p, p16, scale, eps,
        HAS_X: tl.constexpr, DROPOUT: tl.constexpr, PACKED_RNG: tl.constexpr, STORE_MASK: tl.constexpr,
        HAS_HB: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    m = (rows < N)[:, None] & cmask[None, :]
    offs = rows[:, None] * C + cols[None, :]  # int32: the wrapper checks N * C < 2**31
    d = tl.load(H + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_HB:
        d += tl.load(HB + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if DROPOUT:
        if PACKED_RNG:
            keep = _packed_keep(tl.load(SEED), rows, 0, BLOCK_C // 8, BLOCK_C, p16)
        else:
            keep = tl.rand(tl.load(SEED), offs) >= p
        if STORE_MASK:
            tl.store(MASK + offs, keep.to(tl.uint8), mask=m)
        d = tl.where(keep, d * scale, 0.0)
    if HAS_X:
        d += tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
    xn = d.to(XN.dtype.element_ty)
    tl.store(XN + offs, xn, mask=m)
    xn = xn.to(tl.float32)  # normalise what is stored, as LayerNorm on x_new would
    mean = tl.sum(xn, axis=1) / C
    xc = tl.where(m, xn - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / C + eps)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=m)
    tl.store(MEAN + rows, mean, mask=rows < N)
    tl.store(RSTD + rows, rstd, mask=rows < N)


@triton.jit
def dropout_add_layer_norm_bwd(DY, DXN, XN, W, MEAN, RSTD, MASK, SEED, DX, DH, DW, DB, DHB, N, C, p16, scale,
        HAS_DXN: tl.constexpr, HAS_DX: tl.constexpr, DROPOUT: tl.constexpr, RECOMPUTE_MASK: tl.constexpr,
        HAS_HB: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr, STAGES: tl.constexpr):  # fmt: skip
    # each program strides over row blocks and keeps its own partial dweight/dbias (one row of DW/DB)
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    # 2-D accumulators: elementwise adds in the loop, one reduction over rows at the end
    dw = tl.zeros((BLOCK_ROWS, BLOCK_C), dtype=tl.float32)
    db = tl.zeros((BLOCK_ROWS, BLOCK_C), dtype=tl.float32)
    dhb = tl.zeros((BLOCK_ROWS, BLOCK_C), dtype=tl.float32)  # h's bias: dh's column sums (HAS_HB)
    # STAGES > 1: the next row blocks' loads in flight while this one is computed (1: a plain loop)
    for start in tl.range(pid * BLOCK_ROWS, N, tl.num_programs(0) * BLOCK_ROWS, num_stages=STAGES):
        rows = start + tl.arange(0, BLOCK_ROWS)
        m = (rows < N)[:, None] & cmask[None, :]
        offs = rows[:, None] * C + cols[None, :]
        mean = tl.load(MEAN + rows, mask=rows < N, other=0.0)
        rstd = tl.load(RSTD + rows, mask=rows < N, other=0.0)
        xhat, dy = _tile_xhat_dy(XN, DY, offs, m, mean, rstd)
        dw += dy * xhat
        db += dy
        g = dy * w[None, :]
        c1 = tl.sum(g * xhat, axis=1) / C
        c2 = tl.sum(g, axis=1) / C
        keep = _packed_keep(tl.load(SEED), rows, 0, BLOCK_C // 8, BLOCK_C, p16) if RECOMPUTE_MASK else None
        g = _tile_grad(g, xhat, c1, c2, rstd, DXN, DX, DH, MASK, offs, m, keep, scale,
                       HAS_DXN, HAS_DX, DROPOUT, RECOMPUTE_MASK)  # fmt: skip
        if HAS_HB:
            dhb += g  # stored masked: columns past C never reach DHB
    tl.store(DW + pid * C + cols, tl.sum(dw, axis=0), mask=cmask)
    tl.store(DB + pid * C + cols, tl.sum(db, axis=0), mask=cmask)
    if HAS_HB:
        tl.store(DHB + pid * C + cols, tl.sum(dhb, axis=0), mask=cmask)


@triton.jit
def dropout_add_layer_norm_bwd_split(DY, DXN, XN, W, MEAN, RSTD, MASK, SEED, DX, DH, DW, DB, DHB, N, C, p16,
        scale, HAS_DXN: tl.constexpr, HAS_DX: tl.constexpr, DROPOUT: tl.constexpr, RECOMPUTE_MASK: tl.constexpr,
        HAS_HB: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
        ROW_CALLS: tl.constexpr, STAGES: tl.constexpr):  # fmt: skip
    """``dropout_add_layer_norm_bwd`` with each row as two power-of-two tiles, A (columns 0 .. BLOCK_A - 1, all
    below C) and B (the rest, masked past C), each keeping its own partial sums (``KernelConfig.bwd_split``)."""
    pid = tl.program_id(0)
    ca = tl.arange(0, BLOCK_A)
    cb = BLOCK_A + tl.arange(0, BLOCK_B)
    mb = cb < C
    wa = tl.load(W + ca).to(tl.float32)
    wb = tl.load(W + cb, mask=mb, other=0.0).to(tl.float32)
    dwa = tl.zeros((BLOCK_ROWS, BLOCK_A), dtype=tl.float32)
    dba = tl.zeros((BLOCK_ROWS, BLOCK_A), dtype=tl.float32)
    dhba = tl.zeros((BLOCK_ROWS, BLOCK_A), dtype=tl.float32)
    dwb = tl.zeros((BLOCK_ROWS, BLOCK_B), dtype=tl.float32)
    dbb = tl.zeros((BLOCK_ROWS, BLOCK_B), dtype=tl.float32)
    dhbb = tl.zeros((BLOCK_ROWS, BLOCK_B), dtype=tl.float32)
    for start in tl.range(pid * BLOCK_ROWS, N, tl.num_programs(0) * BLOCK_ROWS, num_stages=STAGES):
        rows = start + tl.arange(0, BLOCK_ROWS)
        rm = rows < N
        ma = rm[:, None] & (ca < C)[None, :]
        mbb = rm[:, None] & mb[None, :]
        oa = rows[:, None] * C + ca[None, :]
        ob = rows[:, None] * C + cb[None, :]
        mean = tl.load(MEAN + rows, mask=rm, other=0.0)
        rstd = tl.load(RSTD + rows, mask=rm, other=0.0)
        xa, dya = _tile_xhat_dy(XN, DY, oa, ma, mean, rstd)
        xb, dyb = _tile_xhat_dy(XN, DY, ob, mbb, mean, rstd)
        dwa += dya * xa
        dba += dya
        dwb += dyb * xb
        dbb += dyb
        ga = dya * wa[None, :]
        gb = dyb * wb[None, :]
        c1 = (tl.sum(ga * xa, axis=1) + tl.sum(gb * xb, axis=1)) / C
        c2 = (tl.sum(ga, axis=1) + tl.sum(gb, axis=1)) / C
        ka = _packed_keep(tl.load(SEED), rows, 0, ROW_CALLS, BLOCK_A, p16) if RECOMPUTE_MASK else None
        kb = _packed_keep(tl.load(SEED), rows, BLOCK_A // 8, ROW_CALLS, BLOCK_B, p16) if RECOMPUTE_MASK else None
        ga = _tile_grad(ga, xa, c1, c2, rstd, DXN, DX, DH, MASK, oa, ma, ka, scale,
                        HAS_DXN, HAS_DX, DROPOUT, RECOMPUTE_MASK)  # fmt: skip
        gb = _tile_grad(gb, xb, c1, c2, rstd, DXN, DX, DH, MASK, ob, mbb, kb, scale,
                        HAS_DXN, HAS_DX, DROPOUT, RECOMPUTE_MASK)  # fmt: skip
        if HAS_HB:
            dhba += ga
            dhbb += gb
    tl.store(DW + pid * C + ca, tl.sum(dwa, axis=0))
    tl.store(DW + pid * C + cb, tl.sum(dwb, axis=0), mask=mb)
    tl.store(DB + pid * C + ca, tl.sum(dba, axis=0))
    tl.store(DB + pid * C + cb, tl.sum(dbb, axis=0), mask=mb)
    if HAS_HB:
        tl.store(DHB + pid * C + ca, tl.sum(dhba, axis=0))
        tl.store(DHB + pid * C + cb, tl.sum(dhbb, axis=0), mask=mb)
