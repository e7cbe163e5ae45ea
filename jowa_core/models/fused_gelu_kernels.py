"""The Triton kernels of ``jowa_core.models.fused_gelu`` (imported on first CUDA use or by the interpreter tests:
importing triton is slow, and CPU-only paths never need it)."""

import triton
import triton.language as tl


@triton.jit
def _cdf_and_gauss(x, FAST_RCP: tl.constexpr):
    """(Phi(x), exp(-x^2 / 2)) with one reciprocal and one exponential: Abramowitz & Stegun 26.2.17 (their
    7.1.26 for erf at x / sqrt 2), Phi(-|x|) = t (b1 + t (b2 + t (b3 + t (b4 + t b5)))) exp(-x^2 / 2),
    t = 1 / (1 + 0.2316419 |x|), the b's here over sqrt(2 pi) so that the exponential serves the density too.
    ``FAST_RCP`` (CUDA): the reciprocal as one ``rcp.approx`` instruction, not ``div.full``'s eight with their
    range checks (its operand lies in [1, inf)); the interpreter, which runs no PTX, divides."""
    d = tl.fma(tl.abs(x), 0.2316418882663604, 1.0)
    if FAST_RCP:
        t = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [d], dtype=tl.float32, is_pure=True, pack=1)
    else:
        t = 1.0 / d
    e = tl.exp2(x * x * -0.7213475204444817)  # exp(-x^2 / 2)
    tail = t * (0.127414796 + t * (-0.142248368 + t * (0.7107068705 + t * (-0.7265760135 + t * 0.5307027145)))) * e
    return tl.where(x >= 0, 1.0 - tail, tail), e


@triton.jit
def bias_gelu_fwd(H, B, Y, N, C, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FAST_RCP: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = (rows < N)[:, None] & (cols < C)[None, :]
    offs = rows[:, None] * C + cols[None, :]  # int32: the wrapper checks N * C < 2**31
    x = tl.load(H + offs, mask=m, other=0.0).to(tl.float32)
    x += tl.load(B + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]
    cdf, _ = _cdf_and_gauss(x, FAST_RCP)
    tl.store(Y + offs, (x * cdf).to(Y.dtype.element_ty), mask=m)


@triton.jit
def bias_gelu_bwd(DY, H, B, DH, DB, N, C, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FAST_RCP: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < C
    b = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
    db = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # elementwise adds in the loop, one sum at the end
    for start in range(pid * BLOCK_M, N, tl.num_programs(0) * BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        m = (rows < N)[:, None] & cmask[None, :]
        offs = rows[:, None] * C + cols[None, :]
        x = tl.load(H + offs, mask=m, other=0.0).to(tl.float32) + b[None, :]
        cdf, e = _cdf_and_gauss(x, FAST_RCP)
        g = tl.load(DY + offs, mask=m, other=0.0).to(tl.float32) * (cdf + x * e * 0.3989422804014327)
        tl.store(DH + offs, g.to(DH.dtype.element_ty), mask=m)
        db += tl.where(m, g, 0.0)
    tl.store(DB + pid * C + cols, tl.sum(db, axis=0), mask=cmask)
