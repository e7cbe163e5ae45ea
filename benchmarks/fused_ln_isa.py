"""The fused_ln kernels' machine code for Hopper, counted without a GPU.

    python -m benchmarks.fused_ln_isa [--rows 151552] [--width 768] [--kernels fwd,bwd] [--unaligned]

Triton compiles ``jowa_core.models.fused_ln``'s kernels for sm_90 on the CPU, and ``nvdisasm`` (shipped with
triton) lists their SASS. They are compiled as the launch at jowa_150m's shape specializes them: pointers 16-byte
aligned, and the row count and width multiples of 16, so that rows load as 16-byte vectors. ``--unaligned``
compiles them without those facts; the forward's counts quoted before session 21 were taken that way (scalar
loads, about 1.5 times the instructions).

The forward kernel has no loop, so each thread runs its listing once. The backward's persistent loop runs once
per block of rows; its body is counted. Either count gives the time the SMs need to issue a call (warp
instructions over 132 SMs x 4 schedulers at 1.98 GHz, one warp-instruction per scheduler and clock), set beside
the time the call's bytes take at a copy's bandwidth on an H100 (3.0 TB/s) and an H200 (4.3 TB/s). A kernel whose
issue time exceeds its bandwidth time is bound by its instructions: the case for ``KernelConfig.packed_rng``,
whose Philox work is an eighth of the per-element one. An estimate, not a timing: memory stalls and dual issue
are left out. Each line also gives the registers a thread, the programs an SM holds, and the warps whose columns
all lie past the width (a row is a power-of-two block: 1024 columns for 768). One JSON line per configuration:
forward with per-element Philox, packed, and packed with the mask left to the backward (``recompute_mask``, one
byte less to write); backward with the mask read and redrawn, with the mask read in a loop pipelined over 3
stages (``bwd_stages``: its loads become asynchronous copies), and with each row in two power-of-two tiles
(``bwd_split``: 768 = 512 + 256, no masked columns), each with the branch's bias as the loop passes it.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

SMS, SCHEDULERS, CLOCK_HZ = 132, 4, 1.98e9  # H100 SXM and H200: the same SM count and boost clock
COPY_TB_S = {"h100": 3.0, "h200": 4.3}  # device-to-device copies measured on the lent machines
BYTES_PER_ELEMENT = 13  # reads x (fp32) and h (bf16); writes x_new (fp32), y (bf16) and the mask (uint8, 1)
BWD_BYTES_PER_ELEMENT = 17  # reads dy (bf16), dxn (fp32), x_new (fp32), the mask (1); writes dx (fp32), dh (bf16)
SIGNATURE = {"X": "*fp32", "H": "*bf16", "W": "*fp32", "B": "*fp32", "XN": "*fp32", "Y": "*bf16", "MEAN": "*fp32",
             "RSTD": "*fp32", "MASK": "*u8", "SEED": "*i64", "HB": "*fp32", "N": "i32", "C": "i32", "p": "fp32", "p16": "i32",
             "scale": "fp32", "eps": "fp32"}  # fmt: skip
BWD_SIGNATURE = {"DY": "*bf16", "DXN": "*fp32", "XN": "*fp32", "W": "*fp32", "MEAN": "*fp32", "RSTD": "*fp32",
                 "MASK": "*u8", "SEED": "*i64", "DX": "*fp32", "DH": "*bf16", "DW": "*fp32", "DB": "*fp32",
                 "DHB": "*fp32", "N": "i32", "C": "i32", "p16": "i32", "scale": "fp32"}  # fmt: skip
_ADDRESS = re.compile(r"/\*([0-9a-f]{4,})\*/")
_LABEL = re.compile(r"^(\.L_x_\d+):", re.MULTILINE)
_BACK_BRANCH = re.compile(r"/\*([0-9a-f]{4,})\*/[^\n]*\bBRA\b[^\n]*`\((\.L_x_\d+)\)")
_SASS_LINE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


def issue_ms(warp_instructions: float) -> float:
    """Milliseconds for every scheduler of the GPU to issue this many warp instructions, one a cycle each."""
    return warp_instructions / (SMS * SCHEDULERS * CLOCK_HZ) * 1e3


def _run_on_cubin(cubin: bytes, *command: str) -> str:
    """The output of ``command`` with the cubin's file path appended (nvdisasm and cuobjdump read files)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([*command, f.name], capture_output=True, text=True, check=True).stdout


