"""World-action training throughput, stage 2 (the joint loss): prints one JSON object.

    python benchmarks/train_throughput.py [--preset tiny jowa_40m] [--device auto] [--steps 4]
                                          [--batch-size 8] [--threads N]

Runs the real loop (``jowa_core.training.train_world_action``, stage 2 only) on synthetic token
caches of two games, for 2 x ``--steps`` optimizer steps with ``log_every = --steps``, and reports the
second interval (the first holds start-up and warm-up). tokens/s counts every input token of a
segment (8 steps x 37 = 296, padding included). On CUDA it also reports MFU: model FLOPs per token
(nanoGPT's estimate: 6 N + 12 layers d T, N the trainable parameters without embeddings) times
tokens/s over the device's dense bf16 peak, when the device is in the table below.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import h5py
import numpy as np
import torch

from jowa_core import games
from jowa_core.config import WorldActionConfig, preset
from jowa_core.data.token_cache import CACHE_FORMAT_VERSION
from jowa_core.models.world_action import WorldActionModel
from jowa_core.runtime import resolve_device
from jowa_core.training import read_metrics, train_world_action

# dense bf16 tensor-core peaks (FLOP/s), matched against torch.cuda.get_device_name
BF16_PEAK = {"H200": 989e12, "H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 PCIe": 756e12, "H100": 989e12,
             "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12, "4090": 165e12}  # fmt: skip


def write_cache(path: Path, game: str, vocab: int, n: int, rng: np.random.Generator) -> Path:
    """A token cache in the ``<Game>.tokens.h5`` layout with random tokens and episodes of 50-500 steps."""
    lengths = rng.integers(50, 500, n // 50 + 1)
    starts = np.r_[0, np.cumsum(lengths)]
    starts = starts[starts < n]
    terminals = np.zeros(n, bool)
    terminals[np.r_[starts[1:] - 1, n - 1]] = True
    with h5py.File(path, "w") as f:
        f["tokens"] = rng.integers(0, vocab, (n, 36)).astype(np.uint16)
        f["actions"] = rng.choice(np.flatnonzero(games.legal_mask(game)), n).astype(np.uint8)
        f["rewards"] = rng.choice([-1.0, 0.0, 1.0], n).astype(np.float32)
        f["terminals"], f["truncations"] = terminals, np.zeros(n, bool)
        f["episode_starts"] = starts.astype(np.int64)
        f["episode_returns"] = np.zeros(len(starts), np.float32)
        a = f.attrs
        a["cache_format_version"] = CACHE_FORMAT_VERSION
        a.update(tokenizer_hash="benchmark", game=game, task_id=games.task_id(game), source="synthetic")
        a.update(source_path="none", source_num_transitions=n, vocab_size=vocab)
    return path


def flops_per_token(name: str) -> float:
    cfg = preset(name).model
    with torch.device("meta"):
        model = WorldActionModel(cfg)
    embeddings = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    n = model.num_parameters() - embeddings
    return 6 * n + 12 * cfg.num_layers * cfg.embed_dim * cfg.max_tokens


def counted_flops_per_sample(cfg: WorldActionConfig) -> float:
    """Training FLOPs of one full-window segment for MFU: 3x the forward's (and the target head's), counted
    by ``torch.utils.flop_counter`` on the meta device (attention in full, heads where they run)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = WorldActionModel(cfg)
    x = torch.zeros(1, cfg.max_tokens, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        out = model(x, torch.zeros(1, dtype=torch.long, device="meta"))
        model.q_target_logits(out.q_hidden)
    return 3.0 * counter.get_total_flops()


def bf16_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in BF16_PEAK.items() if k in name), None)


def measure(name: str, device: torch.device, steps: int, batch_size: int, threads: int | None, tmp: Path) -> dict:
    p = preset(name)
    rng = np.random.default_rng(0)
    caches = [write_cache(tmp / f"{g}.tokens.h5", g, p.model.obs_vocab_size, 20_000, rng) for g in ("Pong", "Breakout")]
    run = tmp / f"run_{name}"
    train_world_action(p, caches, run, stage1_steps=0, stage2_steps=2 * steps, batch_size=batch_size,
                       log_every=steps, save_every=10**9, device=device, resume=False, progress=False,
                       num_threads=threads, keep_last=1)  # fmt: skip
    rec = read_metrics(run)[-1]
    out = {"preset": name, "device": str(device), "batch_size": batch_size, "steps_timed": steps,
           "samples_per_s": round(rec["samples_per_s"], 3), "tokens_per_s": round(rec["tokens_per_s"], 1),
           "trainable_params": preset(name).model.num_parameters()}  # fmt: skip
    peak = bf16_peak(device)
    if peak is not None:
        out["mfu"] = round(flops_per_token(name) * rec["tokens_per_s"] / peak, 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", nargs="+", default=["tiny", "jowa_40m"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=4, help="timed optimizer steps (after as many warm-up steps)")
    ap.add_argument("--batch-size", type=int, default=8, help="segments per optimizer step")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the library's split)")
    args = ap.parse_args()
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        results = [measure(n, device, args.steps, args.batch_size, args.threads, Path(tmp)) for n in args.preset]
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}  # fmt: skip
    print(json.dumps({"benchmark": "train_throughput_stage2", **info, "results": results}, indent=2))


if __name__ == "__main__":
    main()
