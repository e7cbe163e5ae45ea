"""Where a stage-2 training step's time goes, variant by variant: prints one JSON object per variant.

    python benchmarks/profile_train.py [--preset jowa_150m] [--batch-size 512] [--steps 10]
                                       [--variants eager compile_forward compile_loss] [--profile]

The step is the training loop's own (``step_loss``, backward, gradient clipping, fused AdamW on CUDA,
bf16 autocast), fed from batches already on the device, so that the loop's data path is left out and
the figure is the step itself. Variants: ``eager``; ``compile_forward`` (``torch.compile`` of the model's
forward alone, the loop's recipe before session 7); ``compile_loss`` (what ``train_world_action(compile=True)``
does: forward and the joint loss in one compiled graph, so the 2048-way cross-entropy and the critic's small
kernels fuse); ``compile_loss_pure_bf16`` (the same with every parameter, and so the residual stream, in bf16:
not a training recipe, AdamW on bf16 weights loses small updates, but a bound on what halving the bytes of the
elementwise passes would give); ``*_no_dropout`` (the same model with every dropout at 0: what dropout costs;
on an H200, 36 ms of jowa_150m's 255 ms step, session 11); ``compile_loss_fused_ln`` (``compile_loss`` with
``model.use_fused_layer_norm(True)``: each residual add, its dropout and the next LayerNorm in one hand-written
Triton op, ``jowa_core.models.fused_ln``, instead of inductor's kernels); ``compile_loss_fused_ln_qkv`` (that with
``model.use_fused_qkv(True)``: one product for each layer's queries, keys and values, so the backward computes
the input's gradient in one product instead of three summed); ``compile_loss_fused_ln_qkv_gelu`` (that with
``model.use_fused_bias_gelu(True)``: each MLP's first bias add and GELU in one op, ``jowa_core.models.fused_gelu``,
whose backward also sums the bias gradient); ``compile_loss_fused_ln_qkv_gelu_bias`` (that with
``model.use_fused_branch_bias(True)``: the attention's output bias and the MLP's second bias added inside the fused
LayerNorm op, whose backward sums their gradients); ``*_attn`` (with ``model.use_fused_attention(True)``: the
Triton flash-attention op, ``jowa_core.models.fused_attention``, on the packed QKV product). ``--inductor KEY=VALUE`` sets inductor
options for the whole process (``fallback_random=1``, ``triton.persistent_reductions=0``).
Reports ms per step (CUDA events around ``--steps`` steps after as many warm-up steps), tokens/s,
MFU (the suite's FLOP count) and peak memory; ``--profile`` adds, from ``torch.profiler`` over three
steps, the GPU's busy share of the wall time and the kernels by share of GPU time.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from benchmarks.train_throughput import counted_flops_per_sample
from jowa_core.config import preset
from jowa_core.data.segments import SegmentSampler
from jowa_core.games import action_masks
from jowa_core.models.world_action import WorldActionModel
from jowa_core.runtime import resolve_device
from jowa_core.training import Batch, clip_and_step, make_sources, param_groups, set_stage, step_loss, to_batches

VARIANTS = (
    "eager", "compile_forward", "compile_loss", "compile_loss_pure_bf16", "eager_no_dropout", "compile_loss_no_dropout",
    "compile_loss_fused_ln", "compile_loss_fused_ln_qkv", "compile_loss_fused_ln_qkv_gelu",
    "compile_loss_fused_ln_qkv_gelu_bias", "compile_loss_fused_ln_qkv_attn", "compile_loss_fused_ln_qkv_gelu_bias_attn",
)  # fmt: skip


def kernel_kind(name: str) -> str:
    n = name.lower()
    if "flash" in n or "fmha" in n or "attention" in n:
        return "attention"
    if "gemm" in n or "sm90" in n or "cutlass" in n or "matmul" in n or "xmma" in n:
        return "matmul"
    if "adam" in n:
        return "optimizer"
    if "dropout_add_layer_norm" in n:  # jowa_core.models.fused_ln's hand-written Triton kernels
        return "fused dropout/add/LayerNorm (fused_ln)"
    if n.startswith("attn_"):  # jowa_core.models.fused_attention's Triton kernels
        return "attention"
    if "bias_gelu" in n:  # jowa_core.models.fused_gelu's
        return "fused bias/GELU (fused_gelu)"
    if "triton" in n:
        return "triton (fused elementwise/reductions)"
    if "softmax" in n or "nll" in n or "cross_entropy" in n:
        return "softmax/cross-entropy (eager)"
    if "norm" in n:
        return "norm"
    if "memcpy" in n or "memset" in n or "copy" in n:
        return "copies"
    return "other elementwise"


def apply_inductor_settings(settings: list[str]) -> dict[str, object]:
    """``KEY=VALUE`` strings onto ``torch._inductor.config``, each value cast to the setting's type."""
    import torch._inductor.config as inductor_config

    applied: dict[str, object] = {}
    for kv in settings:
        key, sep, value = kv.partition("=")
        *path, leaf = key.split(".")  # dotted keys reach nested settings: triton.persistent_reductions=0
        owner = inductor_config
        for part in path:
            owner = getattr(owner, part, None)
        if not sep or owner is None or not hasattr(owner, leaf):
            raise SystemExit(f"--inductor {kv!r}: expected KEY=VALUE with KEY a torch._inductor.config setting.")
        kind = type(getattr(owner, leaf))
        applied[key] = kind(int(value)) if kind is bool and value.isdigit() else kind(value)
        setattr(owner, leaf, applied[key])
    return applied


