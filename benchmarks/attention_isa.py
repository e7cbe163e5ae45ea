"""The Triton flash-attention kernels' machine code for Hopper, counted without a GPU.

    python -m benchmarks.attention_isa [--batch 512] [--heads 12] [--tokens 296] [--layers 12]
                                       [--fused-attention-config JSON]

Triton compiles ``jowa_core.models.fused_attention``'s forward and its two backward kernels for sm_90 on the CPU
(bf16, head size 64, the default tiles), and ``nvdisasm`` lists the SASS of each kernel's two loops over blocks:
one for blocks that cross the causal diagonal (masked), one for blocks seen whole (no mask). A step of
``BLOCK_M`` queries against ``BLOCK_N`` keys is one pass of a loop; jowa_150m's 296 tokens in blocks of 64 make
15 passes per head and kernel, 5 of them masked. Per step (``--layers`` calls):
- issue time: passes x warps x their loop's instructions over 132 SMs x 4 schedulers at 1.98 GHz, as in
  ``benchmarks.fused_ln_isa`` (the masked loop is taken to be the longer of the two);
- tensor time: the passes' matrix-product FLOPs (2 per pass forward, 4 and 3 in the backward kernels) at the
  989 TFLOP/s dense bf16 peak of an H100 SXM and an H200.
The larger of the two bounds a kernel from below. An estimate, not a timing: memory stalls, the loop's prologue,
and how far the asynchronous products overlap the rest are left out. cuDNN's kernels, which the step ran until
session 20, took 12.7 ms forward and 24.8 ms backward (with its two helper kernels) on an H100 (session 13's
profile); these took 10.0, 13.3 (dk/dv) and 11.0 (dq) in session 20's. One JSON line per kernel, with and
without dropout. ``spill_sass``: local-memory loads and stores (spilled
registers), in the loops over passes and in the whole kernel; ``bar_sync`` and ``shared_memory_ops``: a thread's
barriers and shared-memory accesses per pass, where warps wait on each other (the issue time leaves them out);
``registers`` a thread, spill ``stack_bytes`` (``cuobjdump``) and the ``programs_per_sm`` those registers allow
(the forward honours ``KernelConfig.fwd_maxnreg``).
"""

from __future__ import annotations

import argparse
import json

import triton

from benchmarks.attention_backends import add_shape_args
from benchmarks.fused_ln_isa import (
    compile_sm90,
    disassemble,
    issue_ms,
    loop_bodies,
    nvdisasm_path,
    programs_per_sm,
    resource_usage,
    sass_counts,  # fmt: skip
)

PEAK_FLOPS = 989e12
_COMMON = {"T": "i32", "H": "i32", "s_b": "i32", "s_t": "i32", "s_o_b": "i32", "s_o_t": "i32", "qk_scale": "fp32"}
SIGNATURES = {
    "attn_fwd": {"QKV": "*bf16", "O": "*bf16", "LSE": "*fp32", "SEED": "*i64", "FLAGS": "*u8", **_COMMON,
                 "p_int": "i32", "drop_scale": "fp32"},
    "attn_bwd_dkdv": {"QKV": "*bf16", "DO": "*bf16", "LSE": "*fp32", "DELTA": "*fp32", "FLAGS": "*u8",
                      "DQKV": "*bf16", "DBIAS": "*fp32", **_COMMON, "sm_scale": "fp32", "drop_scale": "fp32",
                      "n_blocks": "i32"},
}  # fmt: skip
SIGNATURES["attn_bwd_dq"] = {"QKV": "*bf16", "DO": "*bf16", "O": "*bf16", "LSE": "*fp32", "DELTA": "*fp32",
                             "FLAGS": "*u8", "DQKV": "*bf16", "DBIAS": "*fp32", **_COMMON, "sm_scale": "fp32",
                             "drop_scale": "fp32", "n_blocks": "i32"}  # fmt: skip
PRODUCTS = {"attn_fwd": 2, "attn_bwd_dkdv": 4, "attn_bwd_dq": 3}  # matrix products per pass
SPILLS = ("STL", "LDL")  # local-memory stores and loads: registers spilled


def pass_loops(text: str, nvdisasm) -> list[dict[str, int]]:
    """Opcode counts of a listing's loops over passes: the innermost loops that run matrix products."""
    bodies = loop_bodies(text)
    inner = [b for b in bodies if not any(len(o) < len(b) and o in b for o in bodies)]
    counts = [sass_counts(b"", nvdisasm, b) for b in inner]
    return [c for c in counts if any("GMMA" in op for op in c)]


