"""The Triton flash-attention op's tiles at the training shape, forward and backward apart.

    python -m benchmarks.attention_sweep [--batch 512] [--tokens 296] [--best best.json]

At jowa_150m's attention shape (batch 512, 12 heads, 296 tokens of 64, bf16, causal, dropout 0.1; the packed
(B, T, 3, H, D) product, the QKV bias's gradient summed in the backward as in training) it times, with CUDA events
over ``--reps`` calls after warm-up, ``jowa_core.models.fused_attention``'s forward under each forward tile
(queries x keys, warps, pipeline stages) and its backward under each backward tile. A tile the GPU cannot run (too much shared memory, say) gets an ``error`` line. ``--best`` writes the fastest forward and
backward tiles as one ``KernelConfig`` (JSON), which ``python -m benchmarks --fused-attention-config`` and
``benchmarks/profile_train.py --fused-attention-config`` read. CUDA only (``--device cpu``: a smoke run of the
script on the torch reference, where tiles change nothing).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
from dataclasses import asdict, replace

import torch

from benchmarks.attention_backends import add_shape_args
from benchmarks.fused_ln_sweep import time_configs, time_ms
from jowa_core.models import fused_attention as fa

FWD_TILES = [{"fwd_m": m, "fwd_n": n, "fwd_warps": w, "fwd_stages": s, "fwd_maxnreg": 0}
             for m, n, w, s in itertools.product((64, 128), (32, 64), (4, 8), (2, 3))]  # fmt: skip
# the default tile held to 168 registers a thread: three programs an SM instead of two (KernelConfig.fwd_maxnreg)
FWD_TILES += [{"fwd_m": 64, "fwd_n": 64, "fwd_warps": 4, "fwd_stages": s, "fwd_maxnreg": 168} for s in (2, 3)]
BWD_BLOCKS = ((32, 64), (64, 32), (64, 64), (64, 128), (128, 64))
BWD_TILES = [{"bwd_m": m, "bwd_n": n, "bwd_warps": w, "bwd_stages": s}
             for (m, n), w, s in itertools.product(BWD_BLOCKS, (4, 8), (2, 3))]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_args(ap)
    ap.add_argument("--p", type=float, default=0.1)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--best", default=None, help="write the fastest KernelConfig here (JSON)")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the script (torch reference)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("attention_sweep times Triton kernels on a CUDA device; none is available here "
                         "(--device cpu runs the script on the torch reference, for a smoke check).")  # fmt: skip
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    B, H, T, D, p = args.batch, args.heads, args.tokens, args.head_size, args.p
    g = torch.Generator(device=dev).manual_seed(0)
    qkv = torch.randn(B, T, 3, H, D, device=dev, generator=g).to(dtype)
    do = torch.randn(B, T, H, D, device=dev, generator=g).to(dtype)
    bias = torch.zeros(3 * H * D, device=dev)
    seed = torch.tensor([7], device=dev)
    info = {"device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "torch": torch.__version__, "shape": [B, H, T, D], "dropout": p}  # fmt: skip
    previous = fa.kernel_config()
    best: dict[str, tuple[float, dict]] = {}
    for part, tiles in (("fwd", FWD_TILES), ("bwd", BWD_TILES)):

        def measure(part: str = part) -> float:
            saved = fa._attention(qkv, seed, p, bias)
            if part == "fwd":
                return time_ms(lambda: fa._attention(qkv, seed, p, bias), args.reps, dev)
            return time_ms(functools.partial(fa._attention_backward, do, qkv, *saved, seed, p, True), args.reps, dev)

        for tile, (cfg, ms, e) in zip(tiles, time_configs(fa, [replace(previous, **t) for t in tiles], measure)):
            rec = {"part": part, "config": asdict(cfg), **info}
            if e is not None:  # a tile the GPU cannot run is a figure, not the sweep's end
                rec["error"] = f"{type(e).__name__}: {e}"[:300]
            else:
                rec["ms"] = round(ms, 3)
                if part not in best or ms < best[part][0]:
                    best[part] = (ms, tile)
            print(json.dumps(rec), flush=True)
    if len(best) == 2:
        cfg = replace(previous, **best["fwd"][1], **best["bwd"][1])
        print(json.dumps({"part": "best", "config": asdict(cfg), "fwd_ms": round(best["fwd"][0], 3),
                          "bwd_ms": round(best["bwd"][0], 3), **info}), flush=True)  # fmt: skip
        if args.best:
            with open(args.best, "w") as f:
                json.dump(asdict(cfg), f)


if __name__ == "__main__":
    main()