def disassemble(cubin: bytes, nvdisasm: Path) -> str:
    return _run_on_cubin(cubin, str(nvdisasm), "-c")


def resource_usage(cubin: bytes, nvdisasm: Path) -> dict[str, int]:
    """Registers a thread and spill stack bytes of a one-kernel cubin (``cuobjdump``, beside ``nvdisasm``), and the
    programs of ``warps`` warps that the registers let share an SM: ``programs_per_sm(regs, warps)``."""
    out = _run_on_cubin(cubin, str(nvdisasm.with_name("cuobjdump")), "--dump-resource-usage")
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if m is None:
        raise SystemExit(f"cuobjdump gave no resource usage: {out[:200]!r}")
    return {"registers": int(m.group(1)), "stack_bytes": int(m.group(2))}


def programs_per_sm(registers: int, warps: int, sm_registers: int = 65536) -> int:
    """Programs that fit an SM's register file: a warp's registers are allocated 256 at a time (8 a thread)."""
    return sm_registers // (warps * 32 * -(-registers // 8) * 8)


def sass_counts(cubin: bytes, nvdisasm: Path, text: str | None = None) -> dict[str, int]:
    """Instructions of one kernel's listing (or of ``text``, a part of it) by opcode (NOPs, the padding after
    EXIT, left out)."""
    text = disassemble(cubin, nvdisasm) if text is None else text
    counts: dict[str, int] = {}
    for m in _SASS_LINE.finditer(text):
        op = m.group(1)
        if not op.startswith("NOP"):
            counts[op] = counts.get(op, 0) + 1
    return counts


def compile_sm90(
    fn, signature: dict[str, str], consts: dict, warps: int, aligned: bool = True, maxnreg: int | None = None,
    asm: str = "cubin",
) -> Any:  # fmt: skip
    """``fn``'s cubin for sm_90 (``asm="all"``: every stage's text, the ``ttgir`` among them, and the cubin).
    ``aligned``: as a launch on 16-byte-aligned tensors and sizes divisible by 16 builds it (16-byte vectors), the
    case of every op's training shapes; ``maxnreg``: the launch option of that name."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = [*signature, *consts]
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(len(signature))} if aligned else None
    src = ASTSource(fn, {**signature, **dict.fromkeys(consts, "constexpr")},
                    constexprs={(names.index(k),): v for k, v in consts.items()}, attrs=attrs)  # fmt: skip
    options = {"num_warps": warps} | ({"maxnreg": maxnreg} if maxnreg else {})
    stages = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm
    return stages if asm == "all" else stages[asm]


_BLOCKED = re.compile(r"(#blocked\d*) = #ttg\.blocked<\{sizePerThread = \[([\d, ]+)\], threadsPerWarp = \[([\d, ]+)\], "
                      r"warpsPerCTA = \[([\d, ]+)\]")  # fmt: skip


def idle_warps(ttgir: str, tiles: list[tuple[int, int]]) -> int:
    """Warps of a program that hold no column below the width in any of its row tiles: ``tiles`` lists each tile's
    (block, valid columns), as the first [rows, block] fp32 tile read (the residual stream's) lays it out. Such
    warps hold registers and issue instructions for masked elements only."""
    layouts = {m.group(1): [[int(v) for v in g.split(",")] for g in m.groups()[1:]] for m in _BLOCKED.finditer(ttgir)}
    idle: set[int] | None = None
    for block, width in tiles:
        use = re.search(rf"tensor<\d+x{block}x!tt\.ptr<f32>, (#blocked\d*)>", ttgir)  # its pointers, loaded or copied
        if use is None:
            raise SystemExit(f"fused_ln_isa: no [rows, {block}] fp32 tile in the kernel's TTGIR")
        (_, per_thread), (_, lanes), (warp_rows, warp_cols) = layouts[use.group(1)]
        span = per_thread * lanes  # columns one warp covers in one repeat of the layout
        repeat = span * warp_cols
        empty = {r * warp_cols + w for r in range(warp_rows) for w in range(warp_cols)
                 if all(k * repeat + w * span >= width for k in range(-(-block // repeat)))}  # fmt: skip
        idle = empty if idle is None else idle & empty
    return len(idle or ())


def loop_bodies(text: str) -> list[str]:
    """The lines of each of a listing's loops (from a backward branch's label to the branch), in order."""
    labels = {m.group(1): m.end() for m in _LABEL.finditer(text)}
    bodies = [text[labels[m.group(2)] : m.end()] for m in _BACK_BRANCH.finditer(text)
              if labels.get(m.group(2), len(text)) < m.start()]  # fmt: skip
    return [b for b in bodies if len(_ADDRESS.findall(b)) > 1]  # not the "BRA to itself" trap after EXIT


def nvdisasm_path(prog: str) -> Path:
    """triton's own ``nvdisasm``, or a usage error naming ``prog``."""
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    if not path.exists():
        raise SystemExit(f"{prog}: {path} is missing; it ships with triton's NVIDIA backend.")
    return path