SDPA_BACKENDS = ("flash", "cudnn", "mem_efficient", "math")


def disable_sdpa_backends(names: list[str]) -> list[str]:
    """Turn SDPA backends off for the whole process (``torch.backends.cuda.enable_<name>_sdp(False)``), so
    that attention runs on the others: ``--sdpa-off cudnn`` puts the training forward on the flash kernel,
    whose dropout may cost less than cuDNN's (12.6 against 6.9 ms per step with and without, H200)."""
    for name in names:
        if name not in SDPA_BACKENDS:
            raise SystemExit(f"--sdpa-off {name!r}: choose from {', '.join(SDPA_BACKENDS)}.")
        getattr(torch.backends.cuda, f"enable_{name}_sdp")(False)
    return list(names)


KERNEL_CONFIGS = {"fused_ln_config": "fused_ln", "fused_attention_config": "fused_attention",
                  "fused_gelu_config": "fused_gelu"}  # fmt: skip
"""Each ``--fused-*-config`` flag's argparse name and the ``jowa_core.models`` op whose ``KernelConfig`` it sets."""


def apply_kernel_configs(args: argparse.Namespace, ap: argparse.ArgumentParser) -> dict:
    """``--fused-ln-config`` / ``--fused-attention-config`` / ``--fused-gelu-config``, those ``args`` has and gives:
    the process's tiles and switches of each op from a JSON ``KernelConfig``, as that op's sweep writes it with
    ``--best``; a file it cannot read is a usage error of ``ap``. Returns {flag's name: the config applied}."""
    applied = {}
    for name, op in KERNEL_CONFIGS.items():
        path = getattr(args, name, None)
        if not path:
            continue
        module = importlib.import_module(f"jowa_core.models.{op}")
        try:
            cfg = module.KernelConfig.from_json(path)
        except (OSError, ValueError, TypeError) as e:
            ap.error(f"--{name.replace('_', '-')}: {e}")
        module.set_kernel_config(cfg)
        applied[name] = cfg
    return applied


def run_variant(
    variant: str, p, batches: list[Batch], dev: torch.device, steps: int, profile: bool, peak: float | None
):
    torch.manual_seed(0)
    no_dropout = variant.endswith("_no_dropout")
    cfg = replace(p.model, embed_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0, q_dropout=0.0) if no_dropout else p.model
    model = WorldActionModel(cfg).to(dev).train().use_fused_layer_norm("_fused_ln" in variant)
    model.use_fused_qkv("_qkv" in variant).use_fused_bias_gelu("_gelu" in variant)
    model.use_fused_branch_bias("_bias" in variant).use_fused_attention(variant.endswith("_attn"))
    if variant == "compile_loss_pure_bf16":
        model.to(torch.bfloat16)
    set_stage(model, 2)
    opt = torch.optim.AdamW(param_groups(model, 2, p.train), betas=(0.9, 0.999), eps=1e-8, fused=dev.type == "cuda")
    cuda = dev.type == "cuda"

    fwd = torch.compile(model) if variant == "compile_forward" else model

    def loss_of(tokens, task_ids, rewards, ends, mask, legal):
        b = Batch(tokens, task_ids, rewards, ends, mask, legal)
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=cuda):
            terms = step_loss(fwd, model, b, stage=2, train_cfg=p.train)
        return terms.total, torch.stack([v.float() for v in terms.metrics().values()])

    loss_fn = torch.compile(loss_of) if variant.startswith("compile_loss") else loss_of

    def step(i: int) -> torch.Tensor:
        b = batches[i % len(batches)]
        opt.zero_grad(set_to_none=True)
        total, metrics = loss_fn(b.tokens, b.task_ids, b.rewards, b.ends, b.mask, b.legal)
        total.backward()
        clip_and_step(opt, [q for q in model.parameters() if q.requires_grad], p.train.grad_clip)
        return metrics

    t0 = time.perf_counter()
    for i in range(3):
        step(i)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    warm_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    for i in range(2):  # steady state before timing
        step(i)
    sync()
    if cuda:  # the timed steps alone under Nsight Compute: ``ncu --profile-from-start off`` (the profiler's
        # start/stop hold for every thread; an NVTX push/pop range only for the main one, and autograd launches the
        # backward's kernels from its own thread, so session 22's ``--nvtx-include`` found none of them)
        torch.cuda.profiler.start()
        torch.cuda.nvtx.range_push("timed_steps")
    t0 = time.perf_counter()
    for i in range(steps):
        m = step(i)
    m.tolist()  # one sync, as at a log step
    sync()
    if cuda:
        torch.cuda.nvtx.range_pop()
        torch.cuda.profiler.stop()
    ms = (time.perf_counter() - t0) / steps * 1e3
    B, T = batches[0].tokens.shape
    out = {"variant": variant, "preset": p.name, "batch_size": B, "dropout": not no_dropout,
           "ms_per_step": round(ms, 2), "tokens_per_s": round(B * T / ms * 1e3, 1),
           "warmup_s": round(warm_s, 1)}  # fmt: skip
    if cuda:
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
    if peak is not None:
        out["mfu"] = round(counted_flops_per_sample(p.model) * B / (ms / 1e3) / peak, 4)
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as tprofile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        sync()
        with tprofile(activities=acts) as prof:
            t0 = time.perf_counter()
            for i in range(3):
                step(i)
            sync()
            wall_us = (time.perf_counter() - t0) * 1e6
        kinds: dict[str, float] = defaultdict(float)
        top: dict[str, float] = defaultdict(float)
        busy = 0.0
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                kinds[kernel_kind(e.name)] += e.device_time
                top[e.name[:90]] += e.device_time
                busy += e.device_time
        sort = "cuda_time_total" if cuda else "cpu_time_total"
        print(f"== {variant}\n" + prof.key_averages().table(sort_by=sort, row_limit=50, max_name_column_width=70),
              file=sys.stderr)  # fmt: skip
        out["gpu_busy_share"] = round(busy / wall_us, 3) if cuda else None
        out["ms_by_kind"] = {k: round(v / 3e3, 2) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}
        out["top_kernels_ms"] = {k: round(v / 3e3, 2) for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:40]}
    return out


