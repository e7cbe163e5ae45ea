"""Fused "bias add + GELU" for the transformer MLP's first layer (Megatron-LM's ``bias_gelu`` fusion, exact GELU).

``bias_gelu(h, bias)`` returns ``gelu(h + bias)`` for the bias-free product ``h = y @ W1.T``; its backward
returns ``dh`` and ``dbias`` from one kernel. Why: on an H100 and an H200 alike (README Performance),
jowa_150m's step spends about 25 ms in inductor's three GELU kernels:
- the forward and the backward take the same time on both GPUs although the H200's memory is 1.4x faster, so
  instructions bound them, not bytes: ``libdevice.erf`` is about 25 instructions per element;
- a third kernel reads the 151,552 x 3072 gradient again only to sum its columns for the bias.
Here erf is Abramowitz & Stegun's formula 7.1.26, which shares its one exponential with the backward's
Gaussian density; its absolute error in GELU, under 5e-7, is below that of fp32 ``0.5 x (1 + erf(x/sqrt 2))``
(which cancels for negative x; ``benchmarks/bias_gelu_isa.py`` counts both kernels' instructions). The bias
gradient is summed in fp32 inside the backward kernel.

Dispatch as ``fused_ln``: Triton on CUDA when triton imports, a pure-torch reference (exact erf)
elsewhere. Dtypes: the sums and GELU run in fp32 (fp64 for fp64 inputs); ``y`` and ``dh`` come out in
h's dtype (bf16 under autocast), ``dbias`` in the bias's.
"""

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from jowa_core.models.fused_ln import (
    ConfigSlot,
    TileConfig,
    _cdiv,
    _compute_dtype,
    _on_device,
    _sm_count,
    triton_available,
)

# ---------------------------------------------------------------------------------------------
# Pure-torch reference (CPU, no Triton, tests): exact erf


def _reference_forward(h: Tensor, bias: Tensor) -> Tensor:
    cd = _compute_dtype(h.dtype)
    with torch.autocast(h.device.type, enabled=False):
        return torch.nn.functional.gelu(h.to(cd) + bias.to(cd)).to(h.dtype)


