"""Segment sampling throughput: segments per second from in-memory tokens (prints one JSON object).

    python benchmarks/segment_throughput.py [--transitions 200000] [--batch-size 32] [--games 1]

Measures ``SegmentSampler.batch`` (game draw, segment draw, vectorised gather, torch conversion) in one
process with one torch thread, on random token-sized data with random episode lengths. Also reports a
two-worker DataLoader figure and, with ``--h5-frames N``, frames read from a gzip-chunked dataset file.
Target: >= 20,000 segments/s on 2 cores (in-memory tokens).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from jowa_core import games
from jowa_core.data.format import DatasetWriter
from jowa_core.data.segments import SegmentSampler, SegmentSource


def make_source(game: str, n: int, length: int, stride: int, rng: np.random.Generator) -> SegmentSource:
    lengths = rng.integers(200, 3000, n // 200 + 1)
    starts = np.r_[0, np.cumsum(lengths)]
    starts = starts[starts < n]
    terminals = np.zeros(n, bool)
    terminals[np.r_[starts[1:] - 1, n - 1]] = True
    return SegmentSource.from_arrays(
        game,
        actions=rng.integers(0, 18, n).astype(np.uint8),
        rewards=rng.choice([-1.0, 0.0, 1.0], n).astype(np.float32),
        terminals=terminals,
        episode_starts=starts,
        tokens=rng.integers(0, 2048, (n, 36)).astype(np.uint16),
        segment_length=length,
        stride=stride,
    )


def h5_frames_figure(n: int, batch_size: int, seconds: float, rng: np.random.Generator) -> dict[str, float]:
    """Segments/s reading frames from a gzip-chunked dataset file (synthetic blocky frames, 21x21 blocks)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "Pong.h5"
        with DatasetWriter(path, "Pong", source="collected") as w:
            for a in range(0, n, 1000):
                t = min(1000, n - a)
                small = rng.integers(0, 4, (t, 21, 21), dtype=np.uint8) * 60
                obs = np.repeat(np.repeat(small, 4, axis=1), 4, axis=2)
                w.add_episode(obs, np.zeros(t, int), np.zeros(t), np.r_[np.zeros(t - 1, bool), True])
        out = {}
        for in_memory in (False, True):
            src = SegmentSource(path, in_memory=in_memory)
            src.fetch(np.arange(1))
            m, elapsed = timed(lambda i, src=src: src.fetch(rng.integers(0, src.num_segments, batch_size)), seconds)
            out[f"h5_frames_{'in_memory' if in_memory else 'from_file'}_segments_per_s"] = round(
                m * batch_size / elapsed
            )
            src.close()
        return out


def timed(fn, seconds: float) -> tuple[int, float]:
    n, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        fn(n)
        n += 1
    return n, elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--transitions", type=int, default=200_000, help="transitions per game")
    p.add_argument("--games", type=int, default=1, help="number of games (sources) mixed per batch")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--length", type=int, default=8)
    p.add_argument("--stride", type=int, default=4)
    p.add_argument("--seconds", type=float, default=3.0, help="measuring time per figure")
    p.add_argument("--no-dataloader", action="store_true", help="skip the 2-worker DataLoader figure")
    p.add_argument("--h5-frames", type=int, default=0, help="also time frames read from an N-transition dataset file")
    args = p.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    sources = [make_source(g, args.transitions, args.length, args.stride, rng) for g in games.GAMES[: args.games]]
    sampler = SegmentSampler(sources, args.batch_size, seed=0)
    sampler.batch(0)  # warm-up

    n, elapsed = timed(sampler.batch, args.seconds)
    fetch_n, fetch_elapsed = timed(
        lambda i: sources[0].fetch(rng.integers(0, sources[0].num_segments, args.batch_size)), args.seconds
    )
    result = {
        "benchmark": "segment_throughput",
        "transitions_per_game": args.transitions,
        "games": args.games,
        "batch_size": args.batch_size,
        "segment_length": args.length,
        "stride": args.stride,
        "segments_per_game": sources[0].num_segments,
        "sampler_segments_per_s": round(n * args.batch_size / elapsed),
        "sampler_ms_per_batch": round(1000 * elapsed / n, 4),
        "fetch_only_segments_per_s": round(fetch_n * args.batch_size / fetch_elapsed),
        "torch_threads": torch.get_num_threads(),
    }
    if not args.no_dataloader:
        loader = DataLoader(SegmentSampler(sources, args.batch_size, seed=0), batch_size=None, num_workers=2)
        it = iter(loader)
        next(it)  # worker start-up is not counted
        m, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < args.seconds:
            next(it)
            m += 1
        result["dataloader_2_workers_segments_per_s"] = round(m * args.batch_size / (time.perf_counter() - t0))
        del it
    if args.h5_frames:
        result["h5_frames_transitions"] = args.h5_frames
        result.update(h5_frames_figure(args.h5_frames, args.batch_size, args.seconds, rng))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
