"""The fused dropout + add + LayerNorm op alone, against inductor's kernels for the same pattern, tile by tile.

    python -m benchmarks.fused_ln_sweep [--rows 151552] [--width 768] [--grids fwd,bwd] [--no-h-bias]
                                        [--best best.json]

At jowa_150m's training shape (batch 512 x 296 tokens = 151,552 rows of 768; fp32 residual stream, bf16
branch, dropout 0.1) it times, with CUDA events over ``--reps`` calls after warm-up: inductor's compiled
``x + dropout(h)`` then ``layer_norm`` (forward, and forward + backward), then ``jowa_core.models.fused_ln``
forward and backward under every ``KernelConfig`` of the sweep (the forward's tiles with and without
``packed_rng``; ``--grids bwd`` times the backward's alone, keeping the default forward: its tiles, its row
loop over the three of 1 to 4 stages that are not the default's, and its rows split in two tiles). The op gets
the branch's bias (``h_bias``) and the backward sums its gradient, as every block's two calls do in the training
loop on CUDA (``fused_branch_bias``); ``--no-h-bias`` times the op without it. Session 21's sweep timed it
without, and its best backward tile, 10 % faster alone, made the loop 3 ms slower. One JSON line per
figure, with the bytes each pass must move and the bandwidth that implies; ``--best`` writes the fastest config
as JSON, which ``benchmarks.profile_train --fused-ln-config`` and ``python -m benchmarks --fused-ln-config``
read. CUDA only.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from typing import Any

import torch
import torch.nn.functional as F

from jowa_core.models import fused_ln
from jowa_core.models.fused_ln import KernelConfig
from jowa_core.runtime import atomic_path


def time_ms(fn, reps: int, dev: torch.device) -> float:
    for _ in range(3):
        fn()
    if dev.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) * 1e3 / reps
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def write_best(path: str, config: Any) -> None:
    """Replace ``path`` with ``config`` as JSON in one rename, so a sweep killed mid-write leaves the last best."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(asdict(config)))