def _reference_backward(dy: Tensor, h: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    cd = _compute_dtype(h.dtype)
    with torch.autocast(h.device.type, enabled=False):
        x = h.to(cd) + bias.to(cd)
        cdf = 0.5 * (1.0 + torch.erf(x * 0.7071067811865476))
        pdf = torch.exp(-0.5 * x * x) * 0.3989422804014327
        dh = dy.to(cd) * (cdf + x * pdf)
    return dh.to(h.dtype), dh.sum(0).to(bias.dtype)


# ---------------------------------------------------------------------------------------------
# Triton kernels (CUDA; also run on CPU by Triton's interpreter in the tests)


@dataclass(frozen=True)
class KernelConfig(TileConfig):
    """Tiles: rows x columns per program and warps, for both kernels; the backward is persistent (each
    program strides down the rows of one column block, keeping one partial bias-gradient row), with about
    ``bwd_programs_per_sm`` programs per SM. The defaults are ``benchmarks/bias_gelu_sweep.py``'s best on an H100
    at jowa_150m's shape (151,552 x 3072, session 21): 16 x 128 on 2 warps took 0.668 + 0.974 ms (forward +
    backward) against 0.661 + 1.275 for the previous 8 x 256 on 4 warps, and 32 programs per SM 1.06 ms backward
    against 1.28 at 8 on that tile; together they moved the training loop from 39.1 to 39.5 % MFU."""

    rows: int = 16
    cols: int = 128
    warps: int = 2
    bwd_programs_per_sm: int = 32

    NAME = "bias_gelu KernelConfig"

    def __post_init__(self) -> None:
        self.check_integers(("rows", "cols", "warps", "bwd_programs_per_sm"), powers_of_two=("rows", "cols", "warps"))


_SLOT = ConfigSlot(KernelConfig())  # process-wide, as fused_ln's
kernel_config, set_kernel_config = _SLOT.get, _SLOT.set


@functools.cache
def _kernels():
    """Compile-on-first-use kernels (importing triton is slow and must not happen on CPU-only paths). They
    live at module level in their own module: the interpreter resolves a kernel's helpers in its globals."""
    from jowa_core.models import fused_gelu_kernels as k

    return k.bias_gelu_fwd, k.bias_gelu_bwd


def _check_size(h: Tensor) -> None:
    if h.numel() >= 2**31:
        raise ValueError(f"bias_gelu: {tuple(h.shape)} has {h.numel()} elements, past the kernels' int32 offsets.")


def _triton_forward(h: Tensor, bias: Tensor) -> Tensor:
    h = h.contiguous()
    _check_size(h)
    N, C = h.shape
    cfg = kernel_config()
    y = torch.empty_like(h)
    fwd, _ = _kernels()
    with _on_device(h):
        fwd[(_cdiv(N, cfg.rows), _cdiv(C, cfg.cols))](
            h, bias, y, N, C, BLOCK_M=cfg.rows, BLOCK_N=cfg.cols, FAST_RCP=h.is_cuda, num_warps=cfg.warps
        )
    return y


def _triton_backward(dy: Tensor, h: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    dy, h = dy.contiguous(), h.contiguous()
    _check_size(h)
    N, C = h.shape
    cfg = kernel_config()
    col_blocks = _cdiv(C, cfg.cols)
    sms = _sm_count(h)
    # enough programs to fill the GPU a few times over, few enough that the partial sums stay small
    grid_rows = max(1, min(_cdiv(N, cfg.rows), _cdiv(cfg.bwd_programs_per_sm * sms, col_blocks)))
    dh = torch.empty_like(h)
    db = torch.empty(grid_rows, C, device=h.device, dtype=torch.float32)
    _, bwd = _kernels()
    with _on_device(h):
        bwd[(grid_rows, col_blocks)](
            dy, h, bias, dh, db, N, C, BLOCK_M=cfg.rows, BLOCK_N=cfg.cols, FAST_RCP=h.is_cuda, num_warps=cfg.warps
        )
    return dh, db.sum(0).to(bias.dtype)


# ---------------------------------------------------------------------------------------------
# The op: one opaque node for torch.compile, Triton on CUDA, the reference elsewhere


def _use_triton(t: Tensor) -> bool:
    return t.is_cuda and t.dtype in (torch.float32, torch.bfloat16, torch.float16) and triton_available()


@torch.library.custom_op("jowa::bias_gelu", mutates_args=())
def _bias_gelu(h: Tensor, bias: Tensor) -> Tensor:
    """gelu(h + bias) for 2-D h (N, C) and bias (C,), in h's dtype."""
    return _triton_forward(h, bias) if _use_triton(h) else _reference_forward(h, bias)


@_bias_gelu.register_fake
def _(h, bias):
    return torch.empty_like(h)


@torch.library.custom_op("jowa::bias_gelu_backward", mutates_args=())
def _bias_gelu_backward(dy: Tensor, h: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """(dh, dbias): dh = dy * gelu'(h + bias) in h's dtype, dbias its column sums in the bias's dtype."""
    return _triton_backward(dy, h, bias) if _use_triton(h) else _reference_backward(dy, h, bias)


@_bias_gelu_backward.register_fake
def _(dy, h, bias):
    return torch.empty_like(h), torch.empty_like(bias)


def _setup_context(ctx, inputs, output) -> None:
    h, bias = inputs
    ctx.save_for_backward(h, bias)


def _backward(ctx, dy):
    h, bias = ctx.saved_tensors
    return _bias_gelu_backward(dy, h, bias)


_bias_gelu.register_autograd(_backward, setup_context=_setup_context)


def bias_gelu(h: Tensor, bias: Tensor) -> Tensor:
    """``gelu(h + bias)`` (exact GELU) with a fused backward that also sums the bias gradient.

    Args:
        h: (..., C) the bias-free output of the MLP's first matrix product, bf16 under autocast.
        bias: (C,) that layer's bias (fp32 parameters under autocast).
    Returns:
        (..., C) in h's dtype: what the second matrix product reads.
    """
    C = h.shape[-1]
    if bias.shape != (C,):
        raise ValueError(
            f"bias_gelu: bias {tuple(bias.shape)} must be ({C},), the last dimension of h {tuple(h.shape)}."
        )
    return _bias_gelu(h.reshape(-1, C), bias).view(h.shape)
