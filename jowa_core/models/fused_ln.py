"""Fused "dropout + residual add + LayerNorm", one op for the pre-LN transformer's residual stream.

``dropout_add_layer_norm(x, h, weight, bias, p, training)`` returns ``x_new = x + dropout(h)`` and
``y = layer_norm(x_new)``. Why a hand-written op: inductor fuses exactly this pattern but runs each row
of 768 on one warp with ~200 registers, latency-bound at 12-18 % occupancy (Nsight Compute on an H200,
README "Performance"); the Triton kernels (``fused_ln_kernels``) put one or two rows on a program of 4 warps
(``KernelConfig``, swept on an H100: jowa_150m's step 258.5 -> 236.3 ms, session 13).
Registered with ``torch.library.custom_op`` so that it stays one opaque op inside ``torch.compile``.

Dispatch: Triton kernels on CUDA when ``triton`` imports, else a pure-torch reference of the same math
(CPU, tests). Dtype rule: ``x_new`` keeps x's dtype; every sum and the normalisation run in fp32 (or
fp64 for fp64 inputs); ``y`` comes out in ``out_dtype``, by default h's dtype, i.e. the dtype the next
matmul consumes under autocast. ``nn.LayerNorm`` under autocast returns fp32 that the next ``Linear``
rounds to bf16; rounding the same fp32 value here once gives the matmul the same input.

Dropout mask: drawn in the forward from a seed that ``torch.randint`` takes from torch's generator on
x's device (reproducible under ``torch.manual_seed``) and kept as uint8, one byte per element, for the
backward: the same memory as the bool mask inductor saves today, and the backward, already the slower
kernel, reads one byte instead of re-running Philox.
"""

import contextlib
import functools
import json
from dataclasses import dataclass
from typing import Generic, Self, TypeVar

import torch
from torch import Tensor

C = TypeVar("C")

# ---------------------------------------------------------------------------------------------
# Pure-torch reference (CPU, no Triton, tests)


def _reference_mask(h: Tensor, seed: Tensor, p: float) -> Tensor:
    """uint8 keep mask (1 = kept, probability 1 - p) drawn from a generator seeded with ``seed`` (on a GPU
    without Triton, reading the seed waits for the device: a fallback, not a fast path)."""
    g = torch.Generator(device=h.device)
    g.manual_seed(int(seed.item()))
    return (torch.rand(h.shape, generator=g, device=h.device) >= p).to(torch.uint8)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _reference_forward(
    x: Tensor | None, h: Tensor, weight: Tensor, bias: Tensor, mask: Tensor | None, p: float, eps: float,
    out_dtype: torch.dtype, h_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(x_new, y, mean, rstd) for 2-D (N, C) inputs and a given keep mask (None: no dropout); ``h_bias`` (C,)
    is added to h before the dropout."""
    res_dtype = h.dtype if x is None else x.dtype
    cd = _compute_dtype(res_dtype)
    with torch.autocast(h.device.type, enabled=False):
        d = h.to(cd, copy=True) if h_bias is None else h.to(cd) + h_bias.to(cd)
        d = d if mask is None else d * mask.to(cd) * (1.0 / (1.0 - p))
        x_new = (d if x is None else x.to(cd) + d).to(res_dtype)
        C = x_new.shape[-1]
        y, mean, rstd = torch.native_layer_norm(x_new.to(cd), [C], weight.to(cd), bias.to(cd), eps)
    return x_new, y.to(out_dtype), mean.view(-1), rstd.view(-1)


def _reference_backward(
    dy: Tensor, dxn: Tensor | None, x_new: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor, mask: Tensor | None,
    p: float, h_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(dx, dh, dweight, dbias, dh_bias): d(x_new) total = dxn + LN-backward(dy); dx = that; dh = that * mask /
    (1 - p); dh_bias, the gradient of a bias added to h, is dh's column sums (in the compute dtype, fp32 or fp64)."""
    cd = mean.dtype
    with torch.autocast(dy.device.type, enabled=False):
        C = x_new.shape[-1]
        w = weight.to(cd)  # also stands in for the bias, of which aten reads only the shape
        g, dw, db = torch.ops.aten.native_layer_norm_backward(
            dy.to(cd), x_new.to(cd), [C], mean.view(-1, 1), rstd.view(-1, 1), w, w, [True, True, True]
        )
        if dxn is not None:
            g = g + dxn.to(cd)
        dh = g * (1.0 if mask is None else mask.to(cd) * (1.0 / (1.0 - p)))
    return g.to(x_new.dtype), dh.to(h_dtype), dw.to(weight.dtype), db.to(weight.dtype), dh.sum(0)


# ---------------------------------------------------------------------------------------------
# Triton kernels (CUDA; also run on CPU by Triton's interpreter in the tests)


@functools.cache
def triton_available() -> bool:
    """Whether triton imports (asked only for CUDA tensors: CPU paths never import it)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class TileConfig:
    """What the fused ops' ``KernelConfig`` dataclasses share: loading one from JSON (as an op's sweep writes it
    with ``--best``) and checking the integer fields Triton's tiles are made of."""

    NAME = "KernelConfig"  # how errors name the class

    @classmethod
    def from_json(cls, path: str) -> Self:
        """A config as an op's sweep writes it with ``--best``; missing fields keep the defaults."""
        with open(path) as f:
            fields = json.load(f)
        unknown = set(fields) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown {cls.NAME} fields {sorted(unknown)}; known: "
                             f"{', '.join(cls.__dataclass_fields__)}.")  # fmt: skip
        return cls(**fields)

    def check_booleans(self, names: tuple[str, ...]) -> None:
        """TypeError unless each of ``names`` is a bool (a JSON config could hold "yes" or 1)."""
        for name in names:
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{self.NAME}.{name} must be true or false, got {getattr(self, name)!r}.")

    def check_integers(self, names: tuple[str, ...], powers_of_two: tuple[str, ...], least_power: int = 1) -> None:
        """TypeError unless each of ``names`` is an int (a JSON config could hold 2.0 or true), ValueError if one is
        below 1 or one of ``powers_of_two`` is not a power of two >= ``least_power``."""
        for name in names:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{self.NAME}.{name} must be an integer, got {v!r}.")
            if v < 1:
                raise ValueError(f"{self.NAME}.{name} must be >= 1 (each of these fields is an integer >= 1), got {v}.")
        for name in powers_of_two:
            v = getattr(self, name)
            if v < least_power or v & (v - 1):
                raise ValueError(f"{self.NAME}.{name} must be a power of two >= {least_power} (Triton tiles), got {v}.")


