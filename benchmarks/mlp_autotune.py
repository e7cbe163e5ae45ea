"""The transformer's MLP alone, compiled with inductor's default matrix products and with max-autotune.

    python -m benchmarks.mlp_autotune [--rows 151552] [--reps 20] [--profile]

At jowa_150m's training shape (batch 512 x 296 tokens = 151,552 rows; fc1 768 -> 3072, exact GELU, fc2
3072 -> 768, bf16 autocast, as ``world_action.Block.mlp`` without its dropout) it times forward and backward of
the same module compiled twice: ``torch.compile(mlp)`` (cuBLAS products, GELU and its backward as separate
Triton passes, about 20 ms of jowa_150m's step) and ``torch.compile(mlp, mode="max-autotune-no-cudagraphs")``
(Triton templates where they win, which can take the GELU into fc1's epilogue and its backward into the
input-gradient product's). A quick A/B of the lever before the training loop's minutes-long max-autotune
compile (``python -m benchmarks --inductor max_autotune_gemm=1``). One JSON line per variant: ms per forward +
backward, the largest difference of its gradients from eager's, and with ``--profile`` its kernels. On a CPU
it runs eager and the default compile on a few rows (a smoke run).
"""

from __future__ import annotations

import argparse
import copy
import json
from collections import defaultdict

import torch
from torch import nn

from benchmarks.fused_ln_sweep import time_ms
from jowa_core.runtime import resolve_device

MODES = {"eager": None, "compile": "default", "max_autotune": "max-autotune-no-cudagraphs"}


def kernels_ms(step, dev: torch.device, top: int = 12) -> dict[str, float]:
    """GPU time per step of each kernel name over 3 profiled steps, largest first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize(dev)
    by_name: dict[str, float] = defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            by_name[e.name[:90]] += e.device_time / 3e3
    return {k: round(v, 3) for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])[:top]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=151_552)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--variants", nargs="+", choices=list(MODES), default=None,
                    help="default: all three on CUDA, eager and compile on a CPU")  # fmt: skip
    ap.add_argument("--profile", action="store_true", help="CUDA: also list each variant's kernels")
    args = ap.parse_args(argv)
    dev = resolve_device(args.device)
    cuda = dev.type == "cuda"
    variants = args.variants or (list(MODES) if cuda else ["eager", "compile"])
    torch.manual_seed(0)
    d = args.width
    mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)).to(dev)
    dtype = torch.bfloat16 if cuda else torch.float32
    x = torch.randn(args.rows, d, device=dev, dtype=dtype, requires_grad=True)  # the LayerNorm's output
    g = torch.randn(args.rows, d, device=dev, dtype=dtype)
    name = torch.cuda.get_device_name(dev) if cuda else "cpu"
    reference = None
    for variant in variants:
        module = copy.deepcopy(mlp)  # its own code cache entry per compile mode, the same weights
        fn = module if MODES[variant] is None else torch.compile(module, mode=MODES[variant])
        params = [x, *module.parameters()]

        def step(fn=fn, params=params) -> list[torch.Tensor]:
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
                out = fn(x)
            return torch.autograd.grad(out, params, g)

        grads = step()  # compiles
        reference = reference if reference is not None else grads
        diff = max(float((a.float() - e.float()).abs().max() / e.float().abs().max().clamp_min(1e-12))
                   for a, e in zip(grads, reference))  # fmt: skip
        rec = {"variant": variant, "device_name": name, "torch": torch.__version__, "rows": args.rows, "width": d,
               "ms_fwd_bwd": round(time_ms(step, args.reps, dev), 3), "grad_rel_diff_vs_first": diff}  # fmt: skip
        if args.profile and cuda:
            rec["kernels_ms"] = kernels_ms(step, dev)
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
