"""Tokenizer throughput: token-cache building and tiny-preset training steps, in frames/s.

Prints one JSON object. ``*_encode_*`` and ``*_train_*`` use random uint8 frames already in memory
(compute only); ``tiny_cache_build_frames_per_s`` runs ``build_token_cache`` end to end on a
temporary gzip-compressed HDF5 dataset (read, decompress, encode, write).

    python benchmarks/tokenizer_throughput.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from jowa_core.config import TokenizerConfig, preset
from jowa_core.data.format import DatasetWriter
from jowa_core.data.token_cache import build_token_cache
from jowa_core.models.tokenizer import Tokenizer, changed_pixel_mask, tokenizer_loss
from jowa_core.runtime import resolve_device


def _time(fn, warmup: int, repeats: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def encode_fps(cfg: TokenizerConfig, batch: int, repeats: int, device: torch.device) -> float:
    tok = Tokenizer(cfg).to(device).eval()
    x = torch.randint(0, 256, (batch, 1, 84, 84), dtype=torch.uint8, device=device)
    return batch / _time(lambda: tok.encode(x), 1, repeats, device)


def train_fps(cfg: TokenizerConfig, batch: int, repeats: int, device: torch.device) -> float:
    tok = Tokenizer(cfg).to(device).train()
    opt = torch.optim.Adam(tok.parameters(), lr=1e-4)
    x = torch.randint(0, 256, (batch, 1, 84, 84), dtype=torch.uint8, device=device)
    prev = torch.randint(0, 256, (batch, 1, 84, 84), dtype=torch.uint8, device=device)
    mask = changed_pixel_mask(x, prev)

    def step() -> None:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = tok(x)
        loss = tokenizer_loss(out, x.float() / 255.0, cfg, mask)["total"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tok.parameters(), 1.0)
        opt.step()

    return batch / _time(step, 2, repeats, device)


def cache_build_fps(cfg: TokenizerConfig, n_frames: int, batch: int, device: torch.device) -> float:
    rng = np.random.default_rng(0)
    tok = Tokenizer(cfg).to(device).eval()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "Pong.h5"
        with DatasetWriter(path, "Pong", source="collected") as w:
            obs = rng.integers(0, 256, (n_frames, 84, 84), dtype=np.uint8)
            w.add_episode(obs, np.zeros(n_frames, int), np.zeros(n_frames), np.r_[np.zeros(n_frames - 1, bool), True])
        t0 = time.perf_counter()
        build_token_cache(path, tok, batch_size=batch, device=device, progress=False)
        return n_frames / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--batch-size", type=int, default=0, help="training batch (frames); 0 means the tiny preset's")
    ap.add_argument("--encode-batch", type=int, default=256, help="encoding batch (frames), as build_token_cache")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cache-frames", type=int, default=2048, help="frames in the temporary dataset")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--official", action="store_true", help="also time the official-size tokenizer")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    torch.manual_seed(0)
    tiny_preset = preset("tiny")
    tiny = tiny_preset.tokenizer
    batch = args.batch_size or tiny_preset.train.tokenizer_batch_size
    res = {
        "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "tiny_train_frames_per_s": round(train_fps(tiny, batch, args.repeats, dev), 1),
        "tiny_train_batch": batch,
        "tiny_encode_frames_per_s": round(encode_fps(tiny, args.encode_batch, args.repeats, dev), 1),
        "tiny_cache_build_frames_per_s": round(cache_build_fps(tiny, args.cache_frames, args.encode_batch, dev), 1),
        "tiny_params": Tokenizer(tiny).num_parameters(),
    }
    if args.official:
        official = TokenizerConfig()
        res["official_encode_frames_per_s"] = round(
            encode_fps(official, args.encode_batch, max(1, args.repeats // 2), dev), 1
        )
        res["official_train_frames_per_s"] = round(train_fps(official, min(batch, 16), 2, dev), 1)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