def compile_forward(cfg, width: int, aligned: bool = True, h_bias: bool = False) -> dict:
    """The forward kernel's stages for sm_90, as ``_triton_forward`` would launch it (residual and dropout on)."""
    import triton

    from jowa_core.models import fused_ln

    fwd = fused_ln._kernels().dropout_add_layer_norm_fwd
    block_c = triton.next_power_of_2(width)
    packed = cfg.packed_rng and block_c >= 8
    consts = {"HAS_X": True, "DROPOUT": True, "PACKED_RNG": packed, "STORE_MASK": not (packed and cfg.recompute_mask),
              "HAS_HB": h_bias, "BLOCK_ROWS": cfg.fwd_rows, "BLOCK_C": block_c}  # fmt: skip
    return compile_sm90(fwd, SIGNATURE, consts, cfg.fwd_warps, aligned=aligned, asm="all")


def backward_tiles(cfg, width: int) -> list[tuple[int, int]]:
    """The backward's row tiles as (block, valid columns): one of next_power_of_2(width), or ``bwd_split``'s two."""
    from jowa_core.models import fused_ln

    a, b = fused_ln._split_widths(width)
    if cfg.bwd_split and b >= 8:
        return [(a, a), (b, width - a)]
    return [(fused_ln._block_c(width), width)]


