"""The fused bias + GELU op alone, against inductor's kernels for the same pattern, tile by tile.

    python -m benchmarks.bias_gelu_sweep [--rows 151552] [--width 3072] [--reps 20] [--device cuda|cpu]
                                         [--best best.json]

Why: ``jowa_core.models.fused_gelu.KernelConfig``'s first default tile (8 x 256 on 4 warps, 8 backward programs
per SM) was chosen from instruction counts (``benchmarks/bias_gelu_isa.py``), not from timings; this sweep timed
it and gave today's default (16 x 128 on 2 warps, 32 programs per SM, H100, session 21).
At jowa_150m's MLP shape (batch 512 x 296 tokens = 151,552 rows of 3072; h, the bias-free product, in bf16 as
autocast makes it, the bias an fp32 parameter, as ``Block.mlp_branch`` calls ``bias_gelu``) it times, with CUDA
events over ``--reps`` calls after warm-up: inductor's compiled ``gelu(h.float() + b).to(bf16)`` (forward, and
forward + backward: its backward is the difference), then ``fused_gelu``'s forward and its backward op alone
under every ``KernelConfig`` of two grids: the tiles (rows x columns, warps; both kernels share them) with the
default programs per SM, and the default tile with 2 to 64 backward programs per SM. One JSON line per figure,
with the bytes each pass must move and the bandwidth that implies; a tile that does not compile gets an
``error`` line. The fastest tile (forward + backward) and the fastest programs per SM (backward) make one
``KernelConfig``, printed as ``bias_gelu_best`` and written as JSON by ``--best``, which
``benchmarks.profile_train --fused-gelu-config`` and ``python -m benchmarks --fused-gelu-config`` read. The
process's config is put back at the end. CUDA by default; ``--device cpu`` (the default without CUDA) is a
smoke run of the script on the torch reference, eager, at a tiny shape, where the tiles change nothing.
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import asdict, replace

import torch
import torch.nn.functional as F

from benchmarks.fused_ln_sweep import time_configs, time_ms, write_best
from jowa_core.models import fused_gelu

ROWS, COLS, WARPS = (4, 8, 16, 32), (128, 256, 512), (2, 4, 8)
PROGRAMS_PER_SM = (2, 4, 8, 16, 32, 64)


def elements_per_thread(rows: int, cols: int, warps: int) -> float:
    return rows * cols / (32 * warps)


def tile_grid(default: fused_gelu.KernelConfig) -> list[fused_gelu.KernelConfig]:
    """The tiles worth timing, each with ``default``'s programs per SM. Left out, by elements a thread
    (rows x cols / (32 x warps)): over 64, the backward holds its fp32 bias-gradient tile across the loop (one
    register an element) beside each element's x and gradient, over 3 x 64 = 192 of the 255 registers a thread
    may have, and spills; under 4, a thread's bf16 loads are narrower than 8 bytes (a 16-byte vector is 8
    elements) and the row and column index arithmetic is shared by too few elements to pay for itself."""
    return [
        replace(default, rows=r, cols=c, warps=w)
        for r, c, w in itertools.product(ROWS, COLS, WARPS)
        if 4 <= elements_per_thread(r, c, w) <= 64
    ]


def programs_grid(default: fused_gelu.KernelConfig) -> list[fused_gelu.KernelConfig]:
    """The default tile with each of the backward's programs per SM (the forward does not read it)."""
    return [replace(default, bwd_programs_per_sm=k) for k in PROGRAMS_PER_SM]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=None, help="default: 151,552 on CUDA, 64 on the CPU")
    ap.add_argument("--width", type=int, default=None, help="default: 3072 on CUDA, 256 on the CPU")
    ap.add_argument("--reps", type=int, default=None, help="timed calls per figure (default: 20 on CUDA, 2 on the CPU)")
    ap.add_argument("--best", default=None, help="write the fastest KernelConfig here (JSON)")
    ap.add_argument("--device", default=None, choices=("cuda", "cpu"),
                    help="default: cuda if there is one; cpu: a smoke run (torch reference, eager)")  # fmt: skip
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bias_gelu_sweep times Triton kernels on a CUDA device; none is available here "
                         "(--device cpu runs the script on the torch reference, for a smoke check).")  # fmt: skip
    dev, bf16 = torch.device(device), torch.bfloat16
    cuda = dev.type == "cuda"
    N = args.rows or (512 * 296 if cuda else 64)
    C = args.width or (3072 if cuda else 256)
    reps = args.reps or (20 if cuda else 2)
    g = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(N, C, device=dev, generator=g).to(bf16).requires_grad_()  # F.linear's output under autocast
    b = (0.1 * torch.randn(C, device=dev, generator=g)).requires_grad_()  # the fp32 parameter
    dy = torch.randn(N, C, device=dev, generator=g).to(bf16)  # the second product's input gradient, bf16
    # bytes per element each pass must move: forward reads h (2), writes y (2); backward reads dy (2) and h (2),
    # writes dh (2). The bias and its gradient (C values, and the backward's partial sums) are left out.
    gb_fwd, gb_bwd = N * C * 4 / 1e9, N * C * 6 / 1e9
    info = {"device_name": torch.cuda.get_device_name(dev) if cuda else "cpu", "torch": torch.__version__,
            "rows": N, "width": C}  # fmt: skip

    def emit(**kv) -> None:
        print(json.dumps({**kv, **info}), flush=True)

    def figures(f_ms: float, b_ms: float) -> dict:
        return {"fwd_ms": round(f_ms, 3), "bwd_ms": round(b_ms, 3), "fwd_gb": round(gb_fwd, 3),
                "bwd_gb": round(gb_bwd, 3), "fwd_tb_s": round(gb_fwd / f_ms, 2) if f_ms > 0 else None,
                "bwd_tb_s": round(gb_bwd / b_ms, 2) if b_ms > 0 else None}  # fmt: skip

    def inductor(h, b):
        return F.gelu(h.float() + b).to(bf16)

    compiled = torch.compile(inductor) if cuda else inductor
    with torch.no_grad():
        f_ms = time_ms(lambda: compiled(h, b), reps, dev)
    fb_ms = time_ms(lambda: torch.autograd.grad(compiled(h, b), (h, b), dy), reps, dev)  # no .grad accumulation
    emit(impl="inductor", **figures(f_ms, fb_ms - f_ms))  # on a CPU at a tiny shape the difference can be noise

    previous = fused_gelu.kernel_config()
    tiles, programs = tile_grid(previous), programs_grid(previous)
    results: dict[str, list[tuple[fused_gelu.KernelConfig, float, float]]] = {"tile": [], "programs": []}
    hd = h.detach()

    def measure() -> tuple[float, float]:
        with torch.no_grad():
            f_ms = time_ms(lambda: fused_gelu.bias_gelu(hd, b), reps, dev)
            # the backward op alone, as autograd calls it (dh in bf16, the bias gradient in fp32)
            return f_ms, time_ms(lambda: fused_gelu._bias_gelu_backward(dy, hd, b), reps, dev)

    def best_so_far() -> tuple[fused_gelu.KernelConfig, float, float, float | None]:
        # both kernels read rows, cols and warps: one tile for the pair; only the backward reads the programs per
        # SM (the tile's own until the programs grid has run)
        tile, tile_f, tile_b = min(results["tile"], key=lambda r: r[1] + r[2])
        if not results["programs"]:
            return tile, tile_f, tile_b, None
        per_sm, _, per_sm_b = min(results["programs"], key=lambda r: r[2])
        return replace(tile, bwd_programs_per_sm=per_sm.bwd_programs_per_sm), tile_f, tile_b, per_sm_b

    for i, (cfg, ms, e) in enumerate(time_configs(fused_gelu, tiles + programs, measure)):
        grid = "tile" if i < len(tiles) else "programs"  # the default is in both grids
        if e is not None:
            emit(impl="bias_gelu", grid=grid, config=asdict(cfg), error=f"{type(e).__name__}: {str(e)[:200]}")
            continue
        results[grid].append((cfg, *ms))
        emit(impl="bias_gelu", grid=grid, config=asdict(cfg), **figures(*ms))
        if args.best and results["tile"]:  # after every config: a sweep cut short still leaves its best so far
            write_best(args.best, best_so_far()[0])
    if not results["tile"] or not results["programs"]:
        raise SystemExit("bias_gelu_sweep: no tile or no programs-per-SM config ran; see the errors above.")
    best, tile_f, tile_b, per_sm_b = best_so_far()
    emit(impl="bias_gelu_best", config=asdict(best), tile_fwd_ms=round(tile_f, 3), tile_bwd_ms=round(tile_b, 3),
         programs_bwd_ms=round(per_sm_b, 3))  # fmt: skip


if __name__ == "__main__":
    main()