class ConfigSlot(Generic[C]):
    """One op's process-wide ``KernelConfig``, like torch.backends flags: ``get`` it, or ``set`` another for every
    later launch (benchmarks sweep tiles this way) and get the previous one back."""

    def __init__(self, config: C) -> None:
        self._config = config

    def get(self) -> C:
        return self._config

    def set(self, config: C) -> C:
        previous, self._config = self._config, config
        return previous


@dataclass(frozen=True)
class KernelConfig(TileConfig):
    """Tile sizes of the Triton kernels: rows per tile, warps per program, and the backward's programs per
    SM (it is persistent: each program strides over row tiles and keeps one partial dweight/dbias row).
    The defaults are the fastest of ``benchmarks/fused_ln_sweep.py`` at jowa_150m's shape on an H100
    (session 13: forward 0.62 ms, backward 0.73 ms per 151,552 x 768 call; the first guess, 4 rows of 8
    warps and 8 programs per SM, took 0.73 and 0.85 ms).

    ``packed_rng`` (on by default): the forward draws its dropout mask with one Philox call per 8 elements (its
    four 32-bit words, each split into two 16-bit uniforms; p rounded to a multiple of 1/65536) instead of one
    per element. With the other fused ops on, jowa_150m's loop went from 38.2 % to 39.0 % MFU on an H100
    (session 20, README Performance): per-element Philox, not bandwidth, bounded the forward.

    ``recompute_mask`` (on by default since session 24; needs ``packed_rng``): the backward draws the packed mask
    again from the seed instead of reading the one the forward stored, so no mask is written, read or kept: 1 of
    the forward's 13 bytes per element, 1 of the backward's 17, and 2.6 GiB of jowa_150m's peak memory at batch
    512. On an H100 the loop took 40.09 % MFU with it against 39.74 % without (five runs each, alternated on one
    machine; README Performance). Per-element Philox (``packed_rng=False``) needs ``recompute_mask=False``.

    ``bwd_stages``: above 1, the backward's row loop is software-pipelined (``tl.range(num_stages=)``): the loads of
    the next ``bwd_stages - 1`` row blocks are issued to shared memory (Hopper's asynchronous copies) while this one
    is computed. The backward is bound by memory latency, not instructions or bandwidth (``fused_ln_isa``: 0.15 ms
    of issue and 0.66 ms of bytes a call, where the H100 took 0.81), and one row in flight per program leaves the
    latency exposed. It costs registers (94 against 72) and shared memory, so fewer programs fit an SM. 3 is the
    default since session 22: jowa_150m's loop on an H100 at 39.9 % MFU against 39.7 % with 1 (one run each,
    README Performance); 1 compiles to the same machine code as the plain loop.

    ``bwd_split``: the backward takes each row as two power-of-two tiles (768 = 512 + 256) instead of one of
    next_power_of_2(C) columns, a quarter of which is masked at jowa_150m's width (a whole idle warp of 4). Off:
    the loop on an H100 took 39.1 % MFU with it, 39.6 % with it and 3 stages (session 22)."""

    fwd_rows: int = 2
    fwd_warps: int = 4
    bwd_rows: int = 1
    bwd_warps: int = 4
    bwd_programs_per_sm: int = 16
    packed_rng: bool = True
    recompute_mask: bool = True
    bwd_stages: int = 3
    bwd_split: bool = False

    def __post_init__(self) -> None:
        self.check_booleans(("packed_rng", "recompute_mask", "bwd_split"))
        tiles = ("fwd_rows", "fwd_warps", "bwd_rows", "bwd_warps")
        self.check_integers((*tiles, "bwd_programs_per_sm", "bwd_stages"), powers_of_two=tiles)
        if self.recompute_mask and not self.packed_rng:
            raise ValueError("KernelConfig.recompute_mask needs packed_rng=True (the backward redraws the packed "
                             "mask; per-element Philox there would cost what it saves): pass recompute_mask=False "
                             "with packed_rng=False.")  # fmt: skip