def compile_backward(cfg, width: int, aligned: bool = True, h_bias: bool = True) -> dict:
    """The backward kernel's stages for sm_90, as ``_triton_backward`` would launch it inside a block (dx and the
    residual's gradient, dropout; the mask read, or redrawn under ``recompute_mask``; two tiles a row under
    ``bwd_split``)."""
    import triton

    from jowa_core.models import fused_ln

    consts = {"HAS_DXN": True, "HAS_DX": True, "DROPOUT": True, "RECOMPUTE_MASK": cfg.recompute_mask,
              "HAS_HB": h_bias, "BLOCK_ROWS": cfg.bwd_rows}  # fmt: skip
    tiles = backward_tiles(cfg, width)
    if len(tiles) == 2:
        kernel = fused_ln._kernels().dropout_add_layer_norm_bwd_split
        consts |= {"BLOCK_A": tiles[0][0], "BLOCK_B": tiles[1][0], "ROW_CALLS": triton.next_power_of_2(width) // 8}
    else:
        kernel = fused_ln._kernels().dropout_add_layer_norm_bwd
        consts |= {"BLOCK_C": tiles[0][0]}
    consts |= {"STAGES": cfg.bwd_stages}  # the kernels' last constexpr
    return compile_sm90(kernel, BWD_SIGNATURE, consts, cfg.bwd_warps, aligned=aligned, asm="all")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=151_552, help="rows per call (jowa_150m: 512 x 296 tokens)")
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--kernels", default="fwd,bwd", help="fwd, bwd or both (comma-separated)")
    ap.add_argument("--unaligned", action="store_true",
                    help="compile without the launch's alignment facts (scalar loads; the pre-session-21 figures)")  # fmt: skip
    args = ap.parse_args(argv)
    kernels = args.kernels.split(",")
    if not kernels or set(kernels) - {"fwd", "bwd"}:
        ap.error(f"--kernels takes fwd, bwd or fwd,bwd, not {args.kernels!r}")
    import triton

    from jowa_core.models import fused_ln

    nvdisasm = nvdisasm_path("fused_ln_isa")
    default = fused_ln.kernel_config()
    aligned = not args.unaligned
    block_c = triton.next_power_of_2(args.width)

    def emit(kernel: str, cfg, stages: dict, per_thread: int, counts: dict, warps: int, calls_per_thread: int,
             gigabytes: float, tiles: list[tuple[int, int]]) -> None:  # fmt: skip
        usage = resource_usage(stages["cubin"], nvdisasm)
        warp_instr = calls_per_thread * warps * per_thread
        print(json.dumps({
            "kernel": kernel, "config": asdict(cfg), "rows": args.rows, "width": args.width, "aligned": aligned,
            "triton": triton.__version__, "sass_per_thread": per_thread,
            "integer_multiplies": sum(n for op, n in counts.items() if op.startswith(("IMAD", "IMUL"))),
            "shared_memory_ops": sum(n for op, n in counts.items() if op.startswith(("LDS", "STS"))),
            "vector_loads": sum(n for op, n in counts.items() if op.startswith("LDG") and op.endswith(".128")),
            "async_copies": sum(n for op, n in counts.items() if op.startswith("LDGSTS")),
            **usage, "programs_per_sm": programs_per_sm(usage["registers"], warps),
            "idle_warps": idle_warps(stages["ttgir"], tiles), "warps": warps,
            "issue_ms": round(issue_ms(warp_instr), 3),
            **{f"bandwidth_ms_{k}": round(gigabytes / tb_s, 3) for k, tb_s in COPY_TB_S.items()},
        }), flush=True)  # fmt: skip

    if "fwd" in kernels:
        for packed, recompute in ((False, False), (True, False), (True, True)):
            cfg = replace(default, packed_rng=packed, recompute_mask=recompute)
            stages = compile_forward(cfg, args.width, aligned)
            counts = sass_counts(stages["cubin"], nvdisasm)
            gigabytes = args.rows * args.width * (BYTES_PER_ELEMENT - recompute) / 1e9  # no mask written
            emit("fwd", cfg, stages, sum(counts.values()), counts, cfg.fwd_warps,
                 math.ceil(args.rows / cfg.fwd_rows), gigabytes, [(block_c, args.width)])  # fmt: skip
    if "bwd" in kernels:
        for recompute, stages, split in ((False, 1, False), (True, 1, False), (False, 3, False), (False, 1, True)):
            cfg = replace(default, packed_rng=True, recompute_mask=recompute, bwd_stages=stages, bwd_split=split)
            stages = compile_backward(cfg, args.width, aligned)
            bodies = loop_bodies(disassemble(stages["cubin"], nvdisasm))
            if len(bodies) != 1:
                raise SystemExit(f"fused_ln_isa: expected the backward's one row loop, found {len(bodies)} loops")
            counts = sass_counts(stages["cubin"], nvdisasm, bodies[0])
            gigabytes = args.rows * args.width * (BWD_BYTES_PER_ELEMENT - recompute) / 1e9  # no mask read
            emit("bwd", cfg, stages, sum(counts.values()), counts, cfg.bwd_warps,
                 math.ceil(args.rows / cfg.bwd_rows), gigabytes, backward_tiles(cfg, args.width))  # fmt: skip


if __name__ == "__main__":
    main()