def causal_passes(tokens: int, block_m: int, block_n: int, kernel: str = "attn_fwd") -> tuple[int, int]:
    """(masked, whole) passes per head of ``kernel``'s two loops, as its loop bounds count them."""
    masked = whole = 0
    if kernel == "attn_bwd_dkdv":  # per key block, over the query blocks that see it
        for start_n in range(0, tokens, block_n):
            edge = -(-(start_n + block_n) // block_m) * block_m
            masked += len(range((start_n // block_m) * block_m, min(edge, tokens), block_m))
            whole += len(range(edge, tokens, block_m))
        return masked, whole
    for start_m in range(0, tokens, block_m):  # the forward and dq: a program per query block, over key blocks
        edge = (start_m // block_n) * block_n
        whole += len(range(0, edge, block_n))
        masked += len(range(edge, min(start_m + block_m, tokens), block_n))
    return masked, whole


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(ap)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--fused-attention-config", default=None, metavar="JSON",
                    help="count the kernels under this KernelConfig (as attention_sweep --best writes it)")  # fmt: skip
    args = ap.parse_args(argv)
    from benchmarks.profile_train import apply_kernel_configs
    from jowa_core.models import fused_attention, fused_attention_kernels

    previous = fused_attention.kernel_config()
    apply_kernel_configs(args, ap)
    try:
        _count(args, fused_attention, fused_attention_kernels)
    finally:
        fused_attention.set_kernel_config(previous)


def _count(args, fused_attention, fused_attention_kernels) -> None:
    nvdisasm = nvdisasm_path("attention_isa")
    cfg = fused_attention.kernel_config()
    D = args.head_size
    for name, sig in SIGNATURES.items():
        fwd = name == "attn_fwd"
        bm, bn, warps = (cfg.fwd_m, cfg.fwd_n, cfg.fwd_warps) if fwd else (cfg.bwd_m, cfg.bwd_n, cfg.bwd_warps)
        masked, whole = (n * args.batch * args.heads * args.layers for n in causal_passes(args.tokens, bm, bn, name))
        flops = (masked + whole) * PRODUCTS[name] * 2 * bm * bn * D
        for dropout in (True, False):
            # the backwards as in training: the QKV bias's gradient summed in the kernels
            consts = {"D": D, "DROPOUT": dropout, **({} if fwd else {"HAS_DBIAS": True}), "BLOCK_M": bm, "BLOCK_N": bn}
            if fwd:  # the draw's uniforms: 16 bits, or 8 (KernelConfig.dropout_bits)
                consts["BITS"] = cfg.dropout_bits
            maxnreg = cfg.fwd_maxnreg if fwd else 0
            cubin = compile_sm90(getattr(fused_attention_kernels, name), sig, consts, warps, maxnreg=maxnreg or None)
            text = disassemble(cubin, nvdisasm)
            usage = resource_usage(cubin, nvdisasm)
            usage["programs_per_sm"] = programs_per_sm(usage["registers"], warps)
            loops = pass_loops(text, nvdisasm)
            if len(loops) != 2:
                raise SystemExit(f"attention_isa: expected two loops over passes in {name}, found {len(loops)}.")
            short_loop, long_loop = sorted(loops, key=lambda c: sum(c.values()))
            short, long = sum(short_loop.values()), sum(long_loop.values())
            stalls = {  # barriers and shared-memory accesses a thread, per pass: data moved between threads
                kind: {"masked": sum(n for op, n in long_loop.items() if op.startswith(prefixes)),
                       "whole": sum(n for op, n in short_loop.items() if op.startswith(prefixes))}
                for kind, prefixes in (("bar_sync", ("BAR.SYNC",)), ("shared_memory_ops", ("LDS", "STS")))
            }  # fmt: skip
            spills = {
                "in_pass_loops": sum(n for c in loops for op, n in c.items() if op.startswith(SPILLS)),
                "in_kernel": sum(n for op, n in sass_counts(b"", nvdisasm, text).items() if op.startswith(SPILLS)),
            }
            warp_instr = (masked * long + whole * short) * warps
            print(json.dumps({
                "kernel": name, "dropout": dropout, "tiles": [bm, bn, warps],
                **({"dropout_bits": cfg.dropout_bits} if fwd else {}),
                "loop_sass_per_thread": {"masked": long, "whole": short},
                "hgmma_per_pass": sum(n for op, n in loops[0].items() if "GMMA" in op), "spill_sass": spills, **stalls,
                **usage,
                "passes_per_step": {"masked": masked, "whole": whole},
                "issue_ms": round(issue_ms(warp_instr), 2),
                "tensor_ms": round(flops / PEAK_FLOPS * 1e3, 2), "triton": triton.__version__,
                "shape": [args.batch, args.heads, args.tokens, D], "layers": args.layers,
            }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