_SLOT = ConfigSlot(KernelConfig())  # benchmarks/fused_ln_sweep.py writes the --best that from_json reads
kernel_config, set_kernel_config = _SLOT.get, _SLOT.set


def _block_c(C: int) -> int:
    import triton

    return triton.next_power_of_2(C)


@functools.cache
def _kernels():
    """``fused_ln_kernels``, imported on first use (importing triton is slow and must not happen on CPU-only
    paths)."""
    from jowa_core.models import fused_ln_kernels

    return fused_ln_kernels


def _split_widths(C: int) -> tuple[int, int]:
    """``bwd_split``'s two tiles of a row: the largest power of two not above C, and the rest rounded up to a power
    of two (0 when C is one): 768 -> 512 + 256, where one tile of 1024 leaves a quarter masked."""
    a = 1 << (C.bit_length() - 1)
    return a, (_block_c(C - a) if C > a else 0)


def _sm_count(t: Tensor) -> int:
    """Streaming multiprocessors of t's GPU, for the persistent kernels' grids; 2 for the interpreter on CPU."""
    return torch.cuda.get_device_properties(t.device).multi_processor_count if t.is_cuda else 2


def _on_device(t: Tensor):
    """Launch on t's GPU (Triton launches on the current device); nothing to do for the interpreter."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _triton_forward(
    x: Tensor | None, h: Tensor, weight: Tensor, bias: Tensor, seed: Tensor | None, p: float, eps: float,
    out_dtype: torch.dtype, h_bias: Tensor | None = None, store_mask: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(x_new, y, mean, rstd, mask) for 2-D (N, C) inputs; mask is empty without dropout and when the backward
    redraws it: ``store_mask`` False (None: ``not KernelConfig.recompute_mask``), which draws the packed mask,
    the one the backward can redraw, whatever ``packed_rng`` says."""
    x, h = None if x is None else x.contiguous(), h.contiguous()  # the kernels assume row-major rows
    N, C = h.shape
    if N * C >= 2**31:
        raise ValueError(f"dropout_add_layer_norm: {N} x {C} elements exceed the kernels' int32 offsets.")
    cfg, block_c = kernel_config(), _block_c(C)
    rows, warps = cfg.fwd_rows, cfg.fwd_warps
    store_mask = not cfg.recompute_mask if store_mask is None else store_mask
    packed = (cfg.packed_rng or not store_mask) and block_c >= 8  # 8 columns per Philox call
    store = seed is not None and (store_mask or not packed)
    x_new = torch.empty_like(h, dtype=h.dtype if x is None else x.dtype)
    y = torch.empty_like(h, dtype=out_dtype)
    mean = torch.empty(N, device=h.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    mask = torch.empty((N, C) if store else (0,), device=h.device, dtype=torch.uint8)
    with _on_device(h):
        _kernels().dropout_add_layer_norm_fwd[(_cdiv(N, rows),)](
            # tensors stand in for pointers that a constexpr branch never reads (an empty one may be null)
            x_new if x is None else x, h, weight, bias, x_new, y, mean, rstd,
            mask if store else mean, mean if seed is None else seed, bias if h_bias is None else h_bias,
            N, C, p, round(p * 65536), 1.0 / (1.0 - p), eps,
            HAS_X=x is not None, DROPOUT=seed is not None, PACKED_RNG=packed, STORE_MASK=store,
            HAS_HB=h_bias is not None, BLOCK_ROWS=rows, BLOCK_C=block_c, num_warps=warps,
        )  # fmt: skip
    return x_new, y, mean, rstd, mask


def _triton_backward(
    dy: Tensor, dxn: Tensor | None, x_new: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor, mask: Tensor | None,
    p: float, h_dtype: torch.dtype, need_dx: bool = True, seed: Tensor | None = None, need_dhb: bool = False,
    stacked: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(dx, dh, dweight, dbias, dh_bias) as ``_reference_backward``; dx is empty when ``need_dx`` is False, dh_bias
    (fp32) when ``need_dhb`` is. Dropout reads ``mask``, or with ``seed`` instead redraws the forward's packed
    mask (``recompute_mask``). ``KernelConfig.bwd_split`` takes each row as two tiles where C is not a power of two
    and the rest is 8 columns or more. ``stacked``: (dx, dh, sums, empty, empty), the fp32 sums (2 or 3, C) of
    dweight, dbias (and dh_bias) reduced by one call instead of one each."""
    if mask is not None and seed is not None:
        raise ValueError("_triton_backward: give the stored mask or the seed to redraw it, not both.")
    dy, dxn, x_new = dy.contiguous(), None if dxn is None else dxn.contiguous(), x_new.contiguous()
    N, C = x_new.shape
    cfg, block_c = kernel_config(), _block_c(C)
    rows, warps = cfg.bwd_rows, cfg.bwd_warps
    # enough programs to fill the GPU a few times over, few enough that the partial sums stay small
    sms = _sm_count(x_new)
    grid = max(1, min(_cdiv(N, rows), cfg.bwd_programs_per_sm * sms))
    dx = torch.empty_like(x_new) if need_dx else x_new.new_empty(0)
    dh = torch.empty_like(x_new, dtype=h_dtype)
    # the programs' partial sums of dweight, dbias (and dh_bias): summed by one call when ``stacked`` (the caller
    # takes the rows apart outside the op), else each on its own, since the op's outputs may not share storage
    # (torch.library refuses returns that alias)
    parts = torch.empty(3 if need_dhb else 2, grid, C, device=x_new.device, dtype=torch.float32)
    dw, db, dhb = parts[0], parts[1], parts[-1]
    args = (
        dy, dy if dxn is None else dxn, x_new, weight, mean, rstd, dy if mask is None else mask,
        mean if seed is None else seed, dx if need_dx else dh, dh, dw, db, dhb, N, C, round(p * 65536), 1.0 / (1.0 - p),
    )  # fmt: skip
    flags = {"HAS_DXN": dxn is not None, "HAS_DX": need_dx, "DROPOUT": mask is not None or seed is not None,
             "RECOMPUTE_MASK": seed is not None, "HAS_HB": need_dhb, "BLOCK_ROWS": rows, "STAGES": cfg.bwd_stages,
             "num_warps": warps}  # fmt: skip
    block_a, block_b = _split_widths(C)
    with _on_device(x_new):
        if cfg.bwd_split and block_b >= 8:
            _kernels().dropout_add_layer_norm_bwd_split[(grid,)](
                *args, BLOCK_A=block_a, BLOCK_B=block_b, ROW_CALLS=block_c // 8, **flags
            )
        else:
            _kernels().dropout_add_layer_norm_bwd[(grid,)](*args, BLOCK_C=block_c, **flags)
    if stacked:  # two empty tensors, not one twice: the op's outputs may not alias
        return dx, dh, parts.sum(1), parts.new_empty(0), parts.new_empty(0)
    dhb_sum = dhb.sum(0) if need_dhb else parts.new_empty(0)
    return dx, dh, dw.sum(0).to(weight.dtype), db.sum(0).to(weight.dtype), dhb_sum


# ---------------------------------------------------------------------------------------------
# The op: one opaque node for torch.compile, Triton on CUDA, the reference elsewhere


def _use_triton(t: Tensor) -> bool:
    return t.is_cuda and t.dtype in (torch.float32, torch.bfloat16, torch.float16) and triton_available()


@torch.library.custom_op("jowa::dropout_add_layer_norm", mutates_args=())
def _fused_forward(
    x: Tensor | None, h: Tensor, weight: Tensor, bias: Tensor, seed: Tensor | None, p: float, eps: float,
    out_dtype: torch.dtype, h_bias: Tensor | None = None, store_mask: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(x_new, y, mean, rstd, mask) for 2-D (N, C) inputs; dropout with probability p iff ``seed`` is given
    (a 1-element int64 tensor), the mask (uint8 (N, C), empty without dropout) returned for the backward.
    ``h_bias`` (C,), added to h first, comes last with a default, as the backward's ``seed`` does.

    ``store_mask`` False asks for no mask, for the backward to redraw (the Triton kernels' packed draw only; the
    reference stores it anyway). It is an argument, not the process's KernelConfig read inside, because the mask's
    shape must be fixed where torch.compile traces the op: a compiled graph (and inductor's on-disk cache of it,
    whose key holds the op's arguments but no Python global) must not meet a mask of another shape at run time."""
    if _use_triton(h):
        return _triton_forward(x, h, weight, bias, seed, p, eps, out_dtype, h_bias, store_mask)
    mask = None if seed is None else _reference_mask(h, seed, p)
    x_new, y, mean, rstd = _reference_forward(x, h, weight, bias, mask, p, eps, out_dtype, h_bias)
    return x_new, y, mean, rstd, h.new_empty(0, dtype=torch.uint8) if mask is None else mask


def _stores_mask(h: Tensor, seed: Tensor | None, store_mask: bool) -> bool:
    """Whether the forward on h returns its (N, C) mask: with dropout, unless asked not to where the backward can
    redraw it (the Triton kernels' packed draw, 8 columns or more)."""
    return seed is not None and (store_mask or not (_use_triton(h) and _block_c(h.shape[-1]) >= 8))


@_fused_forward.register_fake
def _(x, h, weight, bias, seed, p, eps, out_dtype, h_bias=None, store_mask=True):
    N, C = h.shape
    res_dtype = h.dtype if x is None else x.dtype
    stat = h.new_empty(N, dtype=_compute_dtype(res_dtype))
    mask = h.new_empty((N, C) if _stores_mask(h, seed, store_mask) else (0,), dtype=torch.uint8)
    return torch.empty_like(h, dtype=res_dtype), torch.empty_like(h, dtype=out_dtype), stat, stat.clone(), mask


@torch.library.custom_op("jowa::dropout_add_layer_norm_backward", mutates_args=())
def _fused_backward(
    dy: Tensor, dxn: Tensor | None, x_new: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor, mask: Tensor,
    p: float, h_dtype: torch.dtype, need_dx: bool, seed: Tensor | None = None, need_dhb: bool = False,
    stack_sums: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(dx, dh, dweight, dbias, dh_bias); dx is empty when ``need_dx`` is False (x was None), dh_bias (fp32 (C,))
    unless ``need_dhb``. With dropout, an empty ``mask`` means the forward left it to be redrawn from ``seed``.
    ``stack_sums``: (dx, dh, sums, empty, empty) instead, the column sums (2 or 3, C) in mean's dtype, reduced in
    one launch rather than one each: jowa_150m's step runs 25 of these ops, and each eager reduction of 2,112
    partial rows cost about 12 us on an H100 (``reduce_kernel``: 1.16 ms a step for about 100 of them).
    ``seed``, ``need_dhb`` and ``stack_sums`` come last, with defaults, so that backward graphs compiled and cached
    before they existed still call this op correctly."""
    redraw = p > 0 and seed is not None and mask.numel() != x_new.numel()  # the forward stored none
    m = mask if p > 0 and not redraw else None
    if _use_triton(x_new):
        s = seed if redraw else None
        return _triton_backward(dy, dxn, x_new, weight, mean, rstd, m, p, h_dtype, need_dx, s, need_dhb, stack_sums)
    if redraw:  # only the Triton forward leaves the mask out
        raise RuntimeError("dropout_add_layer_norm: a redrawn mask needs the Triton kernels on CUDA.")
    dx, dh, dw, db, dhb = _reference_backward(dy, dxn, x_new, weight, mean, rstd, m, p, h_dtype)
    dx = dx if need_dx else dx.new_empty(0)
    if stack_sums:
        sums = torch.stack([dw.to(mean.dtype), db.to(mean.dtype)] + ([dhb.to(mean.dtype)] if need_dhb else []))
        return dx, dh, sums, dh.new_empty(0), dh.new_empty(0)
    return dx, dh, dw, db, dhb.float() if need_dhb else dhb.new_empty(0)


@_fused_backward.register_fake
def _(dy, dxn, x_new, weight, mean, rstd, mask, p, h_dtype, need_dx, seed=None, need_dhb=False, stack_sums=False):
    dx = torch.empty_like(x_new) if need_dx else x_new.new_empty(0)
    dh = torch.empty_like(x_new, dtype=h_dtype)
    if stack_sums:
        return dx, dh, mean.new_empty(3 if need_dhb else 2, x_new.shape[-1]), dh.new_empty(0), dh.new_empty(0)
    dhb = x_new.new_empty(x_new.shape[-1] if need_dhb else 0, dtype=torch.float32)
    return dx, dh, torch.empty_like(weight), torch.empty_like(weight), dhb


def _setup_context(ctx, inputs, output) -> None:
    x, h, weight, _bias, seed, p, _eps, _out_dtype, h_bias, _store_mask = inputs
    x_new, _y, mean, rstd, mask = output
    ctx.save_for_backward(x_new, weight, mean, rstd, mask, seed)
    ctx.p, ctx.h_dtype, ctx.has_x = p, h.dtype, x is not None
    ctx.hb_dtype = None if h_bias is None else h_bias.dtype
    ctx.set_materialize_grads(False)  # the last layer's x_new is unused: no zeros tensor for its gradient


def _backward(ctx, dxn, dy, _dmean, _drstd, _dmask):
    x_new, weight, mean, rstd, mask, seed = ctx.saved_tensors
    dy = torch.zeros_like(x_new) if dy is None else dy
    need_dhb = ctx.hb_dtype is not None
    dx, dh, sums, _, _ = _fused_backward(
        dy, dxn, x_new, weight, mean, rstd, mask, ctx.p, ctx.h_dtype, ctx.has_x, seed, need_dhb, True
    )
    dw, db, *dhb = sums.unbind(0)  # views of the op's one output, taken apart outside the op
    dhb = dhb[0].to(ctx.hb_dtype) if need_dhb else None
    return dx if ctx.has_x else None, dh, dw.to(weight.dtype), db.to(weight.dtype), None, None, None, None, dhb, None


_fused_forward.register_autograd(_backward, setup_context=_setup_context)


def dropout_add_layer_norm(
    x: Tensor | None, h: Tensor, weight: Tensor, bias: Tensor, p: float, training: bool, eps: float = 1e-5,
    out_dtype: torch.dtype | None = None, h_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``x_new = x + dropout(h + h_bias)`` and ``y = layer_norm(x_new, weight, bias)`` in one op.

    Args:
        x: (..., C) residual stream (fp32 under autocast), or None for ``x_new = dropout(h)`` (the
            embedding dropout before the first block).
        h: (..., C) branch output, possibly bf16 under autocast.
        weight, bias: (C,) LayerNorm affine parameters.
        p, training: dropout probability in [0, 1), applied only when ``training``.
        out_dtype: y's dtype; default h's dtype (see the module docstring for the dtype rule).
        h_bias: (C,) the bias of the product that gave h, left out of that product and added here, so that the
            backward sums its gradient as it writes dh instead of in a pass of its own; None: h has its bias.
    Returns:
        (x_new in x's dtype (h's when x is None), y in ``out_dtype``), both shaped like h.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_add_layer_norm needs 0 <= p < 1, got p={p}.")
    if x is not None and x.shape != h.shape:
        raise ValueError(f"x {tuple(x.shape)} and h {tuple(h.shape)} must have the same shape.")
    if h_bias is not None and h_bias.shape != h.shape[-1:]:
        raise ValueError(f"h_bias {tuple(h_bias.shape)} must be ({h.shape[-1]},), the last dimension of h.")
    p = float(p) if training else 0.0
    C = h.shape[-1]
    # the seed comes from torch's generator on h's device, so torch.manual_seed makes runs repeat
    seed = torch.randint(2**62, (1,), device=h.device) if p > 0 else None
    # read here, in Python, so that torch.compile bakes the choice into the graph it traces
    store_mask = not kernel_config().recompute_mask
    x_new, y, *_ = _fused_forward(
        None if x is None else x.reshape(-1, C).contiguous(), h.reshape(-1, C).contiguous(), weight, bias, seed, p,
        float(eps), out_dtype or h.dtype, h_bias, store_mask,
    )  # fmt: skip
    return x_new.view(h.shape), y.view(h.shape)
