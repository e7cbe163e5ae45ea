"""Causal attention at the training shape on each SDPA backend, forward and backward, with and without dropout.

    python -m benchmarks.attention_backends [--batch 512] [--reps 20] [--backends cudnn,flash,jowa_triton]

jowa_150m's training attention: batch 512, 12 heads, 296 tokens, head size 64, bf16, causal, dropout 0.1 on the
probabilities (as the official model has it). Attention was about 35 ms of its step on an H200 on cuDNN's
kernel, SDPA's first choice; since session 20 the step runs the Triton op instead. This times each backend that takes the shape (cuDNN, flash,
memory-efficient, math) under ``torch.nn.attention.sdpa_kernel``, eagerly: a minute where the training
loop's A/B (``python -m benchmarks --sdpa-off cudnn``) needs a fresh compile. Without dropout each backend's
output is checked against the math backend's (dropout draws differ by backend). One JSON line per backend and
dropout. Beside SDPA's backends: ``jowa_triton``, ``jowa_core.models.fused_attention`` (the Triton flash-attention
op the model uses with ``use_fused_attention``), fed the packed (B, T, 3, H, D) product it reads in training, its
gradient packed too (on a CPU: its torch reference); ``jowa_triton_untuned``, the same op in session 18's config
before the sweep (the compiler's registers for the forward, 2 pipeline stages). On a CPU, flash and math on a
small shape (a smoke run).
"""

from __future__ import annotations

import argparse
import json
import warnings
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.fused_ln_sweep import time_ms
from jowa_core.runtime import resolve_device

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "mem_efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}  # fmt: skip


# the Triton op under its KernelConfig, and under session 18's config before the sweep
FUSED_VARIANTS = {"jowa_triton": {}, "jowa_triton_untuned": {"fwd_maxnreg": 0, "fwd_stages": 2, "bwd_stages": 2}}


def add_shape_args(ap: argparse.ArgumentParser) -> None:
    """jowa_150m's training attention, the default of every attention benchmark."""
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=296)
    ap.add_argument("--head-size", type=int, default=64)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(ap)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--backends", default=",".join([*BACKENDS, *FUSED_VARIANTS]),
                    help="comma-separated rows to time (default: all)")  # fmt: skip
    args = ap.parse_args(argv)
    chosen = args.backends.split(",")
    unknown = sorted(set(chosen) - set(BACKENDS) - set(FUSED_VARIANTS))
    if unknown:
        ap.error(f"--backends: unknown {unknown}; choose from {', '.join([*BACKENDS, *FUSED_VARIANTS])}.")
    dev = resolve_device(args.device)
    cuda = dev.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    g = torch.Generator(device=dev).manual_seed(0)
    shape = (args.batch, args.heads, args.tokens, args.head_size)
    q, k, v = (torch.randn(shape, device=dev, dtype=dtype, generator=g).requires_grad_() for _ in range(3))
    dy = torch.randn(shape, device=dev, dtype=dtype, generator=g)
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    info = {"device_name": torch.cuda.get_device_name(dev) if cuda else "cpu", "torch": torch.__version__,
            "shape": list(shape), "dtype": str(dtype).removeprefix("torch.")}  # fmt: skip
    with warnings.catch_warnings():  # each refusing backend warns why; its JSON line says it once
        warnings.filterwarnings("ignore", message=".*(not used because|do not support non-zero dropout).*")
        for backend, sdpa in BACKENDS.items():
            if backend not in chosen:
                continue
            for p in (args.dropout, 0.0):
                rec = {"backend": backend, "dropout": p, **info}
                rec.update(_time_backend(sdpa, p, (q, k, v), dy, reference, args.reps, dev))
                print(json.dumps(rec), flush=True)
    from jowa_core.models import fused_attention

    packed = torch.stack((q, k, v), 2).transpose(1, 3).detach().contiguous().requires_grad_()  # (B, T, 3, H, D)
    default = fused_attention.kernel_config()
    try:
        for backend, changes in FUSED_VARIANTS.items():
            if backend not in chosen:
                continue
            fused_attention.set_kernel_config(replace(default, **changes))
            for p in (args.dropout, 0.0):
                rec = {"backend": backend, "dropout": p, **info}
                rec.update(_time_fused(packed, p, dy.transpose(1, 2).contiguous(), reference, args.reps, dev))
                print(json.dumps(rec), flush=True)
    finally:
        fused_attention.set_kernel_config(default)


def _time_fused(qkv: torch.Tensor, p: float, dy: torch.Tensor, reference, reps: int, dev: torch.device) -> dict:
    """ms per forward + backward of ``fused_attention.causal_attention`` on the packed product."""
    from jowa_core.models.fused_attention import causal_attention

    def step() -> torch.Tensor:
        y = causal_attention(qkv, p, True)
        torch.autograd.grad(y, qkv, dy)
        return y

    try:
        y = step()
    except (RuntimeError, ValueError) as e:
        return {"skipped": str(e).splitlines()[0][:160]}
    out = (
        {"max_abs_diff_vs_math": float((y.detach().transpose(1, 2).float() - reference).abs().max())}
        if p == 0.0
        else {}
    )
    return {**out, "ms_fwd_bwd": round(time_ms(step, reps, dev), 3)}


def _time_backend(sdpa: SDPBackend, p: float, qkv, dy, reference, reps: int, dev: torch.device) -> dict:
    """ms per forward + backward on one backend, or why it was skipped; without dropout, the error vs math."""

    def step() -> torch.Tensor:
        with sdpa_kernel(sdpa):
            y = F.scaled_dot_product_attention(*qkv, dropout_p=p, is_causal=True)
        torch.autograd.grad(y, qkv, dy)
        return y

    try:
        y = step()
    except RuntimeError as e:  # the backend does not take this shape, dtype or device
        return {"skipped": str(e).splitlines()[0][:160]}
    out = {"max_abs_diff_vs_math": float((y.detach().float() - reference).abs().max())} if p == 0.0 else {}
    return {**out, "ms_fwd_bwd": round(time_ms(step, reps, dev), 3)}


if __name__ == "__main__":
    main()
