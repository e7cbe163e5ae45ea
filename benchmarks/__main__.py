"""The benchmark suite: one JSON object per figure, and a markdown table for the README.

    python -m benchmarks [--suite train planner tokenizer data] [--preset tiny jowa_40m ...]
                         [--device auto|cpu|cuda] [--quick] [--jsonl out.jsonl] [--markdown out.md]

Every figure is printed as it is measured (so a killed run keeps what it had) with its name, value,
unit, preset, device, torch version and the command that reproduces it. The scripts beside this file
(``train_throughput.py`` ...) hold the measuring code and still run alone.

Suites:
- ``train``: stage-2 training through the real loop (``train_world_action``): tokens/s, samples/s, peak
  memory, and on CUDA MFU = model FLOPs (3x the forward's, counted by ``torch.utils.flop_counter``,
  attention counted in full) x samples/s over the device's dense bf16 peak. CUDA runs bf16 autocast,
  fused AdamW and, unless ``--no-compile``, ``torch.compile``.
- ``planner``: decisions/s of greedy and beam search (2x2, 4x2) at 1 and 16 environments, MCTS at 16,
  ours and the per-node reference (``--reference``, on by default on CPU), with the ratio and whether
  both chose the same actions. bf16 autocast on CUDA, as the agent acts. Beam search also runs with the
  history layout that its default did not pick (``..._copied_history`` or ``..._shared_history``; the
  default is ``planning.shares_history``), the A/B behind it.
- ``tokenizer``: tiny (and on CUDA the official) tokenizer's training and encoding frames/s, and
  token-cache building frames/s end to end.
- ``data``: segments/s from a token cache (sampler alone, and a DataLoader with N workers) and
  collection transitions/s on a real ALE game (skipped with a reason where ale-py is missing).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shlex
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jowa_core.config import preset
from jowa_core.runtime import resolve_device

SUITES = ("train", "planner", "tokenizer", "data")
PRESETS = ("tiny", "jowa_40m", "jowa_70m", "jowa_150m")
Figure = dict[str, Any]


def _figure(name: str, value: float, unit: str, preset_name: str | None, **extra: Any) -> Figure:
    return {"name": name, "value": round(float(value), 4), "unit": unit, "preset": preset_name, **extra}


# ---------------------------------------------------------------------------------------------
# Suites: generators of figures


def train_suite(presets: list[str], device: torch.device, args: argparse.Namespace) -> Iterator[Figure]:
    from benchmarks.train_throughput import bf16_peak, counted_flops_per_sample, write_cache
    from jowa_core.training import fused_switches, read_metrics, train_world_action

    cuda = device.type == "cuda"
    compile_ = cuda and not args.no_compile
    switches = (False if args.no_fused_ln else None, args.fused_qkv, args.fused_bias_gelu, args.fused_branch_bias,
                args.fused_attention)  # fmt: skip
    for name in presets:
        p = preset(name)
        fused = fused_switches(device, *switches, head_size=p.model.head_dim)
        p = replace(p, train=replace(p.train, life_start_share=0.0))  # the synthetic caches have no lives
        batch = args.batch_size or (p.train.batch_size // 4 if cuda else 8)
        steps = args.steps or (20 if cuda else 3)
        with tempfile.TemporaryDirectory() as tmp:
            rng = np.random.default_rng(0)
            caches = [write_cache(Path(tmp) / f"{g}.tokens.h5", g, p.model.obs_vocab_size, 20_000, rng)
                      for g in ("Pong", "Breakout")]  # fmt: skip
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            train_world_action(p, caches, Path(tmp) / "run", stage1_steps=0, stage2_steps=2 * steps,
                               batch_size=batch, log_every=steps, save_every=10**9, device=device, resume=False,
                               progress=False, num_threads=args.threads, keep_last=1, compile=compile_,
                               fused_layer_norm=fused.layer_norm, fused_qkv=fused.qkv,
                               fused_bias_gelu=fused.bias_gelu, fused_branch_bias=fused.branch_bias,
                               fused_attention=fused.attention)  # fmt: skip
            rec = read_metrics(Path(tmp) / "run")[-1]  # the second interval: warm-up and compilation excluded
        tag = {"batch_size": batch, "steps_timed": steps, "compile": compile_, "fused_ln": fused.layer_norm,
               "fused_qkv": fused.qkv, "fused_bias_gelu": fused.bias_gelu, "fused_branch_bias": fused.branch_bias,
               "fused_attention": fused.attention, "amp": "bf16" if cuda else "fp32",
               **({"blas": torch.backends.cuda.preferred_blas_library().name.lower()} if cuda else {}),
               **{k: getattr(args, k) for k in ("inductor", "sdpa_off", "fused_ln_config", "fused_attention_config",
                                                "fused_gelu_config") if getattr(args, k)}}  # fmt: skip
        yield _figure("train_stage2_tokens_per_s", rec["tokens_per_s"], "tokens/s", name, **tag)
        yield _figure("train_stage2_samples_per_s", rec["samples_per_s"], "segments/s", name, **tag)
        if cuda:
            peak_mib = torch.cuda.max_memory_allocated(device) / 2**20
        else:  # ru_maxrss is KiB on Linux: the process's peak, so an upper bound once other suites ran
            peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        yield _figure(
            "train_stage2_peak_memory", peak_mib, "MiB", name, kind="cuda_allocated" if cuda else "rss", **tag
        )
        peak = bf16_peak(device)
        if peak is not None:
            flops_per_sample = counted_flops_per_sample(p.model)
            yield _figure("train_stage2_mfu", flops_per_sample * rec["samples_per_s"] / peak, "fraction", name,
                          flops_per_sample=flops_per_sample, bf16_peak=peak, **tag)  # fmt: skip


def planner_suite(presets: list[str], device: torch.device, args: argparse.Namespace) -> Iterator[Figure]:
    from benchmarks.planner_throughput import random_inputs, reference_beam_search, timed
    from jowa_core.models.world_action import WorldActionModel
    from jowa_core.planning import beam_search, mcts, shares_history

    cuda = device.type == "cuda"
    reference = args.reference if args.reference is not None else not cuda
    seconds = 1.0 if args.quick else 3.0

    def synced(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                out = fn()
            return out.cpu()  # the host needs the actions: one sync per decision batch, as the agent

        return call

    methods = [("greedy", 1, 0), ("beam_bw2_h2", 2, 2), ("beam_bw4_h2", 4, 2)]
    for name in presets:
        torch.manual_seed(0)
        model = WorldActionModel(preset(name).model).to(device).eval()
        model.use_cuda_graphs = not args.no_cuda_graphs
        for n_env in (1, 16):
            history, task_ids, legal = (t.to(device) for t in random_inputs(model, n_env, 8, seed=n_env))
            for method, bw, horizon in methods:
                inputs = (model, history, task_ids, legal, bw, horizon)
                ours = synced(lambda inputs=inputs: beam_search(*inputs)[0])
                ours()  # warm-up
                t_ours, a_ours = timed(ours, seconds, 200)
                tag = {"envs": n_env, "method": method, "cuda_graphs": cuda and model.use_cuda_graphs}
                shared = horizon > 0 and shares_history(model, n_env, device)
                yield _figure(f"planner_{method}_envs{n_env}", n_env / t_ours, "decisions/s", name,
                              shared_history=shared, **tag)  # fmt: skip
                if horizon > 0:  # the A/B behind the default: the other history layout
                    other = synced(lambda inputs=inputs, s=not shared: beam_search(*inputs, share_prefix=s)[0])
                    other()
                    t_other, a_other = timed(other, seconds, 200)
                    yield _figure(f"planner_{method}_envs{n_env}_{'copied' if shared else 'shared'}_history",
                                  n_env / t_other, "decisions/s", name, shared_history=not shared,
                                  actions_match=bool(torch.equal(a_ours, a_other)), **tag)  # fmt: skip
                if reference:
                    ref = synced(lambda inputs=inputs: reference_beam_search(*inputs)[0])
                    t_ref, a_ref = timed(ref, seconds, 50)
                    yield _figure(f"planner_{method}_envs{n_env}_per_node_reference", n_env / t_ref, "decisions/s",
                                  name, **tag)  # fmt: skip
                    yield _figure(f"planner_{method}_envs{n_env}_speedup", t_ref / t_ours, "x", name,
                                  actions_match=bool(torch.equal(a_ours, a_ref)), **tag)  # fmt: skip
        history, task_ids, legal = (t.to(device) for t in random_inputs(model, 16, 8, seed=16))
        args_mcts = (model, history, task_ids, legal)
        run = synced(lambda args_mcts=args_mcts: mcts(*args_mcts, horizon=2, num_simulations=20))
        run()
        t_mcts, _ = timed(run, seconds, 20)
        yield _figure("planner_mcts_h2_sims20_envs16", 16 / t_mcts, "decisions/s", name, envs=16, method="mcts")


def tokenizer_suite(presets: list[str], device: torch.device, args: argparse.Namespace) -> Iterator[Figure]:
    from benchmarks.tokenizer_throughput import cache_build_fps, encode_fps, train_fps
    from jowa_core.config import TokenizerConfig

    cuda = device.type == "cuda"
    repeats = 3 if args.quick else 5
    configs = [("tiny", preset("tiny").tokenizer)]
    if cuda or "jowa_40m" in presets and not args.quick:
        configs.append(("official", TokenizerConfig()))
    for name, cfg in configs:
        small = name == "tiny" or not cuda
        train_batch = preset("tiny").train.tokenizer_batch_size if name == "tiny" else (64 if small else 256)
        encode_batch = 256 if small else 1024
        tag = {"amp": "bf16" if cuda else "fp32"}
        yield _figure("tokenizer_train_frames_per_s", train_fps(cfg, train_batch, repeats, device), "frames/s", name,
                      batch_size=train_batch, **tag)  # fmt: skip
        yield _figure("tokenizer_encode_frames_per_s", encode_fps(cfg, encode_batch, repeats, device), "frames/s",
                      name, batch_size=encode_batch, **tag)  # fmt: skip
        if name == "tiny":
            n = 2048 if args.quick else 8192
            yield _figure("token_cache_build_frames_per_s", cache_build_fps(cfg, n, encode_batch, device), "frames/s",
                          name, frames=n, batch_size=encode_batch)  # fmt: skip


def data_suite(presets: list[str], device: torch.device, args: argparse.Namespace) -> Iterator[Figure]:
    from torch.utils.data import DataLoader

    from benchmarks.segment_throughput import make_source
    from jowa_core.data.segments import SegmentSampler
    from jowa_core.runtime import available_cores

    rng = np.random.default_rng(0)
    seconds = 1.0 if args.quick else 3.0
    batch = 32
    sources = [make_source(g, 100_000, 8, 4, rng) for g in ("Pong", "Breakout")]
    sampler = SegmentSampler(sources, batch, seed=0)
    sampler.batch(0)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        sampler.batch(n)
        n += 1
    yield _figure("data_sampler_segments_per_s", n * batch / (time.perf_counter() - t0), "segments/s", None,
                  batch_size=batch)  # fmt: skip
    for workers in sorted({2, min(4, available_cores())}):
        it = iter(DataLoader(SegmentSampler(sources, batch, seed=0), batch_size=None, num_workers=workers))
        next(it)  # worker start-up is not counted
        m, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            next(it)
            m += 1
        yield _figure("data_loader_segments_per_s", m * batch / (time.perf_counter() - t0), "segments/s", None,
                      workers=workers, batch_size=batch)  # fmt: skip
        del it
    try:
        import ale_py  # noqa: F401
    except ImportError:
        yield _figure("collect_transitions_per_s", float("nan"), "transitions/s", None, skipped="ale-py not installed")
        return
    from jowa_core.data.collect import collect

    n_tr = 4000 if args.quick else 20_000
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        collect("Pong", n_tr, Path(tmp) / "Pong.h5", "random", num_envs=8, seed=0, progress=False)
        yield _figure("collect_transitions_per_s", n_tr / (time.perf_counter() - t0), "transitions/s", None,
                      game="Pong", policy="random", num_envs=8, cores=available_cores())  # fmt: skip


SUITE_FNS = {"train": train_suite, "planner": planner_suite, "tokenizer": tokenizer_suite, "data": data_suite}


# ---------------------------------------------------------------------------------------------
# Output


def markdown_table(figures: list[Figure]) -> str:
    """The README's Performance table: one row per figure, the settings that matter in 'details'."""
    keep = ("envs", "batch_size", "workers", "compile", "fused_ln", "fused_qkv", "fused_bias_gelu", "fused_branch_bias",
            "fused_attention", "inductor", "sdpa_off", "fused_gelu_config",
            "fused_ln_config", "fused_attention_config", "blas", "cuda_graphs", "shared_history", "amp", "actions_match", "skipped")  # fmt: skip
    lines = ["| figure | preset | value | unit | details |", "| --- | --- | ---: | --- | --- |"]
    for f in figures:
        details = ", ".join(f"{k}={f[k]}" for k in keep if k in f)
        value = f["value"]
        shown = "n/a" if math.isnan(value) else (f"{value:.3g}" if abs(value) < 10 else f"{value:,.0f}")
        lines.append(f"| {f['name']} | {f['preset'] or ''} | {shown} | {f['unit']} | {details} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    ap.add_argument("--suite", nargs="+", choices=SUITES, default=list(SUITES))
    ap.add_argument(
        "--preset",
        nargs="+",
        choices=PRESETS,
        default=None,
        help="world-action presets (default: tiny and jowa_40m on CPU, all four on CUDA)",
    )
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="shorter timings (a smoke run of the suite)")
    ap.add_argument("--steps", type=int, default=None, help="train: timed optimizer steps (after as many warm-up)")
    ap.add_argument("--batch-size", type=int, default=None, help="train: segments per step (default per device)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the library's split)")
    ap.add_argument("--no-compile", action="store_true", help="train: eager on CUDA too")
    ap.add_argument("--no-fused-ln", action="store_true", help="train: inductor's LayerNorm kernels on CUDA too")
    ap.add_argument(
        "--fused-qkv",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train: one product for queries, keys and values (default: on CUDA only)",
    )
    ap.add_argument("--fused-bias-gelu", action=argparse.BooleanOptionalAction, default=None,
                    help="train: each MLP's first bias add and GELU as one op (fused_gelu; default: on CUDA only)")  # fmt: skip
    ap.add_argument("--fused-branch-bias", action=argparse.BooleanOptionalAction, default=None,
                    help="train: each residual branch's last bias inside the fused LayerNorm op (default: with it)")  # fmt: skip
    ap.add_argument("--fused-attention", action=argparse.BooleanOptionalAction, default=None,
                    help="train: the Triton flash-attention op on the packed QKV product (default: on CUDA only)")  # fmt: skip
    ap.add_argument(
        "--reference",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="planner: also time the per-node reference (default: on CPU only)",
    )
    ap.add_argument("--no-cuda-graphs", action="store_true", help="planner: eager decoding on CUDA too")
    ap.add_argument("--inductor", nargs="*", default=[], metavar="KEY=VALUE",
                    help="torch._inductor.config settings for the whole process, e.g. max_autotune_gemm=1")  # fmt: skip
    ap.add_argument("--sdpa-off", nargs="*", default=[], metavar="BACKEND",
                    help="SDPA backends to turn off for the whole process, e.g. cudnn")  # fmt: skip
    ap.add_argument("--fused-ln-config", default=None, metavar="JSON",
                    help="train: a fused_ln.KernelConfig (fields as benchmarks.fused_ln_sweep --best writes)")  # fmt: skip
    ap.add_argument("--fused-attention-config", default=None, metavar="JSON",
                    help="train: a fused_attention.KernelConfig (as benchmarks.attention_sweep --best writes)")  # fmt: skip
    ap.add_argument("--fused-gelu-config", default=None, metavar="JSON",
                    help="train: a fused_gelu.KernelConfig (as benchmarks.bias_gelu_sweep --best writes)")  # fmt: skip
    ap.add_argument("--jsonl", type=Path, default=None, help="also append every figure to this file")
    ap.add_argument("--markdown", type=Path, default=None, help="write the markdown table here at the end")
    args = ap.parse_args(argv)
    if args.inductor or args.sdpa_off or args.fused_ln_config or args.fused_attention_config or args.fused_gelu_config:
        from benchmarks import profile_train as pt  # profile_train's switches, for the loop-level A/B

        pt.apply_inductor_settings(args.inductor)
        pt.disable_sdpa_backends(args.sdpa_off)
        pt.apply_kernel_configs(args, ap)
    device = resolve_device(args.device)
    presets = args.preset or (list(PRESETS) if device.type == "cuda" else ["tiny", "jowa_40m"])
    if args.threads:
        torch.set_num_threads(args.threads)
    common = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "command": "python -m benchmarks " + shlex.join(argv if argv is not None else sys.argv[1:]),
    }
    figures: list[Figure] = []
    failed = []
    for suite in args.suite:
        try:
            for fig in SUITE_FNS[suite](presets, device, args):
                fig = {**fig, **common, "suite": suite}
                figures.append(fig)
                line = json.dumps(fig)
                print(line, flush=True)
                if args.jsonl is not None:
                    with open(args.jsonl, "a") as fh:
                        fh.write(line + "\n")
        except Exception:  # noqa: BLE001 - one broken suite must not hide the others' figures
            failed.append(suite)
            traceback.print_exc()
    table = markdown_table(figures)
    header = f"Device: {common['device_name']}, torch {common['torch']}, {os.cpu_count()} CPUs. Command: `{common['command']}`\n\n"
    if args.markdown is not None:
        args.markdown.write_text(header + table + "\n")
    print(header + table, file=sys.stderr)
    if failed:
        print(f"suites that failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
