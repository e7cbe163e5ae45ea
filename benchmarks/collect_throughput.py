"""Collection throughput: transitions/s of ``collect`` including the file write (prints one JSON object).

    python benchmarks/collect_throughput.py [--game Pong] [--transitions 20000] [--num-envs 8]

Reports ``collect`` with the uniform random policy (env stepping + policy + episode buffering + gzip
HDF5 write), the raw vectorised env alone (random legal actions, no storage), and the emulator's
single-core ceiling (``ALEInterface.act`` in a loop, frames/s / frame skip). CPU seconds per 1,000
transitions are reported beside wall-clock rates because they move less when other processes share
the cores. Target: >= 5,000 transitions/s on 2 free cores.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from jowa_core import games
from jowa_core.data.collect import collect
from jowa_core.envs import AtariVecEnv, EnvConfig
from jowa_core.runtime import available_cores


def _timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def env_steps(game: str, n: int, num_envs: int, backend: str) -> dict[str, float]:
    with AtariVecEnv(game, num_envs, EnvConfig.official(), seed=0, backend=backend) as env:
        env.reset()
        legal = np.array(games.legal_actions(game))
        actions = legal[np.random.default_rng(0).integers(0, len(legal), (n // num_envs + 1, num_envs))]

        def run():
            for a in actions:
                env.step(a)

        wall, cpu = _timed(run)
    steps = len(actions) * num_envs
    return {"steps_per_s": steps / wall, "cpu_s_per_1k": 1000 * cpu / steps}


def emulator_ceiling(game: str, frames: int = 20000) -> float:
    """Agent steps/s one core can emulate (frame skip 4, no preprocessing): the physical limit per core."""
    import ale_py
    from ale_py import roms

    ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Error)
    ale = ale_py.ALEInterface()
    ale.loadROM(roms.get_rom_path(games.rom_id(game)))
    actions = ale.getMinimalActionSet()

    def run():
        for i in range(frames):
            ale.act(actions[(i // 16) % len(actions)])
            if ale.game_over():
                ale.reset_game()

    wall, _ = _timed(run)
    return frames / wall / 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--game", default="Pong")
    ap.add_argument("--transitions", type=int, default=20_000)
    ap.add_argument("--num-envs", type=int, default=8)
    ap.add_argument("--backend", default="native", choices=["native", "python"])
    ap.add_argument("--policy", default="random")
    args = ap.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]

    raw = env_steps(args.game, args.transitions, args.num_envs, args.backend)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.h5"
        wall, cpu = _timed(
            lambda: collect(
                args.game,
                args.transitions,
                out,
                args.policy,
                num_envs=args.num_envs,
                seed=0,
                backend=args.backend,
                progress=False,
            )
        )
        size = out.stat().st_size
    result = {
        "game": args.game,
        "transitions": args.transitions,
        "num_envs": args.num_envs,
        "backend": args.backend,
        "policy": args.policy,
        "cores": available_cores(),
        "collect_transitions_per_s": round(args.transitions / wall, 1),
        "collect_cpu_s_per_1k": round(1000 * cpu / args.transitions, 3),
        "collect_wall_s_incl_env_start": round(wall, 2),
        "env_steps_per_s": round(raw["steps_per_s"], 1),
        "env_cpu_s_per_1k": round(raw["cpu_s_per_1k"], 3),
        "emulator_ceiling_steps_per_s_per_core": round(emulator_ceiling(args.game), 1),
        "file_bytes_per_transition": round(size / args.transitions, 1),
        "loadavg_1min_before": round(load_before, 2),
        "target_transitions_per_s": 5000,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