def main() -> None:
    from benchmarks.train_throughput import bf16_peak, write_cache

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="jowa_150m")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--profile", action="store_true")
    ap.add_argument(
        "--inductor",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="torch._inductor.config settings for the compiled variants, e.g. coordinate_descent_tuning=1",
    )
    ap.add_argument("--sdpa-off", nargs="*", default=[], metavar="BACKEND",
                    help=f"SDPA backends to turn off for the process ({', '.join(SDPA_BACKENDS)})")  # fmt: skip
    ap.add_argument("--fused-ln-config", default=None, metavar="JSON",
                    help="a KernelConfig for the fused_ln variants, as benchmarks.fused_ln_sweep --best writes it")  # fmt: skip
    ap.add_argument("--fused-attention-config", default=None, metavar="JSON",
                    help="a KernelConfig for the *_attn variants, as benchmarks.attention_sweep --best writes it")  # fmt: skip
    ap.add_argument("--fused-gelu-config", default=None, metavar="JSON",
                    help="a KernelConfig for the *_gelu* variants, as benchmarks.bias_gelu_sweep --best writes")  # fmt: skip
    args = ap.parse_args()
    apply_inductor_settings(args.inductor)
    disable_sdpa_backends(args.sdpa_off)
    kernel_configs = apply_kernel_configs(args, ap)
    dev = resolve_device(args.device)
    p = preset(args.preset)
    B = args.batch_size or (p.train.batch_size if dev.type == "cuda" else 8)
    legal = torch.as_tensor(action_masks(), device=dev)
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        caches = [write_cache(Path(tmp) / f"{g}.tokens.h5", g, p.model.obs_vocab_size, 20_000, rng)
                  for g in ("Pong", "Breakout")]  # fmt: skip
        sampler = SegmentSampler(make_sources(caches, p.model), B, seed=0)
        it = iter(sampler)
        batches = [to_batches(next(it), 1, dev, legal)[0] for _ in range(4)]
    peak = bf16_peak(dev)
    info = {
        "torch": torch.__version__,
        "inductor": args.inductor,
        **({"sdpa_off": args.sdpa_off} if args.sdpa_off else {}),
        **{name: vars(cfg) for name, cfg in kernel_configs.items()},
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
    }
    for v in args.variants:
        try:
            print(json.dumps({**info, **run_variant(v, p, batches, dev, args.steps, args.profile, peak)}), flush=True)
        except Exception as e:  # noqa: BLE001 - one failing variant (out of memory, say) must not hide the rest
            print(
                json.dumps({**info, "variant": v, "batch_size": B, "error": f"{type(e).__name__}: {e}"[:400]}),
                flush=True,
            )
        if dev.type == "cuda":  # the variant's model and optimizer are gone with its frame
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
