"""Process-level helpers: the CPU-thread split, two runs side by side, seeding, devices and atomic file writes.

One helper decides the thread split because oversubscribing 2 cores made torch 5x slower in a
measurement: torch threads + environment workers + DataLoader workers never exceed the free cores.
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        return os.cpu_count() or 1


def configure_threads(env_workers: int = 0, loader_workers: int = 0) -> int:
    """Give torch the cores left after env and loader workers (at least 1). Returns torch's count."""
    n = max(1, available_cores() - env_workers - loader_workers)
    torch.set_num_threads(n)
    return n


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_pair(
    main: Callable[..., Any],
    side: Callable[..., Any],
    *,
    device: str | torch.device | None = "auto",
    num_threads: int | None = None,
    parallel: bool | None = None,
) -> tuple[Any, Any]:
    """``(main(), side())``: two training runs that take ``progress`` and ``num_threads`` keywords (a run and
    its baseline), one after the other, or with ``parallel`` ``side`` in a spawned process beside ``main``.

    ``parallel`` defaults to on for a CPU with at least 2 free cores. Then each run gets one torch thread
    (``main`` keeps ``num_threads`` when given) and ``side`` runs quietly: on 2 cores that is faster than one
    after the other with 2 threads each (notebooks 03 and 05 train this way). ``side`` must pickle
    (a module-level function, or a ``functools.partial`` of one with picklable arguments), and so must its
    result; its error is re-raised here after ``main`` has finished.
    """
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    if parallel is None:
        parallel = resolve_device(device).type == "cpu" and available_cores() >= 2
    if not parallel:
        return main(), side()
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        job = pool.submit(side, progress=False, num_threads=1)
        first = main(num_threads=num_threads or 1)
        return first, job.result()


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' picks CUDA when available; an explicit 'cuda' without a GPU gets a clear error."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} was asked for but torch sees no CUDA GPU; use device='cpu' or 'auto'.")
    return dev


def synchronize(device: torch.device) -> None:
    """Wait until the device has run all the work queued on it. A throughput read without it counts the
    steps the host has queued, not the ones the GPU has run: CUDA lets the host run ahead by up to its
    launch queue, and the training loop's figures read about 5 % high that way until session 17."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".partial") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    A killed or failing writer leaves at most a ``*.partial`` file, never a file that looks whole.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def truncate_jsonl(path: str | os.PathLike, step: int) -> None:
    """Drop JSONL records logged after ``step`` (a resumed run writes them again), atomically."""
    import json

    path = Path(path)
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(ln + "\n" for ln in keep))