def time_configs(module, configs: list, measure: Callable[[], Any]) -> Iterator[tuple[Any, Any, Exception | None]]:
    """(config, ``measure()``'s result or None, its exception or None) for each config set as ``module``'s process-wide
    ``KernelConfig`` in turn (a tile that does not compile, for registers or shared memory, is a result too); the
    process's config is put back at the end, however the loop ends. What every op's tile sweep shares."""
    previous = module.kernel_config()
    try:
        for cfg in configs:
            module.set_kernel_config(cfg)
            try:
                yield cfg, measure(), None
            except Exception as e:  # noqa: BLE001 - reported by the caller as that config's figure
                yield cfg, None, e
    finally:
        module.set_kernel_config(previous)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=512 * 296)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--p", type=float, default=0.1)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--no-h-bias", action="store_true",
                    help="time the op without the branch's bias (the loop passes it: fused_branch_bias)")  # fmt: skip
    ap.add_argument("--best", default=None, help="write the fastest KernelConfig here (JSON)")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the script (torch reference, eager)")
    ap.add_argument("--grids", default="fwd,bwd", choices=("fwd,bwd", "fwd", "bwd"),
                    help="the tiles to time: the forward's, the backward's or both (the other keeps the default's)")  # fmt: skip
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fused_ln_sweep times Triton kernels on a CUDA device; none is available here "
                         "(--device cpu runs the script on the torch reference, for a smoke check).")  # fmt: skip
    dev, bf16, N, C, p = torch.device(args.device), torch.bfloat16, args.rows, args.width, args.p
    torch.manual_seed(0)
    x = torch.randn(N, C, device=dev, requires_grad=True)
    h = torch.randn(N, C, device=dev, dtype=bf16, requires_grad=True)
    w = (1 + 0.1 * torch.randn(C, device=dev)).requires_grad_()
    b = (0.1 * torch.randn(C, device=dev)).requires_grad_()
    hb = None if args.no_h_bias else (0.1 * torch.randn(C, device=dev)).requires_grad_()
    dxn, dy = torch.randn(N, C, device=dev), torch.randn(N, C, device=dev, dtype=bf16)
    # bytes per element each pass must move: forward reads x (4) and h (2), writes x_new (4), y (2), mask (1);
    # backward reads dy (2), dxn (4), x_new (4), mask (1), writes dx (4), dh (2); no mask where it is redrawn
    def gigabytes(redraw: bool) -> tuple[float, float]:
        return N * C * (13 - redraw) / 1e9, N * C * (17 - redraw) / 1e9

    gb_fwd, gb_bwd = gigabytes(False)  # inductor's dropout stores its mask
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"

    def emit(**kv) -> None:
        print(json.dumps({"device_name": name, "rows": N, "width": C, "p": p, "h_bias": hb is not None, **kv}),
              flush=True)  # fmt: skip

    def inductor(x, h, w, b, hb):
        xn = x + F.dropout(h if hb is None else h + hb, p, True)
        return xn, F.layer_norm(xn, (C,), w, b).to(bf16)

    def fused(x, h, w, b, hb):
        return fused_ln.dropout_add_layer_norm(x, h, w, b, p, True, h_bias=hb)

    leaves = tuple(t for t in (x, h, w, b, hb) if t is not None)

    def backward(fn):
        xn, y = fn(x, h, w, b, hb)
        torch.autograd.grad((xn, y), leaves, (dxn, dy))  # no .grad accumulation in the timing

    compiled = torch.compile(inductor) if dev.type == "cuda" else inductor
    with torch.no_grad():
        f_ms = time_ms(lambda: compiled(x, h, w, b, hb), args.reps, dev)
    fb_ms = time_ms(lambda: backward(compiled), args.reps, dev)
    emit(impl="inductor", fwd_ms=round(f_ms, 3), bwd_ms=round(fb_ms - f_ms, 3), fwd_tb_s=round(gb_fwd / f_ms, 2),
         bwd_tb_s=round(gb_bwd / (fb_ms - f_ms), 2))  # fmt: skip

    default = fused_ln.kernel_config()
    results = []
    fwd_grid = [  # each tile with the dropout mask drawn one Philox call per element and per 8 elements
        replace(default, fwd_rows=r, fwd_warps=wp, packed_rng=pk, recompute_mask=pk and default.recompute_mask)
        for pk, r, wp in itertools.product((False, True), (1, 2, 4, 8), (2, 4, 8))
    ]
    bwd_grid = [
        replace(default, bwd_rows=r, bwd_warps=wp, bwd_programs_per_sm=k)
        for r, wp, k in itertools.product((1, 2, 4, 8), (4, 8), (2, 4, 8, 16))
    ]
    bwd_grid += [replace(default, bwd_stages=k) for k in (1, 2, 3, 4) if k != default.bwd_stages][:3]  # row loop
    bwd_grid += [  # each row as two power-of-two tiles (768 = 512 + 256), on 2 to 8 warps
        replace(default, bwd_split=True, bwd_warps=wp, bwd_programs_per_sm=k)
        for wp, k in itertools.product((2, 4, 8), (8, 16))
    ]
    grids = args.grids.split(",")
    fwd_grid, bwd_grid = (fwd_grid if "fwd" in grids else []), (bwd_grid if "bwd" in grids else [])

    def measure() -> tuple[float, float]:
        with torch.no_grad():
            f_ms = time_ms(lambda: fused(x, h, w, b, hb), args.reps, dev)
        return f_ms, time_ms(lambda: backward(fused), args.reps, dev) - f_ms

    def best_so_far() -> KernelConfig:
        fwd_best = min((r for r in results if r[0] in fwd_grid), key=lambda r: r[1], default=(default,))[0]
        bwd_best = min((r for r in results if r[0] in bwd_grid), key=lambda r: r[2], default=(default,))[0]
        return replace(bwd_best, fwd_rows=fwd_best.fwd_rows, fwd_warps=fwd_best.fwd_warps,
                       packed_rng=fwd_best.packed_rng, recompute_mask=fwd_best.recompute_mask)  # fmt: skip

    for cfg, ms, e in time_configs(fused_ln, fwd_grid + bwd_grid, measure):
        if e is not None:
            emit(impl="fused_ln", config=asdict(cfg), error=f"{type(e).__name__}: {str(e)[:200]}")
            continue
        f_ms, b_ms = ms
        results.append((cfg, f_ms, b_ms))
        gb_f, gb_b = gigabytes(cfg.recompute_mask)
        emit(impl="fused_ln", config=asdict(cfg), fwd_ms=round(f_ms, 3), bwd_ms=round(b_ms, 3),
             fwd_tb_s=round(gb_f / f_ms, 2), bwd_tb_s=round(gb_b / b_ms, 2))  # fmt: skip
        if args.best:  # after every config, so a sweep cut short by a time limit still leaves its best so far
            write_best(args.best, best_so_far())
    if not results:
        raise SystemExit("fused_ln_sweep: no config ran; see the errors above.")
    emit(impl="fused_ln_best", config=asdict(best_so_far()))


if __name__ == "__main__":
    main()
