"""The fused bias + GELU kernels' machine code for Hopper against inductor's GELU kernels, counted without a GPU.

    python -m benchmarks.bias_gelu_isa [--rows 151552] [--width 3072] [--layers 12]

Triton compiles, for sm_90 on the CPU, ``jowa_core.models.fused_gelu``'s two kernels and two kernels written
here as inductor writes jowa_150m's GELU today (``0.5 x (1 + libdevice.erf(x / sqrt 2))`` in fp32, one
element per lane of a 1,024-element block of 4 warps; ``triton_poi_fused_gelu_view`` and
``triton_poi_fused_gelu_gelu_backward_view`` in the step's profile). ``nvdisasm`` lists the SASS; the
backward of ``fused_gelu`` loops over row tiles, so its loop body is counted per tile. Issue time is as in
``benchmarks.fused_ln_isa``: warps x instructions over 132 SMs x 4 schedulers at 1.98 GHz, set beside the
time the bytes take at a copy's bandwidth (H100 3.0, H200 4.3 TB/s). Per step: ``--layers`` calls.

Inductor's third kernel, the bias gradient's column sums (``triton_red_fused_gelu_gelu_backward_sum_view``),
reads the gradient once more: 2 bytes per element, 4.2 ms per step on an H100 and 2.8 ms on an H200 (profiles
of sessions 13 and 17); ``fused_gelu``'s backward sums as it goes and has no such pass. An estimate, not a
timing: memory stalls and dual issue are left out. One JSON line per kernel.
"""

from __future__ import annotations

import argparse
import json
import math

import triton
import triton.language as tl
from triton.language.extra import libdevice

from benchmarks.fused_ln_isa import (
    COPY_TB_S,
    compile_sm90,
    disassemble,
    issue_ms,
    loop_bodies,
    nvdisasm_path,  # fmt: skip
    sass_counts,
)

XBLOCK, WARPS = 1024, 4  # inductor's pointwise blocks for this size


@triton.jit
def inductor_gelu_fwd(X, Y, n, XBLOCK: tl.constexpr):
    off = tl.program_id(0) * XBLOCK + tl.arange(0, XBLOCK)
    m = off < n
    x = tl.load(X + off, m).to(tl.float32)
    tl.store(Y + off, (0.5 * x * (1.0 + libdevice.erf(x * 0.7071067811865476))).to(tl.bfloat16), m)


@triton.jit
def inductor_gelu_bwd(G, X, DX, n, XBLOCK: tl.constexpr):
    off = tl.program_id(0) * XBLOCK + tl.arange(0, XBLOCK)
    m = off < n
    x = tl.load(X + off, m).to(tl.float32)
    g = tl.load(G + off, m).to(tl.float32)
    cdf = 0.5 * (1.0 + libdevice.erf(x * 0.7071067811865476))
    pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
    tl.store(DX + off, (g * (cdf + x * pdf)).to(tl.bfloat16), m)


def loop_body(text: str) -> str:
    """The lines of the listing's one loop."""
    loops = loop_bodies(text)
    if len(loops) != 1:
        raise SystemExit(f"bias_gelu_isa: expected one loop in the backward kernel, found {len(loops)}.")
    return loops[0]


def figure(kernel: str, per_thread: int, programs: int, warps: int, elements: int, bytes_per_element: int) -> dict:
    gigabytes = elements * bytes_per_element / 1e9
    return {"kernel": kernel, "sass_per_thread": per_thread, "sass_per_element": round(per_thread * 32 * warps * programs / elements, 2),
            "issue_ms": round(issue_ms(programs * warps * per_thread), 3), **{f"bandwidth_ms_{k}": round(gigabytes / tb, 3) for k, tb in COPY_TB_S.items()}}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=151_552, help="rows per call (jowa_150m: 512 x 296 tokens)")
    ap.add_argument("--width", type=int, default=3072, help="the MLP's hidden width (4 x 768)")
    ap.add_argument("--layers", type=int, default=12, help="calls per step")
    args = ap.parse_args(argv)
    from jowa_core.models import fused_gelu, fused_gelu_kernels

    nvdisasm = nvdisasm_path("bias_gelu_isa")
    n = args.rows * args.width
    elements = n * args.layers
    bf16 = "*bf16"
    fwd = sass_counts(
        compile_sm90(inductor_gelu_fwd, {"X": bf16, "Y": bf16, "n": "i32"}, {"XBLOCK": XBLOCK}, WARPS), nvdisasm
    )
    bwd = sass_counts(compile_sm90(inductor_gelu_bwd, {"G": bf16, "X": bf16, "DX": bf16, "n": "i32"}, {"XBLOCK": XBLOCK}, WARPS), nvdisasm)  # fmt: skip
    programs = math.ceil(n / XBLOCK) * args.layers
    out = [figure("inductor gelu forward", sum(fwd.values()), programs, WARPS, elements, 4),
           figure("inductor gelu backward", sum(bwd.values()), programs, WARPS, elements, 6)]  # fmt: skip
    cfg = fused_gelu.kernel_config()
    consts = {"BLOCK_M": cfg.rows, "BLOCK_N": cfg.cols, "FAST_RCP": True}  # as launched on CUDA
    tiles = math.ceil(args.rows / cfg.rows) * math.ceil(args.width / cfg.cols) * args.layers
    ours_fwd = compile_sm90(fused_gelu_kernels.bias_gelu_fwd, {"H": bf16, "B": "*fp32", "Y": bf16, "N": "i32", "C": "i32"},
                            consts, cfg.warps)  # fmt: skip
    sig = {"DY": bf16, "H": bf16, "B": "*fp32", "DH": bf16, "DB": "*fp32", "N": "i32", "C": "i32"}
    ours_bwd = compile_sm90(fused_gelu_kernels.bias_gelu_bwd, sig, consts, cfg.warps)
    body = sass_counts(b"", nvdisasm, loop_body(disassemble(ours_bwd, nvdisasm)))
    out += [figure("fused_gelu forward (bias add + GELU)", sum(sass_counts(ours_fwd, nvdisasm).values()), tiles, cfg.warps, elements, 4),
            figure("fused_gelu backward, per row tile (with the bias sums)", sum(body.values()), tiles, cfg.warps, elements, 6)]  # fmt: skip
    for rec in out:
        print(json.dumps({**rec, "rows": args.rows, "width": args.width, "layers": args.layers,
                          "triton": triton.__version__}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
